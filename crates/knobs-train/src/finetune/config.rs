//! Every setting of `knobs train`, with the defaults of diffusers' training scripts scaled to
//! the built-in model. Each group of settings is one struct that is both the command line
//! (`clap::Args`) and the TOML file (`--config`, keys as the flags with `_`): one declaration
//! serves both, and its defaults are the command line's. Flags given on the command line
//! override the file.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, FromArgMatches};
use knobs_nn::io::FloatDtype;
use knobs_nn::optim::{Adafactor, AdafactorConfig, AdamW, AdamW8bit, AdamWConfig, Optimizer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::methods::hyper_lora::HyperLoraOptions;
use super::methods::hypernetwork::HypernetworkOptions;
use super::methods::lokr::LokrOptions;
use super::methods::lora::LoraOptions;
use super::methods::oft::OftOptions;
use super::methods::textual_inversion::TokenOptions;
use super::methods::{Method, OptionGroup};
use crate::lr::LrSchedule;

/// The value of an options struct with every flag at its command-line default.
pub fn clap_defaults<T: Args + FromArgMatches>() -> T {
    let matches = T::augment_args(clap::Command::new("defaults").no_binary_name(true)).get_matches_from(Vec::<String>::new());
    T::from_arg_matches(&matches).expect("every flag has a default")
}

macro_rules! defaults_from_clap {
    ($($t:ty),*) => { $( impl Default for $t { fn default() -> Self { $crate::finetune::config::clap_defaults() } } )* };
}
pub(crate) use defaults_from_clap;

/// Where the concept comes from, and prior preservation.
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Data")]
pub struct DataOptions {
    /// A built-in concept (`knobs world concepts --list`).
    #[arg(long)]
    pub concept: Option<String>,
    /// Folder of instance images (png/jpg) with optional same-named .txt captions.
    #[arg(long)]
    pub instance_dir: Option<PathBuf>,
    /// The prompt of every instance image (overrides .txt captions).
    #[arg(long)]
    pub instance_prompt: Option<String>,
    /// Enables prior preservation with class images of this prompt.
    #[arg(long)]
    pub class_prompt: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub num_class_images: usize,
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Cache folder of generated class images (default OUT/class_images).
    #[arg(long)]
    pub class_dir: Option<PathBuf>,
    /// Training resolution in pixels (default: the model's sample size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Crop randomly instead of at the centre.
    #[arg(long)]
    pub random_crop: bool,
    #[arg(long)]
    pub random_flip: bool,
    /// Train an instance image under the empty prompt with this probability (kohya's
    /// `caption_dropout_rate`), so that the model keeps its unconditional branch.
    #[arg(long, default_value_t = 0.0)]
    #[serde(skip_serializing_if = "is_zero")]
    pub caption_dropout: f64,
    /// Text put before every instance caption, with a space (kohya's `caption_prefix`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_prefix: Option<String>,
    /// Aspect-ratio bucketing (kohya's `enable_bucket`): each instance image trains at the
    /// bucket nearest its ratio, within the resolution's pixel count, a batch per bucket.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub bucket: bool,
}

// Settings left at their defaults stay out of the fingerprint, so that checkpoints of runs
// made before the setting existed still resume.
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// Tuning by freezing and controlled gradient updates, on top of any method.
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Freezing and gradient control")]
pub struct FreezeOptions {
    /// Train only parameters whose path matches this regex (tuning by freezing); repeatable.
    #[arg(long)]
    pub train_only: Vec<String>,
    /// PATTERN=FACTOR: multiply the learning rate of matching parameters; repeatable.
    #[arg(long)]
    pub lr_scale: Vec<String>,
    /// Multiply every gradient by this factor after clipping (controlled gradient update).
    #[arg(long)]
    pub grad_scale: Option<f64>,
}

#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Optimisation")]
pub struct OptimOptions {
    /// Default: the method's own.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Default: the method's own.
    #[arg(long)]
    pub max_train_steps: Option<u64>,
    #[arg(long, default_value_t = 4)]
    pub train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: u64,
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    pub lr_scheduler: LrSchedule,
    #[arg(long, default_value_t = 0)]
    pub lr_warmup_steps: u64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub adam_weight_decay: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Min-SNR loss weighting with this gamma (5 in the paper).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// adamw8bit and adafactor keep about a quarter of adamw's state (some 2 bytes per trained
    /// value against 8), for full fine-tunes of large models.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    pub optimizer: OptimizerKind,
    /// Mixed precision: the UNet computes in bf16 or fp16 (norms and softmax in f32) while
    /// the trained parameters, their gradients and the optimizer stay f32; fp16 adds dynamic
    /// loss scaling. `no`: everything in f32. Meant for GPUs; the CPU runs bf16 slower.
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    pub mixed_precision: MixedPrecision,
    /// Keep an exponential moving average of the trained parameters (diffusers' EMAModel:
    /// decay (1 + n) / (10 + n) capped at this value) and also write the method's files from
    /// it, into OUT/ema/.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
}

/// What the UNet computes in while training (`--mixed-precision`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// f32 throughout.
    #[default]
    No,
    /// bfloat16 compute: f32's range, so no loss scaling.
    Bf16,
    /// float16 compute, with dynamic loss scaling against gradient underflow.
    Fp16,
}

