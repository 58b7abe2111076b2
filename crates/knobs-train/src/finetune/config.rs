//! Every setting of `knobs train`, with the defaults of diffusers' training scripts scaled to
//! the built-in model. A TOML file (`--config`) holds any of them under the same names as the
//! flags (with `_` for `-`); flags given on the command line override it.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use knobs_adapters::hypernetwork::{Activation, Structure};

use crate::lr::LrSchedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Dreambooth,
    TextualInversion,
    Lora,
    Ia3,
    Pivotal,
    /// A1111-style hypernetwork: residual MLPs on the key/value context.
    Hypernetwork,
    /// HyperDreamBooth-style: a pretrained hypernetwork predicts a LoRA from the instance
    /// images (`--hypernetwork-dir`), then optional rank-relaxed fine-tuning.
    HyperLora,
}

impl Method {
    pub const NAMES: &'static str = "dreambooth, textual-inversion, lora, ia3, pivotal, hypernetwork, hyper-lora";

    pub fn parse(name: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string()))
            .with_context(|| format!("--method: unknown method `{name}`; known: {}", Self::NAMES))
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Dreambooth => "dreambooth",
            Method::TextualInversion => "textual-inversion",
            Method::Lora => "lora",
            Method::Ia3 => "ia3",
            Method::Pivotal => "pivotal",
            Method::Hypernetwork => "hypernetwork",
            Method::HyperLora => "hyper-lora",
        }
    }
    pub fn learns_tokens(self) -> bool {
        matches!(self, Method::TextualInversion | Method::Pivotal)
    }
    pub fn learns_lora(self) -> bool {
        matches!(self, Method::Lora | Method::Pivotal)
    }
    /// (learning rate, steps) as diffusers' example commands use them, scaled so that each
    /// method finishes in minutes on the built-in model.
    fn defaults(self) -> (f64, u64) {
        match self {
            Method::Dreambooth => (5e-5, 300),
            Method::TextualInversion => (5e-3, 400),
            Method::Lora => (1e-3, 300),
            Method::Ia3 => (5e-3, 300),
            Method::Pivotal => (1e-3, 300),
            // A1111's hypernetwork learning rate for SD is 5e-6; scaled like DreamBooth's
            // (diffusers' 5e-6 -> 5e-5 here).
            Method::Hypernetwork => (5e-5, 300),
            // Zero-shot by default; `--max-train-steps N` adds rank-relaxed fine-tuning.
            Method::HyperLora => (1e-3, 0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraFormat {
    /// PEFT folder + diffusers `pytorch_lora_weights.safetensors`.
    Diffusers,
    /// kohya-ss keys with `.alpha` and `ss_*` / `modelspec.*` metadata.
    Kohya,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    pub model: PathBuf,
    pub out: PathBuf,
    // Data.
    pub concept: Option<String>,
    pub instance_dir: Option<PathBuf>,
    pub instance_prompt: Option<String>,
    pub class_prompt: Option<String>,
    pub num_class_images: usize,
    pub prior_loss_weight: f64,
    pub class_dir: Option<PathBuf>,
    pub resolution: Option<usize>,
    pub center_crop: bool,
    pub random_flip: bool,
    // Methods.
    pub train_text_encoder: bool,
    pub placeholder_token: Option<String>,
    pub initializer_token: Option<String>,
    pub num_vectors: usize,
    pub rank: usize,
    pub alpha: Option<f64>,
    pub target_modules: Vec<String>,
    pub text_encoder_target_modules: Vec<String>,
    pub conv: bool,
    pub train_only: Vec<String>,
    pub lr_scale: Vec<String>,
    pub grad_scale: Option<f64>,
    pub format: LoraFormat,
    pub a1111_embedding: bool,
    /// Width multipliers of the hypernetwork's MLPs (A1111's layer structure).
    pub hypernetwork_layers: Vec<f64>,
    /// A1111's activation name (linear, relu, leakyrelu, elu, swish, tanh, sigmoid, ...).
    pub hypernetwork_activation: String,
    pub hypernetwork_layer_norm: bool,
    /// One probability (after every hidden layer) or A1111's dropout structure (one per
    /// layer-structure entry, first and last 0); empty: none.
    pub hypernetwork_dropout: Vec<f64>,
    /// Context widths that get a module pair (A1111's enable sizes); empty: every width.
    pub hypernetwork_widths: Vec<usize>,
    /// `--method hyper-lora`: the folder `knobs hyper pretrain` wrote (or its `hyperlora/`).
    pub hypernetwork_dir: Option<PathBuf>,
    /// Judge folder whose image embeddings feed the hyper-lora hypernetwork.
    pub judge: Option<PathBuf>,
    /// `--method hyper-lora`: steps optimising the concept's code through the frozen
    /// hypernetwork (from the zero-shot code) before the rank-relaxed steps.
    pub hyper_code_steps: u64,
    // Optimisation.
    pub learning_rate: Option<f64>,
    pub max_train_steps: Option<u64>,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: u64,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: u64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub seed: u64,
    // Running.
    pub checkpointing_steps: u64,
    pub validation_steps: u64,
    pub validation_prompts: Vec<String>,
    pub validation_inference_steps: usize,
    pub guidance_scale: f64,
    /// An earlier run's output folder (or its `checkpoints/`) to continue from.
    pub resume: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Lora,
            model: default_model(),
            out: PathBuf::from("knobs-train-out"),
            concept: None,
            instance_dir: None,
            instance_prompt: None,
            class_prompt: None,
            num_class_images: 50,
            prior_loss_weight: 1.0,
            class_dir: None,
            resolution: None,
            center_crop: true,
            random_flip: false,
            train_text_encoder: false,
            placeholder_token: None,
            initializer_token: None,
            num_vectors: 1,
            rank: 4,
            alpha: None,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
            text_encoder_target_modules: ["q_proj", "k_proj", "v_proj", "out_proj"].map(String::from).to_vec(),
            conv: false,
            train_only: Vec::new(),
            lr_scale: Vec::new(),
            grad_scale: None,
            format: LoraFormat::Diffusers,
            a1111_embedding: false,
            hypernetwork_layers: vec![1.0, 2.0, 1.0],
            hypernetwork_activation: "linear".to_string(),
            hypernetwork_layer_norm: false,
            hypernetwork_dropout: Vec::new(),
            hypernetwork_widths: Vec::new(),
            hypernetwork_dir: None,
            judge: None,
            hyper_code_steps: 0,
            learning_rate: None,
            max_train_steps: None,
            train_batch_size: 4,
            gradient_accumulation_steps: 1,
            lr_scheduler: LrSchedule::Constant,
            lr_warmup_steps: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            snr_gamma: None,
            noise_offset: 0.0,
            seed: 0,
            checkpointing_steps: 100,
            validation_steps: 0,
            validation_prompts: Vec::new(),
            validation_inference_steps: 25,
            guidance_scale: 5.0,
            resume: None,
        }
    }
}

/// The built-in base model, committed with knobs.
pub fn default_model() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/knobs-base"))
}

