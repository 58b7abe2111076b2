//! The training step of `../shared/reference/bench_lora_step.py`, in knobs: tiny-sd UNet,
//! batch 8, 4x32x32 latents, precomputed 8x77x32 text states, DDPM noise, MSE on epsilon,
//! backward, AdamW. Modes: full fine-tune, LoRA r=4 on to_q/to_k/to_v/to_out.0, IA3 on
//! to_k/to_v/ff.net.2. Prints median / mean / min ms per step.
//!
//! KNOBS_BENCH_MODEL (default ../shared/golden/tiny-sd), KNOBS_BENCH_STEPS (20),
//! KNOBS_BENCH_WARMUP (3), KNOBS_BENCH_BATCH (8), KNOBS_BENCH_MODES (full,lora,ia3).
//!
//! KNOBS_BENCH_RECIPE_WIDTHS="48,96;96,192" times the built-in base model's UNet
//! (`pretrain::recipe`, 8-channel latents, its caption length) at each `block_out_channels`
//! instead of a model folder: the base phase of `knobs pretrain` runs batch 32, full.
use std::time::Instant;

use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, AdapterConfig, Pattern};
use knobs_diffusion::schedulers::{DdpmScheduler, SchedulerConfig};
use knobs_diffusion::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::{Device, Init, ModuleExt, Tensor, cpu_autodiff};
use knobs_train::pretrain::recipe;
use knobs_train::rng::{normal, step_rng};
use rand::Rng;

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn names(v: &[&str]) -> Pattern {
    Pattern::Names(v.iter().map(|s| s.to_string()).collect())
}

/// What one timed run uses: the UNet, its label, its latent channels and its caption length.
struct Subject {
    unet: UNet2DConditionModel,
    label: String,
    channels: usize,
    tokens: usize,
}

/// The built-in recipe's UNet with `block_out_channels` = `widths`, freshly initialised.
fn recipe_unet(widths: &str, dev: &Device) -> Subject {
    let mut cfg = recipe::unet_config();
    // "recipe" times the recipe's UNet as shipped; a width list probes other sizes, all levels with attention.
    if widths != "recipe" {
        let chans: Vec<usize> = widths.split(',').map(|x| x.trim().parse().expect("KNOBS_BENCH_RECIPE_WIDTHS: a number")).collect();
        cfg["block_out_channels"] = serde_json::json!(chans);
        cfg["down_block_types"] = serde_json::json!(vec!["CrossAttnDownBlock2D"; chans.len()]);
        cfg["up_block_types"] = serde_json::json!(vec!["CrossAttnUpBlock2D"; chans.len()]);
    }
    let channels = cfg["in_channels"].as_u64().expect("in_channels") as usize;
    let unet = UNet2DConditionModel::new(serde_json::from_value::<UNetConfig>(cfg).expect("recipe config"), &mut Init::new(0), dev).expect("unet");
    Subject { unet, label: format!("recipe [{widths}]"), channels, tokens: recipe::MAX_TOKENS }
}

#[global_allocator]
static ALLOCATOR: knobs_nn::allocator::LargeBlocks = knobs_nn::allocator::LargeBlocks;

fn main() {
    knobs_nn::allocator::keep_freed_memory();
    // As `knobs` runs its commands: on a pool thread (see knobs_nn::on_worker).
    knobs_nn::on_worker(run);
}

fn run() {
    let model = std::env::var("KNOBS_BENCH_MODEL").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd").into());
    let recipe_widths = std::env::var("KNOBS_BENCH_RECIPE_WIDTHS").ok();
    let (steps, warmup, batch): (usize, usize, usize) = (env("KNOBS_BENCH_STEPS", 20), env("KNOBS_BENCH_WARMUP", 3), env("KNOBS_BENCH_BATCH", 8));
    let modes = std::env::var("KNOBS_BENCH_MODES").unwrap_or_else(|_| "full,lora,ia3".into());
    let dev = cpu_autodiff();
    let ddpm = match &recipe_widths {
        Some(_) => DdpmScheduler::new(SchedulerConfig::from_json_str(&recipe::scheduler_config().to_string()).expect("recipe scheduler")),
        None => DdpmScheduler::new(SchedulerConfig::from_dir(format!("{model}/scheduler")).expect("scheduler config")),
    };
    let subjects = || -> Vec<Subject> {
        match &recipe_widths {
            Some(list) => list.split(';').map(|w| recipe_unet(w, &dev)).collect(),
            None => vec![Subject { unet: UNet2DConditionModel::from_dir(format!("{model}/unet"), &dev).expect("unet"), label: "tiny-sd".into(), channels: 4, tokens: 77 }],
        }
    };
    for mode in modes.split(',') {
        for Subject { mut unet, label, channels, tokens } in subjects() {
            let size = unet.config.sample_size.unwrap_or(32);
            let ctx_dim = match &unet.config.cross_attention_dim {
                PerBlock::One(d) => *d,
                PerBlock::Many(v) => v[0],
            };
            let config: Option<Box<dyn AdapterConfig>> = match mode {
                "full" => None,
                "lora" => Some(Box::new(LoraConfig::new(4, 4.0, names(&["to_q", "to_k", "to_v", "to_out.0"])))),
                "ia3" => Some(Box::new(Ia3Config::new(names(&["to_k", "to_v", "ff.net.2"]), names(&["ff.net.2"])))),
                other => panic!("KNOBS_BENCH_MODES: unknown mode `{other}`"),
            };
            match config {
                None => unet.train_only(|_| true),
                Some(c) => {
                    AdaptedModel::new(&mut unet, 0).add_adapter("default", c).expect("attach");
                }
            }
            let trainable = unet.num_trainable_params();
            let mut opt = AdamW::new(AdamWConfig { lr: 1e-4, ..Default::default() });
            let mut rng = step_rng(0, "bench", 0);
            let latents = normal(&mut rng, [batch, channels, size, size], &dev);
            let context = normal(&mut rng, [batch, tokens, ctx_dim], &dev);
            let mut times = Vec::new();
            for i in 0..warmup + steps {
                let start = Instant::now();
                let noise = normal(&mut rng, latents.dims(), &dev);
                let t: Vec<i64> = (0..batch).map(|_| rng.random_range(0..1000)).collect();
                let noisy = ddpm.add_noise(latents.clone(), noise.clone(), &t).unwrap();
                let tf = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), &dev);
                let loss = (unet.forward(noisy, tf, context.clone()) - noise).powi_scalar(2).mean();
                let grads = collect_grads(&unet, &loss.backward());
                opt.step(&mut unet, &grads, |_| 1e-4);
                if i >= warmup {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            println!(
                "{label} {mode:>5}: median {:.0} ms  mean {mean:.0} ms  min {:.0} ms  ({trainable} trainable params, batch {batch}, {size}x{size} latents)",
                times[times.len() / 2],
                times[0]
            );
        }
    }
}
