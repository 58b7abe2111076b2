//! Each layer type's backward agrees with finite differences, and every parameter of a model
//! built from them receives a gradient.
use knobs_nn::burn::tensor::activation::silu;
use knobs_nn::burn::tensor::{Int, TensorData};
use knobs_nn::{Conv2d, Embedding, GroupNorm, Init, LayerNorm, Linear, ModuleExt, Tensor, cpu_autodiff, gradcheck, impl_module};

struct Net {
    embed: Embedding,
    conv: Conv2d,
    down: Conv2d,
    norm: GroupNorm,
    proj: Linear,
    ln: LayerNorm,
}
impl_module!(Net { "embed" => embed, "conv" => conv, "down" => down, "norm" => norm, "proj" => proj, "ln" => ln });

impl Net {
    fn new(device: &knobs_nn::Device) -> Self {
        let mut init = Init::new(3);
        let mut norm = GroupNorm::new(2, 4, 1e-5, device);
        let mut ln = LayerNorm::new(4, 1e-5, device);
        // Non-trivial affine parameters so that their gradients are checked too.
        norm.weight = init.normal([4], 1.0, device);
        norm.bias = init.normal([4], 1.0, device);
        ln.weight = init.normal([4], 1.0, device);
        ln.bias = init.normal([4], 1.0, device);
        Net {
            embed: Embedding::new(5, 4, &mut init, device),
            conv: Conv2d::new(2, 4, 3, 1, 1, true, &mut init, device),
            down: Conv2d::new(4, 4, 3, 2, 1, true, &mut init, device),
            norm,
            proj: Linear::new(4, 4, true, &mut init, device),
            ln,
        }
    }

    fn loss(&self, ids: &Tensor<2, Int>, img: &Tensor<4>) -> Tensor<1> {
        let h = self.norm.forward(self.down.forward(silu(self.conv.forward(img.clone()))));
        let pooled: Tensor<2> = h.mean_dim(3).mean_dim(2).squeeze_dim::<3>(3).squeeze_dim(2);
        let tokens: Tensor<2> = self.embed.forward(ids.clone()).mean_dim(1).squeeze_dim(1);
        let y = self.ln.forward(self.proj.forward(pooled + tokens));
        (y.clone() * y.sin()).sum()
    }
}

fn inputs(device: &knobs_nn::Device) -> (Tensor<2, Int>, Tensor<4>) {
    let ids = Tensor::from_data(TensorData::new(vec![0i64, 3, 1, 4, 2, 2], [2, 3]), device);
    (ids, Init::new(9).normal([2, 2, 6, 6], 1.0, device))
}

#[test]
fn every_layer_type_matches_finite_differences() {
    let device = cpu_autodiff();
    let mut net = Net::new(&device);
    net.train_only(|_| true);
    let (ids, img) = inputs(&device);
    let samples = gradcheck::check(&mut net, |n| n.loss(&ids, &img), 1e-2, 5);
    for path in net.param_paths() {
        assert!(samples.iter().any(|s| s.path == path), "`{path}` not checked");
    }
    for s in &samples {
        assert!(s.rel_error() < 2e-2, "{}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
    }
}

#[test]
fn trainable_get_gradients_and_frozen_get_none() {
    let device = cpu_autodiff();
    let mut net = Net::new(&device);
    net.train_only(|p| p.starts_with("conv.") || p.starts_with("ln."));
    let (ids, img) = inputs(&device);
    let grads = net.loss(&ids, &img).backward();
    net.for_each_param(|path, p| {
        let g = p.grad(&grads);
        if p.is_trainable() {
            let norm: f32 = g.expect(path).abs().sum().into_scalar();
            assert!(norm > 0.0, "{path}");
        } else {
            assert!(g.is_none(), "frozen {path} got a gradient");
        }
    });
    assert_eq!(net.num_trainable_params(), 2 * 4 * 9 + 4 + 8);
}

/// Mixed precision on the CPU: a Linear or Conv2d fed half-precision activations computes in
/// f32 on the widened input and rounds the result once, so it equals the f32 layer on the
/// widened input, rounded: the output, the input's gradient and a trained weight's gradient.
/// f16 (and bf16 on a CPU without AVX512-BF16) uses the weight as stored, bit for bit with the
/// f32 layer; bf16 products round the weight as autocast does, so there the f32 layer holds
/// the weight rounded to bf16, and the sums' order may move a rounded value by one bf16 step.
#[test]
fn half_precision_linear_and_conv_compute_in_f32_on_the_cpu() {
    use knobs_nn::burn::tensor::{DType, Distribution};
    use knobs_nn::ops::Products;
    let device = cpu_autodiff();
    let layers = |round: bool| {
        let mut init = Init::new(5);
        let mut linear = Linear::new(24, 40, true, &mut init, &device);
        let mut conv = Conv2d::new(6, 8, 3, 1, 1, true, &mut init, &device);
        if round {
            linear.weight = linear.weight.clone().cast(DType::BF16).cast(DType::F32);
            conv.weight = conv.weight.clone().cast(DType::BF16).cast(DType::F32);
        }
        (linear, conv)
    };
    for trained in [false, true] {
        for dtype in [DType::BF16, DType::F16] {
            let rounds = Products::for_dtype(dtype) == Products::Bf16;
            let x = Tensor::<2>::random([33, 24], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let img = Tensor::<4>::random([2, 6, 9, 9], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let values = |t: Tensor<1>| t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
            let run = |widen: bool| {
                let (mut linear, mut conv) = layers(widen && rounds);
                linear.train_only(|_| trained);
                conv.train_only(|_| trained);
                let x = if widen { x.clone().cast(DType::F32) } else { x.clone() }.require_grad();
                let img = if widen { img.clone().cast(DType::F32) } else { img.clone() }.require_grad();
                let y = linear.forward(x.clone()).cast(dtype);
                let z = conv.forward(img.clone()).cast(dtype);
                assert_eq!((y.dtype(), z.dtype()), (dtype, dtype));
                let loss = (y.clone().cast(DType::F32) * 0.3).sum() + (z.clone().cast(DType::F32).powi_scalar(2) * 0.1).sum();
                let g = loss.backward();
                let mut got = vec![values(y.flatten(0, 1)), values(z.flatten(0, 3))];
                got.push(values(x.grad(&g).unwrap().cast(dtype).flatten(0, 1)));
                got.push(values(img.grad(&g).unwrap().cast(dtype).flatten(0, 3)));
                if trained {
                    got.push(values(linear.weight.grad(&g).expect("a trained weight's gradient").flatten(0, 1)));
                    got.push(values(conv.weight.grad(&g).expect("a trained weight's gradient").flatten(0, 3)));
                } else {
                    assert!(linear.weight.grad(&g).is_none() && conv.weight.grad(&g).is_none(), "a frozen weight got a gradient");
                }
                got
            };
            let (got, want) = (run(false), run(true));
            if !rounds {
                assert_eq!(got, want, "{dtype:?}, weights trained: {trained}");
                continue;
            }
            for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                // The outputs rounded to bf16 agree nearly everywhere (the unrounded weight's
                // results would not).
                let same = got.iter().zip(want).filter(|(a, b)| a == b).count();
                assert!(i >= 4 || same * 10 >= got.len() * 9, "{dtype:?}, weights trained: {trained}, output {i}: {same} of {} equal", got.len());
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() <= (b.abs() / 128.0).max(1e-6 * scale), "{dtype:?}, weights trained: {trained}, output {i}: {a} vs {b}");
                }
            }
        }
    }
}
