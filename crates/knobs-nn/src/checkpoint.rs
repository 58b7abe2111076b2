//! Block gradient checkpointing, as PyTorch's `torch.utils.checkpoint` (diffusers'
//! `enable_gradient_checkpointing`): a block runs its forward pass keeping nothing but its
//! inputs, and the backward pass runs it again under autodiff to get its gradients. A model
//! then holds one block's activations at a time instead of every block's, for one more forward
//! pass per step.
//!
//! In burn's graph a checkpointed block is one op whose parent is its input. Its backward step
//! recomputes the block on a copy of the module whose tracked tensors (trainable parameters,
//! or an adapter's weights computed upstream) are fresh leaves, in a graph of its own, and
//! runs that graph's backward. burn's ops take a fixed number of parents, and a block uses any
//! number of tracked tensors; so each tracked tensor is tied to the input in a chain of
//! identity ops before the block op, and each tie hands its tensor the gradient the block's
//! step left for it. The ties come before the block in the graph, so their steps run after its.
//!
//! The recomputed pass draws the dropout masks of the first (the thread's stream is replayed)
//! and computes the same values, so the gradients are those of the block run once: bit for bit
//! through a chain of blocks, to rounding in a model where gradients meet (the ties deepen the
//! graph, so its steps run, and add into a shared tensor's gradient, in another order). A
//! block with nothing tracked in it runs once. The op is the same on the CPU backend and on
//! burn's GPU one (cubecl): it only runs dispatch tensors and hands gradients on.
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor, Flex};
use burn::tensor::{GradientCheckpointingStrategy, Tensor};
use rand::rngs::StdRng;

use crate::module::{Module, ModuleExt};
use crate::ops::portable;
use crate::param::{autodiff_with, lift};

/// What a block computes from its input `x` and one more tensor (a time embedding, a text
/// encoding), as the plain `forward` of its module.
pub type BlockForward<M, const D: usize, const A: usize> = fn(&M, Tensor<D>, &Tensor<A>) -> Tensor<D>;

static RECOMPUTED: AtomicUsize = AtomicUsize::new(0);
static REUSED: AtomicUsize = AtomicUsize::new(0);

/// How many checkpointed blocks this process has run again in a backward pass: proof that
/// checkpointing ran, for tests and logs.
pub fn blocks_recomputed() -> usize {
    RECOMPUTED.load(Ordering::Relaxed)
}

/// How many results ops kept in a checkpointed block's first pass and took again in its
/// recomputed pass instead of computing them ([`kept`]).
pub fn results_reused() -> usize {
    REUSED.load(Ordering::Relaxed)
}

/// What an op computed in a checkpointed block's first pass, handed back to the same op
/// in the block's recomputed pass (in call order, checked by `key`), so the op runs once:
/// for results cheap to keep and dear to compute (attention over many keys), as PyTorch's
/// selective checkpointing keeps its attention's output. Elsewhere it is `compute()`.
pub(crate) fn kept<K, T>(key: K, compute: impl FnOnce() -> T) -> T
where
    K: PartialEq + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    let replayed = FRAMES.with(|frames| match frames.borrow_mut().last_mut() {
        Some(Frame::Replay(items)) => {
            let item = items.next().and_then(|item| item.downcast::<(K, T)>().ok()).filter(|item| item.0 == key);
            if item.is_none() {
                // Another path than the first pass's: nothing after this point is trusted.
                items.by_ref().for_each(drop);
            }
            Some(item.map(|item| item.1.clone()))
        }
        _ => None,
    });
    if let Some(Some(value)) = replayed {
        REUSED.fetch_add(1, Ordering::Relaxed);
        return value;
    }
    let value = compute();
    FRAMES.with(|frames| {
        if let Some(Frame::Keep(items)) = frames.borrow_mut().last_mut() {
            items.push(Arc::new((key, value.clone())));
        }
    });
    value
}

type KeptResult = Arc<dyn std::any::Any + Send + Sync>;

/// A checkpointed block's pass in progress on this thread: its first, keeping results, or
/// its recomputed one, handing them back.
enum Frame {
    Keep(Vec<KeptResult>),
    Replay(std::vec::IntoIter<KeptResult>),
}

