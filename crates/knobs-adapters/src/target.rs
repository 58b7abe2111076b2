//! Which layers an adapter attaches to, with PEFT's matching rules: a list of names matches a
//! layer whose path equals a name or ends with `.name`; a single string is a regex that must
//! match the whole path. Exclusions use the same rules.
use knobs_nn::{LayerRef, Module, ModuleExt};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{AdapterError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pattern {
    Names(Vec<String>),
    Regex(String),
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::Names(Vec::new())
    }
}

impl Pattern {
    pub fn names(names: &[&str]) -> Self {
        Pattern::Names(names.iter().map(|s| s.to_string()).collect())
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Pattern::Names(n) if n.is_empty())
    }

    pub fn matches(&self, path: &str) -> Result<bool> {
        Ok(match self {
            Pattern::Names(names) => names.iter().any(|n| name_matches(n, path)),
            Pattern::Regex(re) => full_regex(re)?.is_match(path),
        })
    }
}

/// PEFT's rule for one name in a list.
pub fn name_matches(name: &str, path: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

fn full_regex(re: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| AdapterError::Config(format!("target_modules: invalid regex `{re}`: {e}")))
}

/// Target and exclusion patterns together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    pub target_modules: Pattern,
    #[serde(default)]
    pub exclude_modules: Option<Pattern>,
}

impl Targets {
    pub fn new(target_modules: Pattern) -> Self {
        Targets { target_modules, exclude_modules: None }
    }

    pub fn matches(&self, path: &str) -> Result<bool> {
        if let Some(ex) = &self.exclude_modules
            && ex.matches(path)? {
                return Ok(false);
            }
        self.target_modules.matches(path)
    }

    /// The paths of the adaptable layers of `model` that these targets select. Every listed name
    /// must select at least one layer; otherwise the error lists the closest layer names.
    pub fn select<M: Module + ?Sized>(&self, model: &M) -> Result<Vec<String>> {
        let mut layers = Vec::new();
        model.for_each_layer(|path, l: LayerRef<'_>| layers.push((path.to_string(), l.kind())));
        let mut chosen = Vec::new();
        for (path, _) in &layers {
            if self.matches(path)? {
                chosen.push(path.clone());
            }
        }
        let unmatched: Vec<String> = match &self.target_modules {
            Pattern::Names(names) => names.iter().filter(|n| !layers.iter().any(|(p, _)| name_matches(n, p))).cloned().collect(),
            Pattern::Regex(re) => if chosen.is_empty() { vec![re.clone()] } else { vec![] },
        };
        if let Some(name) = unmatched.first() {
            return Err(AdapterError::NoMatch { pattern: name.clone(), near: near_matches(name, &layers) });
        }
        if chosen.is_empty() {
            return Err(AdapterError::NoMatch { pattern: format!("{:?} (all excluded)", self.target_modules), near: vec![] });
        }
        Ok(chosen)
    }
}

/// Up to five layer names closest to `pattern` by edit distance of the last path segments.
fn near_matches(pattern: &str, layers: &[(String, knobs_nn::LayerKind)]) -> Vec<String> {
    let segs = pattern.split('.').count();
    let mut names: Vec<String> = layers
        .iter()
        .map(|(p, _)| {
            let parts: Vec<&str> = p.split('.').collect();
            parts[parts.len().saturating_sub(segs)..].join(".")
        })
        .collect();
    names.sort();
    names.dedup();
    names.sort_by_key(|n| edit_distance(n, pattern));
    names.truncate(5);
    names
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The value of the first key in `patterns` that matches `path` by PEFT's rule for
/// `rank_pattern` / `alpha_pattern`: the key, as a regex, matches the path's end after a `.`.
pub fn pattern_value<V: Copy>(patterns: &std::collections::BTreeMap<String, V>, path: &str) -> Option<V> {
    patterns.iter().find(|(k, _)| Regex::new(&format!("^(.*\\.)?(?:{k})$")).is_ok_and(|re| re.is_match(path))).map(|(_, v)| *v)
}
