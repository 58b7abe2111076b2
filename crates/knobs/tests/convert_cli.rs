//! `knobs convert` both ways on the built-in architecture's tiny model, and a single file
//! used directly as `--model`: the same image as the folder it came from.
mod common;
use common::{fail, ok, s, tiny_model};

fn png(path: &std::path::Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn folder_to_single_file_and_back_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    ok(&["convert", "--model", s(tiny_model()), "--out", s(&file), "--dtype", "f32"]);
    // A single file has no tokenizer: the folder's, beside the file (or --config / --tokenizer).
    let err = fail(&["generate", "--model", s(&file), "--prompt", "a star", "--steps", "2", "--out", s(&dir.path().join("x.png"))]);
    assert!(err.contains("tokenizer") && err.contains("--tokenizer"), "{err}");

    let back = dir.path().join("back");
    ok(&["convert", "--model", s(&file), "--out", s(&back), "--config", s(tiny_model())]);
    let generate = |model: &std::path::Path, out: &str| {
        let out = dir.path().join(out);
        let args = vec!["generate", "--model", s(model), "--prompt", "a red star", "--steps", "2", "--seed", "3", "--out", s(&out)];
        ok(&args);
        png(&out)
    };
    let original = generate(tiny_model(), "a.png");
    assert_eq!(original, generate(&back, "b.png"));

    // A folder of fp16 weights: kept in f16 in memory, the same image as widened to f32.
    let half = dir.path().join("half");
    ok(&["convert", "--model", s(&file), "--out", s(&half), "--config", s(tiny_model()), "--dtype", "f16"]);
    let wide = generate(&half, "c.png");
    let out = dir.path().join("d.png");
    ok(&["generate", "--model", s(&half), "--prompt", "a red star", "--steps", "2", "--seed", "3", "--weights-dtype", "f16", "--out", s(&out)]);
    assert_eq!(wide, png(&out));
    let err = fail(&["generate", "--model", s(&half), "--prompt", "x", "--weights-dtype", "f8", "--out", s(&out)]);
    assert!(err.contains("--weights-dtype"), "{err}");

    // Refusals name the flag.
    let err = fail(&["convert", "--model", s(&file), "--out", s(&back), "--to", "single-file"]);
    assert!(err.contains("--model") && err.contains("already a single file"), "{err}");
    let err = fail(&["convert", "--model", s(tiny_model()), "--out", s(&file), "--dtype", "f8"]);
    assert!(err.contains("--dtype") && err.contains("f8"), "{err}");
    let err = fail(&["convert", "--model", s(&dir.path().join("nothing")), "--out", s(&file)]);
    assert!(err.contains("--model") && err.contains("nothing"), "{err}");
}
