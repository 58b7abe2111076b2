//! `knobs-fuzz`: mutation fuzzing of every reader knobs has, on the stable toolchain. Each
//! execution writes a mutant of a seed file into a scratch folder and runs the reader on it,
//! checking that it returns (Ok or a clear error) without panicking, within a time limit, and
//! without allocating more than four times the file's size (plus a small floor) at once.
//! Failing inputs are saved under `--findings`.
//!
//!     knobs-fuzz --target all --execs 2000 --json      # the short run the tests do
//!     scripts/fuzz_long.sh                              # >= 1,000,000 executions
mod alloc;
mod mutate;
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(about = "Mutation fuzzing of knobs' file readers")]
struct Args {
    /// A target name, or `all`; `--list` prints them.
    #[arg(long, default_value = "all")]
    target: String,
    /// Executions per target.
    #[arg(long, default_value_t = 2000)]
    execs: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where failing inputs are written.
    #[arg(long, default_value = "fuzz-findings")]
    findings: PathBuf,
    /// One execution slower than this is a finding (a hang aborts the run at 10x).
    #[arg(long, default_value_t = 2.0)]
    slow_seconds: f64,
    #[arg(long)]
    list: bool,
    /// Print one JSON object per target.
    #[arg(long)]
    json: bool,
}

/// Allocation beyond this many times the input's size (plus the floor) is a finding.
const ALLOC_FACTOR: usize = 4;
/// Readers may allocate this much regardless of the input (buffers, maps, a tokenizer's tables).
const ALLOC_FLOOR: usize = 4 << 20;

static PANIC_MESSAGE: Mutex<String> = Mutex::new(String::new());
/// Milliseconds since the start at which the running execution began (0: none running).
static RUNNING_SINCE: AtomicU64 = AtomicU64::new(0);

#[derive(Default, serde::Serialize)]
struct Report {
    target: String,
    executions: u64,
    seeds: usize,
    ok: u64,
    errors: u64,
    panics: u64,
    over_allocations: u64,
    slow: u64,
    max_ms: f64,
    /// The largest single allocation seen, over the input's size.
    max_alloc_ratio: f64,
    seconds: f64,
}

fn save_finding(dir: &Path, target: &str, kind: &str, n: u64, data: &[u8], note: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("--findings {}", dir.display()))?;
    let path = dir.join(format!("{target}-{kind}-{n}.bin"));
    std::fs::write(&path, data)?;
    std::fs::write(path.with_extension("txt"), note)?;
    Ok(path)
}

fn fuzz(t: &targets::Target, args: &Args, epoch: Instant, say: &dyn Fn(String)) -> Result<Report> {
    let scratch = tempfile::tempdir()?;
    for (name, src) in &t.companions {
        let to = scratch.path().join(name);
        if src.as_os_str().is_empty() {
            std::fs::create_dir_all(&to)?;
        } else {
            std::fs::copy(src, &to).with_context(|| format!("companion {}", src.display()))?;
        }
    }
    let seeds: Vec<Vec<u8>> = t.seeds.iter().map(|p| std::fs::read(p).with_context(|| format!("seed {}", p.display()))).collect::<Result<_>>()?;
    if seeds.is_empty() {
        bail!("target {}: no seed files", t.name);
    }
    let file = scratch.path().join(t.file);
    let mut rng = StdRng::seed_from_u64(args.seed ^ knobs_nn::hash::fnv1a(t.name.as_bytes()));
    let mut r = Report { target: t.name.to_string(), seeds: seeds.len(), ..Default::default() };
    let start = Instant::now();
    for n in 0..args.execs + seeds.len() as u64 {
        // The seeds themselves first: each must read cleanly.
        let data = match seeds.get(n as usize) {
            Some(s) => s.clone(),
            None => {
                let i = rand::Rng::random_range(&mut rng, 0..seeds.len());
                let j = rand::Rng::random_range(&mut rng, 0..seeds.len());
                mutate::mutant(&seeds[i], &seeds[j], &mut rng)
            }
        };
        std::fs::write(&file, &data)?;
        RUNNING_SINCE.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let base = alloc::reset();
        let began = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| (t.run)(scratch.path())));
        let seconds = began.elapsed().as_secs_f64();
        let (_, largest) = alloc::measured(base);
        RUNNING_SINCE.store(0, Ordering::SeqCst);
        r.executions += 1;
        r.max_ms = r.max_ms.max(seconds * 1e3);
        r.max_alloc_ratio = r.max_alloc_ratio.max(largest as f64 / data.len().max(1) as f64);
        let seed_run = (n as usize) < seeds.len();
        match outcome {
            Ok(Ok(())) => r.ok += 1,
            Ok(Err(e)) if seed_run => bail!("target {}: seed {} does not read: {e:#}", t.name, t.seeds[n as usize].display()),
            Ok(Err(_)) => r.errors += 1,
            Err(_) => {
                r.panics += 1;
                let msg = PANIC_MESSAGE.lock().map(|m| m.clone()).unwrap_or_default();
                let p = save_finding(&args.findings, t.name, "panic", n, &data, &msg)?;
                say(format!("{}: PANIC ({msg}) on {}", t.name, p.display()));
            }
        }
        if largest > ALLOC_FACTOR * data.len() + ALLOC_FLOOR {
            r.over_allocations += 1;
            let note = format!("one allocation of {largest} bytes for a {}-byte input", data.len());
            let p = save_finding(&args.findings, t.name, "alloc", n, &data, &note)?;
            say(format!("{}: OVER-ALLOCATION ({note}) on {}", t.name, p.display()));
        }
        if seconds > args.slow_seconds {
            r.slow += 1;
            let p = save_finding(&args.findings, t.name, "slow", n, &data, &format!("{seconds:.2} s"))?;
            say(format!("{}: SLOW ({seconds:.2} s) on {}", t.name, p.display()));
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let all = targets::all();
    if args.list {
        for t in &all {
            println!("{}", t.name);
        }
        return Ok(());
    }
    let chosen: Vec<&targets::Target> = all.iter().filter(|t| args.target == "all" || t.name == args.target).collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|t| t.name).collect();
        bail!("--target {}: unknown; targets: all, {}", args.target, names.join(", "));
    }
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut m) = PANIC_MESSAGE.lock() {
            *m = info.to_string();
        }
    }));
    let epoch = Instant::now();
    let hang = Duration::from_secs_f64(args.slow_seconds * 10.0);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let since = RUNNING_SINCE.load(Ordering::SeqCst);
            if since > 0 && epoch.elapsed().as_millis() as u64 > since + hang.as_millis() as u64 {
                eprintln!("HANG: one execution ran past {} s; its input is the target's scratch file; aborting", hang.as_secs());
                std::process::abort();
            }
        }
    });
    let json = args.json;
    let say = |line: String| eprintln!("{line}");
    let mut total = 0;
    let mut failed = false;
    for t in chosen {
        let r = fuzz(t, &args, epoch, &say)?;
        total += r.executions;
        failed |= r.panics + r.over_allocations + r.slow > 0;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:18} {:>8} execs ({} seeds) in {:6.1} s: {} ok, {} errors, {} panics, {} over-allocations, {} slow; slowest {:.1} ms, largest allocation {:.1}x the input",
                r.target, r.executions, r.seeds, r.seconds, r.ok, r.errors, r.panics, r.over_allocations, r.slow, r.max_ms, r.max_alloc_ratio
            );
        }
    }
    if json {
        println!("{}", json!({ "total_executions": total, "failed": failed }));
    } else {
        println!("{total} executions in all");
    }
    if failed {
        bail!("findings written to {}", args.findings.display());
    }
    Ok(())
}
