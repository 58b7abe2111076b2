//! What a `knobs compare` invocation will do: the checked subjects (built-in concepts or the
//! user's folder) and methods, the settings every run must share, and one [`Job`] per
//! (subject, method) with its folder.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use knobs_train::finetune::Method;
use knobs_train::finetune::methods::OptionGroup;
use knobs_world::concept::{ConceptSpec, by_name, held_out};

use crate::cmd::subject::Subject;
use serde_json::{Value, json};

use super::Args;

/// The reference row: the base model itself, evaluated once per concept.
pub const BASE: &str = "base";

/// Compare-only rows: a registered method run with prior preservation (`--class-prompt "a
/// CLASS" --num-class-images N`), so that language drift with and without it sit side by
/// side. (row name, method)
pub const WITH_PRIOR: &[(&str, &str)] = &[("dreambooth-prior", "dreambooth")];
/// Class images generated for the prior-preservation rows (diffusers' example uses 100-200
/// for SD).
pub const CLASS_IMAGES: usize = 50;

/// What a row trains: its method, and whether with prior preservation.
pub fn row_method(row: &str) -> Result<(Method, bool)> {
    match WITH_PRIOR.iter().find(|(r, _)| *r == row) {
        Some((_, m)) => Ok((Method::parse(m)?, true)),
        None => Ok((Method::parse(row)?, false)),
    }
}

/// Every row name `--methods` accepts, in a fixed order (also the report's order): each
/// registered method, followed by its prior-preservation row if it has one.
pub fn known_methods() -> Vec<String> {
    let mut v = Vec::new();
    for m in Method::names() {
        v.push(m.to_string());
        v.extend(WITH_PRIOR.iter().filter(|(_, base)| *base == m).map(|(r, _)| r.to_string()));
    }
    v
}

/// Whether the row's method reads `--hypernetwork-dir`.
fn uses_hypernetwork_dir(row: &str) -> bool {
    row_method(row).is_ok_and(|(m, _)| m.options().contains(&OptionGroup::HyperLora))
}

