//! `knobs compare` end to end on a tiny model: two methods on one concept, every report file
//! with a number for every metric, a second invocation that skips the finished runs, and bad
//! input that names the flag.
mod common;

use std::path::Path;
use std::time::Instant;

use common::{fail, knobs, ok, s, tiny_model};
use serde_json::Value;

const METRICS: [&str; 13] = [
    "trainable_params",
    "file_bytes",
    "seconds_per_step",
    "train_seconds",
    "peak_rss_mib",
    "subject_fidelity",
    "prompt_fidelity",
    "prior_preservation",
    "language_drift",
    "diversity",
    "gen_ms_base",
    "gen_ms_unmerged",
    "gen_ms_merged",
];

fn compare(out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["compare", "--model", s(tiny_model()), "--concepts", "striped-star", "--methods", "lora,textual-inversion,hypernetwork"];
    args.extend_from_slice(&["--budget-steps", "2", "--images-per-prompt", "2", "--eval-steps", "2", "--json", "--out", s(out)]);
    args.extend_from_slice(extra);
    let out = knobs(&args);
    assert!(out.status.success(), "knobs compare failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json prints one JSON object: {stdout}");
    let mut v: Value = serde_json::from_str(lines[0]).unwrap();
    v["stderr"] = String::from_utf8_lossy(&out.stderr).into_owned().into();
    v
}

fn run<'a>(v: &'a Value, method: &str) -> &'a Value {
    v["runs"].as_array().unwrap().iter().find(|r| r["method"] == method).unwrap_or_else(|| panic!("no {method} run in {v}"))
}

#[test]
fn compare_reports_every_metric_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    tiny_model();
    let start = Instant::now();
    let v = compare(&out, &[]);
    let first = start.elapsed().as_secs_f64();
    eprintln!("first compare: {first:.1} s");

    assert_eq!(v["runs"].as_array().unwrap().len(), 4, "base + 3 methods");
    for method in ["lora", "textual-inversion", "hypernetwork"] {
        let m = &run(&v, method)["metrics"];
        for key in METRICS {
            let x = m[key].as_f64().unwrap_or_else(|| panic!("{method}: {key} is not a number: {m}"));
            assert!(x.is_finite() && x >= 0.0, "{method}: {key} = {x}");
        }
        assert!((-1.0..=1.0).contains(&m["subject_fidelity"].as_f64().unwrap()));
        for key in ["prompt_fidelity", "language_drift"] {
            assert!((0.0..=1.0).contains(&m[key].as_f64().unwrap()), "{method}: {key}");
        }
        assert!(out.join("runs/striped-star").join(method).join("result.json").is_file());
        assert!(out.join("runs/striped-star").join(method).join("eval_grid.png").is_file());
    }
    let (lora, ti) = (&run(&v, "lora")["metrics"], &run(&v, "textual-inversion")["metrics"]);
    assert_eq!(ti["trainable_params"], 64, "one 64-wide token vector");
    assert!(lora["trainable_params"].as_u64().unwrap() > 1000);
    assert!(lora["file_bytes"].as_f64().unwrap() > ti["file_bytes"].as_f64().unwrap(), "a LoRA file is larger than one embedding");
    // The reference row: the base model, nothing trained, prior preservation exactly 1 where measurable.
    let base = &run(&v, "base")["metrics"];
    assert_eq!(base["trainable_params"], 0);
    assert!(base["file_bytes"].is_null() && base["subject_fidelity"].is_number());
    assert_eq!(v["settings"]["budget_steps"], 2);
    assert!(v["mean"]["lora"]["subject_fidelity"].is_number());

    // results.json holds what --json printed; report.md has a table per concept and the mean.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(saved["runs"], v["runs"]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Mean over 1 concept") && md.contains("## striped-star"), "{md}");
    for header in ["trainable params", "file size", "s/step", "peak RSS MiB", "subject fidelity", "prior preservation", "language drift", "diversity", "gen ms merged"] {
        assert!(md.contains(header), "report.md lacks {header}");
    }
    let lora_row = md.lines().find(|l| l.starts_with("| lora |")).unwrap();
    assert!(!lora_row.contains("n/a"), "every lora cell is a number: {lora_row}");
    // A hypernetwork is non-linear: its "merged" time is its unmerged time.
    let hn = &run(&v, "hypernetwork")["metrics"];
    assert_eq!(hn["gen_ms_merged"], hn["gen_ms_unmerged"]);
    // report.html is one self-contained page: the plot, 4 sample grids and 3 loss curves inlined.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 1 + 4 + 3, "inlined images");
    assert!(!html.contains("src=\"runs/") && !html.contains("src=\"fidelity"), "no image is linked from outside the page");
    let plot = image::open(out.join("fidelity_vs_size.png")).unwrap().to_rgb8();
    assert_eq!(plot.dimensions(), knobs_train::finetune::plot::SCATTER_SIZE, "the plotters scatter, not a hand-drawn one");

    // Again: every run is done, nothing is trained or evaluated, and it says so.
    let start = Instant::now();
    let again = compare(&out, &[]);
    let second = start.elapsed().as_secs_f64();
    eprintln!("second compare: {second:.1} s");
    let stderr = again["stderr"].as_str().unwrap();
    assert_eq!(stderr.matches("skipped (done)").count(), 4, "{stderr}");
    assert!(!stderr.contains("training") && !stderr.contains("evaluating"), "{stderr}");
    assert_eq!(again["runs"], v["runs"]);
    assert!(second < first / 2.0, "the second run took {second:.1} s, the first {first:.1} s");

    // Other settings in the same folder are refused, naming the run and what to do.
    let out2 = knobs(&[
        "compare", "--model", s(tiny_model()), "--concepts", "striped-star", "--methods", "lora", "--budget-steps", "3",
        "--images-per-prompt", "2", "--eval-steps", "2", "--out", s(&out),
    ]);
    assert!(!out2.status.success());
    let err = String::from_utf8_lossy(&out2.stderr);
    assert!(err.contains("other settings") && err.contains("--out") && err.contains("lora"), "{err}");

    // The same concept as the user's own folder: every method trains on the same pixels with
    // the same prompts and token, so every measure is the same.
    let concepts = tmp.path().join("concepts");
    ok(&["world", "concepts", "--out", s(&concepts), "--concept", "striped-star"]);
    let folder = concepts.join("striped-star");
    let mine_out = tmp.path().join("mine");
    let mine = knobs(&[
        "compare", "--model", s(tiny_model()), "--instance-dir", s(&folder), "--class-prompt", "a star", "--methods",
        "lora,textual-inversion", "--budget-steps", "2", "--images-per-prompt", "2", "--eval-steps", "2", "--json", "--out", s(&mine_out),
    ]);
    assert!(mine.status.success(), "{}", String::from_utf8_lossy(&mine.stderr));
    let mine: Value = serde_json::from_str(String::from_utf8_lossy(&mine.stdout).trim()).unwrap();
    for method in ["base", "lora", "textual-inversion"] {
        let (a, b) = (&run(&mine, method)["metrics"], &run(&v, method)["metrics"]);
        for key in ["trainable_params", "file_bytes", "subject_fidelity", "prompt_fidelity", "prior_preservation", "language_drift", "diversity"] {
            assert_eq!(a[key], b[key], "{method} {key}: --instance-dir {a} vs --concepts {b}");
        }
    }
    assert_eq!(run(&mine, "lora")["concept"], "striped-star", "runs are named by the folder");
    assert!(mine_out.join("runs/striped-star/textual-inversion/result.json").is_file());
    assert_eq!(run(&mine, "lora")["settings"]["subject"]["class_prompt"], "a star");
}

