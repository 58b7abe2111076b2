//! The heavy single ops of a UNet step at SD-1.5 sizes, each timed alone: 3x3 convolution
//! forward and its input and weight gradients, a linear layer's matmul and the layer itself
//! (its weight f32 or frozen in f16, forward alone and with the input gradient),
//! self-attention, GEGLU, GroupNorm + SiLU (and in one pass, for generation), LayerNorm. Run:
//! `cargo bench -p knobs-nn --bench ops`; `../shared/reference`-style peer:
//! `scripts/ops_peer.py` (same shapes in PyTorch). KNOBS_BENCH_ITERS (5).
use knobs_nn::timing::median_ms;

use burn::tensor::ops::ConvOptions;
use knobs_nn::ops::{conv2d, conv2d_frozen, conv2d_frozen_copy};
use knobs_nn::{Init, Tensor, cpu, cpu_autodiff};

#[global_allocator]
static ALLOCATOR: knobs_nn::allocator::LargeBlocks = knobs_nn::allocator::LargeBlocks;

fn main() {
    knobs_nn::allocator::keep_freed_memory();
    knobs_nn::on_worker(run);
}

/// Shapes of `N` numbers from `var` ("a,b,...;a,b,..."), or `default` when it is unset.
fn shapes_from_env<const N: usize>(var: &str, default: Vec<[usize; N]>) -> Vec<[usize; N]> {
    let Ok(s) = std::env::var(var) else { return default };
    let shape = |t: &str| -> [usize; N] {
        let numbers: Vec<usize> = t.split(',').map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{var}: `{v}` is not a number"))).collect();
        numbers.try_into().unwrap_or_else(|_| panic!("{var}: `{t}` is not {N} numbers"))
    };
    s.split(';').map(shape).collect()
}

