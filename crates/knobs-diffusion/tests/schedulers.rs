//! Schedulers against diffusers: DDPM and DDIM against golden tensors made by diffusers from
//! the tiny pipeline's scheduler config; Euler against the formulas of diffusers' code,
//! evaluated here independently; spacings against values derived by hand from diffusers.
use knobs_diffusion::schedulers::{
    DdimScheduler, DdpmScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Init, Tensor, cpu};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn config() -> SchedulerConfig {
    SchedulerConfig::from_dir(format!("{GOLDEN}/tiny-sd/scheduler")).unwrap()
}

fn golden(name: &str) -> StateDict {
    read_safetensors(format!("{GOLDEN}/tensors/{name}.safetensors")).unwrap()
}

fn tensor<const D: usize>(sd: &StateDict, key: &str) -> Tensor<D> {
    let (v, shape) = sd.f32(key).unwrap();
    Tensor::from_data(TensorData::new(v, shape), &cpu())
}

fn ints(sd: &StateDict, key: &str) -> Vec<i64> {
    sd.get(key).unwrap().clone().convert::<i64>().try_into_vec::<i64>().unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max)
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{name}: relative error {e:.3e}");
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.0e}");
}

fn with(key: &str, value: &str) -> SchedulerConfig {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{GOLDEN}/tiny-sd/scheduler/scheduler_config.json")).unwrap())
            .unwrap();
    json[key] = serde_json::from_str(value).unwrap();
    SchedulerConfig::from_json_str(&json.to_string()).unwrap()
}

#[test]
fn ddpm_schedule_noising_and_velocity_match_diffusers() {
    let g = golden("scheduler_ddpm");
    let ddpm = DdpmScheduler::new(config());
    let betas = g.f32("betas").unwrap().0;
    let acp = g.f32("alphas_cumprod").unwrap().0;
    assert_close("betas", ddpm.betas(), &betas, 1e-6);
    assert_close("alphas_cumprod", ddpm.alphas_cumprod(), &acp, 1e-6);
    // Elementwise too: the small values at the end of alphas_cumprod matter for SNR.
    for (i, (a, b)) in ddpm.alphas_cumprod().iter().zip(&acp).enumerate() {
        assert!(((a - b) / b).abs() < 1e-6, "alphas_cumprod[{i}]: {a} vs {b}");
    }

    let ts = ints(&g, "timesteps");
    let (x0, noise) = (tensor::<4>(&g, "original_samples"), tensor::<4>(&g, "noise"));
    let noisy = ddpm.add_noise(x0.clone(), noise.clone(), &ts).unwrap();
    assert_close("add_noise", &values(noisy), &g.f32("noisy").unwrap().0, 1e-5);
    let v = ddpm.get_velocity(x0.clone(), noise.clone(), &ts).unwrap();
    assert_close("get_velocity", &values(v), &g.f32("velocity").unwrap().0, 1e-5);

    let snr = ddpm.snr(&ts).unwrap();
    for (s, &t) in snr.iter().zip(&ts) {
        let a = acp[t as usize] as f64;
        assert!((*s as f64 / (a / (1.0 - a)) - 1.0).abs() < 1e-5, "snr at {t}: {s}");
    }
    // Wrong batch or timestep is an error, not a panic.
    assert!(ddpm.add_noise(x0.clone(), noise.clone(), &ts[..3]).is_err());
    assert!(ddpm.add_noise(x0, noise, &[0, 1, 2, 1000]).unwrap_err().to_string().contains("1000"));
}

