//! A low-rank product `scale (x A^T) B^T` (a LoRA branch) as one operation with its own
//! backward pass on the CPU backend. From burn's ops it is five (two transposes, two products,
//! a scale), each recorded and stepped back through; a LoRA step has one per adapted layer,
//! and on small models the per-op cost is what the branch costs. Other backends and dtypes
//! take burn's ops.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

use burn::backend::autodiff::NodeId;

use super::record::{kept, lifted, record};

/// `scale (x A^T) B^T` for `x` `[rows, in]`, `a` `[r, in]`, `b` `[out, r]`.
pub fn low_rank(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    if [&x, &a, &b].iter().all(|t| t.dtype() == DType::F32)
        && let Some(y) = fused(&x, &a, &b, scale as f32)
    {
        return y;
    }
    decomposed(x, a, b, scale)
}

/// The same from burn's ops: other backends, and the tests' reference. The rank-r values are
/// scaled, not the full-width output.
pub fn decomposed(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    (x.matmul(a.transpose()) * scale).matmul(b.transpose())
}

type Plain = Tensor<2>;

/// `(scale x A^T, its product with B^T)` on plain CPU tensors.
fn forward(x: &Plain, a: &Plain, b: &Plain, scale: f32) -> (Plain, Plain) {
    let h = x.clone().matmul(a.clone().transpose()) * scale;
    let y = h.clone().matmul(b.clone().transpose());
    (h, y)
}

fn fused(x: &Tensor<2>, a: &Tensor<2>, b: &Tensor<2>, scale: f32) -> Option<Tensor<2>> {
    if ![x, a, b].iter().any(|t| t.is_autodiff()) {
        let plain = |t: &Tensor<2>| t.clone().try_into_primitive::<Flex>().ok().map(Tensor::<2>::from_primitive::<Flex>);
        let (_, y) = forward(&plain(x)?, &plain(a)?, &plain(b)?, scale);
        return Some(Tensor::from_primitive::<Flex>(y.try_into_primitive::<Flex>().ok()?));
    }
    // All on autodiff (a plain input, such as a cached text encoding, lifted untracked).
    let strategy = [x, a, b].iter().find_map(|t| t.gradient_checkpointing_strategy());
    let (x, a, b) = (lifted(x, strategy), lifted(a, strategy), lifted(b, strategy));
    // The input goes to the checkpointer: it is a norm's output in a transformer block, which
    // balanced checkpointing recomputes rather than holds.
    record!(LowRank, strategy, [x, a, b], keep [0], {
        let plain = |t| Tensor::<2>::from_primitive::<Flex>(t);
        let (x, a, b) = (plain(x), plain(a), plain(b));
        let (h, y) = forward(&x, &a, &b, scale);
        (y.try_into_primitive::<Flex>().ok()?, Saved { a, b, h, scale })
    })
}

#[derive(Debug)]
struct LowRank;

/// The factors, and the scaled rank-r values `h = scale x A^T` (the up projection's input);
/// the input `x` is with the checkpointer.
#[derive(Clone, Debug)]
struct Saved {
    a: Plain,
    b: Plain,
    h: Plain,
    scale: f32,
}

impl Backward<Flex, 3> for LowRank {
    type State = (Saved, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let (Saved { a, b, h, scale }, kept_x) = ops.state;
        let g = Tensor::<2>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node));
        let [px, pa, pb] = ops.parents;
        let flex = |t: Plain| t.try_into_primitive::<Flex>().expect("a flex tensor");
        // y = h B^T: dB = g^T h; dh = g B, and through the scale, d(x A^T) = scale dh.
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, flex(g.clone().transpose().matmul(h)));
        }
        if px.is_some() || pa.is_some() {
            let dxa = g.matmul(b) * scale;
            if let Some(node) = pa {
                let x = Tensor::<2>::from_primitive::<Flex>(kept(checkpointer, kept_x[0]));
                grads.register::<Flex>(node.id, flex(dxa.clone().transpose().matmul(x)));
            }
            if let Some(node) = px {
                grads.register::<Flex>(node.id, flex(dxa.matmul(a)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{values, max_rel};
    use crate::{Init, cpu, cpu_autodiff};

    #[test]
    fn forward_and_gradients_match_burns_ops() {
        let mut init = Init::new(5);
        let (x, a, b) = (init.normal::<2>([7, 12], 1.0, &cpu()), init.normal::<2>([3, 12], 1.0, &cpu()), init.normal::<2>([9, 3], 1.0, &cpu()));
        // The kernel itself: the fallback would match burn's ops trivially.
        let kernel = |x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64| fused(&x, &a, &b, scale as f32).expect("the CPU kernel applies");
        let err = max_rel(values(kernel(x.clone(), a.clone(), b.clone(), 0.5)), values(decomposed(x.clone(), a.clone(), b.clone(), 0.5)));
        assert!(err < 1e-6, "forward {err}");
        let device = cpu_autodiff();
        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device).require_grad();
        let probe = init.normal::<2>([7, 9], 1.0, &device);
        let grads = |f: fn(Tensor<2>, Tensor<2>, Tensor<2>, f64) -> Tensor<2>| {
            let (x, a, b) = (on(&x), on(&a), on(&b));
            let g = (f(x.clone(), a.clone(), b.clone(), 0.5) * probe.clone()).sum().backward();
            [x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()].map(values)
        };
        for (name, (ours, burns)) in ["x", "A", "B"].iter().zip(grads(kernel).into_iter().zip(grads(decomposed))) {
            let err = max_rel(ours, burns);
            assert!(err < 1e-5, "d{name}: {err}");
        }
        // An untracked input (a cached text encoding) gets nothing; A and B still do.
        let (xu, a2, b2) = (Tensor::<2>::from_data(x.to_data(), &device), on(&a), on(&b));
        let g = low_rank(xu.clone(), a2.clone(), b2.clone(), 0.5).sum().backward();
        assert!(xu.grad(&g).is_none() && a2.grad(&g).is_some() && b2.grad(&g).is_some());
    }
}
