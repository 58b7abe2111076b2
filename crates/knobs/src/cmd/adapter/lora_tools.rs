//! `knobs adapter resize`, `extract` and `combine`: LoRAs made from LoRAs or from models, by
//! truncated SVD (kohya's resize_lora and extract_lora_from_models, PEFT's
//! add_weighted_adapter).
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use knobs_adapters::lora::{Combination, RankTarget, Resized};
use knobs_diffusion::loaders::{Component, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::cpu;

use super::{Output, load_adapter, write};
use crate::cmd::generate::lora_spec;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Linear,
    Cat,
    Svd,
    Ties,
}

#[derive(clap::Args, Debug)]
pub struct CombineArgs {
    /// A LoRA and its weight (default 1); give two or more.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]", required = true)]
    lora: Vec<String>,
    #[arg(long, value_enum)]
    how: How,
    /// The rank of the result (svd, ties).
    #[arg(long)]
    rank: Option<usize>,
    /// ties: the fraction of each update's largest entries kept.
    #[arg(long, default_value_t = 0.2)]
    density: f64,
    #[command(flatten)]
    output: Output,
    /// The model the LoRAs belong to (default: the built-in base model).
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    /// The model the LoRA will apply to.
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned model (same architecture).
    #[arg(long)]
    tuned: PathBuf,
    #[arg(long)]
    rank: usize,
    /// Also extract convolutions (LoCon); default: linear layers only.
    #[arg(long)]
    conv: bool,
    #[command(flatten)]
    output: Output,
    /// Print every layer's result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    /// The LoRA: a PEFT folder, a train output folder, a diffusers or kohya file.
    input: PathBuf,
    /// The largest rank kept per layer.
    #[arg(long, conflicts_with = "energy", required_unless_present = "energy")]
    rank: Option<usize>,
    /// Keep, per layer, the fewest ranks holding this fraction of the update's energy (0-1].
    #[arg(long)]
    energy: Option<f64>,
    #[command(flatten)]
    output: Output,
    /// The model the LoRA belongs to (default: the built-in base model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print every layer's result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn combine(args: &CombineArgs) -> Result<()> {
    args.output.check_new("combine")?;
    let how = match (args.how, args.rank) {
        (How::Linear, _) => Combination::Linear,
        (How::Cat, _) => Combination::Cat,
        (How::Svd | How::Ties, None | Some(0)) => bail!("--rank R (at least 1) is needed with --how {:?}", args.how),
        (How::Svd, Some(rank)) => Combination::Svd { rank },
        (How::Ties, Some(_)) if !(args.density > 0.0 && args.density <= 1.0) => bail!("--density must be in (0, 1], got {}", args.density),
        (How::Ties, Some(rank)) => Combination::Ties { rank, density: args.density },
    };
    let model = knobs_train::builtin::model_or_default(args.model.as_deref())?;
    let mut sd = StableDiffusion::load(&model, &cpu()).with_context(|| format!("--model {}", model.display()))?;
    let mut adapters = PipelineAdapters::new(0);
    let mut sources = Vec::new();
    for (i, spec) in args.lora.iter().enumerate() {
        let (path, weight) = lora_spec(spec);
        let name = format!("lora{i}");
        adapters.load_lora(&mut sd, &path, &name, 1.0).with_context(|| format!("--lora {}", path.display()))?;
        sources.push((name, weight as f64, path));
    }
    for c in Component::all_in(&sd) {
        let here: Vec<(&str, f64)> = sources.iter().filter(|(n, _, _)| adapters.attached().iter().any(|a| a.name == *n && a.component == c)).map(|(n, w, _)| (n.as_str(), *w)).collect();
        if !here.is_empty() {
            adapters.on(&mut sd, c, |am| knobs_adapters::lora::combine(am, &here, "adapter", how)).with_context(|| format!("--how {:?} on {c}", args.how))?;
        }
    }
    write(&mut sd, &mut adapters, &args.output, &sources[0].2)?;
    eprintln!("combined {} LoRAs ({:?}) -> {}", sources.len(), args.how, args.output.out.display());
    Ok(())
}

pub fn extract(args: &ExtractArgs) -> Result<()> {
    args.output.check_new("extract")?;
    let mut sd = StableDiffusion::load(&args.base, &cpu()).with_context(|| format!("--base {}", args.base.display()))?;
    let tuned = StableDiffusion::load(&args.tuned, &cpu()).with_context(|| format!("--tuned {}", args.tuned.display()))?;
    let mut adapters = PipelineAdapters::new(0);
    let mut rows = Vec::new();
    for c in Component::all_in(&sd) {
        let found = adapters
            .on(&mut sd, c, |am| knobs_adapters::lora::extract(am, c.module(&tuned), "adapter", args.rank, args.conv))
            .with_context(|| format!("--tuned {}: {c}", args.tuned.display()))?;
        rows.extend(found.into_iter().map(|r| (c, r)));
    }
    if rows.is_empty() {
        bail!("--tuned {}: no {}layer differs from --base {}", args.tuned.display(), if args.conv { "" } else { "linear " }, args.base.display());
    }
    write(&mut sd, &mut adapters, &args.output, &args.tuned)?;
    if args.json {
        let out: Vec<_> = rows.iter().map(|(c, r)| serde_json::json!({"layer": format!("{c}.{}", r.path), "rank": r.rank, "rel_error": r.rel_error})).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    let worst = rows.iter().map(|(_, r)| r.rel_error).fold(0.0, f64::max);
    eprintln!("{} layers differ; at rank {} the largest relative error is {worst:.2e}; wrote {}", rows.len(), args.rank, args.output.out.display());
    Ok(())
}

pub fn resize(args: &ResizeArgs) -> Result<()> {
    args.output.check_new("resize")?;
    let target = match (args.rank, args.energy) {
        (Some(r), _) => RankTarget::Rank(r),
        (_, Some(e)) => RankTarget::Energy(e),
        _ => bail!("give --rank R or --energy E"),
    };
    let flag = if args.rank.is_some() { "--rank" } else { "--energy" };
    let (mut sd, mut adapters) = load_adapter(&args.input, args.model.as_deref())?;
    let results = resize_all(&mut sd, &mut adapters, target).with_context(|| flag.to_string())?;
    write(&mut sd, &mut adapters, &args.output, &args.input)?;
    if args.json {
        let rows: Vec<_> = results.iter().map(|(c, r)| serde_json::json!({"layer": format!("{c}.{}", r.path), "from": r.from, "to": r.to, "energy": r.energy})).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    let n = results.len().max(1) as f64;
    let mean = results.iter().map(|(_, r)| r.energy).sum::<f64>() / n;
    let min = results.iter().map(|(_, r)| r.energy).fold(1.0, f64::min);
    let (from, to): (usize, usize) = results.iter().fold((0, 0), |(f, t), (_, r)| (f + r.from, t + r.to));
    eprintln!("{} layers: rank {from} -> {to} in all, energy kept mean {mean:.4}, min {min:.4}; wrote {}", results.len(), args.output.out.display());
    Ok(())
}

/// Resizes adapter "adapter" on every component it is on.
fn resize_all(sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, target: RankTarget) -> knobs_adapters::Result<Vec<(Component, Resized)>> {
    let mut out = Vec::new();
    let on: Vec<_> = adapters.attached().iter().filter(|a| a.name == "adapter").map(|a| a.component).collect();
    for c in on {
        let rows = adapters.on(sd, c, |am| knobs_adapters::lora::resize(am, "adapter", target))?;
        out.extend(rows.into_iter().map(|r| (c, r)));
    }
    Ok(out)
}
