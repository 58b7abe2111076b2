//! `knobs adapter merge`: adapters fused into a model draw what the adapters draw on the base,
//! as a folder and as a single file, for SD-1.x and SDXL; bad input is named.
mod common;

use std::path::Path;

use common::{fail, ok, s};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");
const TINY_SDXL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/tiny-sdxl");

fn png(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// The largest channel difference of two images, of 255.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn draw(model: &str, extra: &[&str], out: &Path) -> image::RgbImage {
    let mut args = vec!["generate", "--model", model, "--prompt", "a photo of a cat", "--steps", "3", "--seed", "1", "--out", s(out)];
    args.extend_from_slice(extra);
    ok(&args);
    png(out)
}

#[test]
fn merged_models_draw_what_their_adapters_draw() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let sd1 = format!("{GOLDEN}/tiny-sd");
    let lora = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors:0.7");
    ok(&["adapter", "merge", "--model", &sd1, "--lora", &lora, "--out", s(&t("merged"))]);
    let merged = draw(s(&t("merged")), &[], &t("a.png"));
    let adapted = draw(&sd1, &["--lora", &lora], &t("b.png"));
    let base = draw(&sd1, &[], &t("c.png"));
    assert!(max_diff(&merged, &adapted) <= 1, "merged vs --lora: {}", max_diff(&merged, &adapted));
    assert!(max_diff(&base, &adapted) > 8, "the LoRA must move the image");

    // SDXL, a kohya file with SGM names, fused into one single file (read back with the
    // folder's configs: the tiny model's heads cannot be inferred).
    let kohya = format!("{TINY_SDXL}/goldens/lora/kohya/tiny_sdxl_lora_kohya.safetensors");
    ok(&["adapter", "merge", "--model", TINY_SDXL, "--lora", &kohya, "--out", s(&t("xl.safetensors"))]);
    ok(&["convert", "--model", s(&t("xl.safetensors")), "--config", TINY_SDXL, "--out", s(&t("xl"))]);
    let merged = draw(s(&t("xl")), &[], &t("d.png"));
    let adapted = draw(TINY_SDXL, &["--lora", &kohya], &t("e.png"));
    assert!(max_diff(&merged, &adapted) <= 1, "SDXL merged vs --lora: {}", max_diff(&merged, &adapted));
    assert!(max_diff(&draw(TINY_SDXL, &[], &t("f.png")), &adapted) > 8);

    // An existing --out is not overwritten; a missing adapter is named.
    let e = fail(&["adapter", "merge", "--model", &sd1, "--lora", &lora, "--out", s(&t("merged"))]);
    assert!(e.contains("--out") && e.contains("exists"), "{e}");
    let e = fail(&["adapter", "merge", "--model", &sd1, "--lora", s(&t("nope.safetensors")), "--out", s(&t("m2"))]);
    assert!(e.contains("nope.safetensors"), "{e}");
    assert!(!t("m2").exists());
}

/// `knobs adapter convert`: a LoRA goes diffusers -> kohya -> PEFT -> diffusers and LoHa / DoRA
/// PEFT folders to LyCORIS files, each drawing the original's image exactly; formats that
/// cannot hold an adapter are refused by name; SDXL embeddings go to A1111's file unchanged.
#[test]
fn converted_adapters_draw_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let sd1 = format!("{GOLDEN}/tiny-sd");
    let lora = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let want = draw(&sd1, &["--lora", &lora], &t("want.png"));
    let chain = [("kohya", "kohya.safetensors"), ("peft", "peft"), ("diffusers", "back.safetensors")];
    let mut from = lora.clone();
    for (to, out) in chain {
        ok(&["adapter", "convert", &from, "--to", to, "--out", s(&t(out)), "--model", &sd1]);
        assert_eq!(draw(&sd1, &["--lora", s(&t(out))], &t(&format!("{to}.png"))), want, "--to {to}");
        from = s(&t(out)).to_string();
    }
    assert!(t("peft/unet_lora/adapter_config.json").exists());

    let methods = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/adapter_methods");
    for m in ["loha", "dora"] {
        let peft = format!("{methods}/{m}_peft");
        let out = t(&format!("{m}.safetensors"));
        ok(&["adapter", "convert", &peft, "--to", "kohya", "--out", s(&out), "--model", &sd1]);
        let want = draw(&sd1, &["--lora", &peft], &t(&format!("{m}-want.png")));
        assert_eq!(draw(&sd1, &["--lora", s(&out)], &t(&format!("{m}-got.png"))), want, "{m}");
    }
    let e = fail(&["adapter", "convert", &format!("{methods}/dora_peft"), "--to", "diffusers", "--out", s(&t("x.safetensors")), "--model", &sd1]);
    assert!(e.contains("DoRA"), "{e}");
    let e = fail(&["adapter", "convert", &format!("{GOLDEN}/tensors/ia3_peft"), "--to", "kohya", "--out", s(&t("y.safetensors")), "--model", &sd1]);
    assert!(e.contains("IA3") && e.contains("--to peft"), "{e}");
    assert!(!t("x.safetensors").exists() && !t("y.safetensors").exists());

    let ti = format!("{TINY_SDXL}/goldens/textual_inversion/tiny-ti.safetensors");
    ok(&["adapter", "convert", &ti, "--to", "a1111", "--out", s(&t("tiny.safetensors"))]);
    let (a, b) = (knobs_nn::io::read_safetensors(&ti).unwrap(), knobs_nn::io::read_safetensors(t("tiny.safetensors")).unwrap());
    assert_eq!(a.tensors, b.tensors);
}

