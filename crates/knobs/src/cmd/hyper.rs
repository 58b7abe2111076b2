//! `knobs hyper pretrain`: trains a HyperLoRA hypernetwork (HyperDreamBooth style) over many
//! procedural concepts on a base model. Run it again with the same --out to resume;
//! --max-minutes spreads the budget over several runs. The result, `OUT/hyperlora/`, feeds
//! `knobs train --method hyper-lora --hypernetwork-dir OUT`.
use std::path::PathBuf;

use anyhow::{Result, ensure};
use knobs_train::hyperlora::{HyperPretrainConfig, Outcome, pretrain};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train the hypernetwork (resumable, deterministic).
    Pretrain(PretrainArgs),
}

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Work folder: checkpoints/ and loss.csv while training, hyperlora/ when done.
    #[arg(long)]
    out: PathBuf,
    /// Base model folder (diffusers layout); default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Judge folder whose image embeddings condition the network (default: models/judge).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Optimizer steps, one concept per step (default 23547, the shipped models/hyperlora's).
    #[arg(long)]
    steps: Option<u64>,
    /// Save a checkpoint and stop after this many minutes; run again to continue.
    #[arg(long)]
    max_minutes: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Procedural training concepts, never a held-out one (default 1024).
    #[arg(long)]
    num_concepts: Option<usize>,
    #[arg(long)]
    images_per_concept: Option<usize>,
    /// Images per step (default 4).
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
    /// LoRA rank of the predicted update (default 2).
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    /// Inner width of the trained factors (A_train [r, aux], B_train [aux, r]; default 32).
    #[arg(long)]
    aux: Option<usize>,
    #[arg(long)]
    code_dim: Option<usize>,
    #[arg(long)]
    hidden: Option<usize>,
    /// Predict a mean and log-variance of the code (reparameterised sampling, KL term).
    #[arg(long)]
    variational: bool,
    /// Weight of the KL term with --variational.
    #[arg(long)]
    kl_weight: Option<f64>,
    /// Probability that a step conditions on image embeddings instead of the learned code
    /// (default 0.7).
    #[arg(long)]
    image_prob: Option<f64>,
    /// Comma-separated module names (default to_q,to_k,to_v,to_out.0).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Pretrain(a) => run_pretrain(a),
    }
}

fn run_pretrain(a: PretrainArgs) -> Result<()> {
    let judge = super::judge::judge_dir(a.judge.as_deref());
    let mut cfg = HyperPretrainConfig::new(knobs_train::builtin::model_or_default(a.model.as_deref())?, judge, a.out);
    macro_rules! set {
        ($($field:ident => $name:ident),*) => { $( if let Some(v) = a.$field { cfg.$name = v; } )* };
    }
    set!(steps => steps, seed => seed, num_concepts => num_concepts, images_per_concept => images_per_concept, batch => batch,
        learning_rate => lr, rank => rank, alpha => alpha, aux => aux, code_dim => code_dim, hidden => hidden,
        kl_weight => kl_weight, image_prob => image_prob, target_modules => target_modules, checkpoint_every => checkpoint_every);
    cfg.variational |= a.variational;
    if let Some(m) = a.max_minutes {
        ensure!(m > 0.0 && m.is_finite(), "--max-minutes must be positive");
        cfg.max_seconds = Some(m * 60.0);
    }
    let start = std::time::Instant::now();
    let outcome = pretrain(&cfg, &mut |tick| {
        if tick.step % 50 == 0 || tick.step == tick.total {
            eprintln!("hyperlora {}/{} loss {:.4} elapsed {:.0}s", tick.step, tick.total, tick.loss, start.elapsed().as_secs_f64());
        }
    })?;
    match outcome {
        Outcome::Finished(dir) => println!("hypernetwork written to {}", dir.display()),
        Outcome::Paused { step } => println!("paused at step {step}; run the same command again to continue"),
    }
    Ok(())
}
