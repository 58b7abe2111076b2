//! `knobs convert`: a single-file SD-1.x/2.x/SDXL checkpoint to a diffusers folder, or back.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::single_file::{SingleFile, SingleFileOptions, is_single_file, save_pretrained, save_single_file};
use knobs_nn::cpu;
use knobs_nn::io::FloatDtype;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A diffusers pipeline folder.
    Diffusers,
    /// One original-layout `.safetensors` file.
    SingleFile,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to convert: a single `.safetensors` checkpoint or a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// Where to write: a folder (--to diffusers) or a `.safetensors` file (--to single-file).
    #[arg(long)]
    out: PathBuf,
    /// Default: the other layout than --model's.
    #[arg(long, value_enum)]
    to: Option<Target>,
    /// Precision of the written weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: FloatDtype,
    /// Single file in: a diffusers folder whose configs, tokenizer and scheduler to use
    /// instead of inferring them from the tensor shapes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Single file in: the tokenizer folder (default: `tokenizer/` beside the file, or the
    /// Hugging Face cache; SDXL also `tokenizer_2/`, or this folder padded with "!").
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Single file in: epsilon or v_prediction (default: SD-1.x epsilon, SD-2.x v_prediction).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Single file in: the training resolution (default: SD-1.x 512, SD-2.x 768).
    #[arg(long)]
    image_size: Option<usize>,
    /// Single file in: take the UNet's EMA weights (`model_ema.*`) where present.
    #[arg(long)]
    ema: bool,
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let single = is_single_file(&args.model);
    if !single && !args.model.is_dir() {
        bail!("--model {}: no such file or folder", args.model.display());
    }
    let to = args.to.unwrap_or(if single { Target::Diffusers } else { Target::SingleFile });
    match (single, to) {
        (true, Target::Diffusers) => {
            let opts = SingleFileOptions {
                config: args.config.clone(),
                tokenizer: args.tokenizer.clone(),
                prediction_type: args.prediction_type.clone(),
                image_size: args.image_size,
                ema: args.ema,
            };
            let file = SingleFile::open(&args.model, &opts).with_context(|| format!("--model {}", args.model.display()))?;
            let sd = file.load(&cpu()).with_context(|| format!("--model {}", args.model.display()))?;
            save_pretrained(&sd, &file.configs, &args.out, args.dtype).with_context(|| format!("--out {}", args.out.display()))?;
            eprintln!("{} ({:?}) -> diffusers folder {} in {:.1} s", args.model.display(), file.family, args.out.display(), start.elapsed().as_secs_f64());
        }
        (false, Target::SingleFile) => {
            if args.config.is_some() || args.tokenizer.is_some() || args.prediction_type.is_some() || args.image_size.is_some() || args.ema {
                bail!("--config, --tokenizer, --prediction-type, --image-size and --ema describe a single file being read; --model {} is a folder", args.model.display());
            }
            if args.out.is_dir() {
                bail!("--out {}: is a folder; --to single-file writes one .safetensors file", args.out.display());
            }
            let sd = StableDiffusion::from_dir(&args.model, &cpu()).with_context(|| format!("--model {}", args.model.display()))?;
            save_single_file(&sd, &args.out, args.dtype).with_context(|| format!("--out {}", args.out.display()))?;
            eprintln!("{} -> single file {} in {:.1} s", args.model.display(), args.out.display(), start.elapsed().as_secs_f64());
        }
        (true, Target::SingleFile) => bail!("--model {} is already a single file; --to single-file has nothing to do", args.model.display()),
        (false, Target::Diffusers) => bail!("--model {} is already a diffusers folder; --to diffusers has nothing to do", args.model.display()),
    }
    Ok(())
}
