//! `knobs judge`: train the attribute judge, check it on held-out renderings, and score images
//! with it.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use knobs_world::judge::Judge;
use knobs_world::judge::train::{TrainConfig, train_and_save};

/// Where the judge lives when `--judge` is not given.
pub const DEFAULT_JUDGE: &str = "models/judge";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train a judge on renderings drawn in memory and write config.json + judge.safetensors.
    Train(TrainArgs),
    /// A judge's accuracy per attribute on fresh held-out renderings.
    Check(CheckArgs),
    /// Predict the attributes of PNG images (files or folders of them).
    Score(ScoreArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Output folder.
    #[arg(long, default_value = DEFAULT_JUDGE)]
    out: PathBuf,
    /// Optimizer steps (the committed judge's recipe: about 8 minutes on 2 cores).
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    steps: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per step.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    batch: usize,
    /// Held-out renderings the accuracy in config.json is measured on.
    #[arg(long, default_value_t = 2000)]
    heldout: usize,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Judge folder (default: models/judge).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Number of held-out renderings.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// PNG files, or folders whose .png files are all scored.
    #[arg(required = true, value_name = "DIR-or-PNG")]
    paths: Vec<PathBuf>,
    /// Judge folder (default: models/judge).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train(a) => train(a),
        Command::Check(a) => check(a),
        Command::Score(a) => score(a),
    }
}

/// `--judge`, else the built-in judge (`models/judge`).
pub fn judge_dir(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_path_buf).or_else(|| knobs_train::builtin::dir(knobs_train::builtin::JUDGE)).unwrap_or_else(|| PathBuf::from(DEFAULT_JUDGE))
}

/// Loads the judge, naming `--judge` in the error.
pub fn load_judge(arg: Option<&Path>) -> Result<Judge> {
    let dir = judge_dir(arg);
    Judge::load(&dir).with_context(|| format!("--judge {}", dir.display()))
}

fn train(args: TrainArgs) -> Result<()> {
    ensure!(args.steps >= 1, "--steps must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    let mut config = TrainConfig { seed: args.seed, steps: args.steps, batch: args.batch, ..Default::default() };
    config.warmup = config.warmup.min(args.steps / 10);
    ensure!(args.heldout >= 1, "--heldout must be at least 1");
    let interactive = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(config.steps)
        .with_style(ProgressStyle::with_template("judge [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}").unwrap());
    let start = Instant::now();
    let record = train_and_save(&config, &args.out, args.heldout, &mut |t| {
        bar.set_position(t.step);
        bar.set_message(format!("loss {:.4}", t.loss));
        if !interactive && (t.step % 100 == 0 || t.step == t.total) {
            eprintln!("judge {}/{} loss {:.4} lr {:.2e} elapsed {:.0}s", t.step, t.total, t.loss, t.lr, start.elapsed().as_secs_f64());
        }
    })?;
    bar.finish_and_clear();
    println!("trained in {:.0} s, final loss {:.4}", record.seconds, record.final_loss);
    let mut acc: Vec<_> = record.heldout_accuracy.iter().collect();
    acc.sort_by_key(|(k, _)| order(k));
    for (k, v) in acc {
        println!("  {k:<10} {:.2}% on {} held-out renderings", v * 100.0, record.heldout_images);
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn order(name: &str) -> usize {
    ["shape", "colour", "background", "size", "position"].iter().position(|n| *n == name).unwrap_or(9)
}

fn check(args: CheckArgs) -> Result<()> {
    ensure!(args.n >= 1, "--n must be at least 1");
    let judge = load_judge(args.judge.as_deref())?;
    let start = Instant::now();
    // Beyond the renderings `judge train` measured on.
    let acc = judge.heldout_accuracy(1_000_000, args.n);
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> = acc.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        println!("{}", serde_json::json!({ "images": args.n, "accuracy": map }));
    } else {
        for (k, v) in acc {
            println!("{k:<10} {:.2}%", v * 100.0);
        }
        println!("{} held-out renderings in {:.1} s", args.n, start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The PNG files named, folders expanded (sorted), in order.
fn png_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .png files in this folder", p.display());
            }
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}

fn score(args: ScoreArgs) -> Result<()> {
    let judge = load_judge(args.judge.as_deref())?;
    let files = png_files(&args.paths)?;
    let s = judge.image_size();
    let mut images: Vec<RgbImage> = Vec::with_capacity(files.len());
    let mut resized = Vec::new();
    for f in &files {
        let img = image::open(f).with_context(|| format!("{}: cannot read as an image", f.display()))?.to_rgb8();
        if img.dimensions() != (s, s) {
            eprintln!(
                "note: {} is {}x{}; the judge reads {s}x{s} images, so it was resized (predictions may be less reliable)",
                f.display(),
                img.width(),
                img.height()
            );
            resized.push(f.display().to_string());
        }
        images.push(img);
    }
    let preds = judge.predict(&images);
    if args.json {
        let items: Vec<serde_json::Value> = files
            .iter()
            .zip(&preds)
            .map(|(f, p)| {
                let mut v = serde_json::to_value(p).expect("predictions serialise");
                v["path"] = f.display().to_string().into();
                v["resized"] = resized.contains(&f.display().to_string()).into();
                v
            })
            .collect();
        println!("{}", serde_json::json!({ "image_size": s, "images": items }));
    } else {
        for (f, p) in files.iter().zip(&preds) {
            println!(
                "{}: {} ({:.2}) {} ({:.2}) on {} ({:.2}), {} ({:.2}), {} ({:.2}); pattern {} ({:.2}), mark {} ({:.2})",
                f.display(),
                p.shape.value,
                p.shape.prob,
                p.colour.value,
                p.colour.prob,
                p.background.value,
                p.background.prob,
                p.size.value,
                p.size.prob,
                p.position.value,
                p.position.prob,
                p.pattern.value,
                p.pattern.prob,
                if p.mark.value { "yes" } else { "no" },
                p.mark.prob
            );
        }
    }
    Ok(())
}