#[test]
fn ddim_timesteps_and_steps_match_diffusers() {
    let g = golden("scheduler_ddim");
    let mut ddim = DdimScheduler::new(config());
    ddim.set_timesteps(10).unwrap();
    assert_eq!(ddim.timesteps(), ints(&g, "timesteps").as_slice());
    assert_close("ddim alphas_cumprod", ddim.alphas_cumprod(), &g.f32("alphas_cumprod").unwrap().0, 1e-6);
    for j in 0..3 {
        let t = ints(&g, &format!("step{j}.timestep"))[0];
        let out = ddim
            .step(tensor(&g, &format!("step{j}.model_output")), t, tensor(&g, &format!("step{j}.sample")), None)
            .unwrap();
        assert_close(&format!("ddim step{j} (t={t}) prev_sample"), &values(out.prev_sample), &g.f32(&format!("step{j}.prev_sample")).unwrap().0, 1e-5);
        assert_close(
            &format!("ddim step{j} (t={t}) pred_original_sample"),
            &values(out.pred_original_sample),
            &g.f32(&format!("step{j}.pred_original_sample")).unwrap().0,
            1e-5,
        );
    }
    // eta > 0 makes the step stochastic: without noise it is an error.
    ddim.eta = 1.0;
    let x = Tensor::<4>::zeros([1, 4, 2, 2], &cpu());
    assert!(ddim.step(x.clone(), 901, x, None).is_err());
}

