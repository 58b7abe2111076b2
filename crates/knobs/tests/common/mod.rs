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

/// A diffusers folder with the built-in model's architecture after two steps of each phase.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pretrain");
        ok(&["pretrain", "--out", out.to_str().unwrap(), "--vae-steps", "2", "--base-steps", "2", "--latent-cache", "32"]);
        let model = out.join("model");
        (tmp, model)
    })
    .1
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
