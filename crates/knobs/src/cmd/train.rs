//! `knobs train`: fine-tune a model on a concept with any method. Every flag can also be set
//! in a TOML file (`--config`, keys as the flags with `_`); flags given here override it.
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use knobs_train::finetune::{LoraFormat, Method, TrainConfig, run};
use knobs_train::lr::LrSchedule;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// dreambooth, textual-inversion, lora, ia3, pivotal, hypernetwork or hyper-lora.
    #[arg(long)]
    method: Option<String>,
    /// Base model folder (diffusers layout); default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A built-in concept (`knobs world concepts --list`).
    #[arg(long)]
    concept: Option<String>,
    /// Folder of instance images (png/jpg) with optional same-named .txt captions.
    #[arg(long)]
    instance_dir: Option<PathBuf>,
    #[arg(long)]
    instance_prompt: Option<String>,
    /// Enables prior preservation with class images of this prompt.
    #[arg(long)]
    class_prompt: Option<String>,
    #[arg(long)]
    num_class_images: Option<usize>,
    #[arg(long)]
    prior_loss_weight: Option<f64>,
    /// Cache folder of generated class images (default OUT/class_images).
    #[arg(long)]
    class_dir: Option<PathBuf>,
    #[arg(long)]
    resolution: Option<usize>,
    /// Crop randomly instead of at the centre.
    #[arg(long)]
    random_crop: bool,
    #[arg(long)]
    random_flip: bool,
    #[arg(long)]
    train_text_encoder: bool,
    #[arg(long)]
    placeholder_token: Option<String>,
    #[arg(long)]
    initializer_token: Option<String>,
    #[arg(long)]
    num_vectors: Option<usize>,
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    /// Comma-separated module names for LoRA (default to_q,to_k,to_v,to_out.0).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Also adapt the UNet's convolutions (LoRA).
    #[arg(long)]
    conv: bool,
    /// Train only parameters whose path matches this regex (tuning by freezing); repeatable.
    #[arg(long)]
    train_only: Vec<String>,
    /// PATTERN=FACTOR: multiply the learning rate of matching parameters; repeatable.
    #[arg(long)]
    lr_scale: Vec<String>,
    /// Multiply every gradient by this factor after clipping (controlled gradient update).
    #[arg(long)]
    grad_scale: Option<f64>,
    /// LoRA file format: diffusers (also writes PEFT folders) or kohya.
    #[arg(long)]
    format: Option<String>,
    /// Also write the embedding in A1111's format.
    #[arg(long)]
    a1111: bool,
    /// Hypernetwork layer structure: comma-separated width multipliers, starting and ending
    /// with 1 (default 1,2,1).
    #[arg(long, value_delimiter = ',')]
    hypernetwork_layers: Option<Vec<f64>>,
    /// Hypernetwork activation, A1111's names: linear (default), relu, leakyrelu, elu, swish
    /// (A1111's hard swish), tanh, sigmoid, silu, gelu, mish, ...
    #[arg(long)]
    hypernetwork_activation: Option<String>,
    /// Add a LayerNorm after every hypernetwork layer (A1111's layer normalization).
    #[arg(long)]
    hypernetwork_layer_norm: bool,
    /// Hypernetwork dropout while training: one probability (after every hidden layer) or
    /// A1111's dropout structure, one value per layer entry (e.g. 0,0.3,0).
    #[arg(long, value_delimiter = ',')]
    hypernetwork_dropout: Option<Vec<f64>>,
    /// Context widths that get a hypernetwork module pair (A1111's enable sizes),
    /// comma-separated; default: every width of the UNet's attention layers.
    #[arg(long, value_delimiter = ',')]
    hypernetwork_widths: Option<Vec<usize>>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    max_train_steps: Option<u64>,
    #[arg(long)]
    train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<u64>,
    /// constant, constant_with_warmup or cosine.
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    lr_warmup_steps: Option<u64>,
    #[arg(long)]
    adam_beta1: Option<f64>,
    #[arg(long)]
    adam_beta2: Option<f64>,
    #[arg(long)]
    adam_weight_decay: Option<f64>,
    #[arg(long)]
    adam_epsilon: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    snr_gamma: Option<f64>,
    #[arg(long)]
    noise_offset: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpointing_steps: Option<u64>,
    #[arg(long)]
    validation_steps: Option<u64>,
    /// Repeatable; default: the instance prompt.
    #[arg(long = "validation-prompt")]
    validation_prompts: Vec<String>,
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Continue the run whose output folder (or checkpoints folder) this is.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// `--method hyper-lora`: the hypernetwork folder `knobs hyper pretrain` wrote (default
    /// with the built-in base model: the built-in models/hyperlora).
    #[arg(long)]
    hypernetwork_dir: Option<PathBuf>,
    /// `--method hyper-lora`: optimise the concept's code through the frozen hypernetwork for
    /// this many steps (from the zero-shot code) before any rank-relaxed steps.
    #[arg(long)]
    hyper_code_steps: Option<u64>,
    /// Judge folder for `--method hyper-lora` (default: models/judge).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

