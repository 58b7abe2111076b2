//! `knobs hyper pretrain`: the hypernetwork learns across many procedural concepts.
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use image::RgbImage;
use knobs_adapters::hyperlora::{HyperLora, HyperLoraConfig};
use knobs_adapters::AdaptedModel;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::io::atomic_write;
use knobs_nn::optim::{AdamW, AdamWConfig};
use knobs_nn::ModuleExt;
use knobs_world::concept::{ConceptSpec, random_concept};
use knobs_world::judge::Judge;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoints, State, check_same, decode_history, encode_history, meta, restore};
use crate::pretrain::Deadline;
use crate::progress::{Progress, Tick};
use crate::rng::{normal, step_rng};

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HyperPretrainConfig {
    pub model: PathBuf,
    pub judge: PathBuf,
    pub out: PathBuf,
    pub steps: u64,
    pub max_seconds: Option<f64>,
    pub seed: u64,
    /// Procedural training concepts (rows of the code table).
    pub num_concepts: usize,
    /// Reference images rendered per concept.
    pub images_per_concept: usize,
    /// Images per step (all of the step's concept).
    pub batch: usize,
    pub lr: f64,
    pub rank: usize,
    pub alpha: f64,
    pub aux: usize,
    pub code_dim: usize,
    pub hidden: usize,
    pub variational: bool,
    pub kl_weight: f64,
    /// Probability that a step conditions on image embeddings instead of the learned code.
    pub image_prob: f64,
    pub target_modules: Vec<String>,
    pub checkpoint_every: u64,
}

impl HyperPretrainConfig {
    /// The recipe of the shipped `models/hyperlora` (its RECIPE.md): 23,547 steps took 58
    /// minutes on one core of the 2-core machine.
    pub fn new(model: PathBuf, judge: PathBuf, out: PathBuf) -> Self {
        HyperPretrainConfig {
            model,
            judge,
            out,
            steps: 23_547,
            max_seconds: None,
            seed: 0,
            num_concepts: 1024,
            images_per_concept: 5,
            batch: 4,
            lr: 1e-3,
            rank: 2,
            alpha: 1.0,
            aux: 32,
            code_dim: 32,
            hidden: 64,
            variational: false,
            kl_weight: 1e-3,
            image_prob: 0.7,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
            checkpoint_every: 100,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!(self.num_concepts >= 1, "--num-concepts must be at least 1");
        ensure!(self.images_per_concept >= 1, "--images-per-concept must be at least 1");
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--learning-rate must be positive");
        ensure!(self.rank >= 1, "--rank must be at least 1");
        ensure!(self.alpha.is_finite() && self.alpha > 0.0, "--alpha must be positive");
        ensure!(self.aux >= 1, "--aux must be at least 1");
        ensure!(self.code_dim >= 1 && self.hidden >= 1, "--code-dim and --hidden must be at least 1");
        ensure!(self.kl_weight.is_finite() && self.kl_weight >= 0.0, "--kl-weight must be >= 0");
        ensure!((0.0..=1.0).contains(&self.image_prob), "--image-prob must be in [0, 1]");
        ensure!(self.checkpoint_every >= 1, "--checkpoint-every must be at least 1");
        ensure!(!self.target_modules.is_empty(), "--target-modules must name at least one layer");
        Ok(())
    }

    /// What a resumed run must share with the run that wrote the checkpoint (the step count
    /// may grow: the learning rate is constant).
    fn fingerprint(&self) -> Result<String> {
        let mut c = self.clone();
        c.out = PathBuf::new();
        c.steps = 0;
        c.max_seconds = None;
        c.checkpoint_every = 0;
        Ok(serde_json::to_string(&c)?)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }
}

pub enum Outcome {
    Finished(PathBuf),
    Paused { step: u64 },
}

/// The procedural training concepts: concept `i` is drawn from its own stream.
pub fn training_concepts(seed: u64, n: usize) -> Vec<ConceptSpec> {
    (0..n as u64).map(|i| random_concept(&mut step_rng(seed, "hyperlora-concepts", i))).collect()
}

/// Trains (or resumes) the hypernetwork; see the module docs.
pub fn pretrain(cfg: &HyperPretrainConfig, progress: Progress) -> Result<Outcome> {
    cfg.validate()?;
    let deadline = Deadline::new(cfg.max_seconds);
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("--out {}: cannot create", cfg.out.display()))?;
    let dev = knobs_nn::device::training();
    let mut sd = StableDiffusion::load(&cfg.model, &dev).with_context(|| format!("--model {}", cfg.model.display()))?;
    sd.vae.for_inference();
    sd.freeze_all();
    let judge = Judge::load(&cfg.judge).with_context(|| format!("--judge {}", cfg.judge.display()))?;
    let res = crate::objective::resolution(&sd);
    let concepts = training_concepts(cfg.seed, cfg.num_concepts);
    let images: Vec<Vec<RgbImage>> = concepts.iter().map(|c| c.instance_images(cfg.images_per_concept, res).into_iter().map(|(i, _)| i).collect()).collect();
    let embeds: Vec<Vec<Vec<f32>>> = images.iter().map(|imgs| judge.embed(imgs)).collect();
    let image_dim = embeds[0][0].len();

