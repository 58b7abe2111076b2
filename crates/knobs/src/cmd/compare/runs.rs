//! One (concept, method) run: `knobs train` and `knobs eval` as subprocesses of this same
//! executable (so each training run has its own peak RSS), then the generation timing in
//! process. Stages are written atomically (`train.json`, then `result.json`), so an
//! interrupted compare redoes only what did not finish.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::adapters::{Artefacts, merged_model};
use super::plan::{BASE, CLASS_IMAGES, Job, Plan, RESULT_FILE, TRAIN_FILE, row_method, write_json};
use super::timing::Timer;
use knobs_train::finetune::methods::OptionGroup;

/// Runs `knobs ARGS` (this executable) and parses the JSON object it prints last. Its stderr
/// (progress, errors) passes through.
fn knobs_json(args: &[OsString]) -> Result<Value> {
    let exe = std::env::current_exe().context("cannot find the knobs executable")?;
    let shown = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    // Children run where this process runs.
    let out = Command::new(&exe)
        .arg("--device")
        .arg(knobs_nn::device::selected().to_string())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!("`knobs {shown}` failed ({}); its error, if it could say one, is above", crate::cmd::child::ended(out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).with_context(|| format!("`knobs {shown}` printed nothing"))?;
    serde_json::from_str(last).with_context(|| format!("`knobs {shown}`: its last line is not JSON: {last}"))
}

fn args(items: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    items.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn train(plan: &Plan, job: &Job) -> Result<Value> {
    let steps = plan.budget_steps.to_string();
    let (method, prior) = row_method(&job.method)?;
    let method = method.name();
    let learns_token = row_method(&job.method)?.0.options().contains(&OptionGroup::Tokens);
    let mut a = args(&[&"train", &"--method", &method]);
    a.extend(job.subject.train_flags(learns_token));
    a.extend(args(&[&"--model", &plan.model, &"--out", &job.dir, &"--max-train-steps", &steps, &"--json"]));
    if prior {
        let (class_prompt, n) = (job.subject.class_prompt.clone(), CLASS_IMAGES.to_string());
        a.extend(args(&[&"--class-prompt", &class_prompt, &"--num-class-images", &n]));
    }
    if let (Some(d), Some(_)) = (&plan.hypernetwork_dir, job.settings.get("hypernetwork_dir")) {
        a.extend(args(&[&"--hypernetwork-dir", d]));
    }
    knobs_json(&a)
}

/// `knobs eval` of `model` plus the run's LoRA files and embeddings.
fn eval(plan: &Plan, job: &Job, model: &Path, base_model: Option<&Path>, a: &Artefacts) -> Result<Value> {
    let (k, s) = (plan.images_per_prompt.to_string(), plan.eval_steps.to_string());
    let grid = job.dir.join("eval_grid.png");
    let mut v = args(&[&"eval", &"--model", &model]);
    v.extend(job.subject.eval_flags());
    v.extend(args(&[
        &"--judge", &plan.judge, &"--images-per-prompt", &k, &"--steps", &s, &"--seed", &"0", &"--save-grid", &grid, &"--json",
    ]));
    if let Some(b) = base_model {
        v.extend(args(&[&"--base-model", &b]));
    }
    for l in &a.loras {
        v.extend(args(&[&"--lora", l]));
    }
    for e in &a.embeddings {
        v.extend(args(&[&"--embedding", e]));
    }
    for h in &a.hypernetworks {
        v.extend(args(&[&"--hypernetwork", h]));
    }
    knobs_json(&v)
}

/// A number as it is (integers stay integers), anything else null.
fn num(v: &Value) -> Value {
    if v.is_number() { v.clone() } else { Value::Null }
}

/// The row of numbers the report shows (null where not measurable).
fn metrics(train: Option<&Value>, bytes: Option<u64>, eval: &Value, timing: &Value) -> Value {
    let t = |k: &str| train.map_or(Value::Null, |t| num(&t[k]));
    json!({
        "trainable_params": train.map_or(Value::from(0), |t| num(&t["trainable_params"])),
        "file_bytes": bytes,
        "seconds_per_step": t("seconds_per_step"),
        "train_seconds": t("seconds"),
        "peak_rss_mib": train.and_then(|t| t["peak_rss_bytes"].as_f64()).map(|b| b / (1024.0 * 1024.0)),
        "subject_fidelity": num(&eval["subject_fidelity"]),
        "prompt_fidelity": num(&eval["prompt_fidelity"]),
        "prior_preservation": num(&eval["prior_preservation"]),
        "language_drift": num(&eval["language_drift"]),
        "diversity": num(&eval["diversity"]),
        "gen_ms_base": num(&timing["base_ms"]),
        "gen_ms_unmerged": num(&timing["unmerged_ms"]),
        "gen_ms_merged": num(&timing["merged_ms"]),
    })
}

/// A file of the run folder by its name there, if the run wrote it.
fn own(dir: &Path, name: &str) -> Value {
    if dir.join(name).is_file() { Value::from(name) } else { Value::Null }
}

/// Trains (unless `train.json` says it already did), evaluates, times; writes `result.json`.
pub fn run(plan: &Plan, job: &Job, timer: &mut Timer, say: &dyn Fn(String)) -> Result<Value> {
    let train_summary = if job.method == BASE {
        None
    } else if let Some(done) = job.stage(TRAIN_FILE)? {
        say(format!("{}: training done before ({TRAIN_FILE})", job.label()));
        Some(done["summary"].clone())
    } else {
        say(format!("{}: training {} steps", job.label(), plan.budget_steps));
        let summary = train(plan, job).with_context(|| format!("{}: training", job.label()))?;
        write_json(&job.dir.join(TRAIN_FILE), &json!({ "settings": job.settings, "summary": summary }))?;
        Some(summary)
    };
    let artefacts = match &train_summary {
        None => None,
        Some(s) => {
            let outputs: Vec<PathBuf> = s["outputs"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(PathBuf::from)).collect();
            Some(Artefacts::from_outputs(&outputs).with_context(|| format!("{}: {}", job.label(), job.dir.join(TRAIN_FILE).display()))?)
        }
    };
    say(format!("{}: evaluating", job.label()));
    let merged_dir = job.dir.join("merged_model");
    let evaluated = match &artefacts {
        None => eval(plan, job, &plan.model, Some(&plan.model), &Artefacts::default()),
        Some(a) if a.model.is_some() => eval(plan, job, a.model.as_ref().expect("checked"), Some(&plan.model), a),
        Some(a) if !a.peft.is_empty() => {
            merged_model(&plan.model, a, &merged_dir).with_context(|| format!("{}: merging {:?}", job.label(), a.peft))?;
            let r = eval(plan, job, &merged_dir, Some(&plan.model), a);
            std::fs::remove_dir_all(&merged_dir).with_context(|| format!("cannot remove {}", merged_dir.display()))?;
            r
        }
        Some(a) => eval(plan, job, &plan.model, None, a),
    }
    .with_context(|| format!("{}: evaluating", job.label()))?;
    say(format!("{}: timing generation", job.label()));
    let timing = timer.measure(&job.subject.instance_prompt, artefacts.as_ref()).with_context(|| format!("{}: timing", job.label()))?;
    let bytes = artefacts.as_ref().map(Artefacts::bytes);
    let files = artefacts.as_ref().map_or(Vec::new(), |a| a.files().iter().map(|p| p.display().to_string()).collect());
    let result = json!({
        "concept": job.subject.name,
        "method": job.method,
        "settings": job.settings,
        "metrics": metrics(train_summary.as_ref(), bytes, &evaluated, &timing),
        "train": train_summary,
        "eval": evaluated,
        "generation": timing,
        "files": {
            "loaded": files,
            "eval_grid": own(&job.dir, "eval_grid.png"),
            "loss_curve": own(&job.dir, "loss.png"),
            "samples": own(&job.dir, "samples.png"),
        },
    });
    write_json(&job.dir.join(RESULT_FILE), &result)?;
    Ok(result)
}
