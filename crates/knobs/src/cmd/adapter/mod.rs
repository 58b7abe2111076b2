//! `knobs adapter`: `inspect` what an adapter file holds (`inspect.rs`); `convert` an adapter
//! or embedding to another format; `resize`, `extract` and `combine` LoRAs; `merge` adapters
//! into a model's weights.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use knobs_adapters::PeftType;
use knobs_adapters::lora::LoraConfig;
use knobs_diffusion::clip::embeddings;
use knobs_diffusion::loaders::{LoraFile, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::single_file::{save_pretrained, save_single_file};
use knobs_nn::cpu;
use knobs_nn::io::FloatDtype;

use super::generate::lora_spec;

pub mod inspect;
mod lora_tools;

pub use lora_tools::{CombineArgs, ExtractArgs, ResizeArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// What an adapter or embedding file holds: format, method, adapted modules grouped by
    /// block with their ranks and alphas, size, dtype, metadata, the model it was made for.
    Inspect {
        /// A PEFT folder (adapter_config.json + adapter_model.safetensors) or a .safetensors file.
        path: PathBuf,
        /// Everything as one JSON object, every module with its rank and alpha.
        #[arg(long)]
        json: bool,
    },
    /// Fuse adapters into a model's weights (diffusers' `fuse_lora`, kohya's merge) and write
    /// the result as a diffusers folder, or as one original-layout file for `--out X.safetensors`.
    Merge(MergeArgs),
    /// Write an adapter in another format (LoRA: PEFT folders, diffusers or kohya file; LoHa,
    /// LoKr, DoRA: PEFT folders or a LyCORIS file; IA3, OFT: PEFT) or a textual-inversion
    /// embedding as diffusers' or A1111's file. A format that cannot hold the adapter is
    /// refused, naming what it lacks.
    Convert(ConvertArgs),
    /// Lower a LoRA's rank by truncated SVD of each layer's update (kohya's resize_lora), to a
    /// fixed rank or to the smallest rank keeping a fraction of each layer's energy; prints
    /// the energy kept.
    Resize(ResizeArgs),
    /// A LoRA from the difference of two models of one architecture (kohya's
    /// extract_lora_from_models), e.g. a DreamBooth output and its base: the SVD of each
    /// changed layer's weight difference at --rank; prints what the rank leaves out.
    Extract(ExtractArgs),
    /// Combine LoRAs into one, as PEFT's add_weighted_adapter: linear (equal ranks, factors
    /// summed), cat (exact: the weighted sum of the updates), svd (its rank-R approximation),
    /// ties (trimmed, sign-elected, averaged updates, then rank R).
    Combine(CombineArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PEFT folders, one per component (`unet_<method>/`, `text_encoder_<method>/`, ...).
    Peft,
    /// `pytorch_lora_weights.safetensors` layout (LoRA), or `learned_embeds` (embeddings).
    Diffusers,
    /// kohya-ss keys (LoRA), a LyCORIS file (LoHa, LoKr, DoRA).
    Kohya,
    /// A1111's embedding file (`emb_params`; SDXL: `clip_l` / `clip_g`).
    A1111,
}

/// Where and in which format a tool writes its adapter.
#[derive(clap::Args, Debug)]
pub struct Output {
    #[arg(long, value_enum)]
    to: Format,
    /// A folder (--to peft) or a .safetensors file.
    #[arg(long)]
    out: PathBuf,
}

impl Output {
    /// Refuses an existing --out: the tools write new files, never over the user's.
    fn check_new(&self, tool: &str) -> Result<()> {
        if self.out.exists() {
            bail!("--out {}: already exists; {tool} writes a new one", self.out.display());
        }
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The adapter: a PEFT folder, a train output folder, a diffusers, kohya or LyCORIS file,
    /// or an embedding file.
    input: PathBuf,
    #[command(flatten)]
    output: Output,
    /// The model the adapter belongs to (kohya names resolve against its layers; default: the
    /// built-in base model). Embeddings need none.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model: a diffusers folder or a single `.safetensors` checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// An adapter to fuse, as `generate --lora` takes it (PEFT folder of any method, diffusers,
    /// kohya or LyCORIS file, a `knobs train` output folder); `:WEIGHT` scales it (default 1).
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]", required = true)]
    lora: Vec<String>,
    /// A new diffusers folder, or a `.safetensors` file for one original-layout checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Precision of the written weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: FloatDtype,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Inspect { path, json } => inspect::inspect(&path, json),
        Command::Merge(args) => merge(&args),
        Command::Convert(args) => convert(&args),
        Command::Resize(args) => lora_tools::resize(&args),
        Command::Extract(args) => lora_tools::extract(&args),
        Command::Combine(args) => lora_tools::combine(&args),
    }
}

/// A model (`--model`, default the built-in one) with the adapter at `input` loaded as "adapter".
pub(super) fn load_adapter(input: &Path, model: Option<&Path>) -> Result<(StableDiffusion, PipelineAdapters)> {
    let model = knobs_train::builtin::model_or_default(model)?;
    let mut sd = StableDiffusion::load(&model, &cpu()).with_context(|| format!("--model {}", model.display()))?;
    let mut adapters = PipelineAdapters::new(0);
    adapters.load_lora(&mut sd, input, "adapter", 1.0).with_context(|| input.display().to_string())?;
    Ok((sd, adapters))
}

/// Writes adapter "adapter" in format `to`, refusing a format that cannot hold it.
pub(super) fn write(sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, output: &Output, input: &Path) -> Result<()> {
    let (to, out) = (output.to, output.out.as_path());
    let config = &adapters.get("adapter").context("nothing was loaded")?.config;
    let method = config.peft_type();
    let dora = LoraConfig::is_dora(config.as_ref());
    let input = input.display();
    let written: knobs_adapters::Result<()> = match (to, method) {
        (Format::Peft, _) => {
            std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
            adapters.save_peft(sd, "adapter", out, &method.to_string().to_lowercase()).map(drop)
        }
        (Format::Kohya, PeftType::Lora) if dora => adapters.save_lycoris_file(sd, "adapter", out),
        (Format::Diffusers, PeftType::Lora) => adapters.save_lora_file(sd, "adapter", out, LoraFile::Diffusers),
        (Format::Kohya, PeftType::Lora) => adapters.save_lora_file(sd, "adapter", out, LoraFile::Kohya),
        (Format::Kohya, PeftType::Loha | PeftType::Lokr) => adapters.save_lycoris_file(sd, "adapter", out),
        (Format::A1111, _) => bail!("{input}: --to a1111 is for embeddings; this is a {method} adapter"),
        (to, _) => bail!("{input}: a {method} adapter cannot be written --to {to:?}; it can go --to peft{}", if method == PeftType::Lora { ", diffusers or kohya" } else { "" }),
    };
    written.with_context(|| format!("--out {}", out.display()))
}

/// Whether `path` is a textual-inversion embedding file rather than an adapter.
pub(crate) fn is_embedding(path: &Path) -> bool {
    path.is_file() && (embeddings::is_sdxl_file(path).unwrap_or(false) || embeddings::read(path, None).is_ok())
}

fn convert(args: &ConvertArgs) -> Result<()> {
    args.output.check_new("convert")?;
    let input = || format!("{}", args.input.display());
    if is_embedding(&args.input) {
        let a1111 = match args.output.to {
            Format::A1111 => true,
            Format::Diffusers => false,
            other => bail!("{}: an embedding converts --to diffusers or a1111, not {other:?}", input()),
        };
        if embeddings::is_sdxl_file(&args.input)? {
            let [l, g] = embeddings::read_sdxl(&args.input, None)?;
            embeddings::save_sdxl(&args.output.out, &l, &g)?;
        } else {
            let emb = embeddings::read(&args.input, None)?;
            if a1111 { embeddings::save_a1111(&args.output.out, &emb)? } else { embeddings::save_diffusers(&args.output.out, &emb)? }
        }
        eprintln!("{} -> {}", input(), args.output.out.display());
        return Ok(());
    }
    let (mut sd, mut adapters) = load_adapter(&args.input, args.model.as_deref())?;
    write(&mut sd, &mut adapters, &args.output, &args.input)?;
    let method = adapters.get("adapter").map(|a| a.config.peft_type().to_string()).unwrap_or_default();
    eprintln!("{} ({method}) -> {}", input(), args.output.out.display());
    Ok(())
}

fn merge(args: &MergeArgs) -> Result<()> {
    let start = Instant::now();
    let to_file = args.out.extension().is_some_and(|e| e == "safetensors");
    if args.out.exists() {
        bail!("--out {}: already exists; merge writes a new {}", args.out.display(), if to_file { "file" } else { "folder" });
    }
    let (mut sd, configs) = StableDiffusion::load_with_configs(&args.model, &cpu()).with_context(|| format!("--model {}", args.model.display()))?;
    let mut adapters = PipelineAdapters::new(0);
    for (i, spec) in args.lora.iter().enumerate() {
        let (path, weight) = lora_spec(spec);
        adapters.load_lora(&mut sd, &path, &format!("lora{i}"), weight).with_context(|| format!("--lora {}", path.display()))?;
    }
    adapters.activate_all(&mut sd)?;
    adapters.fuse(&mut sd)?;
    knobs_nn::ModuleExt::for_inference(&mut sd);
    if to_file {
        save_single_file(&sd, &args.out, args.dtype).with_context(|| format!("--out {}", args.out.display()))?;
    } else {
        // Written beside the target and renamed into place: a killed merge leaves no half model.
        let partial = args.out.with_file_name(format!(".{}.partial", args.out.file_name().and_then(|n| n.to_str()).unwrap_or("merged")));
        let _ = std::fs::remove_dir_all(&partial);
        save_pretrained(&sd, &configs, &partial, args.dtype).with_context(|| format!("--out {}", args.out.display()))?;
        std::fs::rename(&partial, &args.out).with_context(|| format!("--out {}: cannot move the merged model into place", args.out.display()))?;
    }
    eprintln!("fused {} adapter(s) into {} -> {} in {:.1} s", args.lora.len(), args.model.display(), args.out.display(), start.elapsed().as_secs_f64());
    Ok(())
}
