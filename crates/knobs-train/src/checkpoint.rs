//! Training checkpoints: one safetensors file per save, `<prefix>-<step>.safetensors`, holding
//! the model's parameters (`model.*`), the optimizer's moments (`optim.*`), EMA weights
//! (`ema.*`) and string metadata (step, configuration). The file is written atomically, so a
//! run killed mid-save still finds the previous checkpoint intact.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result};
use knobs_nn::io::{FloatDtype, LoadOptions, StateDict, TensorRef, load_state_dict, param_refs, read_safetensors, write_tensor_refs};
use knobs_nn::optim::{Ema, Optimizer};
use knobs_nn::{Device, Module, ModuleExt};

/// Tensors and metadata gathered for one save: the model's parameters and the optimizer's
/// state shared or borrowed, not copied (see [`TensorRef`]), so that a full fine-tune's
/// checkpoint is written tensor by tensor without a second copy of its gigabytes.
#[derive(Default)]
pub struct State<'a> {
    pub tensors: BTreeMap<String, TensorRef<'a>>,
    pub meta: HashMap<String, String>,
}

impl<'a> State<'a> {
    /// What every training loop saves: its model, its optimiser, and the fingerprint of the
    /// settings it started with (under `key`), so that a resume with other settings is refused.
    pub fn of<M: Module + ?Sized>(model: &M, opt: &'a dyn Optimizer, key: &str, fingerprint: &str) -> Self {
        let mut state = State::default();
        state.model(model);
        state.optimizer(opt);
        state.meta.insert(key.into(), fingerprint.into());
        state
    }
    pub fn add(&mut self, prefix: &str, tensors: BTreeMap<String, TensorRef<'a>>, meta: HashMap<String, String>) {
        self.tensors.extend(tensors.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
        self.meta.extend(meta);
    }
    pub fn model<M: Module + ?Sized>(&mut self, model: &M) {
        self.add("model.", param_refs(model), HashMap::new());
    }
    /// Only the trainable parameters: all an adapter run needs to resume.
    pub fn trainable<M: Module + ?Sized>(&mut self, model: &M) {
        let mut tensors = BTreeMap::new();
        model.for_each_param(|path, p| {
            if p.is_trainable() {
                tensors.insert(path.to_string(), TensorRef::param(&p));
            }
        });
        self.add("model.", tensors, HashMap::new());
    }
    pub fn optimizer(&mut self, opt: &'a dyn Optimizer) {
        let (t, m) = opt.state_refs();
        self.add("optim.", t, m);
    }
    pub fn ema(&mut self, ema: &Ema) {
        let (t, m) = ema.state();
        self.add("", t, m);
    }
}

/// The tensors of `sd` under `prefix`, with the prefix removed (metadata kept).
pub fn sub_dict(sd: &StateDict, prefix: &str) -> StateDict {
    let tensors = sd.tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect();
    StateDict { file: sd.file.clone(), tensors, metadata: sd.metadata.clone() }
}

/// Restores what [`State::model`], [`State::optimizer`] and [`State::ema`] saved.
pub fn restore<M: Module + ?Sized>(sd: &StateDict, model: &mut M, opt: &mut dyn Optimizer, ema: Option<&mut Ema>, device: &Device) -> Result<()> {
    load_state_dict(model, &sub_dict(sd, "model."), LoadOptions::default())?;
    opt.load_state(&sub_dict(sd, "optim."), device)?;
    if let Some(ema) = ema {
        ema.load_state(sd, device)?;
    }
    Ok(())
}

pub struct Checkpoints {
    pub dir: PathBuf,
    pub prefix: String,
    /// How many of the newest checkpoints to keep.
    pub keep: usize,
}

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>, prefix: &str) -> Self {
        Checkpoints { dir: dir.into(), prefix: prefix.to_string(), keep: 2 }
    }

    fn path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{}-{step:08}.safetensors", self.prefix))
    }

    /// Every checkpoint of this prefix, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        if !self.dir.exists() {
            return Ok(out);
        }
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let step = name
                .strip_prefix(&format!("{}-", self.prefix))
                .and_then(|r| r.strip_suffix(".safetensors"))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(step) = step {
                out.push((step, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest checkpoint that reads. One that does not (cut short by a crash or a full
    /// disk outside knobs' atomic writes) is reported and passed over, so a run resumes from
    /// the last good one; none readable is an error naming each.
    pub fn latest(&self) -> Result<Option<(u64, StateDict)>> {
        let all = self.list()?;
        let mut bad = Vec::new();
        for (step, path) in all.into_iter().rev() {
            match read_safetensors(&path) {
                Ok(sd) => {
                    if !bad.is_empty() {
                        eprintln!("warning: passed over unreadable checkpoint(s): {}; resuming from step {step}", bad.join("; "));
                    }
                    return Ok(Some((step, sd)));
                }
                Err(e) => bad.push(format!("{e}")),
            }
        }
        if bad.is_empty() { Ok(None) } else { anyhow::bail!("no readable checkpoint in {}: {}", self.dir.display(), bad.join("; ")) }
    }

    /// The end of a training step that completed `step` of `total`: a checkpoint is due every
    /// `every` steps, at the last step, and when the run pauses here. `state` is only built
    /// when one is due. Returns whether one was written.
    pub fn save_if_due<'a>(&self, step: u64, total: u64, every: u64, pausing: bool, state: impl FnOnce() -> State<'a>) -> Result<bool> {
        let due = step == total || pausing || step.is_multiple_of(every);
        if due {
            self.save(step, state())?;
        }
        Ok(due)
    }

    /// Stops a run whose loss is no longer finite, pointing at the checkpoint to go back to.
    pub fn check_loss(&self, what: &str, value: f64, step: u64) -> Result<()> {
        anyhow::ensure!(value.is_finite(), "{what} loss became {value} at step {step}; the last good checkpoint is in {}", self.dir.display());
        Ok(())
    }

    /// Writes the checkpoint of `step`, then removes all but the newest `keep`.
    pub fn save(&self, step: u64, mut state: State) -> Result<PathBuf> {
        state.meta.insert("step".into(), step.to_string());
        let path = self.path(step);
        write_tensor_refs(&path, &state.tensors, &state.meta, FloatDtype::F32)?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep)) {
            std::fs::remove_file(old).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        }
        // A run killed while writing leaves its temporary file (atomic writes rename only
        // finished files); this run's own is renamed by now, so any left is stale.
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(path)
    }
}

/// Reads a metadata field a checkpoint must have.
pub fn meta<'a>(sd: &'a StateDict, key: &str) -> Result<&'a str> {
    sd.metadata.get(key).map(String::as_str).with_context(|| format!("{}: checkpoint metadata lacks `{key}`", sd.file.display()))
}

pub fn check_same(sd: &StateDict, key: &str, want: &str) -> Result<()> {
    let have = meta(sd, key)?;
    anyhow::ensure!(
        have == want,
        "{}: checkpoint was made with {key} = {have}, this run has {want}; use a new --out or the same settings",
        sd.file.display()
    );
    Ok(())
}

/// The loss history as the bit patterns of its f64 values: JSON's decimal round trip is not
/// exact in serde_json's default float parser, and a resumed run must log the same bytes.
pub fn encode_history(history: &[f64]) -> String {
    history.iter().map(|v| format!("{:016x}", v.to_bits())).collect::<Vec<_>>().join(",")
}

pub fn decode_history(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| u64::from_str_radix(s, 16).map(f64::from_bits).with_context(|| format!("checkpoint loss_history: bad entry `{s}`")))
        .collect()
}