/// `knobs adapter resize`: at the LoRA's own rank it is exact (the same image), a lower rank
/// keeps less energy and moves the image, `--energy 1` keeps all; bad targets are named.
#[test]
fn resized_loras_keep_what_they_report() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let sd1 = format!("{GOLDEN}/tiny-sd");
    let lora = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let rank = knobs_nn::io::read_safetensors(lora.as_str()).unwrap().tensors.iter().find(|(k, _)| k.contains("down") || k.contains("lora_A")).map(|(_, v)| v.shape()[0]).unwrap();
    let want = draw(&sd1, &["--lora", &lora], &t("want.png"));
    let resize = |extra: &[&str], out: &str| -> serde_json::Value {
        let path = t(out);
        let mut args = vec!["adapter", "resize", &lora, "--to", "kohya", "--out", s(&path), "--model", &sd1, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let full = resize(&["--rank", &rank.to_string()], "full.safetensors");
    assert!(full.as_array().unwrap().iter().all(|r| (r["energy"].as_f64().unwrap() - 1.0).abs() < 1e-9 && r["to"] == rank));
    let got = draw(&sd1, &["--lora", s(&t("full.safetensors"))], &t("full.png"));
    assert!(max_diff(&got, &want) <= 1, "full rank: {}", max_diff(&got, &want));

    let one = resize(&["--rank", "1"], "one.safetensors");
    let energies: Vec<f64> = one.as_array().unwrap().iter().map(|r| r["energy"].as_f64().unwrap()).collect();
    assert!(energies.iter().all(|e| *e > 0.0 && *e < 1.0), "{energies:?}");
    let got = draw(&sd1, &["--lora", s(&t("one.safetensors"))], &t("one.png"));
    assert!(max_diff(&got, &want) > 0, "rank 1 must change the image");
    let all = resize(&["--energy", "1"], "all.safetensors");
    assert!(all.as_array().unwrap().iter().all(|r| r["to"] == rank || r["energy"].as_f64().unwrap() >= 1.0 - 1e-9));

    let e = fail(&["adapter", "resize", &lora, "--energy", "1.5", "--to", "kohya", "--out", s(&t("x.safetensors")), "--model", &sd1]);
    assert!(e.contains("--energy") && e.contains("1.5"), "{e}");
    let e = fail(&["adapter", "resize", &lora, "--rank", "0", "--to", "kohya", "--out", s(&t("y.safetensors")), "--model", &sd1]);
    assert!(e.contains("--rank"), "{e}");
}

/// `knobs adapter extract`: from a DreamBooth run that trained only attention, the full-rank
/// extraction merged back into the base reproduces the tuned attention weights (and nothing
/// else changes); a lower rank reports what it leaves out; a model against itself is refused.
#[test]
fn extracted_lora_reproduces_the_tuned_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let sd1 = format!("{GOLDEN}/tiny-sd");
    ok(&["train", "--model", &sd1, "--method", "dreambooth", "--concept", "striped-star", "--out", s(&t("db")), "--max-train-steps", "2",
        "--learning-rate", "1e-2", "--train-only", r"attn[12]\.to_(q|k|v|out\.0)\.weight", "--num-samples", "0"]);
    let tuned = t("db/model");
    let rows: serde_json::Value = serde_json::from_str(&ok(&["adapter", "extract", "--base", &sd1, "--tuned", s(&tuned), "--rank", "512", "--to", "diffusers",
        "--out", s(&t("full.safetensors")), "--json"])).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r["rel_error"].as_f64().unwrap() < 1e-6 && r["layer"].as_str().unwrap().contains("attn")), "{rows:?}");
    ok(&["adapter", "merge", "--model", &sd1, "--lora", s(&t("full.safetensors")), "--out", s(&t("merged"))]);
    let file = |dir: &Path| knobs_nn::io::read_safetensors(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (base, tuned, merged) = (file(Path::new(&sd1)), file(&tuned), file(&t("merged")));
    let mut moved = 0;
    for (k, want) in &tuned.tensors {
        let v = |d: &knobs_nn::burn::tensor::TensorData| d.clone().convert::<f32>().try_into_vec::<f32>().unwrap();
        let (w, m, b) = (v(want), v(&merged.tensors[k]), v(&base.tensors[k]));
        let err = w.iter().zip(&m).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5 * scale.max(1e-3), "{k}: merged differs from tuned by {err}");
        moved += (w != b) as usize;
    }
    assert!(moved > 0, "the DreamBooth run changed nothing");

    let low: serde_json::Value = serde_json::from_str(&ok(&["adapter", "extract", "--base", &sd1, "--tuned", s(&t("db/model")), "--rank", "1", "--to", "kohya",
        "--out", s(&t("low.safetensors")), "--json"])).unwrap();
    assert!(low.as_array().unwrap().iter().any(|r| r["rel_error"].as_f64().unwrap() > 1e-3));
    let e = fail(&["adapter", "extract", "--base", &sd1, "--tuned", &sd1, "--rank", "4", "--to", "kohya", "--out", s(&t("same.safetensors"))]);
    assert!(e.contains("no linear layer differs"), "{e}");
}

