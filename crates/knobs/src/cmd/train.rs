//! `knobs train`: fine-tune a model on a concept with any registered method. Every setting is
//! declared once in `knobs_train::finetune::config` (flags and TOML keys alike); a `--config`
//! file sets any of them and flags given here override it.
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::parser::ValueSource;
use indicatif::{ProgressBar, ProgressStyle};
use knobs_train::finetune::{TrainConfig, run};
use knobs_train::progress::peak_rss_bytes;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    train: TrainConfig,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// The settings: the `--config` file's, with every flag given on the command line on top.
pub fn config(args: &Args, matches: &clap::ArgMatches) -> Result<TrainConfig> {
    match &args.config {
        None => Ok(args.train.clone()),
        Some(path) => TrainConfig::from_toml(path)?.overridden_by(&args.train, |id| matches.value_source(id) == Some(ValueSource::CommandLine)),
    }
}

pub fn run_cmd(args: Args, matches: &clap::ArgMatches) -> Result<()> {
    let cfg = config(&args, matches)?;
    let interactive = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(cfg.max_train_steps());
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}").unwrap());
    let summary = run(&cfg, &mut |tick| {
        let mut pace = tick.seconds_per_step.map(|s| format!(", {s:.3} s/step")).unwrap_or_default();
        // Peak memory so far, so that a run too large for the machine shows it early.
        if let Some(peak) = peak_rss_bytes() {
            pace.push_str(&format!(", peak {:.0} MiB", peak as f64 / (1u64 << 20) as f64));
        }
        bar.set_prefix(tick.phase);
        bar.set_length(tick.total);
        bar.set_position(tick.step);
        bar.set_message(format!("loss {:.4}{pace}", tick.loss));
        if !interactive && (tick.step % 50 == 0 || tick.step == tick.total || tick.step <= 3) {
            eprintln!("{} {}/{} loss {:.4}{pace}", tick.phase, tick.step, tick.total, tick.loss);
        }
    })?;
    bar.finish();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let pace = summary.seconds_per_step.map(|s| format!(" ({s:.3} s/step)")).unwrap_or_default();
        println!("{}: {} steps in {:.1} s{pace}, {} trainable parameters", summary.method, summary.steps, summary.seconds, summary.trainable_params);
        for (k, v) in &summary.extra {
            println!("  {k}: {v}");
        }
        for p in &summary.outputs {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
