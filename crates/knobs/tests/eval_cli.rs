//! `knobs eval` end to end on a tiny random base model (quality is irrelevant here: this
//! checks the plumbing, the JSON keys, the value ranges and the errors).
mod common;

use common::{fail, knobs, ok};

use serde_json::Value;

/// The one JSON object `--json` prints.
fn json(stdout: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json must print exactly one line: {stdout}");
    let v: Value = serde_json::from_str(lines[0]).expect("valid JSON");
    assert!(v.is_object());
    v
}

fn in_range(v: &Value, key: &str, lo: f64, hi: f64) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {v}"));
    assert!((lo..=hi).contains(&x), "{key} = {x} outside [{lo}, {hi}]");
    x
}

#[test]
fn eval_reports_base_quality_and_concept_metrics() {
    let model = common::s(common::tiny_model()).to_string();
    let tmp = tempfile::tempdir().unwrap();

    // Base quality: every shape x colour prompt once.
    let start = std::time::Instant::now();
    let v = json(&ok(&["eval", "--model", &model, "--images-per-prompt", "1", "--steps", "2", "--json"]));
    eprintln!("base quality eval (64 images, 2 steps): {:.1} s", start.elapsed().as_secs_f64());
    for key in ["shape_colour_accuracy", "background_accuracy", "prompt_fidelity"] {
        in_range(&v, key, 0.0, 1.0);
    }
    // One image per prompt: no pairs, so diversity is not measurable.
    assert!(v["diversity"].is_null(), "{v}");
    assert_eq!(v["seconds"]["images"], 64);
    assert_eq!(v["settings"]["steps"], 2);

    // A concept, against the same model as the base: prior preservation is exactly 1 (same
    // seeds, same weights), and a grid of every image is written.
    let grid = tmp.path().join("grid.png");
    let start = std::time::Instant::now();
    let v = json(&ok(&[
        "eval",
        "--model",
        &model,
        "--concept",
        "striped-star",
        "--base-model",
        &model,
        "--images-per-prompt",
        "2",
        "--steps",
        "2",
        "--save-grid",
        grid.to_str().unwrap(),
        "--json",
    ]));
    eprintln!("concept eval (36 images, 2 steps): {:.1} s", start.elapsed().as_secs_f64());
    in_range(&v, "subject_fidelity", -1.0, 1.0);
    in_range(&v, "prompt_fidelity", 0.0, 1.0);
    in_range(&v, "language_drift", 0.0, 1.0);
    in_range(&v, "diversity", 0.0, 2.0);
    let details = &v["details"];
    if details["base_other_class_prompt_fidelity"].as_f64().unwrap() > 0.0 {
        let pp = in_range(&v, "prior_preservation", 0.0, 10.0);
        assert!((pp - 1.0).abs() < 1e-9, "same model as base: prior preservation {pp}");
    } else {
        assert!(v["prior_preservation"].is_null());
    }
    assert_eq!(details["instance_prompt"], "a sks star");
    assert_eq!(details["class_prompt"], "a star");
    assert_eq!(v["settings"]["concept"], "striped-star");
    assert_eq!(v["settings"]["token"], "sks");
    // 5 subject prompts + class + 6 other-class prompts, and the 6 again with the base.
    assert_eq!(v["seconds"]["images"], 2 * (5 + 1 + 6 + 6));
    let img = image::open(&grid).unwrap().to_rgb8();
    // Rows: instance images (5), 5 subject prompts, the class prompt, 6 other, 6 base-other;
    // as many columns as the widest row (the 5 instance images).
    assert_eq!(img.dimensions(), (5 * 32, 19 * 32));

    // The same concept as the user's own folder (its images and captions as `knobs world`
    // writes them): the same numbers.
    let concepts = tmp.path().join("concepts");
    ok(&["world", "concepts", "--out", concepts.to_str().unwrap(), "--concept", "striped-star"]);
    let folder = concepts.join("striped-star");
    let mine = json(&ok(&[
        "eval", "--model", &model, "--instance-dir", folder.to_str().unwrap(), "--class-prompt", "a star", "--base-model", &model,
        "--images-per-prompt", "2", "--steps", "2", "--json",
    ]));
    for key in ["subject_fidelity", "prompt_fidelity", "prior_preservation", "language_drift", "diversity"] {
        assert_eq!(mine[key], v[key], "{key}: --instance-dir {mine} vs --concept {v}");
    }
    assert_eq!(mine["details"]["instance_prompt"], "a sks star");
    assert_eq!(mine["details"]["drift_threshold"], details["drift_threshold"]);
    assert_eq!(mine["settings"]["instance_dir"], folder.to_str().unwrap());

    // Text output names every metric.
    let text = ok(&["eval", "--model", &model, "--concept", "ringed-circle", "--base-model", &model, "--images-per-prompt", "1", "--steps", "1"]);
    for key in ["subject_fidelity", "prompt_fidelity", "prior_preservation", "language_drift", "diversity", "\"a zwx circle\""] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
}

