//! `knobs compare`: every method side by side on the same concepts, measured. Each (concept,
//! method) is trained and evaluated as a subprocess of this executable, in
//! `OUT/runs/CONCEPT/METHOD`; the base model is evaluated once per concept as the reference
//! row. Finished runs are kept (`result.json`) and skipped on the next invocation.
mod adapters;
mod plan;
mod report;
mod runs;
mod timing;

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
#[command(after_help = "Resumable: every finished run writes OUT/runs/CONCEPT/METHOD/result.json and is skipped next time \
    (\"skipped (done)\"); a run whose training finished but whose evaluation did not is evaluated again without retraining. \
    Runs made with other settings (--model, --budget-steps, --images-per-prompt, --eval-steps, --judge) are never mixed into \
    one report: compare refuses and names the folder; use another --out or delete that folder.")]
pub struct Args {
    /// Held-out concepts, comma-separated (default: all; `knobs world concepts --list`).
    #[arg(long, value_delimiter = ',', conflicts_with = "instance_dir")]
    pub concepts: Vec<String>,
    /// Your own subject instead of the built-in concepts (every method trains on it).
    #[command(flatten)]
    pub folder: crate::cmd::subject::FolderArgs,
    /// Methods, comma-separated: any that `knobs train --method` accepts, and
    /// `dreambooth-prior` (DreamBooth with prior preservation on generated class images).
    /// Default: every registered method that trains in the shared loop (not hyper-lora).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// The hypernetwork `hyper-lora` predicts with (made by `knobs hyper pretrain`; default with
    /// the built-in base model: the built-in models/hyperlora).
    #[arg(long)]
    pub hypernetwork_dir: Option<PathBuf>,
    /// Training steps, the same for every method (each uses its own default learning rate).
    #[arg(long, default_value_t = 300)]
    pub budget_steps: u64,
    /// Base model folder (diffusers layout); default: the built-in model (models/knobs-base,
    /// found at run time).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Images per prompt in the evaluation (diversity needs at least 2).
    #[arg(long, default_value_t = 4)]
    pub images_per_prompt: usize,
    /// Denoising steps in the evaluation and the generation timing.
    #[arg(long, default_value_t = 25)]
    pub eval_steps: usize,
    /// Judge folder (default: models/judge).
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Print the raw numbers as one JSON object (OUT/results.json always holds them).
    #[arg(long)]
    pub json: bool,
    /// Output folder: runs/, report.md, report.html, results.json, fidelity_vs_size.png.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let plan = plan::Plan::new(&args)?;
    let jobs = plan.jobs();
    // Refuse other settings before any work starts.
    let mut done = Vec::with_capacity(jobs.len());
    for job in &jobs {
        done.push(job.stage(plan::RESULT_FILE)?);
        job.stage(plan::TRAIN_FILE)?;
    }
    let json = args.json;
    let say = move |line: String| if json { eprintln!("{line}") } else { println!("{line}") };
    let mut timer = timing::Timer::new(&plan.model, plan.eval_steps);
    let mut results = Vec::with_capacity(jobs.len());
    for (job, done) in jobs.iter().zip(done) {
        let result = match done {
            Some(r) => {
                say(format!("{}: skipped (done)", job.label()));
                r
            }
            None => {
                let r = runs::run(&plan, job, &mut timer, &say)?;
                say(format!("{}: done", job.label()));
                r
            }
        };
        results.push(result);
    }
    let all = report::write(&plan, &results)?;
    if args.json {
        println!("{all}");
    } else {
        for f in ["report.md", "report.html", "results.json", "fidelity_vs_size.png"] {
            println!("wrote {}", plan.out.join(f).display());
        }
    }
    Ok(())
}
