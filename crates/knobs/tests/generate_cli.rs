//! `knobs generate` end to end on the tiny model: PNG files of the right size, the diffusers
//! golden image from the golden latents, several images and a grid, and clear errors.
mod common;

use common::{fail, ok};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{read_safetensors, write_safetensors};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn model() -> String {
    format!("{GOLDEN}/tiny-sd")
}

fn png(path: &Path) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8()
}

#[test]
fn writes_a_png_of_the_model_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub/cat.png");
    let o = out.to_str().unwrap();
    let stdout = ok(&["generate", "--model", &model(), "--prompt", "a photo of a cat", "--steps", "2", "--out", o]);
    println!("{stdout}");
    let img = png(&out);
    assert_eq!(img.dimensions(), (64, 64));
    // Not a flat image: the decoder drew something.
    let first = img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| p != first));

    // Same seed, same file; a given size is honoured.
    let again = tmp.path().join("again.png");
    ok(&["generate", "--model", &model(), "--prompt", "a photo of a cat", "--steps", "2", "--out", again.to_str().unwrap()]);
    assert_eq!(png(&again), img);
    let wide = tmp.path().join("wide.png");
    ok(&["generate", "--model", &model(), "--prompt", "a cat", "--steps", "1", "--height", "32", "--width", "48",
        "--scheduler", "euler-a", "--out", wide.to_str().unwrap()]);
    assert_eq!(png(&wide).dimensions(), (48, 32));
}

#[test]
fn golden_latents_reproduce_the_diffusers_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("golden.png");
    let file = format!("{GOLDEN}/tensors/pipeline.safetensors");
    let g = read_safetensors(&file).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&g.metadata["golden"]).unwrap();
    // The golden call, with `extra` flags, to `out`.
    let (model, steps, guidance) = (model(), meta["num_inference_steps"].to_string(), meta["guidance_scale"].to_string());
    let golden = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate", "--model", &model,
            "--prompt", meta["prompt"].as_str().unwrap(),
            "--negative-prompt", meta["negative_prompt"].as_str().unwrap(),
            "--steps", &steps,
            "--guidance", &guidance,
            "--scheduler", "ddim",
            "--latents", &file,
            "--out", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    golden(&[], &out);
    let img = png(&out);
    let (want, shape) = g.f32("image").unwrap();
    assert_eq!(shape, vec![1, 3, 64, 64]);
    assert_eq!(img.dimensions(), (64, 64));
    let mut max = 0.0f32;
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            let w = want[(c * 64 + y as usize) * 64 + x as usize];
            max = max.max((p[c] as f32 / 255.0 - w).abs());
        }
    }
    println!("golden image vs PNG: max abs difference {max:.4} (quantisation alone <= {:.4})", 0.5 / 255.0);
    assert!(max <= 1e-2, "PNG differs from the golden image by {max}");

    // Computed in bf16 (`--mixed-precision bf16`): another image, within bf16's rounding of
    // the f32 one.
    let bf16 = tmp.path().join("bf16.png");
    golden(&["--mixed-precision", "bf16"], &bf16);
    let bf16 = png(&bf16);
    let diffs: Vec<f32> = bf16.pixels().zip(img.pixels()).flat_map(|(a, b)| (0..3).map(move |c| (a[c] as f32 - b[c] as f32).abs() / 255.0)).collect();
    let (worst, mean) = (diffs.iter().cloned().fold(0.0, f32::max), diffs.iter().sum::<f32>() / diffs.len() as f32);
    println!("bf16 against f32: max abs difference {worst:.4}, mean {mean:.4}");
    assert!(bf16 != img, "--mixed-precision bf16 drew the f32 image");
    assert!(mean < 0.02 && worst < 0.2, "--mixed-precision bf16 is too far from f32: max {worst}, mean {mean}");
}