/// Checks `--methods`: every `knobs train --method` name, plus `dreambooth-prior`.
pub fn parse_methods(names: &[String]) -> Result<Vec<String>> {
    let known = known_methods().join(", ");
    if names.is_empty() {
        return Ok(Method::all().iter().filter(|m| !m.own_loop()).map(|m| m.name().to_string()).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for name in names.iter().map(|n| n.trim()) {
        if row_method(name).is_err() {
            bail!("--methods: unknown method `{name}`; known: {known}");
        }
        if !out.iter().any(|m| m == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Checks `--concepts` (default: every held-out concept).
pub fn parse_concepts(names: &[String]) -> Result<Vec<ConceptSpec>> {
    let all = held_out();
    if names.is_empty() {
        return Ok(all);
    }
    let mut out: Vec<ConceptSpec> = Vec::new();
    for name in names.iter().map(|n| n.trim()) {
        let Some(c) = by_name(name) else {
            let known: Vec<String> = all.iter().map(|c| c.name.clone()).collect();
            bail!("--concepts: unknown concept `{name}`; the held-out concepts are {}", known.join(", "));
        };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The checked invocation.
pub struct Plan {
    pub out: PathBuf,
    pub model: PathBuf,
    pub judge: PathBuf,
    pub subjects: Vec<Subject>,
    pub methods: Vec<String>,
    pub budget_steps: u64,
    pub images_per_prompt: usize,
    pub eval_steps: usize,
    pub hypernetwork_dir: Option<PathBuf>,
}

impl Plan {
    pub fn new(args: &Args) -> Result<Plan> {
        ensure!(args.budget_steps >= 1, "--budget-steps must be at least 1");
        ensure!(args.images_per_prompt >= 1, "--images-per-prompt must be at least 1");
        ensure!(args.eval_steps >= 1, "--eval-steps must be at least 1");
        let methods = parse_methods(&args.methods)?;
        let f = &args.folder;
        let subjects = match &f.instance_dir {
            Some(dir) => {
                let dir = dir.canonicalize().with_context(|| format!("--instance-dir {}", dir.display()))?;
                vec![Subject::folder(&dir, f.instance_prompt.as_deref(), f.class_prompt.as_deref())?]
            }
            None => parse_concepts(&args.concepts)?.into_iter().map(|c| Subject::concept(c.clone(), &c.token)).collect(),
        };
        let model = knobs_train::builtin::model_or_default(args.model.as_deref())?;
        let hypernetwork_dir = match methods.iter().find(|m| uses_hypernetwork_dir(m)) {
            Some(row) => {
                let named = args.hypernetwork_dir.clone().or_else(|| knobs_train::builtin::hypernetwork_for(&model));
                let d = named.with_context(|| format!("--methods {row} needs --hypernetwork-dir DIR (made by `knobs hyper pretrain`)"))?;
                Some(d.canonicalize().with_context(|| format!("--hypernetwork-dir {}", d.display()))?)
            }
            None if args.hypernetwork_dir.is_some() => bail!("--hypernetwork-dir: none of --methods uses it"),
            None => None,
        };
        if !model.join("model_index.json").is_file() {
            bail!("--model {}: not a diffusers pipeline folder (no model_index.json)", model.display());
        }
        let model = model.canonicalize().with_context(|| format!("--model {}", model.display()))?;
        let judge = crate::cmd::judge::judge_dir(args.judge.as_deref());
        if !judge.is_dir() {
            bail!("--judge {}: judge folder not found", judge.display());
        }
        let judge = judge.canonicalize().with_context(|| format!("--judge {}", judge.display()))?;
        std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}: cannot create", args.out.display()))?;
        Ok(Plan {
            out: args.out.clone(),
            model,
            judge,
            subjects,
            methods,
            budget_steps: args.budget_steps,
            images_per_prompt: args.images_per_prompt,
            eval_steps: args.eval_steps,
            hypernetwork_dir,
        })
    }

    /// Every job: per subject the base row first, then each method.
    pub fn jobs(&self) -> Vec<Job> {
        let mut out = Vec::new();
        for c in &self.subjects {
            for m in std::iter::once(BASE.to_string()).chain(self.methods.iter().cloned()) {
                let dir = self.out.join("runs").join(&c.name).join(&m);
                let settings = self.settings(c, &m);
                out.push(Job { subject: c.clone(), method: m, dir, settings });
            }
        }
        out
    }

    /// What decides a run's numbers; a finished run with other settings is never reused.
    fn settings(&self, subject: &Subject, method: &str) -> Value {
        let mut s = json!({
            "model": self.model.display().to_string(),
            "judge": self.judge.display().to_string(),
            "images_per_prompt": self.images_per_prompt,
            "eval_steps": self.eval_steps,
            "seed": 0,
        });
        if method != BASE {
            s["budget_steps"] = self.budget_steps.into();
        }
        // A built-in concept is named by its folder already (and older runs stay reusable).
        if subject.settings().is_object() {
            s["subject"] = subject.settings();
        }
        if let (Some(d), true) = (&self.hypernetwork_dir, uses_hypernetwork_dir(method)) {
            s["hypernetwork_dir"] = d.display().to_string().into();
        }
        s
    }
}

/// One (subject, method) run in `OUT/runs/SUBJECT/METHOD`.
pub struct Job {
    pub subject: Subject,
    pub method: String,
    pub dir: PathBuf,
    pub settings: Value,
}

pub const RESULT_FILE: &str = "result.json";
pub const TRAIN_FILE: &str = "train.json";

impl Job {
    pub fn label(&self) -> String {
        format!("{} / {}", self.subject.name, self.method)
    }

    /// A stage file (`result.json`, `train.json`) of this run, if it exists; an error if it
    /// was written with other settings.
    pub fn stage(&self, file: &str) -> Result<Option<Value>> {
        let path = self.dir.join(file);
        if !path.exists() {
            return Ok(None);
        }
        let v = read_json(&path)?;
        if v["settings"] != self.settings {
            bail!(
                "{}: this run was made with other settings ({}; now {}). knobs compare never mixes settings in one --out: \
                 choose another --out, or delete {} to redo it",
                path.display(),
                v["settings"],
                self.settings,
                self.dir.display()
            );
        }
        Ok(Some(v))
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Writes `value` as pretty JSON, atomically (tmp + rename).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    knobs_world::dataset::write_atomic(path, text.as_bytes())
}
