//! `y = x W^T + b` as one op with its own backward on the CPU backend, the weight as stored
//! (`[out, in]`: f32, or f16 / bf16 when it does not train). Through burn's ops each output
//! was written three times (a zeroed buffer, its copy into an aligned one, the bias added as a
//! new tensor), and a half-precision weight's widened f32 copy was held from the forward pass
//! to the backward. Here the output starts as the bias rows and the product accumulates into
//! it; the op keeps the weight as stored, and the input only when the weight trains (through
//! burn's checkpointer, so balanced checkpointing may recompute it instead; under it a layer
//! twice as wide out as in has its output recomputed too). The forward
//! product reads a weight no wider out than in transposed beforehand ([`transposes_first`]).
//! Other backends, mixed precision and trainable half-precision weights take burn's ops.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, GradientCheckpointingStrategy, Tensor, TensorData};
use rayon::prelude::*;

use super::bf16_product::{Packed, product_packed};
use super::fresh::written;
use super::weight_transforms;
use super::words::pairs;
use super::matrix::{Products, View, min_len, parallelism, product_as};
use super::record::{kept, lifted, record};
use super::precision::widened;
use super::transposed::with_widened_transposed;

/// Below this many multiply-adds a product stays on one thread.
const PARALLEL_WORK: usize = 1 << 21;

/// `x` `[rows, in]` times the transpose of `w` `[out, in]`, plus `b` `[out]`; `None` when
/// this op does not apply (see the module's doc).
pub fn linear(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>) -> Option<Tensor<2>> {
    linear_as(x, w, b, Products::F32)
}

/// [`linear`] with its products (forward and backward) in `products`' arithmetic.
pub fn linear_as(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>, products: Products) -> Option<Tensor<2>> {
    if !applies(x, w, b, products) {
        return None;
    }
    if !on_autodiff(x, w, b) {
        let (x, w, b) = plain(x, w, b)?;
        return Some(Tensor::from_primitive::<Flex>(forward(&x, &w, b.as_ref(), None, products, true)));
    }
    // All on autodiff (a plain input, such as a cached text encoding, lifted untracked).
    let strategy = x.gradient_checkpointing_strategy().or(w.gradient_checkpointing_strategy());
    let (x, w) = (lifted(x, strategy), lifted(w, strategy));
    let kernel = |x: FlexTensor, w: FlexTensor, b: Option<FlexTensor>| (forward(&x, &w, b.as_ref(), None, products, false), Saved { w, products });
    if strategy == Some(GradientCheckpointingStrategy::Balanced) && w.dims()[0] >= 2 * w.dims()[1] {
        // A layer at least twice as wide out as in (the feed-forward's input projection, 8x
        // for GEGLU) has its output recomputed in the backward pass from the input, as the
        // activations are, instead of held from the forward pass: one more product for the
        // memory of eight inputs, the largest tensor a transformer block kept.
        if !w.is_tracked() && !b.is_some_and(|b| b.is_tracked()) {
            // burn recomputes an op only when every input takes part in autodiff, so a frozen
            // weight and bias are held by the op instead of being its inputs.
            let w = w.inner().try_into_primitive::<Flex>().ok()?;
            let b = match b {
                Some(b) => Some(b.clone().inner().try_into_primitive::<Flex>().ok()?),
                None => None,
            };
            let recompute = |ids: &[NodeId]| Recompute { x: ids[0], w: Input::Held(w.clone()), b: b.clone().map(Input::Held), products };
            return record!(LinearOp::<1>, strategy, [x], keep [], recompute recompute, kernel(x, w.clone(), b.clone()));
        }
        let recompute = |ids: &[NodeId]| Recompute { x: ids[0], w: Input::Node(ids[1]), b: ids.get(2).copied().map(Input::Node), products };
        return match (b.map(|b| lifted(b, strategy)), w.is_tracked()) {
            (Some(b), true) => record!(LinearOp::<3>, strategy, [x, w, b], keep [0], recompute recompute, kernel(x, w, Some(b))),
            (Some(b), false) => record!(LinearOp::<3>, strategy, [x, w, b], keep [], recompute recompute, kernel(x, w, Some(b))),
            (None, true) => record!(LinearOp::<2>, strategy, [x, w], keep [0], recompute recompute, kernel(x, w, None)),
            (None, false) => record!(LinearOp::<2>, strategy, [x, w], keep [], recompute recompute, kernel(x, w, None)),
        };
    }
    // Only the weight gradient reads the input: a frozen weight's op (a LoRA run's) keeps none.
    match (b.map(|b| lifted(b, strategy)), w.is_tracked()) {
        (Some(b), true) => record!(LinearOp::<3>, strategy, [x, w, b], keep [0], kernel(x, w, Some(b))),
        (Some(b), false) => record!(LinearOp::<3>, strategy, [x, w, b], keep [], kernel(x, w, Some(b))),
        (None, true) => record!(LinearOp::<2>, strategy, [x, w], keep [0], kernel(x, w, None)),
        (None, false) => record!(LinearOp::<2>, strategy, [x, w], keep [], kernel(x, w, None)),
    }
}

