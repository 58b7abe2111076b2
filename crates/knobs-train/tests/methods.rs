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
        let mut sd = StableDiffusion::from_dir(&model, &dev).unwrap();
        sd.vae.for_inference();
        let mut adapters = PipelineAdapters::new(0);
        let attached = method.attach(&cfg, &mut sd, &mut adapters).unwrap();
        assert!(!attached.trainable.is_empty(), "{method}");
        set_trainable(&cfg, &mut sd, &attached.trainable).unwrap();
        let mut trainable = std::collections::BTreeSet::new();
        sd.for_each_param(|p, t| {
            if t.is_trainable() {
                trainable.insert(p.to_string());
            }
        });
        let unused = knobs_diffusion::pipeline::sdxl::unused_param_prefixes(&sd);
        let expected: std::collections::BTreeSet<String> =
            attached.trainable.iter().filter(|p| !unused.iter().any(|u| p.starts_with(u.as_str()))).cloned().collect();
        assert_eq!(trainable, expected, "{method}: the trainable parameters are exactly the attached ones the pipeline reads");
        if cfg.train_text_encoder {
            for encoder in ["text_encoder.", "text_encoder_2."] {
                assert!(trainable.iter().any(|p| p.starts_with(encoder)), "{method}: nothing of {encoder} trains");
            }
        }
        let res = resolution(&sd);
        let examples = data::instance_examples(&cfg, res).unwrap();
        let mut rng = step_rng(0, "test", 0);
        let images: Vec<_> = examples.iter().take(2).map(|e| data::crop(e, res, true, false, &mut rng)).collect();
        let prompts: Vec<String> = examples.iter().take(2).map(|e| e.prompt.replace("sks", "<knobs-star>")).collect();
        let loss = Objective::new(&sd, &dev).per_sample(&sd, &images, &prompts, &mut rng, Default::default()).unwrap().mean();
        let grads = collect_grads(&sd, &loss.backward());
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
