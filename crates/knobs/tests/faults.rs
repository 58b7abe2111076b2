//! Faults a long training run meets: killed at 50 random moments, a full disk, a read-only
//! output folder, a checkpoint cut short. Each stops with a clear message, damages nothing
//! already written, and the same command run again ends bit-identical to an uninterrupted run.
//! The disk tests mount small tmpfs folders (root with mount rights, as CI and this machine
//! have); where mounting is refused they say so and check nothing else.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{knobs, s, tiny_model};
use knobs_nn::io::read_safetensors;

const STEPS: &str = "4";

fn args(out: &Path) -> Vec<String> {
    [
        "train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(out), "--max-train-steps", STEPS,
        "--checkpointing-steps", "1", "--rank", "2", "--num-samples", "0",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn run(out: &Path) -> std::process::Output {
    let a = args(out);
    knobs(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// What a finished run leaves that must not depend on interruptions: the LoRA and the losses.
fn result(out: &Path) -> (Vec<u8>, String) {
    let lora = std::fs::read(out.join("unet_lora/adapter_model.safetensors")).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    (lora, std::fs::read_to_string(out.join("loss.csv")).unwrap())
}

/// The files in `out/checkpoints`: (checkpoints, temporary files of unfinished writes).
fn checkpoint_files(out: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.into_iter().partition(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
}

/// Every checkpoint left in `out` reads (a write cut short leaves only its temporary file).
fn checkpoints_intact(out: &Path) {
    for p in checkpoint_files(out).0 {
        assert!(p.extension().is_some_and(|x| x == "safetensors"), "a stray file was left: {}", p.display());
        read_safetensors(&p).unwrap_or_else(|err| panic!("a checkpoint was damaged: {err}"));
    }
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs at `dir` with mount options `opts`, or None where mounting is not allowed.
fn tmpfs(dir: &Path, opts: &str) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs", s(dir)]).status().is_ok_and(|st| st.success());
    if !ok {
        eprintln!("cannot mount a tmpfs here (not root, or no mount rights): the disk-full and read-only checks are skipped");
    }
    ok.then(|| Mount(dir.to_path_buf()))
}

#[test]
fn runs_killed_at_fifty_random_moments_resume_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("whole");
    let start = Instant::now();
    let out = run(&reference);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = start.elapsed().as_secs_f64();
    let want = result(&reference);
    // Kill moments spread over the whole run (loading, steps, checkpoint writes, the end).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for k in 0..50 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = whole * 1.1 * ((state >> 11) as f64 / (1u64 << 53) as f64);
        let out = tmp.path().join(format!("killed-{k}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_knobs")).args(args(&out)).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_secs_f64(at));
        let _ = child.kill();
        child.wait().unwrap();
        checkpoints_intact(&out);
        let again = run(&out);
        assert!(again.status.success(), "kill {k} at {at:.2} s: {}", String::from_utf8_lossy(&again.stderr));
        assert!(result(&out) == want, "kill {k} at {at:.2} s of {whole:.2} s: the resumed run differs");
        assert!(checkpoint_files(&out).1.is_empty(), "kill {k}: the resumed run cleans up unfinished writes");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn a_truncated_checkpoint_is_passed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("whole");
    assert!(run(&reference).status.success());
    let want = result(&reference);
    // A finished run's newest checkpoint cut in half, as a crash outside knobs could leave it.
    let out = tmp.path().join("cut");
    assert!(run(&out).status.success());
    let newest = out.join(format!("checkpoints/train-{:08}.safetensors", STEPS.parse::<u64>().unwrap()));
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(out.join("unet_lora/adapter_model.safetensors")).unwrap();
    let again = run(&out);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("passed over unreadable checkpoint") && stderr.contains(s(&newest)), "{stderr}");
    assert!(result(&out) == want, "resumed from the previous checkpoint, the run ends as the uninterrupted one");
    // With every checkpoint unreadable, the run stops and names them.
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap().flatten() {
        std::fs::write(e.path(), b"garbage").unwrap();
    }
    let err = run(&out);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(!err.status.success() && stderr.contains("no readable checkpoint"), "{stderr}");
}

#[test]
fn a_full_disk_stops_the_run_and_the_rest_resumes_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("whole");
    assert!(run(&reference).status.success());
    let want = result(&reference);
    let ckpt = std::fs::metadata(reference.join(format!("checkpoints/train-{:08}.safetensors", STEPS.parse::<u64>().unwrap()))).unwrap().len();
    // Room for about two checkpoints: the run fills the disk while writing its later ones.
    let Some(mount) = tmpfs(&tmp.path().join("small"), &format!("size={}k", (ckpt * 5 / 2) / 1024)) else { return };
    let out = mount.0.join("run");
    let failed = run(&out);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "the run cannot fit");
    assert!(stderr.contains("No space left on device") && stderr.contains(s(&out)), "the message names the file and the cause: {stderr}");
    checkpoints_intact(&out);
    // Moved to a disk with room, the same command finishes the run.
    let moved = tmp.path().join("moved");
    assert!(Command::new("cp").args(["-r", s(&out), s(&moved)]).status().unwrap().success());
    let again = run(&moved);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(result(&moved) == want);
}

#[test]
fn a_read_only_output_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = tmpfs(&tmp.path().join("ro"), "ro,size=1m") else { return };
    for out in [mount.0.join("run"), mount.0.clone()] {
        let failed = run(&out);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success());
        assert!(stderr.contains("Read-only file system") && stderr.contains(s(&out)), "{stderr}");
    }
}