/// [`linear_as`] plus `residual` `[rows, out]`, the sum written once: a transformer block's
/// residual connections after its attention and its feed-forward, each a pass that read two
/// tensors and wrote a third (SD-1.5 at 512 px: 70-90 ms of a 2.1 s bf16 denoising step).
/// Only where nothing is differentiated (generation); `None` elsewhere, where the caller adds.
/// The output starts as residual + bias and the product accumulates into it, so its sums
/// round in another order than the layer's output plus the residual.
pub fn linear_added_as(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>, residual: &Tensor<2>, products: Products) -> Option<Tensor<2>> {
    let residual_fits = residual.dtype() == DType::F32 && residual.dims() == [x.dims()[0], w.dims()[0]] && !residual.is_autodiff();
    if !applies(x, w, b, products) || x.dtype() != DType::F32 || !residual_fits || on_autodiff(x, w, b) {
        return None;
    }
    let (x, w, b) = plain(x, w, b)?;
    let residual = residual.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(forward(&x, &w, b.as_ref(), Some(&residual), products, true)))
}

/// Whether the op takes these tensors (see the module's doc): an f32 input (or a bf16 one,
/// see [`takes_bf16`]), a weight and bias in f32 or, frozen, in half precision, of matching
/// shapes. Mismatched shapes are left to burn's ops, which name them (the kernels trust them).
fn applies(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>, products: Products) -> bool {
    let usable = |dtype: DType, tracked: bool| dtype == DType::F32 || (matches!(dtype, DType::F16 | DType::BF16) && !tracked);
    (x.dtype() == DType::F32 || takes_bf16(x, w, b, products))
        && usable(w.dtype(), w.is_tracked())
        && b.is_none_or(|b| usable(b.dtype(), b.is_tracked()))
        && x.dims()[1] == w.dims()[1]
        && b.is_none_or(|b| b.dims()[0] == w.dims()[0])
}

/// Whether the op takes `x` in bf16 and gives its output in bf16 (mixed precision's
/// activations): under bf16 products on AMX, for a frozen weight and bias, an even width in
/// and out. The input is packed from its own values and the output (and, in the backward
/// pass, the input's gradient) narrowed as it is made, where the layer widened its input to
/// f32 and narrowed the op's output, each a tensor and a recorded cast of its own, and so
/// their gradients. The same bits either way: the products round their operands to bf16.
fn takes_bf16(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>, products: Products) -> bool {
    x.dtype() == DType::BF16
        && products == Products::Bf16
        && super::bf16_product::amx_runs()
        && !w.is_tracked()
        && b.is_none_or(|b| !b.is_tracked())
        && x.dims()[1].is_multiple_of(2)
        && w.dims()[0].is_multiple_of(2)
}

fn on_autodiff(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>) -> bool {
    x.is_autodiff() || w.is_autodiff() || b.is_some_and(|b| b.is_autodiff())
}

/// The tensors' CPU primitives (none of them on autodiff); `None` off the CPU backend.
fn plain(x: &Tensor<2>, w: &Tensor<2>, b: Option<&Tensor<1>>) -> Option<(FlexTensor, FlexTensor, Option<FlexTensor>)> {
    let (x, w) = (x.clone().try_into_primitive::<Flex>().ok()?, w.clone().try_into_primitive::<Flex>().ok()?);
    let b = match b {
        Some(b) => Some(b.clone().try_into_primitive::<Flex>().ok()?),
        None => None,
    };
    Some((x, w, b))
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor (widened or made contiguous first)")
}

fn par(work: usize) -> gemm::Parallelism {
    parallelism(work >= PARALLEL_WORK)
}