fn run() {
    let iters = std::env::var("KNOBS_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut init = Init::new(0);
    println!("threads {}", knobs_nn::threads());
    // (batch, channels in, channels out, size): SD-1.5's 64x64 and 32x32 levels at 512 px, CFG
    // batch 2; KNOBS_BENCH_CONV ("b,ci,co,hw;...") for others, e.g. the built-in model's
    // "4,32,32,16;4,64,64,8;4,96,96,4".
    let shapes = shapes_from_env("KNOBS_BENCH_CONV", vec![[2, 320, 320, 64], [2, 640, 640, 32], [1, 320, 320, 64]]);
    for [b, ci, co, hw] in shapes {
        let dev = cpu();
        let x: Tensor<4> = init.normal([b, ci, hw, hw], 1.0, &dev);
        let w: Tensor<4> = init.normal([co, ci, 3, 3], 0.05, &dev);
        let opts = || ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let fwd = median_ms(|| drop(conv2d(x.clone(), w.clone(), None, opts()).into_data()), iters);
        // A frozen layer's weight keeps its transform between calls (generation, adapters).
        let fwd_frozen = median_ms(|| drop(conv2d_frozen(x.clone(), w.clone(), None, opts(), knobs_nn::ops::Products::F32).into_data()), iters);
        let dev = cpu_autodiff();
        let xa: Tensor<4> = Tensor::from_data(x.to_data(), &dev).require_grad();
        let wa: Tensor<4> = Tensor::from_data(w.to_data(), &dev).require_grad();
        let both = median_ms(|| drop(conv2d(xa.clone(), wa.clone(), None, opts()).sum().backward()), iters);
        let wfrozen: Tensor<4> = Tensor::from_data(w.to_data(), &dev);
        let input_only = median_ms(|| drop(conv2d_frozen(xa.clone(), wfrozen.clone(), None, opts(), knobs_nn::ops::Products::F32).sum().backward()), iters);
        println!("conv3x3 [{b},{ci},{hw},{hw}]->{co}: forward {fwd:.3} ms (frozen weight {fwd_frozen:.3}), frozen fwd+bwd(x) {input_only:.3} ms, fwd+bwd(x,w) {both:.3} ms");
        // The frozen forward with bf16 products (mixed precision's, on CPUs with AVX512-BF16).
        if knobs_nn::ops::Products::bf16_available() {
            let bf16 = median_ms(|| drop(conv2d_frozen(x.clone(), w.clone(), None, opts(), knobs_nn::ops::Products::Bf16).into_data()), iters);
            println!("conv3x3 [{b},{ci},{hw},{hw}]->{co}: frozen forward, bf16 products {bf16:.3} ms");
            // Generation's: the kernel stored in bf16, its packing kept, against it laid out by
            // tap (nothing kept) where that applies.
            let stored = w.clone().cast(burn::tensor::DType::BF16);
            let frozen = |w: &Tensor<4>| median_ms(|| drop(conv2d_frozen_copy(x.clone(), w.clone(), None, opts(), knobs_nn::ops::Products::Bf16).into_data()), iters);
            let kept = frozen(&stored);
            let by_tap = knobs_nn::ops::kernel_layout::by_tap(&stored).map_or("not laid out".into(), |laid| format!("{:.3} ms", frozen(&laid)));
            println!("conv3x3 [{b},{ci},{hw},{hw}]->{co}: bf16 kernel, packing kept {kept:.3} ms, laid out by tap {by_tap}");
        }
    }
    // KNOBS_BENCH_MATMUL ("rows,k,n;...") for others, e.g. SDXL's 32x32 level at 1024 px
    // "1024,1280,10240;1024,5120,1280".
    for [rows, k, n] in shapes_from_env("KNOBS_BENCH_MATMUL", vec![[8192, 320, 320], [8192, 320, 2560], [8192, 1280, 320]]) {
        let dev = cpu();
        let a: Tensor<2> = init.normal([rows, k], 1.0, &dev);
        let bm: Tensor<2> = init.normal([k, n], 0.05, &dev);
        // The backend is eager: the product is done when it returns (a copy out through
        // `into_data` would add 10 ms at 8192 x 2560, which PyTorch's twin does not pay).
        let ms = median_ms(|| drop(a.clone().matmul(bm.clone())), iters);
        let gflops = 2.0 * (rows * k * n) as f64 / ms / 1e6;
        println!("matmul [{rows},{k}]x[{k},{n}]: {ms:.1} ms ({gflops:.0} GFLOP/s)");
        // A linear layer with a bias as the layers run it (`ops::linear`: the bias rows, the
        // product accumulated into them), against burn's `module::linear` on the same values.
        let w: Tensor<2> = init.normal([n, k], 0.05, &dev);
        let bias: Tensor<1> = init.normal([n], 0.05, &dev);
        let ours = median_ms(|| drop(knobs_nn::ops::linear(&a, &w, Some(&bias))), iters);
        let burns = median_ms(|| drop(burn::tensor::module::linear(a.clone(), w.clone().transpose(), Some(bias.clone()))), iters);
        println!("linear [{rows},{k}] -> {n} with bias: ops::linear {ours:.1} ms, burn's module::linear {burns:.1} ms");
        // The same with bf16 products (mixed precision's, on CPUs with AVX512-BF16).
        if knobs_nn::ops::Products::bf16_available() {
            let bf16 = median_ms(|| drop(knobs_nn::ops::linear_as(&a, &w, Some(&bias), knobs_nn::ops::Products::Bf16)), iters);
            println!("linear [{rows},{k}] -> {n} with bias, bf16 products: {bf16:.1} ms ({:.0} GFLOP/s)", 2.0 * (rows * k * n) as f64 / bf16 / 1e6);
        }
        // The same layer frozen with its weight kept in f16 (`--weights-dtype f16`), forward
        // alone and forward + input gradient, against the f32 weight.
        let w16 = w.clone().cast(burn::tensor::DType::F16);
        let fwd16 = median_ms(|| drop(knobs_nn::ops::linear(&a, &w16, Some(&bias))), iters);
        let dev = cpu_autodiff();
        let xa: Tensor<2> = Tensor::from_data(a.to_data(), &dev).require_grad();
        let (wa, wa16) = (Tensor::<2>::from_data(w.to_data(), &dev), Tensor::<2>::from_data(w16.to_data(), &dev));
        let ba: Tensor<1> = Tensor::from_data(bias.to_data(), &dev);
        let frozen = |w: &Tensor<2>| median_ms(|| drop(knobs_nn::ops::linear(&xa, w, Some(&ba)).expect("the op applies").sum().backward()), iters);
        let (both32, both16) = (frozen(&wa), frozen(&wa16));
        println!("  frozen: forward f16 weight {fwd16:.1} ms; fwd+bwd(x) f32 weight {both32:.1} ms, f16 weight {both16:.1} ms");
        // Under bf16 products (mixed precision's), the frozen weight in f32 and in bf16
        // (`--weights-dtype bf16`: packed from its own values in both passes where it can be).
        if knobs_nn::ops::Products::bf16_available() {
            let wa_bf16 = Tensor::<2>::from_data(w.clone().cast(burn::tensor::DType::BF16).to_data(), &dev);
            let frozen_bf16 = |w: &Tensor<2>| median_ms(|| drop(knobs_nn::ops::linear_as(&xa, w, Some(&ba), knobs_nn::ops::Products::Bf16).expect("the op applies").sum().backward()), iters);
            let (f32_weight, bf16_weight) = (frozen_bf16(&wa), frozen_bf16(&wa_bf16));
            println!("  frozen, bf16 products: fwd+bwd(x) f32 weight {f32_weight:.1} ms, bf16 weight {bf16_weight:.1} ms");
        }
    }
    // Self-attention at SD-1.5's 64x64 level (8 heads of 40) and in its VAE (one head of 512),
    // forward without autodiff and forward + backward with it; KNOBS_BENCH_ATTN
    // ("tokens,width,heads;...") for others, e.g. SDXL's 64x64 level at 1024 px: 4096,640,10.
    for [n, width, heads] in shapes_from_env("KNOBS_BENCH_ATTN", vec![[4096, 320, 8], [4096, 512, 1]]) {
        let dev = cpu();
        let [q, k, v]: [Tensor<3>; 3] = std::array::from_fn(|_| init.normal([1, n, width], 1.0, &dev));
        let scale = 1.0 / ((width / heads) as f64).sqrt();
        let fwd = median_ms(|| drop(knobs_nn::ops::attention(q.clone(), k.clone(), v.clone(), heads, scale)), iters);
        let dev = cpu_autodiff();
        let [qa, ka, va] = [&q, &k, &v].map(|t| Tensor::<3>::from_data(t.to_data(), &dev).require_grad());
        let both = median_ms(|| drop(knobs_nn::ops::attention(qa.clone(), ka.clone(), va.clone(), heads, scale).sum().backward()), iters);
        println!("attention [1,{n},{width}] {heads} heads: forward {fwd:.1} ms, fwd+bwd {both:.1} ms");
        // bf16 tensors (mixed precision's), on CPUs with bf16 products: the casts to f32 and
        // back included, as a model runs them.
        if knobs_nn::ops::Products::bf16_available() {
            let bf16 = |t: &Tensor<3>| t.clone().cast(burn::tensor::DType::BF16);
            let fwd = median_ms(|| drop(knobs_nn::ops::attention(bf16(&q), bf16(&k), bf16(&v), heads, scale)), iters);
            let [qa, ka, va] = [&q, &k, &v].map(|t| bf16(&Tensor::<3>::from_data(t.to_data(), &dev)).require_grad());
            let both = median_ms(|| drop(knobs_nn::ops::attention(qa.clone(), ka.clone(), va.clone(), heads, scale).sum().backward()), iters);
            println!("attention [1,{n},{width}] {heads} heads, bf16 products: forward {fwd:.1} ms, fwd+bwd {both:.1} ms");
        }
    }
    // GEGLU on SD-1.5's 64x64 feed-forward projection ([rows, 2 x 1280]), forward and input
    // gradient.
    {
        let dev = cpu_autodiff();
        let y = init.normal::<2>([4096, 2560], 1.0, &dev).require_grad();
        let ms = median_ms(|| drop(knobs_nn::ops::geglu(y.clone()).sum().backward()), iters);
        println!("geglu [4096,2560] fwd+bwd(x): {ms:.1} ms");
    }
    // GroupNorm then SiLU, as every resnet block opens, forward and backward (input gradient).
    for (b, c, hw) in [(2, 320, 64), (8, 32, 32)] {
        let dev = cpu_autodiff();
        let x: Tensor<4> = init.normal::<4>([b, c, hw, hw], 1.0, &dev).require_grad();
        let norm = knobs_nn::GroupNorm::new(32, c, 1e-5, &dev);
        let ms = median_ms(|| drop(knobs_nn::ops::silu(norm.forward(x.clone())).sum().backward()), iters);
        println!("groupnorm+silu [{b},{c},{hw},{hw}] fwd+bwd(x): {ms:.1} ms");
    }
    // The same where nothing is differentiated (generation): as the two ops and in one pass
    // (`forward_silu`), at the UNet's 64x64 level with guidance and the VAE decoder's last.
    for (b, c, hw) in [(2, 320, 64), (1, 128, 512)] {
        let dev = cpu();
        let x: Tensor<4> = init.normal::<4>([b, c, hw, hw], 1.0, &dev);
        let norm = knobs_nn::GroupNorm::new(32, c, 1e-6, &dev);
        let two = median_ms(|| drop(knobs_nn::ops::silu(norm.forward(x.clone()))), iters);
        let one = median_ms(|| drop(norm.forward_silu(x.clone())), iters);
        println!("groupnorm+silu [{b},{c},{hw},{hw}] forward: {two:.1} ms as two ops, {one:.1} ms in one pass");
    }
    // LayerNorm, three in every transformer block, at SD-1.5's 64x64 and 32x32 levels (batch
    // 1, as a training step), forward and backward (input gradient, the weights frozen).
    for (rows, c) in [(4096, 320), (1024, 640)] {
        let dev = cpu_autodiff();
        let x: Tensor<3> = init.normal::<3>([1, rows, c], 1.0, &dev).require_grad();
        let norm = knobs_nn::LayerNorm::new(c, 1e-5, &dev);
        let ms = median_ms(|| drop(norm.forward(x.clone()).sum().backward()), iters);
        let burns = median_ms(|| drop(burn::tensor::module::layer_norm(x.clone(), norm.weight.clone(), Some(norm.bias.clone()), 1e-5).sum().backward()), iters);
        println!("layernorm [1,{rows},{c}] fwd+bwd(x): {ms:.1} ms, burn's ops {burns:.1} ms");
    }
}
