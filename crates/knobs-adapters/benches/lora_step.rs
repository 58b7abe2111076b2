//! Forward + backward through a Linear stack and a Conv2d stack, fully trainable versus
//! LoRA with the base frozen. Run: `cargo bench -p knobs-adapters --bench lora_step`.
//! LoRA must be cheaper: frozen weights need no weight gradient.
use knobs_nn::timing::median_ms;

use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, Pattern};
use knobs_nn::ops::silu;
use knobs_nn::{Conv2d, Init, Linear, ModuleExt, Tensor, cpu_autodiff, impl_module};

struct Mlp {
    layers: Vec<Linear>,
}
impl_module!(Mlp { "layers" => layers });

struct ConvStack {
    layers: Vec<Conv2d>,
}
impl_module!(ConvStack { "layers" => layers });

/// `KNOBS_BENCH_LINEAR=WIDTHxDEPTHxROWS` (default 320x4x2048).
fn linear_shape() -> (usize, usize, usize) {
    let parsed = std::env::var("KNOBS_BENCH_LINEAR").ok().and_then(|s| {
        let v: Vec<usize> = s.split('x').filter_map(|p| p.parse().ok()).collect();
        (v.len() == 3).then(|| (v[0], v[1], v[2]))
    });
    parsed.unwrap_or((320, 4, 2048))
}

fn report(name: &str, full: f64, lora: f64) {
    println!("{name:<34} full {full:>8.2} ms   lora {lora:>8.2} ms   lora/full {:.2}", lora / full);
}

fn main() {
    knobs_nn::allocator::keep_freed_memory();
    let device = cpu_autodiff();
    let iters = std::env::var("KNOBS_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let mut init = Init::new(0);

    let (width, depth, rows) = linear_shape();
    let x = init.normal([rows, width], 1.0, &device);
    let mlp = || Mlp { layers: (0..depth).map(|_| Linear::new(width, width, true, &mut Init::new(1), &device)).collect() };
    let step = |m: &Mlp| {
        let mut h = x.clone();
        for l in &m.layers {
            h = silu(l.forward(h));
        }
        let _ = h.powi_scalar(2).mean().backward();
    };
    let mut full = mlp();
    full.train_only(|_| true);
    let full_ms = median_ms(|| step(&full), iters);
    let mut frozen = mlp();
    frozen.train_only(|p| p == "layers.0.bias");
    let frozen_ms = median_ms(|| step(&frozen), iters);
    println!("linear: base frozen, only layers.0.bias trainable (input grads only): {frozen_ms:.2} ms");
    let mut lora = AdaptedModel::new(mlp(), 2);
    lora.add_adapter("a", Box::new(LoraConfig::new(8, 8.0, Pattern::Regex(r"layers\.\d+".into())))).unwrap();
    let lora_ms = median_ms(|| step(&lora.model), iters);
    report(&format!("linear {depth}x[{width}x{width}], {rows} rows"), full_ms, lora_ms);

    let (ch, depth, batch, size) = (64, 4, 8, 32);
    let img: Tensor<4> = init.normal([batch, ch, size, size], 1.0, &device);
    let convs = || ConvStack { layers: (0..depth).map(|_| Conv2d::new(ch, ch, 3, 1, 1, true, &mut Init::new(3), &device)).collect() };
    let step = |m: &ConvStack| {
        let mut h = img.clone();
        for l in &m.layers {
            h = silu(l.forward(h));
        }
        let _ = h.powi_scalar(2).mean().backward();
    };
    let mut full = convs();
    full.train_only(|_| true);
    let full_ms = median_ms(|| step(&full), iters);
    let mut lora = AdaptedModel::new(convs(), 4);
    lora.add_adapter("a", Box::new(LoraConfig::new(8, 8.0, Pattern::Regex(r"layers\.\d+".into())))).unwrap();
    let lora_ms = median_ms(|| step(&lora.model), iters);
    report(&format!("conv3x3 {depth}x[{ch}ch], {batch}x{size}x{size}"), full_ms, lora_ms);
}