/// The layer's output, plus `residual` where given; `untracked`: nothing will be
/// differentiated (generation), so the weight, frozen, keeps its bf16 packing between calls.
fn forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>, residual: Option<&FlexTensor>, products: Products, untracked: bool) -> FlexTensor {
    let x = x.to_contiguous();
    let [rows, d_in] = x.layout().shape().dims::<2>();
    let d_out = w.layout().shape().dims::<2>()[0];
    let b = b.map(widened);
    let residual = residual.map(|r| r.to_contiguous());
    let work = rows * d_in * d_out;
    // The output from `product(out, accumulate)`, which adds (or writes) x W^T there.
    let with_product = |product: &dyn Fn(*mut f32, bool)| -> Vec<f32> {
        let (b, r) = (b.as_ref().map(slice), residual.as_ref().map(slice));
        if b.is_none() && r.is_none() {
            if d_in == 0 {
                return vec![0.0; rows * d_out];
            }
            // SAFETY: a product without accumulation writes all rows x d_out values.
            return unsafe { written(rows * d_out, |out| product(out.as_mut_ptr().cast(), false)) };
        }
        // SAFETY: every row is written with the bias, the residual's row or their sum.
        let mut out = unsafe {
            written(rows * d_out, |out| {
                out.par_chunks_mut(d_out.max(1)).enumerate().with_min_len(min_len(rows * d_out >= PARALLEL_WORK)).for_each(|(i, row)| {
                    let r = r.map(|r| &r[i * d_out..][..d_out]);
                    match (b, r) {
                        (Some(b), Some(r)) => row.iter_mut().zip(b).zip(r).for_each(|((o, b), r)| {
                            o.write(r + b);
                        }),
                        (Some(start), None) | (None, Some(start)) => row.iter_mut().zip(start).for_each(|(o, v)| {
                            o.write(*v);
                        }),
                        (None, None) => unreachable!("handled above"),
                    }
                })
            })
        };
        if d_in > 0 {
            product(out.as_mut_ptr(), true);
        }
        out
    };
    let parallel = work >= PARALLEL_WORK;
    if x.dtype() == DType::BF16 {
        // A bf16 input (`takes_bf16`), packed from its own values; the output narrowed.
        let words = pairs(x.as_slice::<half::bf16>().expect("a contiguous bf16 input")).expect("bf16 values, an even count, as words");
        let (lhs, rhs) = (Packed::left_of_bf16(rows, d_in, words, parallel).expect("AMX runs (takes_bf16)"), packed_weight(w, d_in, d_out, parallel));
        // SAFETY: the destination holds rows x d_out values; the operands cover [rows, d_in]
        // and [d_in, d_out].
        return narrowed(with_product(&|dst, accumulate| unsafe { product_packed(&lhs, &rhs, dst, d_out, 1, accumulate, 1.0, parallel) }), [rows, d_out]);
    }
    let xv = View::rows(slice(&x), 0, d_in);
    // The product with `wt`, the weight's transpose `[in, out]` as a view.
    // SAFETY (of each product below): `dst` holds rows x d_out; x is [rows, d_in] and the
    // weight's operand covers [d_in, d_out].
    let times = |wt: View| with_product(&|dst, accumulate| unsafe { product_as(products, rows, d_out, d_in, dst, d_out, 1, accumulate, xv, wt, 1.0, par(work)) });
    // SAFETY (of both): the packing covers [d_in, d_out]; see above.
    let packed_product = |rhs: &Packed| with_product(&|dst, accumulate| unsafe { product_packed(&Packed::left(rows, d_in, xv, parallel), rhs, dst, d_out, 1, accumulate, 1.0, parallel) });
    if untracked && products == Products::Bf16 {
        // A large bf16 weight packed as the product goes, none of it kept.
        if let Some(rows_of_w) = bf16_rows(w, d_in).filter(|_| d_out * d_in >= PACKED_AS_IT_GOES && super::bf16_product::amx_runs()) {
            // SAFETY: the destination holds rows x d_out; the weight's rows are [d_out, d_in].
            let out = with_product(&|dst, accumulate| unsafe { super::bf16_product::product_of_rows(&Packed::left(rows, d_in, xv, parallel), rows_of_w, d_out, dst, d_out, accumulate, parallel) });
            return FlexTensor::from_data(TensorData::new(out, [rows, d_out]));
        }
        let pack = || vec![packed_weight(w, d_in, d_out, true)];
        if let Some(kept) = weight_transforms::packed(w, [d_out, d_in, 1], Packed::right_bytes(d_in, d_out), pack) {
            return FlexTensor::from_data(TensorData::new(packed_product(&kept[0]), [rows, d_out]));
        }
    }
    // A bf16 weight packed from its own words, per call (training's frozen weights).
    if products == Products::Bf16
        && let Some(rows_of_w) = bf16_rows(w, d_in)
    {
        return FlexTensor::from_data(TensorData::new(packed_product(&Packed::right_of_rows(rows_of_w, d_out, d_in, true)), [rows, d_out]));
    }
    let transposed = || with_widened_transposed(w, |wt| times(View::rows(wt, 0, d_out)));
    // The bf16 kernel packs either layout at the same cost.
    let out = (transposes_first(rows, d_in, d_out) && products == Products::F32).then(transposed).flatten().unwrap_or_else(|| {
        let w = widened(w);
        times(View::rows(slice(&w), 0, d_in).t())
    });
    FlexTensor::from_data(TensorData::new(out, [rows, d_out]))
}

/// f32 `values` of `shape` as a bf16 tensor, rounded as the casts round.
fn narrowed(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(super::precision::data_as(TensorData::new(values, shape), DType::BF16))
}

/// bf16 weights of at least this many values are packed as the product goes where nothing is
/// differentiated (`bf16_product::product_of_rows`), not kept.
const PACKED_AS_IT_GOES: usize = 1 << 20;

/// The weight `[d_out, d_in]` packed as the bf16 products' right operand: a bf16 one straight
/// from its words where `d_in` allows ([`bf16_rows`]), any other widened first.
fn packed_weight(w: &FlexTensor, d_in: usize, d_out: usize, parallel: bool) -> Packed {
    match bf16_rows(w, d_in) {
        Some(rows) => Packed::right_of_rows(rows, d_out, d_in, parallel),
        None => Packed::right(d_in, d_out, View::rows(slice(&widened(w)), 0, d_in).t(), parallel),
    }
}

/// A contiguous bf16 weight's rows as words (pairs of neighbouring values), where `d_in` is a
/// multiple of 32 and the CPU packs words ([`Packed::right_of_rows`]).
fn bf16_rows(w: &FlexTensor, d_in: usize) -> Option<&[u32]> {
    (d_in.is_multiple_of(32) && super::bf16_product::available()).then(|| pairs(w.as_slice::<half::bf16>()?)).flatten()
}

