//! The adapter store: one folder whose entries are adapters by name. `NAME.safetensors` is a
//! LoRA-family file (diffusers, kohya, LyCORIS) or a textual-inversion embedding; `NAME/` is
//! a PEFT folder (any method) or a diffusers LoRA folder. Uploads are written beside the
//! entries under a hidden name and renamed into place once the worker has loaded them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use knobs_train::finetune::outputs::size_of;
use serde_json::{Value, json};

use crate::cmd::adapter::inspect::describe;

/// What a name refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub embedding: bool,
    pub bytes: u64,
}

pub struct Store {
    pub dir: PathBuf,
    /// What reading each entry told (its kind, its `inspect` description), kept while its size
    /// and modification time stay the same: requests and listings do not read the files again.
    known: Mutex<HashMap<PathBuf, Facts>>,
}

#[derive(Clone)]
struct Facts {
    stamp: (Option<SystemTime>, u64),
    embedding: bool,
    /// Read on the first listing that shows the entry.
    description: Option<Value>,
}

/// Names are file names without the extension, and adapter names on the pipeline: letters,
/// digits, `-` and `_`, starting with a letter or digit (the worker's scratch names do not).
pub fn check_name(name: &str) -> Result<()> {
    let ok = name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !ok {
        bail!("`{name}` is not an adapter name: use 1-128 letters, digits, '-' or '_', starting with a letter or digit");
    }
    Ok(())
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("--adapters {}: cannot create the folder", dir.display()))?;
        Ok(Store { dir: dir.to_path_buf(), known: Mutex::new(HashMap::new()) })
    }

    /// The facts about `path`, read again only when it changed; with `describe`, its
    /// description too.
    fn facts(&self, path: &Path, describe_it: bool) -> (Facts, u64) {
        let bytes = size_of(std::slice::from_ref(&path.to_path_buf()));
        let stamp = (std::fs::metadata(path).and_then(|m| m.modified()).ok(), bytes);
        let mut known = self.known.lock().expect("store facts");
        let fresh = known.get(path).filter(|f| f.stamp == stamp).cloned();
        let mut facts = fresh.unwrap_or_else(|| Facts { stamp, embedding: crate::cmd::adapter::is_embedding(path), description: None });
        if describe_it && facts.description.is_none() {
            facts.description = Some(describe(path).unwrap_or_else(|e| json!({ "error": format!("{e:#}") })));
        }
        known.insert(path.to_path_buf(), facts.clone());
        (facts, bytes)
    }

    fn entry_at(&self, name: &str, path: PathBuf) -> Entry {
        let (facts, bytes) = self.facts(&path, false);
        Entry { name: name.to_string(), bytes, path, embedding: facts.embedding }
    }

    /// The entry called `name`, if the store holds one.
    pub fn get(&self, name: &str) -> Option<Entry> {
        check_name(name).ok()?;
        let file = self.dir.join(format!("{name}.safetensors"));
        let folder = self.dir.join(name);
        if file.is_file() {
            Some(self.entry_at(name, file))
        } else if folder.is_dir() {
            Some(self.entry_at(name, folder))
        } else {
            None
        }
    }

    /// Every entry, by name.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let path = e?.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let name = if path.is_dir() { Some(file_name) } else { file_name.strip_suffix(".safetensors") };
            if let Some(name) = name.filter(|n| check_name(n).is_ok()) {
                out.push(self.entry_at(name, path.clone()));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Where an upload of `name` is written before it is checked.
    pub fn staging(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".upload-{name}.safetensors"))
    }

    /// Puts a checked upload in place under its name.
    pub fn commit(&self, name: &str) -> Result<Entry> {
        let to = self.dir.join(format!("{name}.safetensors"));
        std::fs::rename(self.staging(name), &to).with_context(|| format!("cannot store {}", to.display()))?;
        Ok(self.entry_at(name, to))
    }

    pub fn remove(&self, entry: &Entry) -> Result<()> {
        if entry.path.is_dir() {
            std::fs::remove_dir_all(&entry.path)
        } else {
            std::fs::remove_file(&entry.path)
        }
        .with_context(|| format!("cannot remove {}", entry.path.display()))
    }

    /// What `GET /v1/adapters` shows of an entry: its name, kind, method and ranks as `knobs
    /// adapter inspect` reads them, its size and whether it is loaded now.
    pub fn describe(&self, entry: &Entry, loaded: bool) -> Value {
        let d = self.facts(&entry.path, true).0.description.unwrap_or_default();
        let ranks: std::collections::BTreeSet<u64> = d["modules"].as_array().into_iter().flatten().filter_map(|m| m["rank"].as_u64()).collect();
        json!({
            "name": entry.name,
            "kind": if entry.embedding { "embedding" } else { "adapter" },
            "format": d["format"],
            "method": d["method"],
            "rank": ranks.iter().max(),
            "bytes": entry.bytes,
            "loaded": loaded,
        })
    }
}
