//! Under mixed precision a layer computes in f32 on its half-precision input. What it keeps
//! for the backward pass must be that input as it came, not a widened f32 copy (each layer
//! held one from the forward pass to the backward, and an SDXL LoRA step in bf16 at 1024 px
//! did not fit in 24 GiB), and under balanced checkpointing even that is recomputed like
//! burn's element-wise ops. Alone in its binary, as it counts every allocation.
mod common;

use common::counting::live;
use knobs_nn::burn::tensor::{DType, Tensor};
use knobs_nn::param::value_as;
use knobs_nn::{Device, Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};

const VALUES: usize = 1 << 20;
const LAYERS: usize = 8;

/// Eight SiLUs on a bf16 activation (each computed in f32, rounded once), as a mixed-precision model
/// chains its layers. The bytes the forward pass leaves held for the backward (beyond its
/// input and output), and the input's gradient.
fn chain(dev: &Device, x0: &Tensor<2>) -> (usize, Vec<f32>) {
    let x = Tensor::<2>::from_data(x0.to_data(), dev).require_grad();
    let before = live();
    let mut h = value_as(&x, DType::BF16);
    for _ in 0..LAYERS {
        h = knobs_nn::ops::silu(h);
    }
    let held = live() - before - VALUES * 2;
    let g = x.grad(&value_as(&h, DType::F32).sum().backward()).unwrap();
    (held, g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap())
}

#[test]
fn mixed_precision_casts_are_recomputed_under_checkpointing() {
    let x0 = Init::new(4).normal::<2>([VALUES / 1024, 1024], 1.0, &cpu());
    let (plain_held, plain) = chain(&cpu_autodiff(), &x0);
    let (held, checkpointed) = chain(&cpu_autodiff_checkpointed(), &x0);
    assert_eq!(checkpointed, plain, "the same gradient");
    // Without checkpointing each SiLU keeps its input as it came, in bf16 (2 bytes a value),
    // and no widened f32 copy (4 bytes a value more).
    assert!((LAYERS * VALUES * 2..LAYERS * VALUES * 4).contains(&plain_held), "{plain_held}");
    // Recomputed: the chain's first bf16 input and the graph's bookkeeping. Kept casts held
    // at least each layer's widened f32 input again.
    assert!(held < VALUES * 4, "checkpointing held {} MiB for {LAYERS} layers of {} MiB", held >> 20, (VALUES * 4) >> 20);
}