macro_rules! set {
    ($cfg:ident, $args:ident, $($field:ident),+) => { $( if let Some(v) = $args.$field.clone() { $cfg.$field = v; } )+ };
    (opt $cfg:ident, $args:ident, $($field:ident),+) => { $( if $args.$field.is_some() { $cfg.$field = $args.$field.clone(); } )+ };
}

pub fn config(args: &Args) -> Result<TrainConfig> {
    let mut cfg = match &args.config {
        Some(path) => TrainConfig::from_toml(path)?,
        None => TrainConfig::default(),
    };
    if let Some(m) = &args.method {
        cfg.method = Method::parse(m)?;
    }
    if let Some(f) = &args.format {
        cfg.format = match f.as_str() {
            "diffusers" | "peft" => LoraFormat::Diffusers,
            "kohya" => LoraFormat::Kohya,
            other => anyhow::bail!("--format: unknown format `{other}`; known: diffusers, kohya"),
        };
    }
    if let Some(s) = &args.lr_scheduler {
        cfg.lr_scheduler = LrSchedule::parse(s).with_context(|| format!("--lr-scheduler: unknown schedule `{s}`; known: {}", LrSchedule::NAMES))?;
    }
    set!(cfg, args, model, out, num_class_images, prior_loss_weight, num_vectors, rank, target_modules, train_batch_size,
        gradient_accumulation_steps, lr_warmup_steps, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon, max_grad_norm,
        noise_offset, seed, checkpointing_steps, validation_steps, guidance_scale, hypernetwork_layers, hypernetwork_activation,
        hypernetwork_dropout, hypernetwork_widths, hyper_code_steps);
    set!(opt cfg, args, concept, instance_dir, instance_prompt, class_prompt, class_dir, resolution, placeholder_token,
        initializer_token, alpha, grad_scale, learning_rate, max_train_steps, snr_gamma, resume, hypernetwork_dir, judge);
    if cfg.method == Method::HyperLora && cfg.hypernetwork_dir.is_none() {
        cfg.hypernetwork_dir = super::builtin::hypernetwork_for(&cfg.model);
    }
    cfg.center_crop &= !args.random_crop;
    cfg.random_flip |= args.random_flip;
    cfg.train_text_encoder |= args.train_text_encoder;
    cfg.conv |= args.conv;
    cfg.a1111_embedding |= args.a1111;
    cfg.hypernetwork_layer_norm |= args.hypernetwork_layer_norm;
    cfg.train_only.extend(args.train_only.iter().cloned());
    cfg.lr_scale.extend(args.lr_scale.iter().cloned());
    cfg.validation_prompts.extend(args.validation_prompts.iter().cloned());
    Ok(cfg)
}

pub fn run_cmd(args: Args) -> Result<()> {
    let cfg = config(&args)?;
    let interactive = std::io::stderr().is_terminal();
    if cfg.method == Method::HyperLora {
        let judge = super::judge::judge_dir(cfg.judge.as_deref());
        let summary = knobs_train::hyperlora::run_train(&cfg, &judge, &mut |tick| {
            if tick.step % 50 == 0 || tick.step == tick.total {
                eprintln!("hyper-lora {}/{} loss {:.4}", tick.step, tick.total, tick.loss);
            }
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!(
                "hyper-lora: zero-shot in {:.2} s, {} code steps, {} rank-relaxed steps, {:.1} s in all; LoRA rank {}",
                summary.zero_shot_seconds, summary.code_steps, summary.steps, summary.seconds, summary.lora_rank
            );
            for p in &summary.outputs {
                println!("wrote {}", p.display());
            }
        }
        return Ok(());
    }
    let bar = ProgressBar::new(cfg.max_train_steps());
    bar.set_style(ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}").unwrap());
    let summary = run(&cfg, &mut |tick| {
        bar.set_position(tick.step);
        bar.set_message(format!("loss {:.4}", tick.loss));
        if !interactive && (tick.step % 50 == 0 || tick.step == tick.total) {
            eprintln!("train {}/{} loss {:.4}", tick.step, tick.total, tick.loss);
        }
    })?;
    bar.finish();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} steps in {:.1} s ({:.3} s/step), {} trainable parameters",
            summary.method, summary.steps, summary.seconds, summary.seconds_per_step, summary.trainable_params
        );
        for p in &summary.outputs {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
