//! burn's balanced gradient checkpointing (`--gradient-checkpointing`) recomputes element-wise
//! results in the backward pass: every layer and the fused attention op must give the same
//! gradient bits with it as without (the fused op runs under either strategy).
use knobs_nn::burn::tensor::{Tensor, TensorData, activation};
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Linear, cpu_autodiff, cpu_autodiff_checkpointed};

fn data<const D: usize>(shape: [usize; D], k: f32, dev: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    Tensor::from_data(TensorData::new((0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>(), shape), dev)
}

fn run(dev: Device, which: u32) -> Vec<f32> {
    let x = data([2, 32, 8, 8], 0.37, &dev).require_grad();
    let y: Tensor<4> = match which {
        0 => Conv2d::new(32, 32, 3, 1, 1, true, &mut Init::new(1), &dev).forward(x.clone()),
        1 => GroupNorm::new(8, 32, 1e-5, &dev).forward(x.clone()),
        2 => activation::silu(GroupNorm::new(8, 32, 1e-5, &dev).forward(x.clone())),
        3 => Conv2d::new(32, 32, 3, 1, 1, true, &mut Init::new(1), &dev).forward(activation::silu(GroupNorm::new(8, 32, 1e-5, &dev).forward(x.clone()))),
        4 => { let s: Tensor<3> = x.clone().reshape([2, 32, 64]).swap_dims(1, 2); Linear::new(32, 32, true, &mut Init::new(2), &dev).forward(s).reshape([2, 32, 8, 8]) }
        5 => { let s: Tensor<3> = x.clone().reshape([2, 32, 64]).swap_dims(1, 2); knobs_nn::ops::attention::attention(s.clone(), s.clone(), s, 4, 0.5).reshape([2, 32, 8, 8]) }
        6 => { let s: Tensor<3> = x.clone().reshape([2, 32, 64]).swap_dims(1, 2); knobs_nn::ops::attention::decomposed(s.clone(), s.clone(), s, 4, 0.5).reshape([2, 32, 8, 8]) }
        8 => { let s: Tensor<3> = x.clone().reshape([2, 32, 64]).swap_dims(1, 2); let a = knobs_nn::ops::attention::attention(s.clone(), s.clone(), s, 4, 0.5); activation::silu(Linear::new(32, 32, true, &mut Init::new(2), &dev).forward(a * 2.0)).reshape([2, 32, 8, 8]) }
        9 => { let s: Tensor<3> = x.clone().reshape([2, 32, 64]).swap_dims(1, 2); let a = knobs_nn::ops::attention::decomposed(s.clone(), s.clone(), s, 4, 0.5); activation::silu(Linear::new(32, 32, true, &mut Init::new(2), &dev).forward(a * 2.0)).reshape([2, 32, 8, 8]) }
        _ => { let u = activation::silu(x.clone()); u.clone() + x.clone() * u }
    };
    let w = data([2, 32, 8, 8], 0.13, &dev);
    let loss = (y * w).sum();
    let g = x.grad(&loss.backward()).unwrap();
    g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[test]
fn every_layer_gives_the_same_gradient_with_checkpointing() {
    for which in 0..10 {
        let a = run(cpu_autodiff(), which);
        let b = run(cpu_autodiff_checkpointed(), which);
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let m = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        assert!(m > 0.0, "case {which}: the gradient is zero");
        assert_eq!(d, 0.0, "case {which}: gradients differ by {d} (largest {m})");
    }
}

/// A frozen Linear weight stored in f16 gives the output and input gradient of an f32 weight
/// holding the same values, bit for bit, under either strategy (its own backward widens again).
#[test]
fn a_half_precision_frozen_linear_matches_its_f32_widening() {
    use knobs_nn::ModuleExt;
    use knobs_nn::burn::tensor::DType;
    for dev in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
        let run = |half: bool| {
            let mut layer = Linear::new(24, 40, true, &mut Init::new(4), &dev);
            layer.store_frozen_as(DType::F16);
            if !half {
                layer.for_each_param_mut(|_, mut p| p.set_trainable(true));
                layer.for_each_param_mut(|_, mut p| p.set_trainable(false));
            }
            assert_eq!(layer.weight.dtype() == DType::F16, half);
            let x = data([3, 5, 24], 0.21, &dev).require_grad();
            let y = activation::silu(layer.forward(x.clone()));
            let g = x.grad(&(y.clone() * data([3, 5, 40], 0.07, &dev)).sum().backward()).unwrap();
            (y.into_data(), g.into_data())
        };
        assert_eq!(run(true), run(false));
    }
}
