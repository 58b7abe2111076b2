//! SDXL LoRA files (tiny random, `fixtures/tiny-sdxl/goldens/lora`) against diffusers'
//! `load_lora_weights`: one adapter on the UNet and both text encoders, in every layout people
//! hold (PEFT folders, diffusers' two key spellings, kohya with SGM or diffusers block names),
//! gives diffusers' 3-step image; what knobs writes for SDXL reads back the same.
mod common;

use std::path::Path;

use knobs_diffusion::loaders::{Component, LoraFile, PipelineAdapters};
use common::{golden_request, rel_err, tiny_sdxl as fixture};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Tensor, cpu};

fn generate_with(path: &Path, g: &StateDict) -> (Tensor<4>, Vec<Component>) {
    let mut sd = StableDiffusion::from_dir(fixture(), &cpu()).unwrap();
    let mut adapters = PipelineAdapters::new(0);
    let mut on = adapters.load_lora(&mut sd, path, "lora", 1.0).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    on.sort();
    adapters.activate_all(&mut sd).unwrap();
    (sd.generate_latents(&golden_request(g, "pipeline.latents")).unwrap(), on)
}

#[test]
fn every_sdxl_lora_layout_gives_the_diffusers_image() {
    let g = read_safetensors(fixture().join("goldens/lora.safetensors")).unwrap();
    let dir = fixture().join("goldens/lora");
    let files = [
        "peft",
        "diffusers/pytorch_lora_weights.safetensors",
        "diffusers_old_keys/pytorch_lora_weights.safetensors",
        "kohya/tiny_sdxl_lora_kohya.safetensors",
        "kohya/tiny_sdxl_lora_kohya_diffusers_names.safetensors",
    ];
    for f in files {
        let (latents, on) = generate_with(&dir.join(f), &g);
        assert_eq!(on, [Component::Unet, Component::TextEncoder, Component::TextEncoder2], "{f}");
        let e = rel_err(latents, &g, "pipeline.final_latents");
        println!("{f}: final latents rel {e:.2e}");
        assert!(e < 1e-4, "{f}: {e}");
    }
}

/// knobs' own SDXL files (diffusers, and kohya with sd-scripts' SDXL names) read back to the
/// same image; the kohya file uses SGM block names and `te1` / `te2`.
#[test]
fn sdxl_lora_files_written_by_knobs_read_back() {
    let g = read_safetensors(fixture().join("goldens/lora.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut sd = StableDiffusion::from_dir(fixture(), &cpu()).unwrap();
    let mut adapters = PipelineAdapters::new(0);
    adapters.load_lora(&mut sd, &fixture().join("goldens/lora/peft"), "lora", 1.0).unwrap();
    for (layout, file) in [(LoraFile::Kohya, "kohya.safetensors"), (LoraFile::Diffusers, "diffusers.safetensors")] {
        let path = tmp.path().join(file);
        adapters.save_lora_file(&mut sd, "lora", &path, layout).unwrap();
        let (latents, _) = generate_with(&path, &g);
        let e = rel_err(latents, &g, "pipeline.final_latents");
        assert!(e < 1e-4, "{file}: {e}");
    }
    let kohya = read_safetensors(tmp.path().join("kohya.safetensors")).unwrap();
    let want = read_safetensors(fixture().join("goldens/lora/kohya/tiny_sdxl_lora_kohya.safetensors")).unwrap();
    let keys = |s: &StateDict| s.tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&kohya), keys(&want), "sd-scripts' SDXL key set");
    assert_eq!(kohya.metadata.get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
}

/// A file for a second text encoder on an SD-1.x model names the component.
#[test]
fn sdxl_lora_on_an_sd1_model_is_refused() {
    let mut sd = StableDiffusion::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/tiny-sd"), &cpu()).unwrap();
    let mut adapters = PipelineAdapters::new(0);
    let file = fixture().join("goldens/lora/diffusers/pytorch_lora_weights.safetensors");
    let err = adapters.load_lora(&mut sd, &file, "x", 1.0).unwrap_err().to_string();
    assert!(err.contains("text_encoder") || err.contains("unet"), "{err}");
    assert!(adapters.attached().is_empty());
    // Only the second text encoder's part: refused by that component's name, nothing left.
    let mut full = read_safetensors(&file).unwrap();
    full.tensors.retain(|k, _| k.starts_with("text_encoder_2."));
    let tmp = tempfile::tempdir().unwrap();
    let te2_only = tmp.path().join("te2.safetensors");
    knobs_nn::io::write_safetensors(&te2_only, &full.tensors, &full.metadata).unwrap();
    let err = adapters.load_lora(&mut sd, &te2_only, "x", 1.0).unwrap_err().to_string();
    assert!(err.contains("text_encoder_2") && err.contains("second text encoder"), "{err}");
    assert!(adapters.attached().is_empty());
}
