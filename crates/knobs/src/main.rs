//! The `knobs` command line: one file per subcommand under `cmd/`.
mod cmd;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "knobs", version, about = "Fine-tune text-to-image diffusion models by turning only the knobs the job needs")]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Threads for tensor work (matmul, conv, attention, norms); default: every core.
    /// Results are the same for any count.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Where tensor work runs: cpu, cuda[:N], wgpu[:N|:cpu] or vulkan[:N|:cpu]. GPU backends
    /// need a build with the matching cargo feature (`--features cuda`, `wgpu`, `vulkan`).
    #[arg(long, global = true, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    device: knobs_nn::device::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train LoRA and IA3 adapters on the built-in toy classifier and report what they learned.
    Demo(cmd::demo::Args),
    /// Generate images from a text prompt with a Stable Diffusion model (diffusers folder or single file).
    Generate(cmd::generate::Args),
    /// Serve one base model and a store of adapters over HTTP (generate, list, upload, delete,
    /// metrics, and a web page at /).
    Serve(cmd::serve::Args),
    /// Adapter tools: inspect, convert, merge, resize, extract, combine (alias: `knobs lora`).
    #[command(subcommand, visible_alias = "lora")]
    Adapter(cmd::adapter::Command),
    /// Write the built-in synthetic world: a captioned base dataset or the held-out concepts.
    #[command(subcommand)]
    World(cmd::world::Command),
    /// Train the built-in base model on the synthetic world (resumable).
    Pretrain(cmd::pretrain::Args),
    /// Fine-tune on a concept with any method (`--method`, listed in `knobs train --help`).
    Train(Box<cmd::train::Args>),
    /// HyperLoRA hypernetworks (HyperDreamBooth style): `knobs hyper pretrain`.
    #[command(subcommand)]
    Hyper(cmd::hyper::Command),
    /// Train the attribute judge, check it, or score images with it.
    #[command(subcommand)]
    Judge(cmd::judge::Command),
    /// Generate with a model (and adapters) and measure it with the judge: base quality, or
    /// DreamBooth's metrics for a held-out concept.
    Eval(Box<cmd::eval::Args>),
    /// Train and evaluate every method on the same concepts and report the trade-offs:
    /// parameters, file size, time, memory, the judge's measures, generation time.
    Compare(Box<cmd::compare::Args>),
    /// Time each method's training step and one generation step on a model (median of N),
    /// with threads, peak memory and the model's size.
    Bench(cmd::bench::Args),
    /// Convert between a single-file SD-1.x/2.x/SDXL checkpoint (original CompVis / A1111 / SGM keys) and a
    /// diffusers pipeline folder, either way.
    Convert(cmd::convert::Args),
}

fn parse_device(s: &str) -> Result<knobs_nn::device::Target, String> {
    s.parse().map_err(|e: knobs_nn::Error| e.to_string())
}

/// Freed large blocks are kept for reuse (see `knobs_nn::allocator`).
#[global_allocator]
static ALLOCATOR: knobs_nn::allocator::LargeBlocks = knobs_nn::allocator::LargeBlocks;

fn main() {
    knobs_nn::allocator::keep_freed_memory();
    // The matches are kept: `knobs train` tells flags given on the command line from defaults.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let level = ["warn", "info", "debug", "trace"][cli.verbose.min(3) as usize];
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = knobs_nn::set_threads(cli.threads) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    if let Err(e) = knobs_nn::device::select(cli.device) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    // The server's thread answers requests and never touches tensors; its generation worker
    // enters the pool itself.
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        command => knobs_nn::on_worker(|| dispatch(command, &matches)),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Adapter(c) => cmd::adapter::run(c),
        Command::Serve(_) => unreachable!("the server runs outside the pool (see main)"),
        Command::World(c) => cmd::world::run(c),
        Command::Pretrain(args) => cmd::pretrain::run_cmd(args),
        Command::Train(args) => cmd::train::run_cmd(*args, matches.subcommand_matches("train").expect("the train subcommand")),
        Command::Judge(c) => cmd::judge::run(c),
        Command::Hyper(c) => cmd::hyper::run(c),
        Command::Eval(args) => cmd::eval::run(*args),
        Command::Compare(args) => cmd::compare::run(*args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Convert(args) => cmd::convert::run(args),
    }
}