#[test]
fn eval_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = fail(&["eval", "--model", missing.to_str().unwrap()]);
    assert!(err.contains("--model") && err.contains("nope"), "{err}");

    let err = fail(&["eval", "--instance-dir", missing.to_str().unwrap(), "--class-prompt", "a star"]);
    assert!(err.contains("--instance-dir") && err.contains("nope"), "{err}");
    let err = fail(&["eval", "--instance-dir", tmp.path().to_str().unwrap()]);
    assert!(err.contains("--class-prompt"), "{err}");
    let err = fail(&["eval", "--instance-dir", tmp.path().to_str().unwrap(), "--class-prompt", "a star"]);
    assert!(err.contains("no .png or .jpg images"), "{err}");

    let err = fail(&["eval", "--model", missing.to_str().unwrap(), "--concept", "purple-unicorn"]);
    assert!(err.contains("--concept purple-unicorn") && err.contains("striped-star"), "{err}");

    let err = fail(&["eval", "--model", missing.to_str().unwrap(), "--judge", missing.to_str().unwrap()]);
    assert!(err.contains("--judge"), "{err}");

    let err = fail(&["eval", "--model", missing.to_str().unwrap(), "--images-per-prompt", "0"]);
    assert!(err.contains("--images-per-prompt"), "{err}");
}

#[test]
fn judge_score_reads_pngs_and_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let scene = knobs_world::Scene::new(knobs_world::Attributes {
        shape: knobs_world::Shape::Star,
        colour: knobs_world::Colour::Red,
        background: knobs_world::Background::White,
        size: knobs_world::Size::Large,
        position: knobs_world::Position::Center,
    });
    knobs_world::render(&scene, 32).save(dir.join("a.png")).unwrap();
    knobs_world::render(&scene, 64).save(dir.join("b.png")).unwrap();
    let out = knobs(&["judge", "score", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("b.png is 64x64") && stderr.contains("resized"), "{stderr}");
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for img in images {
        assert_eq!(img["shape"]["value"], "star", "{img}");
        assert_eq!(img["colour"]["value"], "red", "{img}");
        assert_eq!(img["background"]["value"], "white", "{img}");
    }
    assert_eq!(images[0]["resized"], false);
    assert_eq!(images[1]["resized"], true);

    let text = ok(&["judge", "score", dir.join("a.png").to_str().unwrap()]);
    assert!(text.contains("star") && text.contains("red"), "{text}");
    let err = fail(&["judge", "score", tmp.path().join("missing.png").to_str().unwrap()]);
    assert!(err.contains("missing.png"), "{err}");
}

#[test]
fn judge_train_writes_a_judge_that_check_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("judge");
    let o = out.to_str().unwrap();
    let text = ok(&["judge", "train", "--out", o, "--steps", "3", "--batch", "4", "--heldout", "20"]);
    assert!(text.contains("shape") && text.contains("wrote"), "{text}");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["format"], "knobs-judge");
    assert_eq!(config["training"]["config"]["steps"], 3);
    assert_eq!(config["embedding"]["feature_centre"].as_array().unwrap().len(), 128);
    let v = json(&ok(&["judge", "check", "--judge", o, "--n", "20", "--json"]));
    in_range(&v["accuracy"], "shape", 0.0, 1.0);
    let err = fail(&["judge", "train", "--out", o, "--steps", "0"]);
    assert!(err.contains("--steps"), "{err}");
}

#[test]
fn eval_defaults_to_the_built_in_model_found_at_run_time() {
    // No --model: the built-in base model, looked up when the command runs.
    let v = json(&ok(&["eval", "--images-per-prompt", "1", "--steps", "1", "--json"]));
    let model = v["settings"]["model"].as_str().unwrap();
    assert!(model.ends_with("knobs-base"), "{model}");
    in_range(&v, "shape_colour_accuracy", 0.0, 1.0);
    // From another folder, with a KNOBS_MODELS that lacks it, the search goes on to the
    // places after it.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knobs"))
        .args(["eval", "--images-per-prompt", "1", "--steps", "1", "--json"])
        .env("KNOBS_MODELS", empty.path())
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
