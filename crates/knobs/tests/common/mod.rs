//! Helpers shared by the CLI tests: running the binary and a tiny base model made with
//! `knobs pretrain` (random quality, the built-in architecture), built once per test binary.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn knobs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knobs")).args(args).output().expect("the knobs binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = knobs(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "knobs {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fail(args: &[&str]) -> String {
    let out = knobs(args);
    assert!(!out.status.success(), "knobs {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A folder made once by `build` and kept in the target's test scratch folder for as long as
/// the knobs binary stays the same (statics are never dropped, so a temporary folder held by
/// one would outlive every test run). Built under a private name, then renamed into place;
/// older builds of the same name are removed.
pub fn cached_dir(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let exe = std::fs::metadata(env!("CARGO_BIN_EXE_knobs")).expect("the knobs binary");
    let stamp = exe.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("{name}-{stamp}-{}", exe.len()));
    if dir.is_dir() {
        return dir;
    }
    let partial = root.join(format!(".{name}-partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).unwrap();
    build(&partial);
    if std::fs::rename(&partial, &dir).is_err() {
        // Another test process got there first.
        let _ = std::fs::remove_dir_all(&partial);
    }
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{name}-")) && e.path() != dir {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    dir
}

/// A diffusers folder with the built-in model's architecture after two steps of each phase.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = cached_dir("tiny-model", |dir| {
            ok(&["pretrain", "--out", dir.join("pretrain").to_str().unwrap(), "--vae-steps", "2", "--base-steps", "2", "--latent-cache", "32"]);
        });
        root.join("pretrain/model")
    })
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
