//! Every registered method on the golden tiny SD pipeline and on the tiny SDXL one: what it
//! attaches trains exactly the parameters it says, every one of them gets a gradient from the
//! denoising loss, and no frozen parameter does.
use std::path::PathBuf;

use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::ModuleExt;
use knobs_nn::optim::collect_grads;
use knobs_train::finetune::config::TrainConfig;
use knobs_train::finetune::methods::OptionGroup;
use knobs_train::finetune::trainer::set_trainable;
use knobs_train::finetune::{Method, data};
use knobs_train::objective::{Objective, resolution};
use knobs_train::rng::step_rng;

fn tiny_sd() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd"))
}

fn tiny_sdxl() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/tiny-sdxl"))
}

fn config(method: Method, model: PathBuf) -> TrainConfig {
    let mut cfg = TrainConfig { method, model: Some(model), ..Default::default() };
    cfg.data.concept = Some("striped-star".into());
    if method.options().contains(&OptionGroup::Tokens) {
        // `sks` is a word of the real CLIP vocabulary tiny-sd carries.
        cfg.tokens.placeholder_token = Some("<knobs-star>".into());
        cfg.tokens.initializer_token = Some("star".into());
    }
    cfg
}

#[test]
fn each_method_trains_exactly_what_it_attaches() {
    trains_exactly_what_it_attaches(tiny_sd());
}

/// On SDXL the loss also runs through the second text encoder, the pooled embedding and the
/// time ids; textual inversion's rows in both encoders must get gradients.
#[test]
fn each_method_trains_exactly_what_it_attaches_on_sdxl() {
    trains_exactly_what_it_attaches(tiny_sdxl());
}

/// Every method that can train the text encoders, training them (on SDXL: both, but not the
/// first encoder's last layer, which SDXL never reads).
#[test]
fn each_method_trains_the_text_encoders_on_sdxl() {
    let methods: Vec<Method> = Method::all().iter().copied().filter(|m| !m.own_loop() && m.options().contains(&OptionGroup::TextEncoder)).collect();
    assert!(methods.len() >= 2, "{methods:?}");
    for method in methods {
        let mut cfg = config(method, tiny_sdxl());
        cfg.train_text_encoder = true;
        check_method(cfg, tiny_sdxl());
    }
}

fn trains_exactly_what_it_attaches(model: PathBuf) {
    for &method in Method::all().iter().filter(|m| !m.own_loop()) {
        check_method(config(method, model.clone()), model.clone());
    }
}

fn check_method(cfg: TrainConfig, model: PathBuf) {
    let method = cfg.method;
    {
        cfg.validate().unwrap();
        let dev = knobs_nn::cpu_autodiff();
        let (sd, _adapters, attached) = prepared(&cfg, &model, &dev);
        assert!(!attached.is_empty(), "{method}");
        let mut trainable = std::collections::BTreeSet::new();
        sd.for_each_param(|p, t| {
            if t.is_trainable() {
                trainable.insert(p.to_string());
            }
        });
        let unused = knobs_diffusion::pipeline::sdxl::unused_param_prefixes(&sd);
        let expected: std::collections::BTreeSet<String> =
            attached.iter().filter(|p| !unused.iter().any(|u| p.starts_with(u.as_str()))).cloned().collect();
        assert_eq!(trainable, expected, "{method}: the trainable parameters are exactly the attached ones the pipeline reads");
        if cfg.train_text_encoder {
            for encoder in ["text_encoder.", "text_encoder_2."] {
                assert!(trainable.iter().any(|p| p.starts_with(encoder)), "{method}: nothing of {encoder} trains");
            }
        }
        let grads = collect_grads(&sd, &batch_loss(&cfg, &sd, &dev).backward());
        let with_grad: std::collections::BTreeSet<String> = grads.keys().cloned().collect();
        assert_eq!(with_grad, trainable, "{method}: gradients reach exactly the trainable parameters");
        let nonzero = grads.values().filter(|g| (*g).clone().abs().sum().into_scalar::<f32>() > 0.0).count();
        // A factor that starts at zero silences its partners' gradients on the first step (as
        // in PEFT): LoRA's B gates A, LoHa's hada_w2_b gates the other factors, LoKr's w1
        // gates w2.
        let gated = [".lora_A.", ".hada_w1_", ".hada_w2_a.", ".hada_t", ".lokr_w2", ".lokr_t2", ".lokr_w1_b."];
        let silent = grads.keys().filter(|k| gated.iter().any(|g| k.contains(g))).count();
        assert!(nonzero + silent >= grads.len() && nonzero > 0, "{method}: {nonzero} of {} gradients are non-zero", grads.len());
    }
}

