//! `knobs train --method hyper-lora`: zero-shot prediction, optional code optimisation and
//! rank-relaxed fine-tuning, and the files.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use image::RgbImage;
use knobs_adapters::formats::diffusers::{self as diffusers_lora, DiffusersKeys};
use knobs_adapters::formats::lora_files::ComponentLora;
use knobs_adapters::formats::peft;
use knobs_adapters::hyperlora::{HyperLora, Predicted};
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, Pattern, generated};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{read_safetensors, write_safetensors};
use knobs_nn::optim::{AdamW, AdamWConfig};
use knobs_nn::{ModuleExt, Tensor};
use knobs_world::judge::Judge;
use rand::Rng;
use rand::rngs::StdRng;

use crate::finetune::data::{crop, instance_examples};
use crate::finetune::trainer::validation_prompts;
use crate::finetune::TrainConfig;
use crate::finetune::outputs::{Sampling, Summary, size_of, write_samples};
use crate::objective::Objective;
use crate::progress::{Progress, Tick};
use crate::rng::step_rng;

use super::*;

/// What `knobs train --method hyper-lora` asks for.
#[derive(Debug, Clone)]
pub struct PersonalizeConfig {
    pub model: PathBuf,
    pub judge: PathBuf,
    pub hypernetwork_dir: PathBuf,
    pub out: PathBuf,
    /// Instance images (already at the training resolution or larger) and their prompt.
    pub images: Vec<RgbImage>,
    pub prompt: String,
    /// Steps of optimising the concept's code through the frozen hypernetwork (starting from
    /// the zero-shot code) before anything else; 0: the zero-shot code as is.
    pub code_steps: u64,
    /// Rank-relaxed fine-tuning: steps (0: zero-shot only), rank and learning rate.
    pub steps: u64,
    pub rank: usize,
    /// Images per code or rank-relaxed step (drawn with replacement from the instances).
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// `samples/`: images of `prompt` as `knobs generate --seed 0` makes them.
    pub sampling: Sampling,
}

/// A free code `[1, code_dim]` as the one trainable parameter (`code`).
struct FreeCode {
    z: Tensor<2>,
}

impl knobs_nn::Module for FreeCode {
    fn visit(&self, prefix: &str, v: &mut dyn knobs_nn::Visitor) {
        v.param(&knobs_nn::join(prefix, "code"), knobs_nn::ParamRef::D2(&self.z));
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn knobs_nn::VisitorMut) {
        v.param(&knobs_nn::join(prefix, "code"), knobs_nn::ParamMut::D2(&mut self.z));
    }
}

/// `A`, `B` and the scale of each target layer's LoRA, outside autodiff.
type Plain = BTreeMap<String, (Tensor<2>, Tensor<2>, f64)>;

fn plain(pred: &Predicted, scale: f64) -> Plain {
    pred.iter().map(|(p, a, b)| (p.clone(), (a.clone().inner(), b.clone().inner(), scale))).collect()
}

/// One LoRA equal to the sum of several (concatenated along the rank, each scale folded into
/// its `B`), with `alpha = r` so that its own scale is 1.
fn concat(parts: &[&Plain]) -> Plain {
    let mut out = Plain::new();
    for path in parts[0].keys() {
        let a = Tensor::cat(parts.iter().map(|p| p[path].0.clone()).collect(), 0);
        let b = Tensor::cat(parts.iter().map(|p| p[path].1.clone() * p[path].2).collect(), 1);
        out.insert(path.clone(), (a, b, 1.0));
    }
    out
}

/// The diffusion loss on a random pick of the instance images, one per prompt: the step body
/// that code optimisation and rank-relaxed fine-tuning share.
fn instance_loss(sd: &StableDiffusion, objective: &Objective, images: &[RgbImage], prompts: &[String], rng: &mut StdRng, what: &str, step: u64) -> Result<(Tensor<1>, f64)> {
    let batch: Vec<RgbImage> = (0..prompts.len()).map(|_| images[rng.random_range(0..images.len())].clone()).collect();
    let loss = objective.per_sample(sd, &batch, prompts, rng, Default::default())?.mean();
    let value = loss.clone().into_scalar::<f32>() as f64;
    ensure!(value.is_finite(), "{what}: loss became {value} at step {step}");
    Ok((loss, value))
}

