//! The text-to-image pipeline against diffusers' `StableDiffusionPipeline` on the tiny model
//! (4 DDIM steps, CFG 7.5, given latents), seeding, guidance, every scheduler, and errors.
use std::path::Path;

mod common;

use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind, StableDiffusion, WeightsAs};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Tensor, cpu};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn model_dir() -> String {
    format!("{GOLDEN}/tiny-sd")
}

fn load() -> StableDiffusion {
    StableDiffusion::from_dir(model_dir(), &cpu()).unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    diff / want.iter().map(|b| b.abs() as f64).fold(0.0, f64::max)
}

fn small(prompt: &str, seed: u64) -> GenerateRequest {
    GenerateRequest { steps: 2, seed, ..GenerateRequest::new(prompt) }
}

#[test]
fn matches_diffusers_pipeline_golden() {
    common::sd_goldens::assert_within(&common::sd_goldens::pipeline(&cpu()), 1e-4);
}

/// `generate_once` gives `generate`'s image and leaves the text encoder and the UNet
/// released: generating again is an error naming them. A request it refuses releases nothing.
#[test]
fn generating_once_releases_the_text_encoder_and_the_unet() {
    use knobs_nn::ModuleExt;
    let mut sd = load();
    let req = GenerateRequest { num_images: 2, ..small("a photo of a cat", 4) };
    let want = values(sd.generate(&req).unwrap());
    assert!(sd.generate_once(&GenerateRequest { steps: 0, ..req.clone() }, &mut |_, _| {}).is_err());
    assert!(!sd.text_encoder.is_released() && !sd.unet.is_released(), "a refused request releases nothing");
    let got = values(sd.generate_once(&req, &mut |_, _| {}).unwrap());
    assert_eq!(got, want);
    assert!(sd.text_encoder.is_released() && sd.unet.is_released());
    assert_eq!(sd.text_encoder.num_params() + sd.unet.num_params(), 0, "every weight is freed");
    let given = GenerateRequest { conditioning: Some(load().condition_for(&req).unwrap()), ..req.clone() };
    let err = sd.generate(&given).unwrap_err().to_string();
    assert!(err.contains("unet") && err.contains("released"), "{err}");
    let err = sd.generate(&req).unwrap_err().to_string();
    assert!(err.contains("text_encoder") && err.contains("released"), "{err}");
}

/// A pipeline loaded for one generation builds its UNet with placeholders and reads the
/// weights only inside `generate_once`, after the prompt is encoded and the text encoder
/// released: the same image as a pipeline loaded in full, also with a LoRA attached to the
/// placeholders. Until then running, merging into or saving the UNet is an error naming
/// `unet`, and a refused request leaves everything as it was.
#[test]
fn a_pipeline_loaded_for_one_generation_reads_the_unet_after_encoding() {
    use knobs_diffusion::loaders::PipelineAdapters;
    use knobs_nn::ModuleExt;
    let lora = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let with_lora = |sd: &mut StableDiffusion| {
        let mut adapters = PipelineAdapters::new(0);
        adapters.load_lora(sd, Path::new(&lora), "lora", 0.8).unwrap();
        adapters.activate_all(sd).unwrap();
        adapters
    };
    let req = GenerateRequest { num_images: 2, ..small("a photo of a cat", 6) };
    for attach in [false, true] {
        let mut full = load();
        let mut once = StableDiffusion::load_for_one_generation(model_dir(), &cpu(), WeightsAs::from(knobs_nn::burn::tensor::DType::F32)).unwrap();
        assert!(once.unet.is_deferred() && !full.unet.is_deferred());
        if attach {
            with_lora(&mut full);
            let mut adapters = with_lora(&mut once);
            let err = adapters.merge(&mut once, "lora").unwrap_err().to_string();
            assert!(err.contains("unet") && err.contains("not loaded yet"), "{err}");
            let out = tempfile::tempdir().unwrap();
            let err = knobs_diffusion::single_file::save_single_file(&once, out.path().join("x.safetensors"), knobs_nn::io::FloatDtype::F32).unwrap_err().to_string();
            assert!(err.contains("unet") && err.contains("not loaded yet"), "{err}");
        }
        let want = values(full.generate(&req).unwrap());
        let err = once.generate(&req).unwrap_err().to_string();
        assert!(err.contains("unet") && err.contains("not loaded yet"), "{err}");
        assert!(once.generate_once(&GenerateRequest { steps: 0, ..req.clone() }, &mut |_, _| {}).is_err());
        assert!(once.unet.is_deferred() && !once.text_encoder.is_released(), "a refused request changes nothing");
        let mut steps = 0;
        let got = values(once.generate_once(&req, &mut |done, _| steps = done).unwrap());
        assert_eq!(got, want, "LoRA attached before the weights: {attach}");
        assert_eq!(steps, req.steps);
        assert!(once.text_encoder.is_released() && once.unet.is_released());
        assert_eq!(once.text_encoder.num_params() + once.unet.num_params(), 0, "every weight is freed");
    }
}