impl MixedPrecision {
    /// The dtypes a pipeline that only generates keeps its weight matrices and kernels in:
    /// `explicit` (`--weights-dtype`) for every part; by default f32, except the UNet's and
    /// VAE's under bf16 on a CPU where storing them in bf16 changes no result
    /// (`autocast::bf16_weights_change_nothing`: their products round them to bf16 anyway),
    /// kept in bf16 there at half their memory.
    pub fn generation_weights(self, explicit: Option<FloatDtype>) -> knobs_diffusion::pipeline::WeightsAs {
        use knobs_nn::burn::tensor::DType;
        match explicit {
            Some(dtype) => dtype.dtype().into(),
            None if self == MixedPrecision::Bf16 && knobs_nn::ops::autocast::bf16_weights_change_nothing() => knobs_diffusion::pipeline::WeightsAs { text_encoders: DType::F32, unet_and_vae: DType::BF16 },
            None => DType::F32.into(),
        }
    }

    /// Sets what `sd`'s UNet and VAE compute in. The UNet in this dtype; the frozen VAE in
    /// bf16 under bf16, as diffusers' scripts cast it to the weight dtype, and in f32 otherwise
    /// (SD's VAE overflows fp16's range). `No` sets both back to f32.
    pub fn apply(self, sd: &mut knobs_diffusion::pipeline::StableDiffusion) {
        use knobs_nn::burn::tensor::DType;
        sd.unet.compute_dtype = match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Bf16 => DType::BF16,
            MixedPrecision::Fp16 => DType::F16,
        };
        sd.vae.compute_dtype = if self == MixedPrecision::Bf16 { DType::BF16 } else { DType::F32 };
    }
}

/// The optimizer of `knobs train` (`--optimizer`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.AdamW.
    Adamw,
    /// bitsandbytes' AdamW8bit: moments as 8-bit codes with a scale per 256 values.
    Adamw8bit,
    /// transformers' Adafactor with the given learning rate (no relative step, no parameter
    /// scaling, no first moment): a factored second moment for weights.
    Adafactor,
}

impl OptimizerKind {
    /// The optimizer with the run's settings; `--adam-*` settings and the weight decay as
    /// the kind reads them.
    pub fn build(self, o: &OptimOptions, lr: f64) -> Box<dyn Optimizer> {
        let adam = AdamWConfig { lr, beta1: o.adam_beta1, beta2: o.adam_beta2, eps: o.adam_epsilon, weight_decay: o.adam_weight_decay };
        match self {
            OptimizerKind::Adamw => Box::new(AdamW::new(adam)),
            OptimizerKind::Adamw8bit => Box::new(AdamW8bit::new(adam)),
            OptimizerKind::Adafactor => Box::new(Adafactor::new(AdafactorConfig::with_lr(o.adam_weight_decay)).expect("a valid Adafactor setting")),
        }
    }
}