/// Zero-shot prediction from the instance images, optional rank-relaxed fine-tuning, and the
/// files: `pytorch_lora_weights.safetensors`, `unet_lora/` (PEFT), `hyperlora_code.safetensors`,
/// `samples/` and `summary.json`.
pub fn personalize(cfg: &PersonalizeConfig, progress: Progress) -> Result<Summary> {
    ensure!(!cfg.images.is_empty(), "no instance images");
    ensure!(cfg.rank >= 1, "--rank must be at least 1");
    ensure!(cfg.batch >= 1, "--train-batch-size must be at least 1");
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("--out {}: cannot create", cfg.out.display()))?;
    let hdir = hyper_dir(&cfg.hypernetwork_dir);
    let net = HyperLora::load(&hdir, &knobs_nn::device::inference()).with_context(|| format!("--hypernetwork-dir {}", cfg.hypernetwork_dir.display()))?;
    ensure!(
        net.config.image_dim > 0,
        "--hypernetwork-dir {}: this hypernetwork has no image path, so it cannot predict from instance images",
        cfg.hypernetwork_dir.display()
    );
    let judge = Judge::load(&cfg.judge).with_context(|| format!("--judge {}", cfg.judge.display()))?;
    let dev = if cfg.steps > 0 || cfg.code_steps > 0 { knobs_nn::device::training() } else { knobs_nn::device::inference() };
    let mut sd = StableDiffusion::load(&cfg.model, &dev).with_context(|| format!("--model {}", cfg.model.display()))?;
    sd.vae.for_inference();
    sd.freeze_all();
    let res = crate::objective::resolution(&sd);
    let images: Vec<RgbImage> = cfg.images.iter().map(|i| image::imageops::resize(i, res, res, image::imageops::FilterType::Triangle)).collect();

    // Zero-shot: one forward pass of the judge and the hypernetwork.
    let emb = judge.embed(&images);
    ensure!(
        emb[0].len() == net.config.image_dim,
        "--judge {}: embeddings are {} wide, the hypernetwork was trained on {}-wide ones",
        cfg.judge.display(),
        emb[0].len(),
        net.config.image_dim
    );
    let code = net.code_from_images(embeddings_tensor(&emb, &knobs_nn::device::inference()))?;
    let mut mean = code.mean.clone();
    let mut code_loss = None;
    let mut trainable_params = 0;
    let mut step_seconds = 0.0;
    // Both optional phases draw `cfg.batch` instance images a step under the instance prompt.
    let objective = Objective::new(&sd, &dev);
    let prompts = vec![cfg.prompt.clone(); cfg.batch];
    if cfg.code_steps > 0 {
        // The concept's own code, optimised with the diffusion loss through the frozen
        // hypernetwork: the generated LoRA is rebuilt from the code every step.
        let mut frozen = HyperLora::load(&hdir, &dev)?;
        frozen.freeze_all();
        frozen.attach(&mut AdaptedModel::new(&mut sd.unet, cfg.seed), ADAPTER)?;
        sd.freeze_all();
        let mut free = FreeCode { z: Tensor::from_data(mean.to_data(), &dev) };
        free.train_only(|_| true);
        trainable_params += free.num_trainable_params();
        let mut opt = AdamW::new(AdamWConfig { lr: cfg.lr, weight_decay: 0.0, ..Default::default() });
        let looping = Instant::now();
        for step in 0..cfg.code_steps {
            let mut rng = step_rng(cfg.seed, "hyperlora-code", step);
            HyperLora::apply(&mut sd.unet, ADAPTER, &frozen.predict(free.z.clone()))?;
            let (loss, value) = instance_loss(&sd, &objective, &images, &prompts, &mut rng, "code optimisation", step)?;
            opt.minimise(&mut free, loss, 1.0, cfg.lr);
            code_loss = Some(value);
            progress(&Tick { phase: "hyper-code", step: step + 1, total: cfg.code_steps, loss: value, seconds_per_step: None });
        }
        step_seconds += looping.elapsed().as_secs_f64();
        sd.unet.for_each_layer_mut(|_, mut l| {
            l.remove_adapter(ADAPTER);
        });
        mean = Tensor::from_data(free.z.to_data(), &knobs_nn::device::inference());
    }
    let zero = plain(&net.predict(mean.clone()), net.config.scale());
    let zero_shot_seconds = started.elapsed().as_secs_f64();
    let layers: Vec<String> = net.config.layers.iter().map(|l| l.path.clone()).collect();

    let mut final_loss = None;
    let mut total = zero.clone();
    if cfg.steps > 0 {
        // Rank-relaxed: the predicted LoRA stays fixed; a zero-initialised LoRA of rank
        // `cfg.rank` learns on top of it.
        let relaxed: std::collections::BTreeSet<String> = {
            let mut unet = AdaptedModel::new(&mut sd.unet, cfg.seed);
            unet.add_adapter(ADAPTER, Box::new(LoraConfig::new(net.config.rank, net.config.alpha, Pattern::Names(layers.clone()))))?;
            unet.add_adapter("relaxed", Box::new(LoraConfig::new(cfg.rank, cfg.rank as f64, Pattern::Names(layers.clone()))))?;
            unet.adapter_param_paths("relaxed").into_iter().map(|p| format!("unet.{p}")).collect()
        };
        let fixed: BTreeMap<String, Tensor<2>> = zero
            .iter()
            .flat_map(|(p, (a, b, _))| {
                [(format!("{p}.lora_A.{ADAPTER}.weight"), Tensor::from_data(a.to_data(), &dev)), (format!("{p}.lora_B.{ADAPTER}.weight"), Tensor::from_data(b.to_data(), &dev))]
            })
            .collect();
        generated::set_tensors(&mut sd.unet, &fixed)?;
        sd.train_only(|p| relaxed.contains(p));
        trainable_params += sd.num_trainable_params();
        let mut opt = AdamW::new(AdamWConfig { lr: cfg.lr, ..Default::default() });
        let looping = Instant::now();
        for step in 0..cfg.steps {
            let mut rng = step_rng(cfg.seed, "hyperlora-relaxed", step);
            let (loss, value) = instance_loss(&sd, &objective, &images, &prompts, &mut rng, "rank-relaxed fine-tuning", step)?;
            opt.minimise(&mut sd, loss, 1.0, cfg.lr);
            final_loss = Some(value);
            progress(&Tick { phase: "hyper-lora", step: step + 1, total: cfg.steps, loss: value, seconds_per_step: None });
        }
        step_seconds += looping.elapsed().as_secs_f64();
        let mut relaxed = Plain::new();
        sd.unet.for_each_param(|path, p| {
            if let Some(rest) = path.strip_suffix(".relaxed.weight") {
                let t = Tensor::<2>::from_data(p.to_data(), &knobs_nn::device::inference());
                let (layer, part) = rest.rsplit_once('.').expect("lora path");
                let e = relaxed.entry(layer.to_string()).or_insert_with(|| (t.clone(), t.clone(), 1.0));
                if part == "lora_A" { e.0 = t } else { e.1 = t }
            }
        });
        total = concat(&[&zero, &relaxed]);
        sd.unet.for_each_layer_mut(|_, mut l| {
            l.remove_adapter(ADAPTER);
            l.remove_adapter("relaxed");
        });
    }
    // Like the trainer's: model loading and training, not the samples and files below.
    let seconds = started.elapsed().as_secs_f64();
    sd.for_inference();
    sd.device = knobs_nn::device::inference();

    // The final LoRA, attached as `default` and written like any LoRA.
    let rank = total.values().next().map(|(a, _, _)| a.dims()[0]).unwrap_or(1);
    let alpha = rank as f64 * total.values().next().map(|v| v.2).unwrap_or(1.0);
    let mut unet = AdaptedModel::new(&mut sd.unet, 0);
    unet.add_adapter("default", Box::new(LoraConfig::new(rank, alpha, Pattern::Names(layers))))?;
    let tensors: BTreeMap<String, Tensor<2>> = total
        .iter()
        .flat_map(|(p, (a, b, _))| [(format!("{p}.lora_A.default.weight"), a.clone()), (format!("{p}.lora_B.default.weight"), b.clone())])
        .collect();
    generated::set_tensors(&mut unet.model, &tensors)?;
    unet.freeze();
    let peft_dir = cfg.out.join(PEFT_DIR);
    peft::save(&unet, "default", &peft_dir)?;
    let lora_path = cfg.out.join(LORA_FILE);
    let component = ComponentLora::from_adapter(&unet, "default")?;
    diffusers_lora::save(&lora_path, &[("unet", &component)], DiffusersKeys::Diffusers)?;
    drop(unet);

    write_samples(&cfg.out, &sd, std::slice::from_ref(&cfg.prompt), cfg.sampling, &Default::default())?;

    // The compact file: the code plus the hypernetwork it belongs to.
    let code_path = cfg.out.join(CODE_FILE);
    let code_vec: Vec<f32> = mean.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let n = code_vec.len();
    let meta = HashMap::from([
        ("format".to_string(), "knobs-hyperlora-code".to_string()),
        ("hypernetwork".to_string(), hdir.display().to_string()),
        ("hyperlora_config_fnv1a".to_string(), config_hash(&net.config)?),
        ("relaxed_steps".to_string(), cfg.steps.to_string()),
        ("code_steps".to_string(), cfg.code_steps.to_string()),
    ]);
    write_safetensors(&code_path, &BTreeMap::from([("code".to_string(), TensorData::new(code_vec, [n]))]), &meta)?;

    let outputs = vec![lora_path.clone(), peft_dir, code_path.clone()];
    let relaxing = cfg.steps + cfg.code_steps;
    let extra = serde_json::json!({
        "zero_shot_seconds": zero_shot_seconds,
        "code_steps": cfg.code_steps,
        "code_loss": code_loss,
        "lora_rank": rank,
        "code_bytes": size_of(std::slice::from_ref(&code_path)),
        "lora_bytes": size_of(std::slice::from_ref(&lora_path)),
    });
    let summary = Summary {
        method: "hyper-lora".into(),
        steps: cfg.steps,
        seconds,
        seconds_per_step: (relaxing > 0).then(|| step_seconds / relaxing as f64),
        trainable_params,
        output_bytes: size_of(&outputs),
        outputs,
        peak_rss_bytes: crate::progress::peak_rss_bytes(),
        final_loss,
        extra: serde_json::from_value(extra)?,
    };
    summary.write(&cfg.out)?;
    Ok(summary)
}