thread_local! {
    static FRAMES: std::cell::RefCell<Vec<Frame>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f()` with `frame` as this thread's innermost pass; the frame as `f` left it.
fn in_frame<T>(frame: Frame, f: impl FnOnce() -> T) -> (T, Frame) {
    /// Pops the frame when `f` panics, so that a thread that goes on (a server's) does not
    /// replay a dead block's results.
    struct OnUnwind;
    impl Drop for OnUnwind {
        fn drop(&mut self) {
            FRAMES.with(|frames| frames.borrow_mut().pop());
        }
    }
    FRAMES.with(|frames| frames.borrow_mut().push(frame));
    let on_unwind = OnUnwind;
    let out = f();
    std::mem::forget(on_unwind);
    let frame = FRAMES.with(|frames| frames.borrow_mut().pop()).expect("the frame pushed above");
    (out, frame)
}

/// The results a block's first pass kept.
#[derive(Clone, Default)]
struct KeptResults(Arc<Vec<KeptResult>>);

impl Debug for KeptResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} kept results", self.0.len())
    }
}

/// `forward(module, x, aux)`, checkpointed when `on` (see the module's comment).
pub fn checkpointed_if<M, const D: usize, const A: usize>(on: bool, module: &M, x: Tensor<D>, aux: &Tensor<A>, forward: BlockForward<M, D, A>) -> Tensor<D>
where
    M: Module + Clone + Debug + Send + Sync + 'static,
{
    if on { checkpointed(module, x, aux, forward) } else { forward(module, x, aux) }
}

/// The backends the block op is recorded on: every one knobs builds with.
#[derive(Clone, Copy)]
enum Inner {
    Flex,
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    Cube,
}

impl Inner {
    fn of<const D: usize>(x: &Tensor<D>) -> Option<Inner> {
        let plain = x.clone().inner();
        if plain.clone().try_into_primitive::<Flex>().is_ok() {
            return Some(Inner::Flex);
        }
        #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
        if plain.try_into_primitive::<burn::backend::Cube>().is_ok() {
            return Some(Inner::Cube);
        }
        None
    }
}

/// `forward(module, x, aux)` keeping only `x` and `aux` for the backward pass, which runs it
/// again. Runs it as it is where nothing in it is tracked.
pub fn checkpointed<M, const D: usize, const A: usize>(module: &M, x: Tensor<D>, aux: &Tensor<A>, forward: BlockForward<M, D, A>) -> Tensor<D>
where
    M: Module + Clone + Debug + Send + Sync + 'static,
{
    let Some(inner) = Inner::of(&x) else { return forward(module, x, aux) };
    // The copy's tracked tensors become plain values; the originals are tied to the input.
    let mut copy = module.clone();
    let (mut tracked, mut strategy) = (Vec::new(), x.gradient_checkpointing_strategy().or(aux.gradient_checkpointing_strategy()));
    copy.for_each_param_mut(|_, mut p| {
        let is_tracked = p.as_ref().is_tracked();
        tracked.push(is_tracked);
        if is_tracked {
            strategy = strategy.or(p.as_ref().gradient_checkpointing_strategy());
            p.set_inference();
        }
    });
    if !(x.is_tracked() || aux.is_tracked() || tracked.contains(&true)) {
        return forward(module, x, aux);
    }
    // The tracked tensors as they were come from a second copy, not from `module`: a copy can
    // visit other tensors than its original (an A1111 hypernetwork's copy owns its shared
    // module, which only one of the original's layers visits), and two copies visit alike.
    let parts = Parts { original: module.clone(), copy, tracked, strategy, forward };
    macro_rules! on {
        ($ib:ty) => {
            match strategy {
                Some(GradientCheckpointingStrategy::Balanced) => recorded::<$ib, BalancedCheckpointing, M, D, A>(parts, x, aux),
                _ => recorded::<$ib, NoCheckpointing, M, D, A>(parts, x, aux),
            }
        };
    }
    match inner {
        Inner::Flex => on!(Flex),
        #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
        Inner::Cube => on!(burn::backend::Cube),
    }
}

/// What the visit of the module found.
struct Parts<M, const D: usize, const A: usize> {
    /// A copy of the module as it was: its tracked tensors are tied to the input.
    original: M,
    /// The module with its tracked tensors as plain values.
    copy: M,
    /// Which of its parameters were tracked, in visiting order.
    tracked: Vec<bool>,
    strategy: Option<GradientCheckpointingStrategy>,
    forward: BlockForward<M, D, A>,
}

/// The block as one op on `Autodiff<IB, C>`: each tracked tensor tied to the input, then the
/// block op on the chain, with the output of a first pass that records nothing.
fn recorded<IB: Backend, C: CheckpointStrategy, M, const D: usize, const A: usize>(parts: Parts<M, D, A>, x: Tensor<D>, aux: &Tensor<A>) -> Tensor<D>
where
    M: Module + Clone + Debug + Send + Sync + 'static,
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, C>>,
{
    let on_backend = "a tensor on the backend it was found on";
    let state = Block::<IB, M, D, A> {
        module: Arc::new(parts.copy),
        tracked: parts.tracked,
        x: x.clone().inner(),
        x_tracked: x.is_tracked(),
        aux: aux.clone().inner(),
        aux_tracked: aux.is_tracked(),
        strategy: parts.strategy,
        forward: parts.forward,
        masks: crate::dropout::stream(),
        stash: Stash::default(),
        kept: KeptResults::default(),
    };
    // The input when it is tracked, else a stand-in of one value: the chain only carries the
    // input's gradient, and each tie its tensor's.
    let chain = if state.x_tracked { x } else { autodiff_with(Tensor::<D>::zeros([1; D], &x.device()), state.strategy) };
    let mut chain = chain.try_into_primitive::<Autodiff<IB, C>>().expect(on_backend);
    let mut tied: Vec<_> = state.aux_tracked.then(|| aux.clone().try_into_primitive::<Autodiff<IB, C>>().expect(on_backend)).into_iter().collect();
    parts.original.for_each_param(|_, p| {
        if p.is_tracked() {
            tied.push(p.primitive::<Autodiff<IB, C>>().expect(on_backend));
        }
    });
    for (slot, t) in tied.into_iter().enumerate() {
        let stash = state.stash.clone();
        chain = portable::recorded::<IB, C, _, 2>(Tie, [chain, t], |[chain, _]| Some((chain, (slot, stash)))).expect("a tie computes nothing");
    }
    // The first pass: every tensor untracked, so it records nothing and keeps nothing but
    // what its ops chose to keep for the second.
    let (run, frame) = in_frame(Frame::Keep(Vec::new()), || state.run(false));
    let y = run.y.inner().try_into_primitive::<IB>().expect(on_backend);
    let mut state = state;
    if let Frame::Keep(items) = frame {
        state.kept = KeptResults(Arc::new(items));
    }
    let out = portable::recorded::<IB, C, _, 1>(BlockOp::<M, D, A>(PhantomData), [chain], |_| Some((y, state))).expect("the output is computed");
    Tensor::from_primitive::<Autodiff<IB, C>>(out)
}

/// The gradients the block's backward step leaves for its tracked tensors (the `aux` input
/// first when tracked, then the parameters in visiting order), each taken by its tie.
struct Stash<IB: Backend>(Arc<Mutex<Vec<Option<FloatTensor<IB>>>>>);

impl<IB: Backend> Stash<IB> {
    fn take(&self, slot: usize) -> Option<FloatTensor<IB>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(slot).and_then(Option::take)
    }
}
impl<IB: Backend> Default for Stash<IB> {
    fn default() -> Self {
        Stash(Arc::default())
    }
}
impl<IB: Backend> Clone for Stash<IB> {
    fn clone(&self) -> Self {
        Stash(self.0.clone())
    }
}
impl<IB: Backend> Debug for Stash<IB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stash")
    }
}

/// The chain as it is, with a tracked tensor as a second parent whose gradient comes from
/// the stash.
#[derive(Debug)]
struct Tie;

impl<IB: Backend> Backward<IB, 2> for Tie {
    type State = (usize, Stash<IB>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = grads.consume::<IB>(&ops.node);
        let [chain, tied] = ops.parents;
        let (slot, stash) = ops.state;
        if let (Some(node), Some(g)) = (tied, stash.take(slot)) {
            grads.register::<IB>(node.id, g);
        }
        if let Some(node) = chain {
            grads.register::<IB>(node.id, d);
        }
    }
}

/// What the block op keeps: its inputs and a copy of its module, tracked tensors as plain
/// values (`tracked` marks them in visiting order).
#[derive(Debug, Clone)]
struct Block<IB: Backend, M, const D: usize, const A: usize> {
    module: Arc<M>,
    tracked: Vec<bool>,
    x: Tensor<D>,
    x_tracked: bool,
    aux: Tensor<A>,
    aux_tracked: bool,
    strategy: Option<GradientCheckpointingStrategy>,
    forward: BlockForward<M, D, A>,
    /// The dropout stream as the first pass found it.
    masks: StdRng,
    stash: Stash<IB>,
    /// What the first pass's ops kept for the recomputed one (`kept`).
    kept: KeptResults,
}

/// One run of the block on autodiff tensors.
struct Run<M, const D: usize, const A: usize> {
    y: Tensor<D>,
    x: Tensor<D>,
    aux: Tensor<A>,
    /// The module run, its tracked parameters leaves of this run's graph when it has one.
    module: M,
}

impl<IB: Backend, M: Module + Clone, const D: usize, const A: usize> Block<IB, M, D, A> {
    /// The block, its tracked tensors fresh leaves when `leaves`, else untracked.
    fn run(&self, leaves: bool) -> Run<M, D, A> {
        let mut module = (*self.module).clone();
        let mut tracked = self.tracked.iter();
        module.for_each_param_mut(|_, mut p| {
            if tracked.next() == Some(&true) {
                p.lift(self.strategy, leaves);
            }
        });
        let x = lift(self.x.clone(), self.strategy, leaves && self.x_tracked);
        let aux = lift(self.aux.clone(), self.strategy, leaves && self.aux_tracked);
        // The recomputed pass draws the first pass's masks, and leaves the stream as it was.
        let before = leaves.then(|| crate::dropout::swap_stream(self.masks.clone()));
        let y = (self.forward)(&module, x.clone(), &aux);
        if let Some(before) = before {
            crate::dropout::swap_stream(before);
        }
        Run { y, x, aux, module }
    }
}

impl<IB: Backend, M, const D: usize, const A: usize> Backward<IB, 1> for BlockOp<M, D, A>
where
    M: Module + Clone + Debug + Send + Sync + 'static,
    DispatchTensor: DispatchKindConversion<IB>,
{
    type State = Block<IB, M, D, A>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<IB>(&ops.node);
        let [chain] = ops.parents;
        let mut block = ops.state;
        // The recomputed block in a graph of its own, whose backward starts from `dy`: the
        // gradient of `sum(y * dy)` with respect to `y` is `dy`, exactly.
        let kept = std::mem::take(&mut block.kept).0;
        let kept = Arc::try_unwrap(kept).unwrap_or_else(|shared| shared.to_vec());
        let (run, _) = in_frame(Frame::Replay(kept.into_iter()), || block.run(true));
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        let dy = autodiff_with(Tensor::<D>::from_primitive::<IB>(dy), block.strategy);
        let inner = (run.y * dy).sum().backward();
        {
            let mut stash = block.stash.0.lock().unwrap_or_else(|e| e.into_inner());
            if block.aux_tracked {
                stash.push(run.aux.grad(&inner).and_then(|g| g.try_into_primitive::<IB>().ok()));
            }
            let mut tracked = block.tracked.iter();
            run.module.for_each_param(|_, p| {
                if tracked.next() == Some(&true) {
                    stash.push(p.grad_primitive::<IB>(&inner));
                }
            });
        }
        let Some(node) = chain else { return };
        // The chain's node always gets a gradient (its ties consume one): zeros where the
        // input is a stand-in or the block did not use it.
        let dx = match (block.x_tracked, run.x.grad(&inner)) {
            (true, Some(dx)) => dx,
            (true, None) => Tensor::<D>::zeros(block.x.dims(), &block.x.device()).cast(block.x.dtype()),
            (false, _) => Tensor::<D>::zeros([1; D], &block.x.device()),
        };
        grads.register::<IB>(node.id, dx.try_into_primitive::<IB>().expect("a gradient on the block's backend"));
    }
}

struct BlockOp<M, const D: usize, const A: usize>(PhantomData<fn() -> M>);

impl<M, const D: usize, const A: usize> Debug for BlockOp<M, D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointedBlock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::ModuleExt;
    use crate::ops::attention::attention;
    use crate::param::{f32_value, value_as};
    use crate::{Init, Linear, cpu, cpu_autodiff};
    use burn::tensor::DType;

    /// `x + attention(p, p, p)` with `p = proj(x)`, the attention in `dtype`: 96 keys of 16
    /// channels, dear enough to keep.
    fn block(proj: &Linear, x: Tensor<3>, dtype: &Tensor<1>) -> Tensor<3> {
        let p = proj.forward(x.clone());
        let p = if dtype.dtype() == DType::BF16 { value_as(&p, DType::BF16) } else { p };
        x + f32_value(&attention(p.clone(), p.clone(), p, 2, 0.35))
    }

    /// Gradients of a chain of three blocks (the input's, then each weight's and bias's), and
    /// the blocks run again and results reused meanwhile.
    fn chain(checkpointed: bool, dtype: DType) -> (Vec<Vec<f32>>, usize, usize) {
        let dev = cpu_autodiff();
        let mut init = Init::new(3);
        let mut blocks: Vec<Linear> = (0..3).map(|_| Linear::new(16, 16, true, &mut init, &dev)).collect();
        blocks.train_only(|_| true);
        let x = Tensor::<3>::from_data(init.normal::<3>([1, 96, 16], 1.0, &cpu()).to_data(), &dev).require_grad();
        let marker = Tensor::<1>::zeros([1], &dev).cast(dtype);
        let (recomputed, reused) = (blocks_recomputed(), results_reused());
        let mut h = x.clone();
        for b in &blocks {
            h = checkpointed_if(checkpointed, b, h, &marker, block);
        }
        let grads = (h.clone() * h).sum().backward();
        let values = |t: Tensor<1>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        let mut out = vec![values(x.grad(&grads).unwrap().reshape([96 * 16]))];
        blocks.for_each_param(|_, p| out.push(values(p.grad(&grads).unwrap())));
        (out, blocks_recomputed() - recomputed, results_reused() - reused)
    }

    /// The attention's output and log-sum-exp from the first pass serve the recomputed one:
    /// the same gradient bits as the blocks run once, f32 and bf16 (whose first pass takes
    /// another path through `attention` than the tracked one).
    #[test]
    fn kept_attention_results_give_the_same_gradients() {
        for dtype in [DType::F32, DType::BF16] {
            let (plain, plain_runs, plain_reused) = chain(false, dtype);
            let (checkpointed, runs, reused) = chain(true, dtype);
            assert_eq!((plain_runs, plain_reused), (0, 0), "{dtype:?}");
            assert_eq!((runs, reused), (3, 3), "{dtype:?}: blocks run again, results reused");
            assert_eq!(plain.len(), checkpointed.len());
            for (i, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
                assert!(a == b, "{dtype:?}: gradient {i} differs");
            }
        }
    }

    /// A recomputed pass that asks for another result than the first pass kept computes it,
    /// and trusts nothing kept after it.
    #[test]
    fn a_panicking_pass_leaves_no_frame() {
        let kept: Vec<KeptResult> = vec![Arc::new((1u32, 10i32))];
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| in_frame(Frame::Replay(kept.into_iter()), || panic!("inside"))));
        assert!(caught.is_err());
        assert_eq!(kept_value(1, -1), -1, "a dead pass's result replayed");
    }

    #[test]
    fn a_result_asked_out_of_turn_is_computed() {
        let kept: Vec<KeptResult> = vec![Arc::new((1u32, 10i32)), Arc::new((2u32, 20i32))];
        let (got, _) = in_frame(Frame::Replay(kept.into_iter()), || [kept_value(2, -2), kept_value(2, -3)]);
        assert_eq!(got, [-2, -3]);
        let kept: Vec<KeptResult> = vec![Arc::new((1u32, 10i32)), Arc::new((2u32, 20i32))];
        let (got, _) = in_frame(Frame::Replay(kept.into_iter()), || [kept_value(1, -1), kept_value(2, -2)]);
        assert_eq!(got, [10, 20]);
        let (got, frame) = in_frame(Frame::Keep(Vec::new()), || kept_value(5, 50));
        let Frame::Keep(items) = frame else { panic!("the frame changed kind") };
        assert_eq!((got, items.len()), (50, 1));
        assert_eq!(kept_value(6, 60), 60, "outside a block");
    }

    fn kept_value(key: u32, value: i32) -> i32 {
        kept(key, || value)
    }
}
