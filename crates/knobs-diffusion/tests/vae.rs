//! AutoencoderKL against diffusers' golden outputs for the tiny VAE, gradient flow through
//! encode + decode, finite differences, and config errors.
use knobs_diffusion::vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Device, Init, ModuleExt, Tensor, cpu, cpu_autodiff, gradcheck};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn vae_dir() -> String {
    format!("{GOLDEN}/tiny-sd/vae")
}

fn tensor<const D: usize>(sd: &StateDict, key: &str, device: &Device) -> Tensor<D> {
    let (v, shape) = sd.f32(key).unwrap();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn assert_close<const D: usize>(name: &str, got: Tensor<D>, g: &StateDict, key: &str, tol: f64) {
    let (want, shape) = g.f32(key).unwrap();
    assert_eq!(got.dims().to_vec(), shape, "{name} shape");
    let got = values(got);
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let e = diff / want.iter().map(|b| b.abs() as f64).fold(0.0, f64::max);
    println!("{name}: relative error {e:.3e}");
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.0e}");
}

#[test]
fn loads_diffusers_weights_and_matches_golden_outputs() {
    let device = cpu();
    let vae = AutoencoderKL::from_dir(vae_dir(), &device).unwrap();
    assert_eq!(vae.num_params(), 658_375);
    // Every file key is a parameter path and vice versa (from_dir loads strictly; this
    // also pins the names).
    let file = read_safetensors(format!("{}/diffusion_pytorch_model.safetensors", vae_dir())).unwrap();
    let mut paths = vae.param_paths();
    paths.sort();
    assert_eq!(paths, file.tensors.keys().cloned().collect::<Vec<_>>());
    assert!((vae.scaling_factor() - 0.18215).abs() < 1e-12);

    let g = read_safetensors(format!("{GOLDEN}/tensors/vae.safetensors")).unwrap();
    assert_close("decode", vae.decode(tensor(&g, "decode_in", &device)), &g, "decode_out", 1e-4);

    let x: Tensor<4> = tensor(&g, "encode_in", &device);
    let moments = vae.quant_conv.as_ref().unwrap().forward(vae.encoder.forward(x.clone()));
    assert_close("encode moments", moments, &g, "encode_moments", 1e-4);
    let post = vae.encode(x);
    assert_close("encode mean", post.mean.clone(), &g, "encode_mean", 1e-4);
    assert_close("encode logvar", post.logvar.clone(), &g, "encode_logvar", 1e-4);
    assert_close("encode std", post.std(), &g, "encode_std", 1e-4);

    // Scaling for the UNet and back is the identity.
    let z = post.mode();
    let back = vae.unscale_latents(vae.scale_latents(z.clone()));
    let err = values((back - z).abs().max());
    assert!(err[0] < 1e-5);
}

/// Under `--mixed-precision bf16` the VAE computes in bf16 (`compute_dtype`): encode and
/// decode still take and give f32, stay near diffusers' f32 golden within bf16's rounding,
/// and are not the f32 results (2.2e-2 / 2.1e-2; PyTorch's bf16 autocast on the same golden
/// 1.7e-2 / 2.1e-2).
#[test]
fn bf16_compute_stays_near_the_golden_and_gives_f32() {
    use knobs_nn::burn::tensor::DType;
    let device = cpu();
    let mut vae = AutoencoderKL::from_dir(vae_dir(), &device).unwrap();
    let g = read_safetensors(format!("{GOLDEN}/tensors/vae.safetensors")).unwrap();
    let run = |vae: &AutoencoderKL| (vae.decode(tensor(&g, "decode_in", &device)), vae.encode(tensor(&g, "encode_in", &device)).mean);
    let (f32_decode, f32_mean) = run(&vae);
    vae.compute_dtype = DType::BF16;
    let (decode, mean) = run(&vae);
    assert_eq!((decode.dtype(), mean.dtype()), (DType::F32, DType::F32));
    assert_close("bf16 decode", decode.clone(), &g, "decode_out", 3e-2);
    assert_close("bf16 encode mean", mean.clone(), &g, "encode_mean", 3e-2);
    assert!(values(decode) != values(f32_decode) && values(mean) != values(f32_mean), "computed in f32");
}

#[test]
fn posterior_clamps_logvar_and_samples_by_reparameterisation() {
    let device = cpu();
    let mean = Tensor::<4>::full([1, 1, 1, 2], 0.5, &device);
    let logvar = Tensor::<4>::from_data(TensorData::new(vec![-40.0f32, 30.0], [1, 1, 1, 2]), &device);
    let post = DiagonalGaussian::from_moments(Tensor::cat(vec![mean, logvar], 1));
    assert_eq!(values(post.logvar.clone()), vec![-30.0, 20.0]);
    let noise = Tensor::<4>::full([1, 1, 1, 2], 2.0, &device);
    let s = values(post.sample(noise));
    assert!((s[0] - 0.5).abs() < 1e-5 && (s[1] as f64 - (0.5 + 2.0 * 10f64.exp())).abs() / s[1] as f64 <= 1e-6);
}

/// A VAE small enough for finite differences, with every block kind present.
fn small_config() -> VaeConfig {
    VaeConfig {
        latent_channels: 2,
        block_out_channels: vec![8, 16],
        down_block_types: vec!["DownEncoderBlock2D".into(); 2],
        up_block_types: vec!["UpDecoderBlock2D".into(); 2],
        norm_num_groups: 4,
        ..VaeConfig::default()
    }
}