/// The LoRA a code file describes, predicted again by its hypernetwork (`[path -> (A, B)]`).
pub fn lora_from_code(code_file: &Path, hypernetwork_dir: &Path) -> Result<Predicted> {
    let sd = read_safetensors(code_file)?;
    let net = HyperLora::load(hyper_dir(hypernetwork_dir), &knobs_nn::device::inference())?;
    let want = config_hash(&net.config)?;
    if sd.metadata.get("hyperlora_config_fnv1a") != Some(&want) {
        bail!("{}: key `hyperlora_config_fnv1a`: the code belongs to another hypernetwork than {}", code_file.display(), hypernetwork_dir.display());
    }
    let (v, shape) = sd.f32("code")?;
    if shape != [net.config.code_dim] {
        bail!("{}: key `code`: shape {shape:?}, the hypernetwork takes [{}]", code_file.display(), net.config.code_dim);
    }
    Ok(net.predict(Tensor::from_data(TensorData::new(v, [1, net.config.code_dim]), &knobs_nn::device::inference())))
}

/// `knobs train --method hyper-lora`: the [`PersonalizeConfig`] a [`TrainConfig`] describes
/// (already validated), run with the hypernetwork in `hyper` and the judge in `judge`.
pub fn run_train(cfg: &TrainConfig, model: &Path, hyper: &Path, judge: &Path, progress: Progress) -> Result<Summary> {
    // The instance images as the trainer reads them, at the resolution of the base model.
    let res = match cfg.data.resolution {
        Some(r) => r as u32,
        None => crate::objective::resolution_of(model).with_context(|| format!("--model {}", model.display()))?,
    };
    let examples = instance_examples(cfg, res)?;
    let mut rng = step_rng(cfg.optim.seed, "hyperlora-crop", 0);
    let images = examples.iter().map(|e| crop(e, res, true, false, &mut rng)).collect();
    let prompt = validation_prompts(cfg, &examples)[0].clone();
    personalize(
        &PersonalizeConfig {
            model: model.to_path_buf(),
            judge: judge.to_path_buf(),
            hypernetwork_dir: hyper.to_path_buf(),
            out: cfg.out.clone(),
            images,
            prompt,
            code_steps: cfg.hyper_lora.hyper_code_steps,
            steps: cfg.max_train_steps(),
            rank: cfg.lora.rank,
            batch: cfg.optim.train_batch_size,
            lr: cfg.learning_rate(),
            seed: cfg.optim.seed,
            sampling: Sampling { per_prompt: cfg.run.num_samples, steps: cfg.run.sample_steps, guidance: cfg.run.guidance_scale },
        },
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_lora_is_the_sum_of_its_parts() {
        let dev = knobs_nn::device::inference();
        let mut init = knobs_nn::Init::new(1);
        let mut part = |r: usize, s: f64| -> Plain { BTreeMap::from([("l".to_string(), (init.normal([r, 5], 1.0, &dev), init.normal([4, r], 1.0, &dev), s))]) };
        let (p, q) = (part(1, 0.5), part(3, 2.0));
        let c = concat(&[&p, &q]);
        let delta = |x: &Plain| x["l"].1.clone().matmul(x["l"].0.clone()) * x["l"].2;
        let want: Vec<f32> = (delta(&p) + delta(&q)).into_data().try_into_vec().unwrap();
        let got: Vec<f32> = delta(&c).into_data().try_into_vec().unwrap();
        assert_eq!(c["l"].0.dims(), [4, 5]);
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