/// Whether the product reads the weight transposed beforehand ([`with_widened_transposed`]):
/// on AVX-512, for a layer no wider out than in and more than one row. Measured on a Zen 4
/// (gemm 0.19, 2 threads), the product alone, as stored -> transposed: `[16, 5120] -> 1280`
/// 10.7 -> 2.1 ms, `[77, 768] -> 768` 1.6 -> 0.5, `[256, 5120] -> 1280` 25 -> 16,
/// `[1024, 5120] -> 1280` 73 -> 63, `[1024, 1280] -> 1280` 17.2 both ways; but wider out,
/// `[77, 1280] -> 5120` 8.2 -> 8.8, and one row, `[1, 1280] -> 5120` 0.8 -> 1.6 (gemm's
/// matrix-vector path packs nothing).
fn transposes_first(rows: usize, d_in: usize, d_out: usize) -> bool {
    rows > 1 && d_in >= d_out && super::lanes::isa() == super::lanes::Isa::Avx512
}

/// `lhs` `[m, k]` times `rhs` `[k, n]` into a new row-major vector (see [`written`]). The
/// views must cover their matrices.
fn new_product(m: usize, n: usize, k: usize, lhs: View, rhs: View, products: Products) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    // SAFETY: gemm without accumulation writes all m x n values and reads none of them; the
    // caller vouches for the views.
    unsafe { written(m * n, |out| product_as(products, m, n, k, out.as_mut_ptr().cast(), n, 1, false, lhs, rhs, 1.0, par(m * n * k))) }
}

/// The input's gradient `g W` into a new vector: `g` `[rows, d_out]` packed by `lhs` (from f32
/// or bf16 values), times the weight `w` `[d_out, d_in]` as the bf16 products' right operand,
/// a bf16 one packed from its own values, any other widened first.
fn times_packed_weight(lhs: impl FnOnce(bool) -> Packed, w: &FlexTensor, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    if d_out == 0 {
        return vec![0.0; rows * d_in];
    }
    let parallel = rows * d_in * d_out >= PARALLEL_WORK;
    let rhs = match w.as_slice::<half::bf16>() {
        Some(values) => Packed::right_of_bf16(d_out, d_in, values, parallel),
        None => Packed::right(d_out, d_in, View::rows(slice(&widened(w)), 0, d_in), parallel),
    };
    let lhs = lhs(parallel);
    // SAFETY: a product without accumulation writes all rows x d_in values.
    unsafe { written(rows * d_in, |out| product_packed(&lhs, &rhs, out.as_mut_ptr().cast(), d_in, 1, false, 1.0, parallel)) }
}

/// The input's gradient from the output's `g` `[rows, d_out]` (f32) and the weight as stored.
fn times_weight(rows: usize, d_in: usize, d_out: usize, g: &[f32], w: &FlexTensor, products: Products) -> Vec<f32> {
    if products == Products::Bf16 && super::bf16_product::available() && w.dtype() == DType::BF16 {
        return times_packed_weight(|parallel| Packed::left(rows, d_out, View::rows(g, 0, d_out), parallel), w, rows, d_in, d_out);
    }
    let w = widened(w);
    new_product(rows, d_in, d_out, View::rows(g, 0, d_out), View::rows(slice(&w), 0, d_in), products)
}

/// The input's gradient in bf16 from the output's `g` `[rows, d_out]` in bf16 and the frozen
/// weight ([`takes_bf16`]), `g` packed from its own words.
fn input_gradient_bf16(g: &FlexTensor, w: &FlexTensor, rows: usize, d_in: usize, d_out: usize) -> FlexTensor {
    let words = pairs(g.as_slice::<half::bf16>().expect("a contiguous bf16 gradient")).expect("bf16 values, an even count, as words");
    let lhs = |parallel| Packed::left_of_bf16(rows, d_out, words, parallel).expect("AMX runs (takes_bf16)");
    narrowed(times_packed_weight(lhs, w, rows, d_in, d_out), [rows, d_in])
}

/// The output again from the input, weight and bias, in the backward pass.
#[derive(Debug)]
struct Recompute {
    x: NodeId,
    w: Input,
    b: Option<Input>,
    products: Products,
}

/// A weight or bias as [`Recompute`] finds it.
#[derive(Debug)]
enum Input {
    /// An input of the op, from burn's checkpointer.
    Node(NodeId),
    /// Frozen, held by the op.
    Held(FlexTensor),
}

impl Input {
    fn get(&self, states: &mut BackwardStates) -> FlexTensor {
        match self {
            Input::Node(id) => states.get_state::<FlexTensor>(id),
            Input::Held(t) => t.clone(),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// How many outputs [`Recompute`] made on this thread (burn runs a backward pass on the
    /// thread that asks for it).
    static RECOMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl RetroForward for Recompute {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        #[cfg(test)]
        RECOMPUTED.with(|n| n.set(n.get() + 1));
        let (x, w) = (states.get_state::<FlexTensor>(&self.x), self.w.get(states));
        let b = self.b.as_ref().map(|b| b.get(states));
        states.save(out, forward(&x, &w, b.as_ref(), None, self.products, false));
    }
}

/// The linear layer; `N` is 3 with a bias, 2 without, 1 when the op holds a frozen weight
/// and bias itself.
#[derive(Debug)]
struct LinearOp<const N: usize>;

#[derive(Clone, Debug)]
struct Saved {
    /// The weight as stored: a half-precision one is widened again here.
    w: FlexTensor,
    products: Products,
}

impl<const N: usize> Backward<Flex, N> for LinearOp<N> {
    /// With the input's node when the weight trains.
    type State = (Saved, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let (Saved { w, products }, kept_ids) = ops.state;
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [rows, d_out] = g.layout().shape().dims::<2>();
        let parent = |i: usize| ops.parents.get(i).cloned().flatten();
        if g.dtype() == DType::BF16 {
            // A bf16 input's op ([`takes_bf16`]): the weight and bias are frozen.
            if let Some(node) = parent(0) {
                let d_in = w.layout().shape().dims::<2>()[1];
                grads.register::<Flex>(node.id, input_gradient_bf16(&g, &w, rows, d_in, d_out));
            }
            return;
        }
        let gs = slice(&g);
        if let Some(node) = parent(0) {
            let d_in = w.layout().shape().dims::<2>()[1];
            let dx = times_weight(rows, d_in, d_out, gs, &w, products);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [rows, d_in])));
        }
        if let Some(node) = parent(1) {
            let x = kept(checkpointer, kept_ids[0]).to_contiguous();
            let d_in = x.layout().shape().dims::<2>()[1];
            let dw = new_product(d_out, d_in, rows, View::rows(gs, 0, d_out).t(), View::rows(slice(&x), 0, d_in), products);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, [d_out, d_in])));
        }
        if let Some(node) = parent(2) {
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(column_sums(gs, rows, d_out), [d_out])));
        }
    }
}

