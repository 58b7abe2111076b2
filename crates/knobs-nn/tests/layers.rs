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