impl TrainConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}: cannot read", path.display()))?;
        toml::from_str(&text).with_context(|| format!("--config {}: invalid", path.display()))
    }
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate.unwrap_or(self.method.defaults().0)
    }
    pub fn max_train_steps(&self) -> u64 {
        self.max_train_steps.unwrap_or(self.method.defaults().1)
    }
    pub fn lora_alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }
    pub fn class_dir(&self) -> PathBuf {
        self.class_dir.clone().unwrap_or_else(|| self.out.join("class_images"))
    }
    pub fn with_prior_preservation(&self) -> bool {
        self.class_prompt.is_some() && self.prior_loss_weight > 0.0 && self.num_class_images > 0
    }

    /// The hypernetwork's structure from the `--hypernetwork-*` settings, checked; errors
    /// name the flag.
    pub fn hypernetwork_structure(&self) -> Result<Structure> {
        let layers = &self.hypernetwork_layers;
        let activation = Activation::parse(&self.hypernetwork_activation).map_err(|e| anyhow::anyhow!("--hypernetwork-activation: {e}"))?;
        let dropout = match self.hypernetwork_dropout[..] {
            [] => vec![0.0; layers.len()],
            [p] => Structure::dropout_after_hidden(layers.len(), p),
            _ => self.hypernetwork_dropout.clone(),
        };
        let s = Structure { layer_structure: layers.clone(), activation, add_layer_norm: self.hypernetwork_layer_norm, activate_output: false, dropout_structure: dropout };
        if let Err(e) = s.validate() {
            let flag = if e.starts_with("dropout") { "--hypernetwork-dropout" } else { "--hypernetwork-layers" };
            bail!("{flag}: {e}");
        }
        if let [p] = self.hypernetwork_dropout[..] {
            if !(0.0..1.0).contains(&p) {
                bail!("--hypernetwork-dropout: {p} is not a probability in [0, 1)");
            }
            if p > 0.0 && layers.len() < 3 {
                bail!("--hypernetwork-dropout {p}: --hypernetwork-layers {layers:?} has no hidden layer to drop out");
            }
        }
        if self.hypernetwork_widths.contains(&0) {
            bail!("--hypernetwork-widths: widths must be positive");
        }
        Ok(s)
    }

    /// `PATTERN=FACTOR` pairs of `--lr-scale`, checked.
    pub fn lr_scales(&self) -> Result<Vec<(regex::Regex, f64)>> {
        self.lr_scale
            .iter()
            .map(|s| {
                let (pat, f) = s.rsplit_once('=').with_context(|| format!("--lr-scale `{s}`: expected PATTERN=FACTOR"))?;
                let f: f64 = f.parse().with_context(|| format!("--lr-scale `{s}`: `{f}` is not a number"))?;
                if !(f >= 0.0 && f.is_finite()) {
                    bail!("--lr-scale `{s}`: the factor must be a finite number >= 0");
                }
                Ok((regex::Regex::new(pat).with_context(|| format!("--lr-scale `{s}`: bad pattern"))?, f))
            })
            .collect()
    }

    /// The settings that decide the trained result; a resumed run must have the same.
    pub fn fingerprint(&self) -> String {
        let mut c = self.clone();
        c.out = PathBuf::new();
        c.resume = None;
        c.checkpointing_steps = 0;
        c.validation_steps = 0;
        c.validation_prompts.clear();
        serde_json::to_string(&c).expect("config serialises")
    }

    /// Checks combinations that would otherwise fail late or do nothing.
    pub fn validate(&self) -> Result<()> {
        if self.concept.is_none() && self.instance_dir.is_none() {
            bail!("give --concept NAME (a built-in concept) or --instance-dir DIR");
        }
        if self.concept.is_some() && self.instance_dir.is_some() {
            bail!("--concept and --instance-dir exclude each other");
        }
        if self.method.learns_tokens() && self.concept.is_none() && self.placeholder_token.is_none() {
            bail!("--method {} needs --placeholder-token", self.method.name());
        }
        if self.num_vectors == 0 {
            bail!("--num-vectors must be at least 1");
        }
        if self.train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("--train-batch-size and --gradient-accumulation-steps must be at least 1");
        }
        if self.rank == 0 {
            bail!("--rank must be at least 1");
        }
        if let Some(g) = self.grad_scale {
            if !(g > 0.0 && g.is_finite()) {
                bail!("--grad-scale must be a positive number, got {g}");
            }
        }
        if self.method == Method::HyperLora && self.hypernetwork_dir.is_none() {
            bail!("--method hyper-lora needs --hypernetwork-dir DIR (made by `knobs hyper pretrain`)");
        }
        if self.method == Method::HyperLora {
            // Its short steps run at a constant rate without accumulation or validation.
            let defaults = TrainConfig::default();
            let unused = [
                ("--gradient-accumulation-steps", self.gradient_accumulation_steps != defaults.gradient_accumulation_steps),
                ("--lr-scheduler", self.lr_scheduler != defaults.lr_scheduler),
                ("--validation-steps", self.validation_steps != defaults.validation_steps),
            ];
            if let Some((flag, _)) = unused.iter().find(|(_, set)| *set) {
                bail!("{flag} is not used by --method hyper-lora");
            }
        }
        if self.method != Method::HyperLora && (self.hypernetwork_dir.is_some() || self.hyper_code_steps > 0) {
            bail!("--hypernetwork-dir and --hyper-code-steps are only for --method hyper-lora");
        }
        if self.max_train_steps() == 0 && self.method != Method::HyperLora {
            bail!("--max-train-steps must be at least 1");
        }
        self.lr_scales()?;
        if self.method == Method::Hypernetwork {
            self.hypernetwork_structure()?;
        }
        for p in &self.train_only {
            regex::Regex::new(p).with_context(|| format!("--train-only `{p}`: bad pattern"))?;
        }
        Ok(())
    }
}
