//! `knobs world`: write the built-in synthetic world to disk, as a captioned base dataset or as
//! the held-out personalization concepts.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use knobs_world::concept::{DEFAULT_INSTANCES, by_name, held_out};
use knobs_world::dataset::write_concept;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Render a captioned base dataset: 00000.png + 00000.txt per image, and metadata.jsonl.
    Render(RenderArgs),
    /// Write the held-out concepts (one folder each: instance images, captions, concept.json).
    Concepts(ConceptArgs),
}

#[derive(clap::Args)]
pub struct RenderArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Dataset seed; image i depends only on (seed, i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
}

#[derive(clap::Args)]
pub struct ConceptArgs {
    /// Output folder; each concept goes to OUT/<name>/.
    #[arg(long, required_unless_present = "list")]
    out: Option<PathBuf>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
    /// Instance images per concept.
    #[arg(long, default_value_t = DEFAULT_INSTANCES)]
    n: usize,
    /// Only these concepts (repeatable); all of them if absent.
    #[arg(long = "concept", value_name = "NAME")]
    concepts: Vec<String>,
    /// Print the held-out concept names, one a line, and nothing else.
    #[arg(long, conflicts_with_all = ["out", "concepts"])]
    list: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Render(args) => render(args),
        Command::Concepts(args) => concepts(args),
    }
}

/// Sizes below 8 pixels cannot show the shapes; above 1024 the world has nothing more to show.
fn check_size(size: u32) -> Result<()> {
    ensure!((8..=1024).contains(&size), "--size must be between 8 and 1024 pixels, got {size}");
    Ok(())
}

fn check_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create the folder", out.display()))
}

fn render(args: RenderArgs) -> Result<()> {
    ensure!(args.n >= 1, "--n must be at least 1, got {}", args.n);
    check_size(args.size)?;
    check_out(&args.out)?;
    let start = Instant::now();
    knobs_world::write_world(&args.out, args.n, args.seed, args.size)
        .with_context(|| format!("--out {}", args.out.display()))?;
    println!(
        "wrote {} images ({}x{}, seed {}) to {} in {:.1} s",
        args.n,
        args.size,
        args.size,
        args.seed,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn concepts(args: ConceptArgs) -> Result<()> {
    if args.list {
        for c in held_out() {
            println!("{}", c.name);
        }
        return Ok(());
    }
    ensure!(args.n >= 1, "--n must be at least 1, got {}", args.n);
    check_size(args.size)?;
    let specs = if args.concepts.is_empty() {
        held_out()
    } else {
        let mut specs = Vec::new();
        for name in &args.concepts {
            let Some(spec) = by_name(name) else {
                let known: Vec<_> = held_out().into_iter().map(|c| c.name).collect();
                bail!("--concept: unknown concept `{name}`; known: {}", known.join(", "));
            };
            specs.push(spec);
        }
        specs
    };
    let out = args.out.expect("clap requires --out without --list");
    check_out(&out)?;
    for spec in &specs {
        let dir = out.join(&spec.name);
        write_concept(&dir, spec, args.n, args.size).with_context(|| format!("--out {}", out.display()))?;
        println!("{}: {} images of \"{}\" in {}", spec.name, args.n, spec.instance_prompt(), dir.display());
    }
    Ok(())
}
