//! The models knobs ships in `models/` (base model, judge, HyperLoRA hypernetwork), found at
//! run time: `$KNOBS_MODELS`, then `./models`, then a `models/` folder beside the executable
//! or above it (a checkout's `target/release/knobs`), then the source tree the binary was
//! built from. Every command that takes `--model` defaults to the built-in base model.
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub const BASE_MODEL: &str = "knobs-base";
pub const JUDGE: &str = "judge";
/// Pretrained by `knobs hyper pretrain` for the built-in base model only.
pub const HYPERLORA: &str = "hyperlora";

/// Where a built-in model is looked for, in order.
pub fn search_path() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KNOBS_MODELS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("models"));
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).map(|a| a.join("models")));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    dirs
}

/// `models/<name>` from the first place on [`search_path`] that has it.
pub fn dir(name: &str) -> Option<PathBuf> {
    search_path().into_iter().map(|d| d.join(name)).find(|d| d.is_dir())
}

/// Like [`dir`], an error naming `flag` and every place looked in when it is missing.
pub fn require(name: &str, flag: &str) -> Result<PathBuf> {
    match dir(name) {
        Some(d) => Ok(d),
        None => {
            let tried: Vec<String> = search_path().iter().map(|d| d.join(name).display().to_string()).collect();
            bail!("{flag} not given and the built-in models/{name} was not found (looked in {}); pass {flag} DIR or set KNOBS_MODELS", tried.join(", "))
        }
    }
}

/// `given`, or the built-in base model.
pub fn model_or_default(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => require(BASE_MODEL, "--model"),
    }
}

/// `given`, or the built-in judge.
pub fn judge_or_default(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => require(JUDGE, "--judge"),
    }
}

/// The hypernetwork HyperLoRA uses when none is named: the built-in one, and only for the
/// built-in base model it was trained on (its layer shapes are that model's).
pub fn hypernetwork_for(model: &Path) -> Option<PathBuf> {
    let base = dir(BASE_MODEL)?.canonicalize().ok()?;
    (model.canonicalize().ok()? == base).then(|| dir(HYPERLORA)).flatten()
}