/// `knobs adapter combine`: one LoRA at weights 0.3 and 0.7 combined by cat, or by svd at
/// twice its rank, is the LoRA at weight 1; by ties at density 1 (all signs agree) it is
/// their mean, the LoRA at 0.5; missing ranks and bad densities are named.
#[test]
fn combined_loras_draw_their_weighted_sum() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let sd1 = format!("{GOLDEN}/tiny-sd");
    let lora = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let (a, b) = (format!("{lora}:0.3"), format!("{lora}:0.7"));
    let whole = draw(&sd1, &["--lora", &lora], &t("whole.png"));
    let half = draw(&sd1, &["--lora", &format!("{lora}:0.5")], &t("half.png"));
    for (how, extra, want) in [("cat", &[][..], &whole), ("svd", &["--rank", "64"][..], &whole), ("ties", &["--rank", "64", "--density", "1"][..], &half)] {
        let out = t(&format!("{how}.safetensors"));
        let mut args = vec!["adapter", "combine", "--lora", &a, "--lora", &b, "--how", how, "--to", "diffusers", "--out", s(&out), "--model", &sd1];
        args.extend_from_slice(extra);
        ok(&args);
        let got = draw(&sd1, &["--lora", s(&out)], &t(&format!("{how}.png")));
        assert!(max_diff(&got, want) <= 1, "{how}: {}", max_diff(&got, want));
    }
    let e = fail(&["adapter", "combine", "--lora", &a, "--lora", &b, "--how", "svd", "--to", "diffusers", "--out", s(&t("x.safetensors")), "--model", &sd1]);
    assert!(e.contains("--rank"), "{e}");
    let e = fail(&["adapter", "combine", "--lora", &a, "--lora", &b, "--how", "ties", "--rank", "4", "--density", "0", "--to", "diffusers", "--out", s(&t("y.safetensors")), "--model", &sd1]);
    assert!(e.contains("--density"), "{e}");
}

/// `knobs adapter inspect --json` names the format, method, ranks, alphas and base model of
/// kohya SDXL, PEFT LoHa and embedding files.
#[test]
fn inspect_reports_format_method_ranks_and_base() {
    let json = |p: &str| -> serde_json::Value { serde_json::from_str(&ok(&["adapter", "inspect", p, "--json"])).unwrap() };
    let k = json(&format!("{TINY_SDXL}/goldens/lora/kohya/tiny_sdxl_lora_kohya.safetensors"));
    let alias: serde_json::Value =
        serde_json::from_str(&ok(&["lora", "inspect", &format!("{TINY_SDXL}/goldens/lora/kohya/tiny_sdxl_lora_kohya.safetensors"), "--json"])).unwrap();
    assert_eq!(alias, k, "`knobs lora` is `knobs adapter`");
    assert_eq!((k["format"].as_str(), k["method"].as_str(), k["base_model"].as_str()), (Some("kohya"), Some("LoRA"), Some("sdxl_base_v1-0")));
    let modules = k["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 222);
    assert!(modules.iter().all(|m| m["rank"] == 2 && m["alpha"] == 4.0));
    assert!(modules.iter().any(|m| m["block"] == "lora_unet_input_blocks_8"));
    let methods = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/adapter_methods");
    let l = json(&format!("{methods}/loha_peft"));
    assert_eq!((l["format"].as_str(), l["method"].as_str()), (Some("PEFT folder"), Some("LOHA")));
    assert!(l["modules"].as_array().unwrap().iter().all(|m| !m["module"].as_str().unwrap().starts_with("base_model")));
    let d = json(&format!("{methods}/dora_lycoris.safetensors"));
    assert_eq!(d["format"], "LyCORIS (kohya names)");
    assert!(d["method"].as_str().unwrap().contains("DoRA"));
    let e = json(&format!("{TINY_SDXL}/goldens/textual_inversion/tiny-ti.safetensors"));
    assert_eq!(e["format"], "textual-inversion embedding");
    assert!(e["method"].as_str().unwrap().contains("clip_g [1, 32]"));
}