/// Checkpoints, validation, samples and resuming.
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Checkpoints, samples, resuming")]
pub struct RunOptions {
    /// Data-parallel training: split each step over these devices (comma-separated, each as
    /// `--device` spells it; the first one is the run's own and keeps the optimizer). The
    /// batch size is per device; the run equals one device with the batch size times the
    /// device count.
    #[arg(long, value_name = "LIST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
    /// Save a resumable checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpointing_steps: u64,
    /// Sample the validation prompts every N steps into OUT/validation (0: never).
    #[arg(long, default_value_t = 0)]
    pub validation_steps: u64,
    /// Repeatable; default: the instance prompt.
    #[arg(long = "validation-prompt")]
    pub validation_prompts: Vec<String>,
    /// Images per validation prompt sampled at the end into OUT/samples (0: none).
    #[arg(long, default_value_t = 4)]
    pub num_samples: usize,
    /// Denoising steps of samples, validation images and generated class images.
    #[arg(long, default_value_t = 25)]
    pub sample_steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance_scale: f64,
    /// Continue the run whose output folder (or checkpoints folder) this is.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

defaults_from_clap!(DataOptions, FreezeOptions, OptimOptions, RunOptions, TrainConfig);

/// Ways to trade speed for memory; none changes what is learned, so a run may resume with
/// other values (they are not part of its fingerprint).
#[derive(Args, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Memory")]
pub struct MemoryOptions {
    /// VAE-encode each distinct training image (and its flip) once instead of every step.
    /// Refused with --random-crop, whose crops differ every step.
    #[arg(long)]
    pub cache_latents: bool,
    /// Keep the cached latents in DIR too (implies --cache-latents; kohya's
    /// --cache_latents_to_disk): a resumed run, or any later run on the same images with the
    /// same VAE, reads them instead of encoding. A file is named by its image and the VAE
    /// encoder's weights, so one folder serves runs on several models.
    #[arg(long, value_name = "DIR")]
    pub latent_cache: Option<PathBuf>,
    /// Checkpoint the UNet's blocks (diffusers' --gradient_checkpointing): each resnet and
    /// each transformer block, and each layer of a text encoder that trains, keeps only its
    /// inputs for the backward pass, which runs it again. Far less memory for about one more
    /// forward pass a step; the same gradients (to rounding).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Keep the frozen weight matrices and convolution kernels in f16 or bf16, widened to
    /// f32 where a layer uses them: less memory, the same results as f32 weights holding
    /// those values (exact for f16 when the model's files are fp16).
    #[arg(long, default_value = "f32")]
    pub weights_dtype: FloatDtype,
    /// Hold frozen text encoders through the run. By default, when nothing trains in them
    /// and no adapter sits on them, every prompt the run uses (training, validation and
    /// sample prompts) is encoded before the first step and the encoders' weights are freed,
    /// as diffusers' DreamBooth scripts do: the same results, less memory.
    #[arg(long)]
    pub keep_text_encoders: bool,
    /// Refuse to start when the run's estimated peak memory exceeds this many GiB, saying
    /// what to change (the estimate is in the summary either way).
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
}

#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    #[arg(long, value_enum, default_value_t = Method::default())]
    pub method: Method,
    /// Base model folder (diffusers layout); default: the built-in model (models/knobs-base,
    /// found at run time in $KNOBS_MODELS, ./models, beside the executable or the source tree).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "knobs-train-out")]
    pub out: PathBuf,
    /// Also train the text encoder (DreamBooth, LoRA, pivotal).
    #[arg(long)]
    pub train_text_encoder: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub lokr: LokrOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub oft: OftOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub tokens: TokenOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub hypernetwork: HypernetworkOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub hyper_lora: HyperLoraOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub freeze: FreezeOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunOptions,
    /// Read from config files, never written: a run's fingerprint stays what it was.
    #[command(flatten)]
    #[serde(flatten, skip_serializing)]
    pub memory: MemoryOptions,
}

/// A struct's fields as a JSON object (flattened groups give one flat object).
fn fields<T: Serialize>(v: &T) -> serde_json::Map<String, Value> {
    match serde_json::to_value(v).expect("options serialise") {
        Value::Object(m) => m,
        _ => unreachable!("options are structs"),
    }
}

/// The flags of an options struct that differ from their defaults.
pub fn changed_flags<T: Serialize + Default>(v: &T) -> Vec<String> {
    let (now, default) = (fields(v), fields(&T::default()));
    now.iter().filter(|(k, v)| default.get(*k) != Some(v)).map(|(k, _)| format!("--{}", k.replace('_', "-"))).collect()
}

