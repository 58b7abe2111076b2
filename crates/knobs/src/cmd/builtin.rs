//! The models knobs ships in `models/` (base model, judge, HyperLoRA hypernetwork): looked up
//! in the working folder first, then in the source tree the binary was built from, so that a
//! checkout works from any folder.
use std::path::{Path, PathBuf};

pub const BASE_MODEL: &str = "knobs-base";
pub const JUDGE: &str = "judge";
/// Pretrained by `knobs hyper pretrain` for the built-in base model only.
pub const HYPERLORA: &str = "hyperlora";

/// `models/<name>` if either place has it.
pub fn dir(name: &str) -> Option<PathBuf> {
    let here = PathBuf::from("models").join(name);
    if here.is_dir() {
        return Some(here);
    }
    let built_in = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")).join(name);
    built_in.is_dir().then_some(built_in)
}

/// The hypernetwork `hyper-lora` uses when none is named: the built-in one, and only for the
/// built-in base model it was trained on (its layer shapes are that model's).
pub fn hypernetwork_for(model: &Path) -> Option<PathBuf> {
    let base = dir(BASE_MODEL)?.canonicalize().ok()?;
    (model.canonicalize().ok()? == base).then(|| dir(HYPERLORA)).flatten()
}