/// Encodings made beforehand (diffusers' `prompt_embeds`) give the prompt's image, also once
/// the text encoder's weights are gone; a released encoder refuses to encode, naming itself,
/// and encodings of another batch size are refused, naming `conditioning`.
#[test]
fn given_encodings_stand_in_for_a_released_text_encoder() {
    use knobs_nn::ModuleExt;
    let mut sd = load();
    let req = GenerateRequest { num_images: 2, ..small("a photo of a cat", 3) };
    let want = values(sd.generate(&req).unwrap());
    let given = sd.condition_for(&req).unwrap();
    sd.text_encoder.release();
    assert_eq!(sd.text_encoder.num_params(), 0, "every weight is freed");
    let got = values(sd.generate(&GenerateRequest { conditioning: Some(given.clone()), ..req.clone() }).unwrap());
    assert_eq!(got, want);
    let err = sd.generate(&req).unwrap_err().to_string();
    assert!(err.contains("text_encoder") && err.contains("released"), "{err}");
    let err = sd.generate(&GenerateRequest { conditioning: Some(given), num_images: 1, ..req }).unwrap_err().to_string();
    assert!(err.contains("conditioning") && err.contains("4 rows"), "{err}");
}

#[test]
fn seed_decides_the_image() {
    let sd = load();
    let a = values(sd.generate(&small("a photo of a cat", 1)).unwrap());
    let b = values(sd.generate(&small("a photo of a cat", 1)).unwrap());
    let c = values(sd.generate(&small("a photo of a cat", 2)).unwrap());
    assert_eq!(a, b, "same seed, same image");
    let d = rel_err(&a, &c);
    println!("seed 1 vs 2: relative difference {d:.3e}");
    assert!(d > 1e-2, "different seeds gave nearly the same image ({d:.3e})");
    // The prompt matters too.
    let e = values(sd.generate(&small("a red house", 1)).unwrap());
    assert!(rel_err(&a, &e) > 1e-3);

    // Stochastic samplers draw their step noise from the same seed.
    let ea = |seed| values(sd.generate(&GenerateRequest { scheduler: Some(SchedulerKind::EulerAncestral), ..small("a dog", seed) }).unwrap());
    let (x, y) = (ea(3), ea(3));
    assert_eq!(x, y);
    let same_start = GenerateRequest { scheduler: Some(SchedulerKind::EulerAncestral), ..small("a dog", 4) };
    let mut other_noise = same_start.clone();
    other_noise.latents = Some(Tensor::from_data(TensorData::new(knobs_nn::Init::new(3).normal_vec(4 * 32 * 32), [1, 4, 32, 32]), &sd.device));
    // Same initial latents as seed 3, different step noise (seed 4): a different image.
    assert!(rel_err(&values(sd.generate(&other_noise).unwrap()), &x) > 1e-4);
}

#[test]
fn guidance_at_most_one_skips_the_negative_prompt() {
    let sd = load();
    let with_neg = |g: f64, neg: &str| {
        values(sd.generate(&GenerateRequest { guidance_scale: g, negative_prompt: neg.into(), ..small("a photo of a cat", 5) }).unwrap())
    };
    assert_eq!(with_neg(1.0, ""), with_neg(1.0, "blurry, ugly"));
    assert!(rel_err(&with_neg(7.5, ""), &with_neg(7.5, "blurry, ugly")) > 1e-3);
    // Guidance 1 (conditional branch only) differs from strong guidance.
    assert!(rel_err(&with_neg(1.0, ""), &with_neg(7.5, "")) > 1e-3);
}

#[test]
fn every_scheduler_and_batch_and_size() {
    let sd = load();
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        let req = GenerateRequest { scheduler: Some(kind), num_images: 2, height: Some(32), width: Some(48), ..small("a cat", 7) };
        let img = sd.generate(&req).unwrap();
        assert_eq!(img.dims(), [2, 3, 32, 48], "{kind}");
        let v = values(img);
        assert!(v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)), "{kind}: values outside [0, 1]");
        // The two images of a batch start from different noise.
        let half = v.len() / 2;
        assert!(rel_err(&v[..half], &v[half..]) > 1e-3, "{kind}: batch images identical");
    }
    assert!("pndm".parse::<SchedulerKind>().unwrap_err().to_string().contains("ddim, euler, euler-a, ddpm"));
}