impl TrainConfig {
    /// Reads a TOML file; a key that names no setting is an error naming it.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}: cannot read", path.display()))?;
        let table: toml::Table = toml::from_str(&text).with_context(|| format!("--config {}: invalid TOML", path.display()))?;
        // The memory options are read but never serialised (see `memory`): known all the same.
        let mut known = fields(&TrainConfig::default());
        known.extend(fields(&MemoryOptions::default()));
        if let Some(k) = table.keys().find(|k| !known.contains_key(*k)) {
            bail!("--config {}: unknown key `{k}`", path.display());
        }
        toml::from_str(&text).with_context(|| format!("--config {}: invalid", path.display()))
    }

    /// `file` with every setting that `given` says was on the command line taken from `cli`.
    pub fn overridden_by(&self, cli: &TrainConfig, given: impl Fn(&str) -> bool) -> Result<TrainConfig> {
        let merge = |file: serde_json::Map<String, Value>, flags: serde_json::Map<String, Value>| {
            let mut merged = file;
            merged.extend(flags.into_iter().filter(|(k, _)| given(k)));
            Value::Object(merged)
        };
        let mut out: TrainConfig = from_json(merge(fields(self), fields(cli)))?;
        // Never serialised with the rest (see `memory`), so merged on their own.
        out.memory = from_json(merge(fields(&self.memory), fields(&cli.memory)))?;
        Ok(out)
    }

    /// The model folder: `--model`, or the built-in base model.
    pub fn model(&self) -> Result<PathBuf> {
        crate::builtin::model_or_default(self.model.as_deref())
    }
    pub fn learning_rate(&self) -> f64 {
        self.optim.learning_rate.unwrap_or(self.method.defaults().learning_rate)
    }
    pub fn max_train_steps(&self) -> u64 {
        self.optim.max_train_steps.unwrap_or(self.method.defaults().max_train_steps)
    }
    pub fn class_dir(&self) -> PathBuf {
        self.data.class_dir.clone().unwrap_or_else(|| self.out.join("class_images"))
    }
    pub fn with_prior_preservation(&self) -> bool {
        self.data.class_prompt.is_some() && self.data.prior_loss_weight > 0.0 && self.data.num_class_images > 0
    }

    /// `PATTERN=FACTOR` pairs of `--lr-scale`, checked.
    pub fn lr_scales(&self) -> Result<Vec<(regex::Regex, f64)>> {
        self.freeze
            .lr_scale
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
        c.run = RunOptions::default();
        let json = serde_json::to_string(&c).expect("config serialises");
        // AdamW runs keep the fingerprint they had before --optimizer existed, so that their
        // checkpoints still resume. (A quote inside a string value is escaped, so this text
        // can only be the key itself.)
        // Likewise f32 runs (no mixed precision) keep theirs.
        let json = match c.optim.mixed_precision {
            MixedPrecision::No => json.replacen(r#","mixed_precision":"no""#, "", 1),
            _ => json,
        };
        match c.optim.optimizer {
            OptimizerKind::Adamw => json.replacen(r#","optimizer":"adamw""#, "", 1),
            _ => json,
        }
    }

    /// Checks combinations that would otherwise fail late or do nothing: the shared rules,
    /// settings of option groups the method does not read, then the method's own rules.
    pub fn validate(&self) -> Result<()> {
        let (d, o) = (&self.data, &self.optim);
        if o.mixed_precision != MixedPrecision::No && self.method.own_loop() {
            bail!("--mixed-precision {:?}: --method {} runs its own loop, in f32 only", o.mixed_precision, self.method);
        }
        if d.concept.is_none() && d.instance_dir.is_none() {
            bail!("give --concept NAME (a built-in concept) or --instance-dir DIR");
        }
        if d.concept.is_some() && d.instance_dir.is_some() {
            bail!("--concept and --instance-dir exclude each other");
        }
        if let Some(m) = self.memory.max_memory.filter(|m| !(*m > 0.0 && m.is_finite())) {
            bail!("--max-memory must be a positive number of GiB, got {m}");
        }
        if let Some(e) = o.ema_decay.filter(|e| !(0.0..1.0).contains(e)) {
            bail!("--ema-decay must be in [0, 1), got {e}");
        }
        if !(0.0..=1.0).contains(&d.caption_dropout) {
            bail!("--caption-dropout must be a probability in [0, 1], got {}", d.caption_dropout);
        }
        let unused = changed_flags(&self.memory);
        if self.method.own_loop() && !unused.is_empty() {
            bail!("{} not used by --method {}: it trains in its own loop, with its own memory use", unused.join(", "), self.method);
        }
        if d.bucket && self.method.own_loop() {
            bail!("--bucket is not used by --method {}: it trains in its own loop on square images", self.method);
        }
        let caching = if self.memory.latent_cache.is_some() { Some("--latent-cache") } else { self.memory.cache_latents.then_some("--cache-latents") };
        if let (Some(flag), true) = (caching, d.random_crop) {
            bail!("{flag} and --random-crop exclude each other: a random crop differs every step, so its latents cannot be cached");
        }
        if o.train_batch_size == 0 || o.gradient_accumulation_steps == 0 {
            bail!("--train-batch-size and --gradient-accumulation-steps must be at least 1");
        }
        if self.lora.rank == 0 {
            bail!("--rank must be at least 1");
        }
        if o.optimizer == OptimizerKind::Adafactor {
            let d = OptimOptions::default();
            let adam_only = [("--adam-beta1", o.adam_beta1 != d.adam_beta1), ("--adam-beta2", o.adam_beta2 != d.adam_beta2), ("--adam-epsilon", o.adam_epsilon != d.adam_epsilon)];
            if let Some((flag, _)) = adam_only.iter().find(|(_, set)| *set) {
                bail!("{flag} is not used by --optimizer adafactor");
            }
        }
        if !(0.0..1.0).contains(&self.lora.lora_dropout) {
            bail!("--lora-dropout must be in [0, 1), got {}", self.lora.lora_dropout);
        }
        if let Some(g) = self.freeze.grad_scale
            && !(g > 0.0 && g.is_finite()) {
                bail!("--grad-scale must be a positive number, got {g}");
            }
        self.lr_scales()?;
        for p in &self.freeze.train_only {
            regex::Regex::new(p).with_context(|| format!("--train-only `{p}`: bad pattern"))?;
        }
        let used = self.method.options();
        let groups = [
            (OptionGroup::Lora, changed_flags(&self.lora)),
            (OptionGroup::Tokens, changed_flags(&self.tokens)),
            (OptionGroup::Hypernetwork, changed_flags(&self.hypernetwork)),
            (OptionGroup::HyperLora, changed_flags(&self.hyper_lora)),
            (OptionGroup::Lokr, changed_flags(&self.lokr)),
            (OptionGroup::Oft, changed_flags(&self.oft)),
            (OptionGroup::TextEncoder, if self.train_text_encoder { vec!["--train-text-encoder".to_string()] } else { Vec::new() }),
        ];
        for (group, set) in groups {
            if let (false, Some(flag)) = (used.contains(&group), set.first()) {
                bail!("{flag} is not used by --method {}", self.method);
            }
        }
        self.method.validate(self)
    }
}

/// A typed value from JSON, naming the setting at fault.
fn from_json<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("invalid setting")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_command_lines() {
        let c = TrainConfig::default();
        assert_eq!(c.method.name(), "lora");
        assert_eq!(c.lora.rank, 4);
        assert_eq!(c.lora.target_modules, ["to_q", "to_k", "to_v", "to_out.0"]);
        assert_eq!(c.optim.train_batch_size, 4);
        assert_eq!(c.run.num_samples, 4);
        assert_eq!(c.out, PathBuf::from("knobs-train-out"));
        assert!(changed_flags(&c).is_empty());
    }

    #[test]
    fn toml_keys_are_the_flags_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "method = \"ia3\"\nrank = 2\nmax_train_steps = 7\nlr_scheduler = \"cosine\"\nrandom_flip = true\nprior_loss_weight = 1\n").unwrap();
        let c = TrainConfig::from_toml(&path).unwrap();
        assert_eq!((c.method.name(), c.lora.rank, c.optim.max_train_steps), ("ia3", 2, Some(7)));
        assert_eq!(c.optim.lr_scheduler, LrSchedule::Cosine);
        assert!(c.data.random_flip);
        std::fs::write(&path, "ranks = 2\n").unwrap();
        let e = format!("{:#}", TrainConfig::from_toml(&path).unwrap_err());
        assert!(e.contains("unknown key `ranks`"), "{e}");
        std::fs::write(&path, "method = \"lokr2\"\n").unwrap();
        let e = format!("{:#}", TrainConfig::from_toml(&path).unwrap_err());
        assert!(e.contains("unknown method `lokr2`") && e.contains("dreambooth"), "{e}");
    }

    #[test]
    fn flags_given_override_the_file_and_only_those() {
        let file = TrainConfig { lora: LoraOptions { rank: 2, ..Default::default() }, optim: OptimOptions { seed: 9, ..Default::default() }, ..Default::default() };
        // The command line left rank at its default but gave --seed 0 explicitly.
        let cli = TrainConfig::default();
        let merged = file.overridden_by(&cli, |id| id == "seed").unwrap();
        assert_eq!(merged.lora.rank, 2);
        assert_eq!(merged.optim.seed, 0);
    }

    #[test]
    fn the_optimizer_is_in_the_fingerprint_and_adamw_keeps_the_old_one() {
        let adamw = TrainConfig::default();
        let fp = adamw.fingerprint();
        // What the fingerprint was before --optimizer: the same settings without that key.
        let mut legacy = fields(&TrainConfig { out: PathBuf::new(), ..TrainConfig::default() });
        legacy.remove("optimizer");
        legacy.remove("mixed_precision");
        legacy.extend(fields(&RunOptions::default()));
        assert_eq!(serde_json::from_str::<Value>(&fp).unwrap(), Value::Object(legacy));
        assert!(!fp.contains("optimizer"), "{fp}");
        assert!(!fp.contains("mixed_precision") && !fp.contains("devices"), "{fp}");
        let mut bf16 = adamw.clone();
        bf16.optim.mixed_precision = MixedPrecision::Bf16;
        assert!(bf16.fingerprint().contains(r#""mixed_precision":"bf16""#));
        let mut eight = adamw.clone();
        eight.optim.optimizer = OptimizerKind::Adamw8bit;
        assert!(eight.fingerprint().contains(r#""optimizer":"adamw8bit""#));
        let mut factor = adamw.clone();
        factor.optim.optimizer = OptimizerKind::Adafactor;
        let fps = [fp, eight.fingerprint(), factor.fingerprint()];
        assert!(fps[0] != fps[1] && fps[1] != fps[2] && fps[0] != fps[2]);
    }

    #[test]
    fn the_optimizer_comes_from_toml_and_adam_settings_are_refused_with_adafactor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "optimizer = \"adafactor\"\nconcept = \"striped-star\"\n").unwrap();
        let mut c = TrainConfig::from_toml(&path).unwrap();
        assert_eq!(c.optim.optimizer, OptimizerKind::Adafactor);
        c.validate().unwrap();
        c.optim.adam_beta2 = 0.99;
        assert_eq!(c.validate().unwrap_err().to_string(), "--adam-beta2 is not used by --optimizer adafactor");
        std::fs::write(&path, "optimizer = \"sgd\"\n").unwrap();
        let e = format!("{:#}", TrainConfig::from_toml(&path).unwrap_err());
        assert!(e.contains("sgd") && e.contains("adamw8bit"), "{e}");
    }

    #[test]
    fn a_setting_of_another_method_is_refused_by_flag() {
        let mut c = TrainConfig { method: Method::parse("ia3").unwrap(), ..Default::default() };
        c.data.concept = Some("striped-star".into());
        c.validate().unwrap();
        c.lora.rank = 8;
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(e, "--rank is not used by --method ia3");
        c.lora.rank = 4;
        c.train_text_encoder = true;
        assert_eq!(c.validate().unwrap_err().to_string(), "--train-text-encoder is not used by --method ia3");
    }

    /// A method with its own loop uses none of the memory options: each is refused by flag.
    #[test]
    fn memory_options_are_refused_by_methods_with_their_own_loop() {
        let mut c = TrainConfig { method: Method::parse("hyper-lora").unwrap(), ..Default::default() };
        c.data.concept = Some("striped-star".into());
        c.validate().unwrap();
        c.memory.cache_latents = true;
        c.memory.latent_cache = Some("cache".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--cache-latents, --latent-cache not used by --method hyper-lora"), "{e}");
        c.memory = MemoryOptions { gradient_checkpointing: true, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().starts_with("--gradient-checkpointing not used"));
        c.method = Method::parse("lora").unwrap();
        c.validate().unwrap();
    }
}
