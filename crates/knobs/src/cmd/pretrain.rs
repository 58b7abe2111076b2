//! `knobs pretrain`: trains the built-in base model on the synthetic world (VAE, then text
//! encoder + UNet). Run it again with the same --out to resume; --max-minutes spreads the
//! budget over several runs.
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use knobs_train::pretrain::{Outcome, PretrainConfig, run};

#[derive(clap::Args)]
pub struct Args {
    /// Work folder: checkpoints/ while training, model/ (a diffusers folder) when done.
    #[arg(long, default_value = "knobs-pretrain")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// VAE optimizer steps.
    #[arg(long)]
    vae_steps: Option<u64>,
    /// Text encoder + UNet optimizer steps.
    #[arg(long)]
    base_steps: Option<u64>,
    /// Batch size of the base phase.
    #[arg(long)]
    batch: Option<usize>,
    /// Scenes whose latents are cached for the base phase.
    #[arg(long)]
    latent_cache: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Save a checkpoint and stop after this many minutes; run again to continue.
    #[arg(long)]
    max_minutes: Option<f64>,
}

pub fn run_cmd(args: Args) -> Result<()> {
    let mut config = PretrainConfig::recipe(args.out.clone());
    config.seed = args.seed;
    if let Some(n) = args.vae_steps {
        config.vae.steps = n;
    }
    if let Some(n) = args.base_steps {
        config.base.steps = n;
    }
    if let Some(n) = args.batch {
        ensure!(n >= 1, "--batch must be at least 1");
        config.base.batch = n;
    }
    if let Some(n) = args.latent_cache {
        ensure!(n >= 1, "--latent-cache must be at least 1");
        config.latent_cache = n;
    }
    if let Some(n) = args.checkpoint_every {
        ensure!(n >= 1, "--checkpoint-every must be at least 1");
        config.checkpoint_every = n;
    }
    if let Some(m) = args.max_minutes {
        ensure!(m > 0.0, "--max-minutes must be positive");
        config.max_seconds = Some(m * 60.0);
    }
    let style = ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}").unwrap();
    let interactive = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let mut bar: Option<(&'static str, ProgressBar)> = None;
    let outcome = run(&config, &mut |tick| {
        if bar.as_ref().map(|(p, _)| *p) != Some(tick.phase) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(tick.total).with_style(style.clone()).with_prefix(tick.phase);
            bar = Some((tick.phase, b));
        }
        let (_, b) = bar.as_ref().unwrap();
        b.set_position(tick.step);
        b.set_message(format!("loss {:.4}", tick.loss));
        // A log file gets no bar; give it a line now and then instead.
        if !interactive && (tick.step % 50 == 0 || tick.step == tick.total) {
            eprintln!("{} {}/{} loss {:.4} elapsed {:.0}s", tick.phase, tick.step, tick.total, tick.loss, start.elapsed().as_secs_f64());
        }
    })?;
    if let Some((_, b)) = bar {
        b.finish();
    }
    match outcome {
        Outcome::Finished(dir) => println!("base model written to {}", dir.display()),
        Outcome::Paused { phase, step } => {
            println!("paused in the {phase} phase at step {step}; run the same command again to continue")
        }
    }
    Ok(())
}