/// Random affine GroupNorm parameters, so that their gradients are checked non-trivially.
fn randomise_norms(vae: &mut AutoencoderKL, seed: u64) {
    let mut init = Init::new(seed);
    vae.for_each_param_mut(|path, mut p| {
        if path.contains("norm") {
            let n = p.as_ref().numel();
            let v = init.normal_vec(n).into_iter().map(|x| 1.0 + 0.3 * x).collect::<Vec<_>>();
            p.assign(path, TensorData::new(v, [n])).unwrap();
        }
    });
}

fn loss(vae: &AutoencoderKL, x: &Tensor<4>, noise: &Tensor<4>) -> Tensor<1> {
    let post = vae.encode(x.clone());
    let y = vae.decode(post.sample(noise.clone()));
    (y - x.clone()).powi_scalar(2).mean() + post.kl().mean().mul_scalar(1e-3)
}

#[test]
fn every_parameter_gets_a_gradient_through_encode_and_decode() {
    let device = cpu_autodiff();
    let mut vae = AutoencoderKL::from_dir(vae_dir(), &device).unwrap();
    vae.train_only(|_| true);
    let x = Init::new(1).normal([1, 3, 16, 16], 0.5, &device);
    let noise = Init::new(2).normal([1, 4, 8, 8], 1.0, &device);
    let grads = loss(&vae, &x, &noise).backward();
    let mut checked = 0;
    vae.for_each_param(|path, p| {
        let g = p.grad(&grads).unwrap_or_else(|| panic!("{path} got no gradient"));
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0 && norm.is_finite(), "{path}: gradient norm {norm}");
        checked += 1;
    });
    assert_eq!(checked, vae.param_paths().len());
}

#[test]
fn gradients_match_finite_differences() {
    let device = cpu_autodiff();
    let mut vae = AutoencoderKL::new(small_config(), &mut Init::new(4), &device).unwrap();
    randomise_norms(&mut vae, 5);
    vae.train_only(|_| true);
    let x = Init::new(6).normal([1, 3, 8, 8], 0.5, &device);
    let noise = Init::new(7).normal([1, 2, 4, 4], 1.0, &device);
    let samples = gradcheck::check(&mut vae, |m| loss(m, &x, &noise), 1e-2, 2);
    for path in vae.param_paths() {
        assert!(samples.iter().any(|s| s.path == path), "`{path}` not checked");
    }
    let worst = samples.iter().map(|s| s.rel_error()).fold(0.0, f64::max);
    println!("finite differences: {} samples, worst relative error {worst:.3e}", samples.len());
    for s in &samples {
        assert!(s.rel_error() < 2e-2, "{}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
    }
}

#[test]
fn bad_configs_and_files_are_clear_errors() {
    let err = |json: &str| VaeConfig::from_json_str(json).unwrap_err().to_string();
    let e = err(r#"{"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#);
    assert!(e.contains("down_block_types") && e.contains("AttnDownEncoderBlock2D"), "{e}");
    let e = err(r#"{"up_block_types": ["AttnUpDecoderBlock2D"]}"#);
    assert!(e.contains("up_block_types"), "{e}");
    let e = err(r#"{"block_out_channels": [48], "norm_num_groups": 32}"#);
    assert!(e.contains("block_out_channels") && e.contains("norm_num_groups"), "{e}");
    assert!(err(r#"{"act_fn": "gelu"}"#).contains("act_fn"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{}/config.json", vae_dir()), dir.path().join("config.json")).unwrap();
    let e = AutoencoderKL::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    std::fs::write(dir.path().join("config.json"), r#"{"block_out_channels": [32], "down_block_types": ["X"]}"#).unwrap();
    let e = AutoencoderKL::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("down_block_types"), "{e}");

    // Weights that do not fit the config name the key at fault.
    let cfg = std::fs::read_to_string(format!("{}/config.json", vae_dir())).unwrap().replace("\"layers_per_block\": 1", "\"layers_per_block\": 2");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    std::fs::copy(format!("{}/diffusion_pytorch_model.safetensors", vae_dir()), dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let e = AutoencoderKL::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    assert!(e.contains("resnets.") && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

/// SDXL's VAE config (tiny-sdxl: `scaling_factor` 0.13025, `force_upcast`) loads, and encode
/// and decode match diffusers.
#[test]
fn sdxl_vae_matches_diffusers() {
    let device = cpu();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sdxl");
    let vae = AutoencoderKL::from_dir(format!("{dir}/vae"), &device).unwrap();
    assert_eq!(vae.config.scaling_factor, 0.13025);
    let g = read_safetensors(format!("{dir}/goldens/vae.safetensors")).unwrap();
    let posterior = vae.encode(tensor(&g, "encode_in", &device));
    assert_close("sdxl encode mean", posterior.mean, &g, "encode_mean", 1e-5);
    assert_close("sdxl encode logvar", posterior.logvar, &g, "encode_logvar", 1e-5);
    assert_close("sdxl decode", vae.decode(tensor(&g, "decode_in", &device)), &g, "decode_out", 1e-5);
}
