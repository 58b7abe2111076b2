//! `knobs adapter inspect`: what an adapter file holds; `knobs adapter merge`: adapters fused
//! into a model's weights, written as a model.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use knobs_adapters::formats::peft;
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::single_file::{PipelineConfigs, save_pretrained, save_single_file};
use knobs_nn::cpu;
use knobs_nn::io::{FloatDtype, read_safetensors};

use super::generate::lora_spec;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the method, config and tensors of a PEFT folder or a safetensors adapter file.
    Inspect {
        /// A PEFT folder (adapter_config.json + adapter_model.safetensors) or a .safetensors file.
        path: PathBuf,
    },
    /// Fuse adapters into a model's weights (diffusers' `fuse_lora`, kohya's merge) and write
    /// the result as a diffusers folder, or as one original-layout file for `--out X.safetensors`.
    Merge(MergeArgs),
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
        Command::Inspect { path } => inspect(&path),
        Command::Merge(args) => merge(&args),
    }
}

fn merge(args: &MergeArgs) -> Result<()> {
    let start = Instant::now();
    let to_file = args.out.extension().is_some_and(|e| e == "safetensors");
    if args.out.exists() {
        bail!("--out {}: already exists; merge writes a new {}", args.out.display(), if to_file { "file" } else { "folder" });
    }
    let configs = PipelineConfigs::of_model(&args.model).with_context(|| format!("--model {}", args.model.display()))?;
    let mut sd = StableDiffusion::load(&args.model, &cpu()).with_context(|| format!("--model {}", args.model.display()))?;
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

fn inspect(path: &Path) -> Result<()> {
    let weights = if path.is_dir() {
        let config = peft::read_config(path)?;
        println!("{}", serde_json::to_string_pretty(&config.to_peft_json())?);
        path.join(peft::WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    };
    let sd = read_safetensors(&weights)?;
    let mut total = 0usize;
    for (key, t) in &sd.tensors {
        let n: usize = t.shape().as_slice().iter().product();
        total += n;
        println!("{key} {:?}", t.shape().as_slice());
    }
    for (k, v) in &sd.metadata {
        println!("metadata {k} = {}", if v.len() > 200 { &v[..200] } else { v });
    }
    println!("{} tensors, {total} values, {} bytes", sd.tensors.len(), std::fs::metadata(&weights)?.len());
    Ok(())
}