/// Every method with the UNet's resnets and transformer blocks and the text encoder's layers
/// checkpointed (recomputed in the backward pass): the loss bit for bit as without, and the gradients to rounding (the
/// graph's steps run in another order, so gradients meeting at a tensor add in another order:
/// measured up to 2.3e-5 of a gradient's largest value, a full fine-tune's conv bias), with the
/// text encoders training where the method can (the blocks' context then takes gradients
/// too), and LoRA's dropout drawing its masks again in the recomputed pass.
#[test]
fn each_method_gets_the_same_gradients_with_its_unet_blocks_checkpointed() {
    for &method in Method::all().iter().filter(|m| !m.own_loop()) {
        let mut cfg = config(method, tiny_sd());
        cfg.train_text_encoder = method.options().contains(&OptionGroup::TextEncoder);
        cfg.lora.lora_dropout = 0.25;
        let (loss, grads) = loss_and_grads(&cfg, false);
        let (loss_checkpointed, grads_checkpointed) = loss_and_grads(&cfg, true);
        assert_eq!(loss.to_bits(), loss_checkpointed.to_bits(), "{method}: loss");
        assert!(!grads.is_empty(), "{method}");
        assert_eq!(grads.keys().collect::<Vec<_>>(), grads_checkpointed.keys().collect::<Vec<_>>(), "{method}");
        let largest = grads.values().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (path, g) in &grads {
            // One that is zero but for rounding (a key projection's bias) is held to the
            // model's scale.
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3 * largest);
            let err = g.iter().zip(&grads_checkpointed[path]).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale.max(f32::MIN_POSITIVE);
            assert!(err < 1e-4, "{method}: {path} differs by {err} of its largest value");
        }
    }
}

/// The loss of one batch of tiny-sd and its gradients by parameter, checkpointed or not.
fn loss_and_grads(cfg: &TrainConfig, checkpointed: bool) -> (f32, std::collections::BTreeMap<String, Vec<f32>>) {
    let dev = knobs_nn::cpu_autodiff();
    let (mut sd, _adapters, _) = prepared(cfg, &tiny_sd(), &dev);
    sd.for_each_layer_mut(|_, mut layer| layer.set_training(true));
    sd.set_gradient_checkpointing(checkpointed);
    knobs_nn::dropout::seed_thread(3);
    let recomputed = knobs_nn::checkpoint::blocks_recomputed();
    let loss = batch_loss(cfg, &sd, &dev);
    let grads = collect_grads(&sd, &loss.backward());
    // Each resnet and transformer block ran again, but for the first resnet where none of its
    // weights train (its input and time embedding frozen too: nothing to differentiate, so
    // it runs once), and each text encoder layer where anything of the encoder trains (its
    // token embeddings or its layers); none without checkpointing.
    let u = &sd.unet;
    let transformers = |a: &[knobs_diffusion::unet::transformer::Transformer2DModel]| a.iter().map(|t| t.transformer_blocks.len()).sum::<usize>();
    let blocks = u.down_blocks.iter().map(|b| b.resnets.len() + transformers(&b.attentions)).sum::<usize>()
        + u.mid_block.iter().map(|b| b.resnets.len() + transformers(&b.attentions)).sum::<usize>()
        + u.up_blocks.iter().map(|b| b.resnets.len() + transformers(&b.attentions)).sum::<usize>();
    let mut first_trains = false;
    u.down_blocks[0].resnets[0].for_each_param(|_, p| first_trains |= p.is_trainable());
    let mut encoder_trains = false;
    sd.text_encoder.for_each_param(|_, p| encoder_trains |= p.is_trainable());
    let layers = if encoder_trains { sd.text_encoder.num_layers() } else { 0 };
    let expected = match (checkpointed, first_trains) {
        (false, _) => 0,
        (true, true) => blocks + layers,
        (true, false) => blocks - 1 + layers,
    };
    assert_eq!(knobs_nn::checkpoint::blocks_recomputed() - recomputed, expected, "{}", cfg.method);
    let values = |t: knobs_nn::Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    (loss.into_scalar::<f32>(), grads.into_iter().map(|(k, g)| (k, values(g))).collect())
}

/// The pipeline at `model` with `cfg`'s method attached and its trainable set made, the
/// adapters' manager (kept while the pipeline is used) and the attached trainable paths.
fn prepared(cfg: &TrainConfig, model: &std::path::Path, dev: &knobs_nn::Device) -> (StableDiffusion, PipelineAdapters, std::collections::BTreeSet<String>) {
    let mut sd = StableDiffusion::from_dir(model, dev).unwrap();
    sd.vae.for_inference();
    let mut adapters = PipelineAdapters::new(0);
    let attached = cfg.method.attach(cfg, &mut sd, &mut adapters).unwrap();
    set_trainable(cfg, &mut sd, &attached.trainable).unwrap();
    (sd, adapters, attached.trainable)
}

/// The mean denoising loss of the first two training examples.
fn batch_loss(cfg: &TrainConfig, sd: &StableDiffusion, dev: &knobs_nn::Device) -> knobs_nn::Tensor<1> {
    let res = resolution(sd);
    let examples = data::instance_examples(cfg, res).unwrap();
    let mut rng = step_rng(0, "test", 0);
    let images: Vec<_> = examples.iter().take(2).map(|e| data::crop(e, res, true, false, &mut rng)).collect();
    let prompts: Vec<String> = examples.iter().take(2).map(|e| e.prompt.replace("sks", "<knobs-star>")).collect();
    Objective::new(sd, dev).per_sample(sd, &images, &prompts, &mut rng, Default::default()).unwrap().mean()
}
