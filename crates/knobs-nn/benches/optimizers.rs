//! One optimizer step over a UNet's mix of parameters (3x3 kernels, square and wide matrices,
//! vectors; about 83M values, a tenth of SD-1.5's UNet), per optimizer: what a full
//! fine-tune (DreamBooth) pays each step besides the forward and backward passes. Run:
//! `cargo bench -p knobs-nn --bench optimizers`; KNOBS_BENCH_ITERS (3), KNOBS_BENCH_OPTIMIZERS
//! (a comma-separated subset of adamw, adamw8bit, adafactor).
use knobs_nn::optim::{AdamW, AdamW8bit, AdamWConfig, Adafactor, AdafactorConfig, Grads, Optimizer};
use knobs_nn::timing::median_ms;
use knobs_nn::{Conv2d, Init, Linear, ModuleExt, cpu, impl_module};

struct Net {
    convs: Vec<Conv2d>,
    linears: Vec<Linear>,
}
impl_module!(Net { "convs" => convs, "linears" => linears });

fn main() {
    knobs_nn::allocator::keep_freed_memory();
    knobs_nn::on_worker(run);
}

fn run() {
    let iters = std::env::var("KNOBS_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("threads {}", knobs_nn::threads());
    let (mut init, dev) = (Init::new(0), cpu());
    let convs = [(320, 4), (640, 4), (1280, 2)].iter().flat_map(|&(c, n)| (0..n).map(move |_| c)).map(|c| Conv2d::new(c, c, 3, 1, 1, true, &mut init, &dev)).collect();
    let linears = [(320, 320, 4), (640, 640, 4), (1280, 1280, 4), (1280, 5120, 2), (5120, 1280, 2)]
        .iter()
        .flat_map(|&(i, o, n)| (0..n).map(move |_| (i, o)))
        .map(|(i, o)| Linear::new(i, o, true, &mut init, &dev))
        .collect();
    let mut net = Net { convs, linears };
    let mut grads = Grads::new();
    net.for_each_param(|path, p| {
        grads.insert(path.to_string(), init.normal([p.numel()], 1e-3, &dev));
    });
    let values: usize = grads.values().map(|g| g.dims()[0]).sum();
    let optimizers: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("adamw", Box::new(AdamW::new(AdamWConfig::default()))),
        ("adamw8bit", Box::new(AdamW8bit::new(AdamWConfig::default()))),
        ("adafactor", Box::new(Adafactor::new(AdafactorConfig::with_lr(0.0)).expect("valid config"))),
    ];
    let only = std::env::var("KNOBS_BENCH_OPTIMIZERS").unwrap_or_default();
    for (name, mut opt) in optimizers.into_iter().filter(|(name, _)| only.is_empty() || only.split(',').any(|o| o == *name)) {
        let ms = median_ms(|| opt.step(&mut net, &grads, &|_| 1e-5), iters);
        println!("{name:<10} step over {values} values: {ms:.0} ms ({:.2} ns per value)", ms * 1e6 / values as f64);
    }
}