/// The sum of each column of `g` `[rows, cols]`, rows added in order (the same for any
/// thread count: threads take columns).
fn column_sums(g: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const COLUMNS: usize = 64;
    let mut sums = vec![0f32; cols];
    sums.par_chunks_mut(COLUMNS).with_min_len(min_len(rows * cols >= PARALLEL_WORK)).enumerate().for_each(|(i, acc)| {
        for row in g.chunks_exact(cols) {
            acc.iter_mut().zip(&row[i * COLUMNS..]).for_each(|(a, v)| *a += v);
        }
    });
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel, values};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::tensor::Device;

    /// burn's ops on the f32 values, the reference.
    fn reference(x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<2> {
        burn::tensor::module::linear(x, crate::param::f32_value(&w).transpose(), b)
    }

    /// Under balanced checkpointing a layer twice as wide out as in gives its output to the
    /// backward pass by recomputing it, whether its weight trains or not; a narrower one, or
    /// one without checkpointing, keeps it.
    #[test]
    fn only_an_expanding_layer_under_checkpointing_is_recomputed() {
        let (plain, checkpointed) = (cpu_autodiff(), cpu_autodiff_checkpointed());
        for (device, d_out, trains, want) in [(&checkpointed, 40, false, 1), (&checkpointed, 40, true, 1), (&checkpointed, 30, false, 0), (&plain, 40, false, 0)] {
            let mut init = Init::new(3);
            let x = init.normal::<2>([6, 16], 1.0, device).require_grad();
            let w = init.normal::<2>([d_out, 16], 0.3, device);
            let w = if trains { w.require_grad() } else { w };
            let before = RECOMPUTED.with(|n| n.get());
            let y = linear(&x, &w, None).expect("the op applies");
            assert!(x.grad(&(y.clone() * y).sum().backward()).is_some());
            assert_eq!(RECOMPUTED.with(|n| n.get()) - before, want, "out {d_out}, trains {trains}, {device:?}");
        }
    }

    /// The residual's sum against the layer's output plus the residual: with and without a
    /// bias, f32 and bf16 weights, f32 and (where the CPU has them) bf16 products; refused under autodiff and for a
    /// residual of another shape, where the caller adds.
    #[test]
    fn the_residual_joins_the_output_where_nothing_is_differentiated() {
        let mut init = Init::new(8);
        let (rows, d_in, d_out) = (37, 48, 40);
        let x = init.normal::<2>([rows, d_in], 1.0, &cpu());
        let residual = init.normal::<2>([rows, d_out], 1.0, &cpu());
        let w = init.normal::<2>([d_out, d_in], 0.3, &cpu());
        let b = init.normal::<1>([d_out], 1.0, &cpu());
        let bf16 = crate::ops::bf16_product::available().then(|| (w.clone().cast(DType::BF16), Products::Bf16));
        for (w, products) in [(w.clone(), Products::F32)].into_iter().chain(bf16) {
            for b in [None, Some(&b)] {
                let got = linear_added_as(&x, &w, b, &residual, products).expect("the op applies");
                let want = linear_as(&x, &w, b, products).unwrap() + residual.clone();
                let err = max_rel(values(got), values(want));
                assert!(err < 1e-6, "{products:?}, bias {}: {err}", b.is_some());
            }
        }
        assert!(linear_added_as(&x, &w, Some(&b), &residual.clone().narrow(1, 0, d_out - 1), Products::F32).is_none());
        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &cpu_autodiff());
        assert!(linear_added_as(&on(&x), &on(&w), None, &on(&residual), Products::F32).is_none());
    }

    /// Values and every gradient against burn's ops: with and without a bias, the weight
    /// trained or frozen (f32, f16, bf16), plain and checkpointed autodiff, and without
    /// autodiff; rows and widths off the SIMD lanes, and large enough to run on two threads.
    #[test]
    fn values_and_gradients_match_burns_ops() {
        let mut init = Init::new(21);
        // The fifth is twice as wide out as in: its output is recomputed under checkpointing.
        for (rows, d_in, d_out) in [(7, 13, 5), (300, 70, 130), (40, 64, 64), (1, 50, 20), (30, 16, 40)] {
            let (x, w, b) = (init.normal::<2>([rows, d_in], 1.0, &cpu()), init.normal::<2>([d_out, d_in], 0.3, &cpu()), init.normal::<1>([d_out], 0.5, &cpu()));
            let probe = init.normal::<2>([rows, d_out], 1.0, &cpu());
            for (dtype, trains) in [(DType::F32, true), (DType::F32, false), (DType::F16, false), (DType::BF16, false)] {
                for bias in [true, false] {
                    let w = w.clone().cast(dtype);
                    let plain = values(linear(&x, &w, bias.then_some(&b)).expect("the op applies"));
                    let want = values(reference(x.clone(), w.clone(), bias.then(|| b.clone())));
                    assert!(max_rel(&plain, &want) < 1e-6, "{rows}x{d_in}x{d_out} {dtype:?} bias {bias}: no autodiff");
                    let grads = |device: &Device, ours: bool| {
                        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), device);
                        let x = on(&x).require_grad();
                        let w = if trains { on(&w).require_grad() } else { w.clone() };
                        let b = Tensor::<1>::from_data(b.to_data(), device).require_grad();
                        let b = bias.then_some(b);
                        let y = if ours { linear(&x, &w, b.as_ref()).expect("the op applies") } else { reference(x.clone(), w.clone(), b.clone()) };
                        // y twice: its product's backward reads y, which checkpointing recomputes.
                        let g = (y.clone() * y.clone() * on(&probe)).sum().backward();
                        let mut out = vec![values(y), values(x.grad(&g).unwrap())];
                        if trains {
                            out.push(values(w.grad(&g).unwrap()));
                        }
                        if let Some(b) = b {
                            out.push(values(b.grad(&g).unwrap()));
                        }
                        out
                    };
                    let want = grads(&cpu_autodiff(), false);
                    for (device, name) in [(cpu_autodiff(), "plain"), (cpu_autodiff_checkpointed(), "checkpointed")] {
                        let got = grads(&device, true);
                        assert_eq!(got.len(), want.len());
                        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                            let err = max_rel(got, want);
                            assert!(err < 1e-5, "{rows}x{d_in}x{d_out} {dtype:?} trains {trains} bias {bias} {name}: output {i} off by {err}");
                        }
                    }
                }
            }
        }
    }

    /// bf16 products: the f32 op on the input and weight rounded to bf16, within f32
    /// summation error, for the output, the input's gradient and a trained weight's (the
    /// upstream gradient bf16-exact, as it is under mixed precision); and not the f32 op on
    /// the operands as they are.
    #[test]
    fn bf16_products_are_the_f32_op_on_rounded_operands() {
        if !crate::ops::bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let round = |t: &Tensor<2>| t.clone().cast(DType::BF16).cast(DType::F32);
        let mut init = Init::new(34);
        for (rows, d_in, d_out) in [(7, 13, 5), (300, 70, 130), (1, 50, 20), (30, 16, 40)] {
            let (x, w, b) = (init.normal::<2>([rows, d_in], 1.0, &cpu()), init.normal::<2>([d_out, d_in], 0.3, &cpu()), init.normal::<1>([d_out], 0.5, &cpu()));
            let probe = round(&init.normal::<2>([rows, d_out], 1.0, &cpu()));
            for trains in [false, true] {
                let run = |x: &Tensor<2>, w: &Tensor<2>, products: Products| {
                    let device = cpu_autodiff();
                    let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device);
                    let x = on(x).require_grad();
                    let w = if trains { on(w).require_grad() } else { on(w) };
                    let y = linear_as(&x, &w, Some(&Tensor::from_data(b.to_data(), &device)), products).expect("the op applies");
                    let g = (y.clone() * on(&probe)).sum().backward();
                    let mut out = vec![values(y), values(x.grad(&g).unwrap())];
                    if trains {
                        out.push(values(w.grad(&g).unwrap()));
                    }
                    out
                };
                let got = run(&x, &w, Products::Bf16);
                let (want, unrounded) = (run(&round(&x), &round(&w), Products::F32), run(&x, &w, Products::F32));
                for (i, ((got, want), unrounded)) in got.iter().zip(&want).zip(&unrounded).enumerate() {
                    let err = max_rel(got, want);
                    assert!(err < 1e-5, "{rows}x{d_in}x{d_out} trains {trains}: output {i} off by {err}");
                    assert!(max_rel(got, unrounded) > 1e-4, "{rows}x{d_in}x{d_out} trains {trains}: output {i} as if unrounded");
                }
            }
        }
    }

    /// A frozen weight stored in bf16 (packed from its own values for the input's gradient)
    /// gives the bits of the same weight in f32, rounded to bf16 beforehand.
    #[test]
    fn a_bf16_weight_gives_its_f32_twins_gradient() {
        if !crate::ops::bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut init = Init::new(35);
        for (rows, d_in, d_out) in [(7, 13, 5), (300, 70, 131), (1, 64, 20)] {
            let (x, w) = (init.normal::<2>([rows, d_in], 1.0, &cpu()), init.normal::<2>([d_out, d_in], 0.3, &cpu()).cast(DType::BF16));
            let probe = init.normal::<2>([rows, d_out], 1.0, &cpu());
            let run = |w: &Tensor<2>| {
                let device = cpu_autodiff();
                let x = Tensor::<2>::from_data(x.to_data(), &device).require_grad();
                // from_data makes an f32 tensor; the weight takes its dtype back.
                let w_on = Tensor::<2>::from_data(w.to_data(), &device).cast(w.dtype());
                assert_eq!(w_on.dtype(), w.dtype());
                let y = linear_as(&x, &w_on, None, Products::Bf16).expect("the op applies");
                let g = (y.clone() * Tensor::from_data(probe.to_data(), &device)).sum().backward();
                (values(y), values(x.grad(&g).unwrap()))
            };
            let (got, want) = (run(&w), run(&w.clone().cast(DType::F32)));
            assert!(got.0.iter().zip(&want.0).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{d_in}x{d_out}: output");
            assert!(got.1.iter().zip(&want.1).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{d_in}x{d_out}: input gradient");
        }
    }

    /// A bf16 input taken as it is ([`takes_bf16`]) gives the bits of the layer's widen, op,
    /// narrow: the output, and the input's gradient, with an f32 or a bf16 frozen weight,
    /// with and without balanced checkpointing (which recomputes the 8x wider layer's output).
    #[test]
    fn a_bf16_input_gives_the_bits_of_its_widened_twin() {
        if !crate::ops::bf16_product::amx_runs() {
            eprintln!("skipped: AMX does not run on this CPU");
            return;
        }
        let mut init = Init::new(36);
        for (rows, d_in, d_out) in [(7, 16, 6), (300, 70, 130), (64, 128, 1024)] {
            let x = init.normal::<2>([rows, d_in], 1.0, &cpu()).cast(DType::BF16);
            let (w, b) = (init.normal::<2>([d_out, d_in], 0.3, &cpu()), init.normal::<1>([d_out], 0.5, &cpu()));
            let probe = init.normal::<2>([rows, d_out], 1.0, &cpu());
            for (w, checkpointed) in [(w.clone(), false), (w.clone().cast(DType::BF16), false), (w.cast(DType::BF16), true)] {
                let run = |as_is: bool| {
                    let device = if checkpointed { crate::cpu_autodiff_checkpointed() } else { cpu_autodiff() };
                    // from_data makes f32 tensors; each then takes its dtype back.
                    let x = Tensor::<2>::from_data(x.to_data(), &device).cast(DType::BF16).require_grad();
                    let (w, b) = (Tensor::<2>::from_data(w.to_data(), &device).cast(w.dtype()), Tensor::<1>::from_data(b.to_data(), &device));
                    let y = if as_is {
                        linear_as(&x, &w, Some(&b), Products::Bf16).expect("the op takes bf16")
                    } else {
                        let wide = crate::ops::precision::cast(&x, DType::F32);
                        crate::ops::precision::cast(&linear_as(&wide, &w, Some(&b), Products::Bf16).expect("the op applies"), DType::BF16)
                    };
                    assert_eq!(y.dtype(), DType::BF16);
                    let g = (crate::ops::precision::cast(&y, DType::F32) * Tensor::from_data(probe.to_data(), &device)).sum().backward();
                    let dx = x.grad(&g).unwrap();
                    assert_eq!(dx.dtype(), DType::BF16);
                    (values(y), values(dx))
                };
                let (got, want) = (run(true), run(false));
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                let what = format!("{rows}x{d_in}x{d_out}, weight {:?}, checkpointed {checkpointed}", w.dtype());
                assert!(same(&got.0, &want.0), "{what}: output");
                assert!(same(&got.1, &want.1), "{what}: input gradient");
            }
        }
    }

    /// The layer with bf16 products under autodiff (the input tracked): its weight packed per
    /// call, as training packs it; the output outside autodiff.
    fn tracked_bf16(x: &Tensor<2>, w: &Tensor<2>, b: &Tensor<1>) -> Tensor<2> {
        let device = cpu_autodiff();
        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device);
        linear_as(&on(x).require_grad(), &on(w), Some(&Tensor::from_data(b.to_data(), &device)), Products::Bf16).expect("the op applies").inner()
    }

    /// Where nothing is differentiated, a frozen weight's bf16 packing (an f32 weight's and a
    /// bf16-stored one's) is kept and gives the bits of the packing made per call (the same
    /// product under autodiff).
    #[test]
    fn a_frozen_weight_keeps_its_bf16_packing_where_nothing_is_differentiated() {
        if !crate::ops::bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut init = Init::new(35);
        // 64 inputs: a bf16 weight packed from its own words.
        for (dtype, d_in) in [(DType::F32, 48), (DType::BF16, 48), (DType::F32, 64), (DType::BF16, 64)] {
            let (x, w, b) = (init.normal::<2>([70, d_in], 1.0, &cpu()), init.normal::<2>([40, d_in], 0.3, &cpu()).cast(dtype), init.normal::<1>([40], 0.5, &cpu()));
            let stored = w.clone().try_into_primitive::<Flex>().unwrap();
            assert_eq!(bf16_rows(&stored, d_in).is_some(), dtype == DType::BF16 && d_in == 64, "{dtype:?} x {d_in}: packed from its words");
            let kept = || values(linear_as(&x, &w, Some(&b), Products::Bf16).expect("the op applies"));
            let first = kept();
            assert!(weight_transforms::holds_packed(&w.clone().try_into_primitive::<Flex>().unwrap()), "{dtype:?}: the packing is kept");
            let per_call = values(tracked_bf16(&x, &w, &b));
            assert!(first == per_call && kept() == per_call, "{dtype:?}: the kept packing's bits are the per-call one's");
            // The same values as an f32 weight (packed from its widened copy): the same bits.
            let wide = w.clone().cast(DType::F32) + 0.0;
            let from_f32 = values(tracked_bf16(&x, &wide, &b));
            assert!(from_f32 == per_call, "{dtype:?} x {d_in}: packed from the bf16 words, other bits than from f32");
        }
    }

    /// Where nothing is differentiated, a large bf16 weight is packed as the product goes and
    /// not kept: the per-call packing's bits where every block is whole (sums accumulated in
    /// place across parts of `k`, in the same order), within rounding where blocks are partial,
    /// with a bias and a residual.
    #[test]
    fn a_large_bf16_weight_is_packed_as_the_product_goes() {
        if !crate::ops::bf16_product::amx_runs() {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let mut init = Init::new(36);
        let (d_in, d_out) = (2048, 544);
        let w = init.normal::<2>([d_out, d_in], 0.05, &cpu()).cast(DType::BF16);
        let b = init.normal::<1>([d_out], 0.5, &cpu());
        for rows in [512, 70] {
            let x = init.normal::<2>([rows, d_in], 1.0, &cpu());
            let r = init.normal::<2>([rows, d_out], 1.0, &cpu());
            let got = values(linear_as(&x, &w, Some(&b), Products::Bf16).expect("the op applies"));
            assert!(!weight_transforms::holds_packed(&w.clone().try_into_primitive::<Flex>().unwrap()), "nothing kept");
            let per_call = tracked_bf16(&x, &w, &b);
            if rows % 32 == 0 {
                assert!(got == values(per_call.clone()), "{rows} rows: other bits than the per-call packing's");
            } else {
                assert!(max_rel(got, values(per_call.clone())) < 1e-5, "{rows} rows");
            }
            let added = values(linear_added_as(&x, &w, Some(&b), &r, Products::Bf16).expect("the op applies"));
            assert!(max_rel(added, values(per_call + r)) < 1e-5, "{rows} rows, with the residual");
        }
    }

    /// A trainable half-precision weight and a half-precision input are left to burn's ops
    /// (mixed precision), as are weights that do not match the input's width.
    #[test]
    fn declines_what_it_does_not_compute() {
        let mut init = Init::new(5);
        let x = init.normal::<2>([4, 6], 1.0, &cpu());
        let w = init.normal::<2>([3, 6], 1.0, &cpu_autodiff()).cast(DType::F16).require_grad();
        assert!(linear(&x, &w, None).is_none());
        let w = init.normal::<2>([3, 6], 1.0, &cpu());
        assert!(linear(&x.clone().cast(DType::BF16), &w, None).is_none());
        assert!(linear(&x, &w, None).is_some());
        assert!(linear(&x, &init.normal::<2>([3, 5], 1.0, &cpu()), None).is_none());
        assert!(linear(&x, &w, Some(&init.normal::<1>([4], 1.0, &cpu()))).is_none());
        assert!(linear(&x, &w, Some(&init.normal::<1>([3], 1.0, &cpu()))).is_some());
    }

    /// The gradients by finite differences of the loss `sum(probe * y)`, at the first few
    /// entries of the input, weight and bias.
    #[test]
    fn gradients_match_finite_differences() {
        let mut init = Init::new(8);
        let (x, w, b) = (init.normal::<2>([5, 9], 1.0, &cpu()), init.normal::<2>([4, 9], 0.5, &cpu()), init.normal::<1>([4], 0.5, &cpu()));
        let probe = values(init.normal::<2>([5, 4], 1.0, &cpu()));
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let t2 = |v: &[f32], s: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), s), &cpu());
            let y = values(linear(&t2(x, [5, 9]), &t2(w, [4, 9]), Some(&Tensor::<1>::from_data(TensorData::new(b.to_vec(), [4]), &cpu()))).unwrap());
            y.iter().zip(&probe).map(|(y, p)| (*y as f64) * (*p as f64)).sum()
        };
        let dev = cpu_autodiff();
        let on2 = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &dev).require_grad();
        let (xa, wa, ba) = (on2(&x), on2(&w), Tensor::<1>::from_data(b.to_data(), &dev).require_grad());
        let probe_t = Tensor::<2>::from_data(TensorData::new(probe.clone(), [5, 4]), &dev);
        let g = (linear(&xa, &wa, Some(&ba)).unwrap() * probe_t).sum().backward();
        let analytic = [values(xa.grad(&g).unwrap()), values(wa.grad(&g).unwrap()), values(ba.grad(&g).unwrap())];
        let base = [values(x), values(w), values(b)];
        let eps = 1e-2f32;
        for (which, grad) in analytic.iter().enumerate() {
            for i in 0..4 {
                let nudged = |d: f32| {
                    let mut v = base.clone();
                    v[which][i] += d;
                    loss(&v[0], &v[1], &v[2])
                };
                let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * eps as f64);
                assert!((numeric - grad[i] as f64).abs() < 1e-2 * numeric.abs().max(1.0), "input {which} entry {i}: {numeric} vs {}", grad[i]);
            }
        }
    }
}