#[test]
fn bad_requests_are_errors() {
    let sd = load();
    let err = |req: GenerateRequest| sd.generate(&req).unwrap_err().to_string();
    assert!(err(GenerateRequest { steps: 0, ..small("x", 0) }).contains("steps"));
    assert!(err(GenerateRequest { num_images: 0, ..small("x", 0) }).contains("num_images"));
    assert!(err(GenerateRequest { height: Some(30), ..small("x", 0) }).contains("height"));
    let lat = |shape: [usize; 4]| Some(Tensor::<4>::zeros(shape, &sd.device));
    assert!(err(GenerateRequest { latents: lat([1, 3, 32, 32]), ..small("x", 0) }).contains("latents"));
    assert!(err(GenerateRequest { latents: lat([2, 4, 32, 32]), ..small("x", 0) }).contains("latents"));
    assert!(err(GenerateRequest { latents: lat([1, 4, 16, 16]), height: Some(64), ..small("x", 0) }).contains("height"));
    // Latents fix the size when none is given.
    let req = GenerateRequest { latents: lat([1, 4, 16, 24]), ..small("x", 0) };
    assert_eq!(sd.latent_shape(&req).unwrap(), [1, 4, 16, 24]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn missing_parts_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(Path::new(&model_dir()), &dir);
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let e = StableDiffusion::from_dir(&dir, &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("vae") && e.contains("not found"), "{e}");

    copy_dir(Path::new(&model_dir()).join("vae").as_path(), &dir.join("vae"));
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let e = StableDiffusion::from_dir(&dir, &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("unet") && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    // Loaded for one generation, the UNet's file is opened and its header checked at the load,
    // not once the prompt is encoded: missing, then cut short.
    let once = |dir: &Path| StableDiffusion::load_for_one_generation(dir, &cpu(), WeightsAs::from(knobs_nn::burn::tensor::DType::F32)).map(drop).unwrap_err().to_string();
    let e = once(&dir);
    assert!(e.contains("unet") && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    let whole = std::fs::read(Path::new(&model_dir()).join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("unet/diffusion_pytorch_model.safetensors"), &whole[..whole.len() - 4]).unwrap();
    let e = once(&dir);
    assert!(e.contains("unet") && e.contains("diffusion_pytorch_model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    // Cut short after the load opened it: the read's own error, then every later use names
    // that failure, not a release.
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::write(&file, &whole).unwrap();
    let mut sd = StableDiffusion::load_for_one_generation(&dir, &cpu(), WeightsAs::from(knobs_nn::burn::tensor::DType::F32)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(whole.len() as u64 / 2).unwrap();
    let e = sd.generate_once(&small("a photo of a cat", 1), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    let e = sd.unet.check_weights_in_memory().unwrap_err().to_string();
    assert!(e.contains("unet") && e.contains("reading its deferred weights failed") && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    std::fs::write(&file, &whole).unwrap();

    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    let e = StableDiffusion::from_dir(&dir, &cpu()).unwrap_err().to_string();
    assert!(e.contains("model_index.json"), "{e}");

    let e = StableDiffusion::from_dir(tmp.path().join("nope"), &cpu()).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("not found"), "{e}");
}

/// Under bf16 on a CPU whose AMX tiles run the products, the UNet's and VAE's weight matrices
/// and kernels stored in bf16 (what `knobs generate --mixed-precision bf16` keeps there by
/// default) give the images of f32 ones, bit for bit: every product rounds them to bf16 as it
/// packs them.
#[test]
fn bf16_weights_change_no_bf16_image_where_amx_runs() {
    use knobs_nn::ModuleExt;
    use knobs_nn::burn::tensor::DType;
    if !knobs_nn::ops::autocast::bf16_weights_change_nothing() {
        println!("skipped: this CPU runs no AMX");
        return;
    }
    let mut sd = load();
    let req = small("a photo of a dog", 3);
    let f32_image = values(sd.generate(&req).unwrap());
    sd.unet.compute_dtype = DType::BF16;
    sd.vae.compute_dtype = DType::BF16;
    let wide = values(sd.generate(&req).unwrap());
    sd.unet.store_frozen_as(DType::BF16);
    sd.vae.store_frozen_as(DType::BF16);
    let mut narrow_params = 0;
    sd.unet.for_each_param(|_, p| narrow_params += usize::from(p.bytes() == 2 * p.numel()));
    assert!(narrow_params > 100, "the UNet's matrices and kernels are stored in bf16 ({narrow_params})");
    let narrow = values(sd.generate(&req).unwrap());
    assert!(narrow == wide, "the same image from bf16-stored weights");
    assert!(wide != f32_image, "bf16 products, not f32 ones");
    // Loaded so (`knobs generate`'s default there): the text encoder stays f32.
    let mut loaded = StableDiffusion::from_dir_as(model_dir(), &cpu(), WeightsAs { text_encoders: DType::F32, unet_and_vae: DType::BF16 }).unwrap();
    let mut wide_text = true;
    loaded.text_encoder.for_each_param(|_, p| wide_text &= p.bytes() == 4 * p.numel());
    assert!(wide_text, "the text encoder's weights stay f32");
    loaded.unet.compute_dtype = DType::BF16;
    loaded.vae.compute_dtype = DType::BF16;
    assert!(values(loaded.generate(&req).unwrap()) == wide, "the same image from a pipeline loaded so");
}