#[test]
fn spacings_match_diffusers() {
    let cases: [(&str, usize, Vec<i64>); 5] = [
        ("leading", 10, vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("trailing", 10, vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", 10, vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        // numpy rounds halves to even: 832.5 -> 832, 499.5 -> 500, 166.5 -> 166.
        ("linspace", 7, vec![999, 832, 666, 500, 333, 166, 0]),
        ("trailing", 3, vec![999, 666, 332]),
    ];
    for (spacing, n, want) in cases {
        let cfg = with("timestep_spacing", &format!("\"{spacing}\""));
        let mut ddpm = DdpmScheduler::new(cfg.clone());
        ddpm.set_timesteps(n).unwrap();
        assert_eq!(ddpm.timesteps(), want.as_slice(), "DDPM {spacing} {n}");
        let mut ddim = DdimScheduler::new(cfg);
        ddim.set_timesteps(n).unwrap();
        assert_eq!(ddim.timesteps(), want.as_slice(), "DDIM {spacing} {n}");
    }
    let mut ddim = DdimScheduler::new(config());
    assert!(ddim.set_timesteps(0).is_err() && ddim.set_timesteps(1001).is_err());
}

#[test]
fn ddpm_step_follows_the_posterior_formula() {
    let g = golden("scheduler_ddpm");
    let acp: Vec<f64> = g.f32("alphas_cumprod").unwrap().0.iter().map(|&a| a as f64).collect();
    let mut ddpm = DdpmScheduler::new(config());
    let (x, eps, z) = (1.5f64, 0.5f64, -2.0f64);
    let full = |v: f64| Tensor::<4>::full([1, 4, 2, 2], v, &cpu());
    let t = 500;
    let out = ddpm.step(full(eps), t, full(x), Some(full(z))).unwrap();
    let (a, ap) = (acp[500], acp[499]);
    let x0 = (x - (1.0 - a).sqrt() * eps) / a.sqrt();
    let beta = 1.0 - a / ap;
    let mean = ap.sqrt() * beta / (1.0 - a) * x0 + (a / ap).sqrt() * (1.0 - ap) / (1.0 - a) * x;
    let var = (1.0 - ap) / (1.0 - a) * beta;
    let want = mean + var.sqrt() * z;
    let got = values(out.prev_sample);
    assert!(got.iter().all(|&v| ((v as f64 - want) / want).abs() < 1e-5), "{got:?} vs {want}");
    assert!(values(out.pred_original_sample).iter().all(|&v| ((v as f64 - x0) / x0).abs() < 1e-5));
    // Stochastic steps need noise; the last step (t = 0) adds none.
    assert!(ddpm.step(full(eps), t, full(x), None).is_err());
    ddpm.step(full(eps), 0, full(x), None).unwrap();
    // After set_timesteps the previous timestep is the next one of the chain.
    ddpm.set_timesteps(10).unwrap();
    assert_eq!(ddpm.previous_timestep(901).unwrap(), 801);
    assert_eq!(ddpm.previous_timestep(1).unwrap(), -1);
    assert!(ddpm.previous_timestep(900).is_err());
}

/// sigma(t) = sqrt((1 - acp) / acp), linearly interpolated between integer timesteps.
fn sigma_at(acp: &[f32], t: f64) -> f64 {
    let s = |i: usize| (((1.0 - acp[i]) / acp[i]) as f64).sqrt();
    let lo = t.floor() as usize;
    if lo + 1 >= acp.len() { s(acp.len() - 1) } else { s(lo) + (s(lo + 1) - s(lo)) * (t - lo as f64) }
}

#[test]
fn euler_sigmas_match_diffusers_formulas() {
    let acp = golden("scheduler_ddpm").f32("alphas_cumprod").unwrap().0;
    // The tiny config uses leading spacing with steps_offset 1.
    let mut euler = EulerDiscreteScheduler::new(config()).unwrap();
    euler.set_timesteps(10).unwrap();
    assert_eq!(euler.timesteps(), &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    let sig = euler.sigmas().to_vec();
    assert_eq!(sig.len(), 11);
    assert_eq!(sig[10], 0.0);
    for (i, &t) in euler.timesteps().iter().enumerate() {
        let want = sigma_at(&acp, t as f64);
        assert!((sig[i] as f64 / want - 1.0).abs() < 1e-6, "sigma[{i}] at t={t}: {} vs {want}", sig[i]);
    }
    // Leading spacing: the initial noise has variance sigma_max^2 + 1.
    let s0 = sig[0] as f64;
    assert!((euler.init_noise_sigma() - (s0 * s0 + 1.0).sqrt()).abs() < 1e-5);

    // linspace with 7 steps has fractional timesteps, which the model receives unrounded.
    let mut euler = EulerDiscreteScheduler::new(with("timestep_spacing", "\"linspace\"")).unwrap();
    euler.set_timesteps(7).unwrap();
    let exact = euler.model_timesteps();
    assert_eq!(exact, vec![999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0]);
    for (i, &t) in exact.iter().enumerate() {
        let want = sigma_at(&acp, t as f64);
        assert!((euler.sigmas()[i] as f64 / want - 1.0).abs() < 1e-6, "linspace sigma[{i}] at t={t}");
    }
    assert!((euler.init_noise_sigma() - euler.sigmas()[0] as f64).abs() < 1e-6);
    assert_eq!(config().spacing_or(TimestepSpacing::Linspace), TimestepSpacing::Leading);
}

/// The exact noise prediction when all data is the constant `c`: eps = (x - c) / sigma.
fn point_mass_eps(x: &Tensor<4>, c: f64, sigma: f32) -> Tensor<4> {
    x.clone().sub_scalar(c).div_scalar(sigma)
}

#[test]
fn euler_sampling_loops_behave_as_the_ode() {
    let c = 0.3;
    let x_init = Init::new(5).normal([1, 4, 8, 8], 1.0, &cpu());
    for ancestral in [false, true] {
        let mut s: Box<dyn Scheduler> = if ancestral {
            Box::new(EulerAncestralDiscreteScheduler::new(config()).unwrap())
        } else {
            Box::new(EulerDiscreteScheduler::new(config()).unwrap())
        };
        s.set_timesteps(10).unwrap();
        let mut sig = EulerDiscreteScheduler::new(config()).unwrap();
        sig.set_timesteps(10).unwrap();
        let sigmas = sig.sigmas().to_vec();
        let mut x = x_init.clone().mul_scalar(s.init_noise_sigma());
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let scaled = s.scale_model_input(x.clone(), t).unwrap();
            let k = (sigmas[i] * sigmas[i] + 1.0).sqrt();
            assert!(rel_err(&values(scaled.mul_scalar(k)), &values(x.clone())) < 1e-6, "input scaling at step {i}");
            // Zero noise makes the ancestral sampler's path checkable: x = c + (x - c) * sigma_down / sigma.
            let noise = Some(Tensor::zeros(x.dims(), &cpu()));
            let out = s.step(point_mass_eps(&x, c, sigmas[i]), t, x.clone(), noise).unwrap();
            let x0 = values(out.pred_original_sample);
            assert!(x0.iter().all(|v| (*v as f64 - c).abs() < 1e-4), "x0 at step {i}");
            let (from, to) = (sigmas[i] as f64, sigmas[i + 1] as f64);
            let ratio = if ancestral { (to * to - to * to * (from * from - to * to) / (from * from)).max(0.0).sqrt() / from } else { to / from };
            let want: Vec<f32> = values(x.clone()).iter().map(|v| (c + (*v as f64 - c) * ratio) as f32).collect();
            x = out.prev_sample;
            assert!(rel_err(&values(x.clone()), &want) < 1e-5, "step {i}");
        }
        assert!(values(x).iter().all(|v| (*v as f64 - c).abs() < 1e-4), "the chain ends on the data");
    }
    // A zero model leaves Euler's sample unchanged; the ancestral one needs noise.
    let mut e = EulerDiscreteScheduler::new(config()).unwrap();
    e.set_timesteps(4).unwrap();
    let t = e.timesteps()[0];
    let x = x_init.clone();
    let out = e.step(Tensor::zeros(x.dims(), &cpu()), t, x.clone(), None).unwrap();
    assert_eq!(values(out.prev_sample), values(x.clone()));
    assert_eq!(e.step_index(), Some(1));
    let mut a = EulerAncestralDiscreteScheduler::new(config()).unwrap();
    a.set_timesteps(4).unwrap();
    assert!(a.step(Tensor::zeros(x.dims(), &cpu()), t, x, None).is_err());
}

#[test]
fn bad_configs_name_the_key() {
    let err = |text: &str| SchedulerConfig::from_json_str(text).unwrap_err().to_string();
    let e = err(r#"{"beta_schedule": "cosine"}"#);
    assert!(e.contains("beta_schedule") && e.contains("scaled_linear") && e.contains("cosine"), "{e}");
    let e = err(r#"{"prediction_type": "flow"}"#);
    assert!(e.contains("prediction_type") && e.contains("v_prediction"), "{e}");
    let e = err(r#"{"timestep_spacing": "even"}"#);
    assert!(e.contains("timestep_spacing") && e.contains("trailing"), "{e}");
    assert!(err(r#"{"thresholding": true}"#).contains("thresholding"));
    assert!(err(r#"{"variance_type": "learned"}"#).contains("variance_type"));
    let e = EulerDiscreteScheduler::new(with("use_karras_sigmas", "true")).unwrap_err().to_string();
    assert!(e.contains("use_karras_sigmas"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scheduler_config.json");
    std::fs::write(&file, r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    let e = SchedulerConfig::from_file(&file).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json") && e.contains("beta_schedule"), "{e}");
    std::fs::write(&file, "{").unwrap();
    assert!(SchedulerConfig::from_file(&file).unwrap_err().to_string().contains("scheduler_config.json"));

    // The other schedules build and are monotone.
    for (sched, extra) in [("linear", ""), ("squaredcos_cap_v2", ""), ("scaled_linear", r#", "rescale_betas_zero_snr": true"#)] {
        let cfg = SchedulerConfig::from_json_str(&format!(r#"{{"beta_schedule": "{sched}"{extra}}}"#)).unwrap();
        let acp = DdpmScheduler::new(cfg).alphas_cumprod().to_vec();
        assert!(acp.windows(2).all(|w| w[1] <= w[0]) && acp[0] < 1.0, "{sched}");
        if !extra.is_empty() {
            assert!(acp[999].abs() < 1e-6, "zero terminal SNR");
        }
    }
}
