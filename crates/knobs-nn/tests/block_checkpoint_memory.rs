//! Block checkpointing (`knobs_nn::checkpoint`) keeps each block's input and nothing of what
//! the block computes, and gives the gradients of the blocks run once. Alone in its binary, as
//! it counts every allocation.
mod common;

use common::counting::live;
use knobs_nn::burn::tensor::Tensor;
use knobs_nn::checkpoint::{blocks_recomputed, checkpointed_if};
use knobs_nn::ops::silu;
use knobs_nn::{Init, Linear, ModuleExt, cpu, cpu_autodiff, impl_module};

const WIDTH: usize = 512;
const ROWS: usize = 1024;
const BLOCKS: usize = 6;

/// A residual feed-forward block, `x + down(silu(up(x)) * scale)`.
#[derive(Debug, Clone)]
struct Block {
    up: Linear,
    down: Linear,
}
impl_module!(Block { "up" => up, "down" => down });

fn forward(b: &Block, x: Tensor<2>, scale: &Tensor<1>) -> Tensor<2> {
    x.clone() + b.down.forward(silu(b.up.forward(x)) * scale.clone().unsqueeze::<2>())
}

/// The bytes the forward pass of the chain leaves held (beyond its input, output and
/// weights), the number of blocks run again, and every gradient: the input's, the scale's
/// and each trainable weight's.
fn chain(checkpointed: bool, trainable: &str) -> (usize, usize, Vec<Vec<f32>>) {
    let dev = cpu_autodiff();
    let mut init = Init::new(7);
    let mut blocks: Vec<Block> = (0..BLOCKS).map(|_| Block { up: Linear::new(WIDTH, WIDTH, true, &mut init, &dev), down: Linear::new(WIDTH, WIDTH, true, &mut init, &dev) }).collect();
    blocks.train_only(|path| path.contains(trainable));
    let x = Tensor::<2>::from_data(init.normal::<2>([ROWS, WIDTH], 1.0, &cpu()).to_data(), &dev).require_grad();
    let scale = Tensor::<1>::from_data(init.normal::<1>([WIDTH], 1.0, &cpu()).to_data(), &dev).require_grad();
    let recomputed = blocks_recomputed();
    let before = live();
    let mut h = x.clone();
    for b in &blocks {
        h = checkpointed_if(checkpointed, b, h, &scale, forward);
    }
    let held = live() - before - ROWS * WIDTH * 4;
    let grads = (h.clone() * h).sum().backward();
    let values = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let mut out = vec![values(x.grad(&grads).unwrap().reshape([ROWS * WIDTH])), values(scale.grad(&grads).unwrap())];
    blocks.for_each_param(|_, p| {
        if p.is_trainable() {
            out.push(values(p.grad(&grads).unwrap()));
        }
    });
    (held, blocks_recomputed() - recomputed, out)
}

#[test]
fn a_checkpointed_block_keeps_only_its_input_and_gives_the_same_gradients() {
    let activation = ROWS * WIDTH * 4;
    for trainable in ["weight", "up.bias"] {
        let (plain_held, plain_runs, plain) = chain(false, trainable);
        let (held, runs, checkpointed) = chain(true, trainable);
        assert_eq!((plain_runs, runs), (0, BLOCKS), "{trainable}");
        assert_eq!(plain.len(), checkpointed.len());
        for (i, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
            assert!(a == b, "{trainable}: gradient {i} differs");
        }
        // Run once, each block keeps at least two activations for the backward pass (SiLU's
        // input and output; with trainable weights also the block's input); checkpointed, its
        // input alone.
        assert!(plain_held >= 2 * BLOCKS * activation, "{trainable}: {} MiB", plain_held >> 20);
        assert!(held < (BLOCKS + 1) * activation, "{trainable}: checkpointed held {} MiB for {BLOCKS} blocks of {} MiB", held >> 20, activation >> 20);
    }
}