#[test]
fn several_images_and_a_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    ok(&["generate", "--model", &model(), "--prompt", "a dog", "--steps", "1", "--num-images", "3", "--out", out.to_str().unwrap()]);
    let parts: Vec<_> = (0..3).map(|i| png(&tmp.path().join(format!("out-{i}.png")))).collect();
    assert!(parts.iter().all(|p| p.dimensions() == (64, 64)));
    assert_ne!(parts[0], parts[1], "each image starts from its own noise");
    let grid = png(&out);
    assert_eq!(grid.dimensions(), (128, 128), "3 images: a 2 x 2 grid");
    assert_eq!(grid.get_pixel(64 + 5, 7), parts[1].get_pixel(5, 7));
    assert_eq!(grid.get_pixel(3, 64 + 9), parts[2].get_pixel(3, 9));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let o = out.to_str().unwrap();
    let missing = tmp.path().join("no-such-model");
    let e = fail(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "x", "--out", o]);
    assert!(e.contains("no-such-model"), "{e}");
    let e = fail(&["generate", "--model", &model(), "--prompt", "x", "--mixed-precision", "fp8", "--out", o]);
    assert!(e.contains("--mixed-precision") && e.contains("fp8"), "{e}");

    let bad = tmp.path().join("bad.safetensors");
    let mut t = BTreeMap::new();
    t.insert("noise".to_string(), TensorData::new(vec![0.0f32; 16], [1, 4, 2, 2]));
    write_safetensors(&bad, &t, &HashMap::new()).unwrap();
    let b = bad.to_str().unwrap();
    let e = fail(&["generate", "--model", &model(), "--prompt", "x", "--latents", b, "--out", o]);
    assert!(e.contains("bad.safetensors") && e.contains("latents"), "{e}");

    // Right key, wrong channel count.
    t.insert("latents".to_string(), TensorData::new(vec![0.0f32; 48], [1, 3, 4, 4]));
    write_safetensors(&bad, &t, &HashMap::new()).unwrap();
    let e = fail(&["generate", "--model", &model(), "--prompt", "x", "--latents", b, "--out", o]);
    assert!(e.contains("bad.safetensors") && e.contains("latents") && e.contains("[1, 3, 4, 4]"), "{e}");

    let e = fail(&["generate", "--model", &model(), "--prompt", "x", "--scheduler", "pndm", "--out", o]);
    assert!(e.contains("pndm") && e.contains("euler-a"), "{e}");
    assert!(!out.exists());
}

const TINY_SDXL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/tiny-sdxl");

/// `generate` on an SDXL folder with the golden call's micro-conditioning flags gives
/// diffusers' image; SDXL flags on an SD-1.x model and malformed sizes are named errors.
#[test]
fn sdxl_folder_reproduces_the_diffusers_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sdxl.png");
    let file = format!("{TINY_SDXL}/goldens/pipeline.safetensors");
    ok(&[
        "generate", "--model", TINY_SDXL, "--prompt", "a photo of a sks dog, high quality!", "--negative-prompt", "blurry, dark",
        "--steps", "3", "--guidance", "5", "--original-size", "96x128", "--crop", "8,16", "--target-size", "64x80",
        "--latents", &file, "--out", out.to_str().unwrap(),
    ]);
    let img = png(&out);
    assert_eq!(img.dimensions(), (48, 32));
    let want = read_safetensors(&file).unwrap().f32("image").unwrap().0; // [1, 32, 48, 3]
    let max = img.enumerate_pixels().flat_map(|(x, y, p)| (0..3).map(move |c| (x, y, c, p[c]))).fold(0f32, |m, (x, y, c, v)| {
        m.max((v as f32 / 255.0 - want[(y as usize * 48 + x as usize) * 3 + c]).abs())
    });
    assert!(max <= 1e-2, "PNG differs from the golden SDXL image by {max}");
    // Other micro-conditioning gives another image.
    let other = tmp.path().join("other.png");
    ok(&["generate", "--model", TINY_SDXL, "--prompt", "a photo of a sks dog, high quality!", "--negative-prompt", "blurry, dark",
        "--steps", "3", "--guidance", "5", "--latents", &file, "--out", other.to_str().unwrap()]);
    assert_ne!(png(&other), img);

    let o = tmp.path().join("x.png");
    let e = fail(&["generate", "--model", &model(), "--prompt", "x", "--crop", "8,16", "--out", o.to_str().unwrap()]);
    assert!(e.contains("--crop") && e.contains("SDXL"), "{e}");
    let e = fail(&["generate", "--model", TINY_SDXL, "--prompt", "x", "--original-size", "96", "--out", o.to_str().unwrap()]);
    assert!(e.contains("--original-size") && e.contains("HEIGHTxWIDTH"), "{e}");
    assert!(!o.exists());
}
