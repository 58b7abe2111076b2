//! `knobs bench`: each method's training step and one generation step on a model, each mode in
//! a fresh process of its own so that its peak memory is its own.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use knobs_train::bench::{BenchOptions, Measurement, measure, method_of};
use knobs_train::builtin;
use knobs_train::finetune::config::MixedPrecision;
use clap::ValueEnum;
use knobs_nn::io::FloatDtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Diffusers model folder or single-file checkpoint (default: the built-in base model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pixels (default: the model's own).
    #[arg(long)]
    resolution: Option<u32>,
    /// Training batch size.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed steps per mode; the median is reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// What to time, comma-separated: full, lora, dora, loha, lokr, oft, ia3, ti (training
    /// steps), generate.
    #[arg(long, value_delimiter = ',', default_value = "full,lora,ia3,ti,generate")]
    modes: Vec<String>,
    /// Time the UNet computing in bf16 or fp16 over f32 weights (as `train --mixed-precision`,
    /// without loss scaling).
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    mixed_precision: MixedPrecision,
    /// Time the training steps under gradient checkpointing (as `train
    /// --gradient-checkpointing`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Keep the frozen weight matrices and kernels in f32, f16 or bf16 (as `train` and
    /// `generate --weights-dtype`; by default as they do: f32, except what `generate` keeps in
    /// bf16 under `--mixed-precision bf16`).
    #[arg(long)]
    weights_dtype: Option<FloatDtype>,
    /// Print the measurements as JSON.
    #[arg(long)]
    json: bool,
    /// Time one mode in this process (what each mode's own process runs).
    #[arg(long, hide = true)]
    child: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let model = builtin::model_or_default(args.model.as_deref())?;
    let options = BenchOptions { model: model.clone(), resolution: args.resolution, batch: args.batch, steps: args.steps, warmup: args.warmup, mixed_precision: args.mixed_precision, gradient_checkpointing: args.gradient_checkpointing, weights_dtype: args.weights_dtype };
    if let Some(mode) = &args.child {
        println!("{}", serde_json::to_string(&measure(mode, &options)?)?);
        return Ok(());
    }
    for mode in &args.modes {
        method_of(mode)?;
    }
    let mut results = Vec::new();
    for mode in &args.modes {
        let m = in_child(mode, &args, &model)?;
        if !args.json {
            if results.is_empty() {
                print_header(&m, &model);
            }
            print_row(&m);
        }
        results.push(m);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

fn in_child(mode: &str, args: &Args, model: &std::path::Path) -> Result<Measurement> {
    let exe = std::env::current_exe().context("cannot find the knobs executable to run a mode in")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--threads").arg(knobs_nn::threads().to_string()).arg("--device").arg(knobs_nn::device::selected().to_string()).arg("bench").arg("--child").arg(mode).arg("--model").arg(model);
    cmd.args(["--batch", &args.batch.to_string(), "--steps", &args.steps.to_string(), "--warmup", &args.warmup.to_string()]);
    if let Some(mp) = args.mixed_precision.to_possible_value() {
        cmd.args(["--mixed-precision", mp.get_name()]);
    }
    if let Some(r) = args.resolution {
        cmd.args(["--resolution", &r.to_string()]);
    }
    if args.gradient_checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    if let Some(dtype) = args.weights_dtype {
        cmd.args(["--weights-dtype", dtype.name()]);
    }
    let out = cmd.output().with_context(|| format!("cannot start the process for mode {mode}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        bail!("mode {mode} failed ({}){}", super::child::ended(out.status), if said.trim().is_empty() { String::new() } else { format!(": {}", said.trim()) });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("mode {mode}: unreadable result `{line}`"))
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.0}", b as f64 / (1 << 20) as f64))
}

fn print_header(m: &Measurement, model: &std::path::Path) {
    let mut setup = Vec::new();
    if m.gradient_checkpointing {
        setup.push("gradient checkpointing".to_string());
    }
    if m.weights_dtype != FloatDtype::F32 {
        setup.push(format!("frozen weights {}", m.weights_dtype.name()));
    }
    let setup: String = setup.iter().map(|s| format!(", {s}")).collect();
    println!("model {} ({:.1} MB of weights), device {}, {} threads{setup}, median of {} steps", model.display(), m.model_bytes as f64 / 1e6, m.device, m.threads, m.steps);
    println!("{:<9} {:>10} {:>10} {:>10} {:>6} {:>6} {:>14} {:>12} {:>8}", "mode", "median s", "mean s", "min s", "batch", "px", "peak RSS MiB", "trainable", "load s");
}

fn print_row(m: &Measurement) {
    let batch = if m.mode == "generate" { "1".to_string() } else { m.batch.to_string() };
    println!(
        "{:<9} {:>10.3} {:>10.3} {:>10.3} {:>6} {:>6} {:>14} {:>12} {:>8.2}",
        m.mode,
        m.median_s,
        m.mean_s,
        m.min_s,
        batch,
        m.resolution,
        mib(m.peak_rss_bytes),
        m.trainable_params,
        m.load_s
    );
    if !m.phases.is_empty() {
        let parts: Vec<String> = m.phases.iter().map(|(name, s)| format!("{name} {s:.3}")).collect();
        println!("{:<9} phases, median s: {} (vae_encode timed apart)", "", parts.join(", "));
    }
    if !m.resident_after.is_empty() {
        let parts: Vec<String> = m.resident_after.iter().map(|(name, b)| format!("{name} {}", mib(Some(*b)))).collect();
        println!("{:<9} resident MiB after the last step's {}", "", parts.join(", "));
    }
}