#[test]
fn bad_input_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = s(&out);
    let err = fail(&["compare", "--methods", "lora,lorax", "--out", o]);
    assert!(err.contains("--methods") && err.contains("lorax") && err.contains("textual-inversion"), "{err}");
    assert!(err.contains("dreambooth-prior"), "the compare-only variant is listed: {err}");
    // The built-in hypernetwork is only the default for the built-in base model.
    let err = fail(&["compare", "--model", s(tiny_model()), "--methods", "hyper-lora", "--out", o]);
    assert!(err.contains("--hypernetwork-dir"), "{err}");
    let err = fail(&["compare", "--concepts", "purple-unicorn", "--out", o]);
    assert!(err.contains("--concepts") && err.contains("purple-unicorn") && err.contains("striped-star"), "{err}");
    let empty = s(tmp.path());
    let err = fail(&["compare", "--instance-dir", empty, "--class-prompt", "a dog", "--out", o]);
    assert!(err.contains("--instance-dir") && err.contains("no .png"), "{err}");
    let err = fail(&["compare", "--instance-dir", empty, "--concepts", "striped-star", "--class-prompt", "a star", "--out", o]);
    assert!(err.contains("--concepts") && err.contains("--instance-dir"), "{err}");
    let err = fail(&["compare", "--budget-steps", "0", "--out", o]);
    assert!(err.contains("--budget-steps"), "{err}");
    let err = fail(&["compare", "--images-per-prompt", "0", "--out", o]);
    assert!(err.contains("--images-per-prompt"), "{err}");
    let err = fail(&["compare", "--model", s(&tmp.path().join("nope")), "--out", o]);
    assert!(err.contains("--model") && err.contains("nope"), "{err}");
    let help = ok(&["compare", "--help"]);
    assert!(help.contains("--budget-steps") && help.contains("skipped (done)") && help.contains("refuses"), "{help}");
}

#[test]
fn hyper_lora_runs_with_its_hypernetwork() {
    let tmp = tempfile::tempdir().unwrap();
    let hyper = tmp.path().join("hyper");
    let h = s(&hyper);
    ok(&["hyper", "pretrain", "--model", s(tiny_model()), "--out", h, "--steps", "2", "--num-concepts", "2", "--images-per-concept", "2", "--batch", "1"]);
    let out = tmp.path().join("cmp");
    let text = ok(&[
        "compare", "--model", s(tiny_model()), "--concepts", "striped-star", "--methods", "hyper-lora", "--hypernetwork-dir", h,
        "--budget-steps", "1", "--images-per-prompt", "2", "--eval-steps", "2", "--json", "--out", s(&out),
    ]);
    let v: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let m = &run(&v, "hyper-lora")["metrics"];
    assert!(m["subject_fidelity"].is_number() && m["file_bytes"].as_f64().unwrap() > 0.0, "{m}");
    assert!(out.join("runs/striped-star/hyper-lora/pytorch_lora_weights.safetensors").is_file());
}
