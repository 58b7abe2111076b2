//! Probe: seconds per base-phase training step of the recipe's UNet at other widths.
//! KNOBS_WIDTHS="48,96;96,192" KNOBS_LAYERS=1 KNOBS_HEAD=4
use std::time::Instant;

use knobs_diffusion::schedulers::{DdpmScheduler, SchedulerConfig};
use knobs_diffusion::unet::{UNet2DConditionModel, UNetConfig};
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::{Init, ModuleExt, Tensor, cpu_autodiff};
use knobs_train::pretrain::recipe;
use knobs_train::rng::{normal, step_rng};
use rand::Rng;

fn main() {
    let widths = std::env::var("KNOBS_WIDTHS").unwrap_or_else(|_| "48,96".into());
    let layers: usize = std::env::var("KNOBS_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let head: usize = std::env::var("KNOBS_HEAD").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let batch = 32;
    let dev = cpu_autodiff();
    let ddpm = DdpmScheduler::new(SchedulerConfig::from_json_str(&recipe::scheduler_config().to_string()).unwrap());
    for w in widths.split(';') {
        let chans: Vec<usize> = w.split(',').map(|x| x.parse().unwrap()).collect();
        let mut cfg = recipe::unet_config();
        cfg["block_out_channels"] = serde_json::json!(chans);
        cfg["layers_per_block"] = serde_json::json!(layers);
        cfg["attention_head_dim"] = serde_json::json!(head);
        let n = chans.len();
        cfg["down_block_types"] = serde_json::json!(vec!["CrossAttnDownBlock2D"; n]);
        cfg["up_block_types"] = serde_json::json!(vec!["CrossAttnUpBlock2D"; n]);
        let mut unet = UNet2DConditionModel::new(serde_json::from_value::<UNetConfig>(cfg).unwrap(), &mut Init::new(0), &dev).unwrap();
        unet.train_only(|_| true);
        let params = unet.num_trainable_params();
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-4, ..Default::default() });
        let mut rng = step_rng(0, "probe", 0);
        let s = recipe::LATENT_SIZE;
        let latents = normal(&mut rng, [batch, recipe::LATENT_CHANNELS, s, s], &dev);
        let context = normal(&mut rng, [batch, recipe::MAX_TOKENS, 64], &dev);
        let mut times = Vec::new();
        for i in 0..8 {
            let start = Instant::now();
            let noise = normal(&mut rng, latents.dims(), &dev);
            let t: Vec<i64> = (0..batch).map(|_| rng.random_range(0..1000)).collect();
            let noisy = ddpm.add_noise(latents.clone(), noise.clone(), &t).unwrap();
            let tf = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), &dev);
            let loss = (unet.forward(noisy, tf, context.clone()) - noise).powi_scalar(2).mean();
            let grads = collect_grads(&unet, &loss.backward());
            opt.step(&mut unet, &grads, |_| 1e-4);
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{w} layers {layers} head {head}: {:.3} s/step median, {params} params", times[times.len() / 2]);
    }
}