    let mut hc = HyperLoraConfig::for_model(&sd.unet, &cfg.target_modules).context("--target-modules")?;
    hc.rank = cfg.rank;
    hc.alpha = cfg.alpha;
    hc.aux_a = cfg.aux;
    hc.aux_b = cfg.aux;
    hc.code_dim = cfg.code_dim;
    hc.hidden = cfg.hidden;
    hc.num_codes = cfg.num_concepts;
    hc.image_dim = image_dim;
    hc.variational = cfg.variational;
    hc.seed = cfg.seed;
    let mut net = HyperLora::new(hc, &dev)?;
    net.attach(&mut AdaptedModel::new(&mut sd.unet, cfg.seed), ADAPTER)?;
    sd.unet.freeze_all();

    let mut opt = AdamW::new(AdamWConfig { lr: cfg.lr, ..Default::default() });
    let ckpts = Checkpoints::new(cfg.checkpoint_dir(), "hyperlora");
    let fingerprint = cfg.fingerprint()?;
    let mut history = Vec::new();
    let mut start = 0;
    if let Some((step, ck)) = ckpts.latest()? {
        check_same(&ck, "config", &fingerprint)?;
        restore(&ck, &mut net, &mut opt, None, &dev)?;
        history = decode_history(meta(&ck, "loss_history")?)?;
        start = step;
    }
    let objective = crate::objective::Objective::new(&sd, &dev);
    for step in start..cfg.steps {
        let mut rng = step_rng(cfg.seed, "hyperlora", step);
        let i = rng.random_range(0..cfg.num_concepts);
        let code = if rng.random_bool(cfg.image_prob) {
            let k = rng.random_range(1..=cfg.images_per_concept);
            let rows: Vec<Vec<f32>> = (0..k).map(|_| embeds[i][rng.random_range(0..cfg.images_per_concept)].clone()).collect();
            net.code_from_images(embeddings_tensor(&rows, &dev))?
        } else {
            net.code_of(i)?
        };
        let eps = cfg.variational.then(|| normal(&mut rng, [1, cfg.code_dim], &dev));
        let pred = net.predict(code.sample(eps));
        HyperLora::apply(&mut sd.unet, ADAPTER, &pred)?;
        let picks: Vec<usize> = (0..cfg.batch).map(|_| rng.random_range(0..cfg.images_per_concept)).collect();
        let batch: Vec<RgbImage> = picks.iter().map(|&j| images[i][j].clone()).collect();
        let prompts = vec![concepts[i].instance_prompt(); cfg.batch];
        let mut loss = objective.per_sample(&sd, &batch, &prompts, &mut rng, Default::default())?.mean();
        if cfg.variational && cfg.kl_weight > 0.0 {
            loss = loss + code.kl() * cfg.kl_weight;
        }
        let value = loss.clone().into_scalar::<f32>() as f64;
        ckpts.check_loss("hyperlora", value, step)?;
        opt.minimise(&mut net, loss, 1.0, cfg.lr);
        history.push(value);
        progress(&Tick { phase: "hyperlora", step: step + 1, total: cfg.steps, loss: value, seconds_per_step: None });
        let pause = deadline.pauses_at(step + 1, cfg.steps);
        let saved = ckpts.save_if_due(step + 1, cfg.steps, cfg.checkpoint_every, pause, || {
            let mut state = State::of(&net, &opt, "config", &fingerprint);
            state.meta.insert("loss_history".into(), encode_history(&history));
            state
        })?;
        if saved {
            let mut csv = String::from("step,loss\n");
            for (k, l) in history.iter().enumerate() {
                csv.push_str(&format!("{},{l}\n", k + 1));
            }
            atomic_write(cfg.out.join("loss.csv"), csv.as_bytes())?;
        }
        if pause {
            return Ok(Outcome::Paused { step: step + 1 });
        }
    }
    let dir = cfg.out.join(SUBDIR);
    net.save(&dir)?;
    let info = serde_json::json!({ "model": cfg.model, "judge": cfg.judge, "concepts": concepts.iter().map(|c| &c.name).collect::<Vec<_>>(), "steps": cfg.steps });
    atomic_write(dir.join("training.json"), serde_json::to_string_pretty(&info)?.as_bytes())?;
    Ok(Outcome::Finished(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use knobs_world::concept::held_out;

    #[test]
    fn training_concepts_are_deterministic_and_never_held_out() {
        let a = training_concepts(3, 300);
        assert_eq!(a, training_concepts(3, 300));
        assert_ne!(a, training_concepts(4, 300));
        for c in &a {
            for h in held_out() {
                assert_ne!(c.name, h.name);
                assert!(!(c.shape == h.shape && c.colour == h.colour && c.pattern.kind() == h.pattern.kind()), "{} looks like {}", c.name, h.name);
            }
        }
    }

}
