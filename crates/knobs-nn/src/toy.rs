//! A small classifier that is not a UNet, built from the same layers: token embedding + conv
//! image features -> MLP block -> head. Demos, tests and benchmarks use it to show that
//! adapters are model-agnostic.

use crate::burn::tensor::activation::{gelu, silu};
use crate::burn::tensor::{Int, TensorData};
use crate::{Conv2d, Device, Embedding, Init, LayerNorm, Linear, Tensor};
use crate::impl_module;

pub const VOCAB: usize = 12;
pub const DIM: usize = 8;
pub const HIDDEN: usize = 16;
pub const CLASSES: usize = 3;

pub struct Block {
    pub fc1: Linear,
    pub fc2: Linear,
}
impl_module!(Block { "fc1" => fc1, "fc2" => fc2 });

pub struct TinyNet {
    pub embed: Embedding,
    pub conv: Conv2d,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
}
impl_module!(TinyNet { "embed" => embed, "conv" => conv, "blocks" => blocks, "norm" => norm, "head" => head });

impl TinyNet {
    pub fn new(seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed);
        TinyNet {
            embed: Embedding::new(VOCAB, DIM, &mut init, device),
            conv: Conv2d::new(3, DIM, 3, 1, 1, true, &mut init, device),
            blocks: vec![Block { fc1: Linear::new(DIM, HIDDEN, true, &mut init, device), fc2: Linear::new(HIDDEN, DIM, true, &mut init, device) }],
            norm: LayerNorm::new(DIM, 1e-5, device),
            head: Linear::new(DIM, CLASSES, true, &mut init, device),
        }
    }

    /// Logits `[batch, classes]` for token ids `[batch, seq]` and images `[batch, 3, h, w]`.
    pub fn forward(&self, ids: Tensor<2, Int>, img: Tensor<4>) -> Tensor<2> {
        let tokens: Tensor<2> = self.embed.forward(ids).mean_dim(1).squeeze_dim(1);
        let pixels: Tensor<2> = silu(self.conv.forward(img)).mean_dim(3).mean_dim(2).squeeze_dim::<3>(3).squeeze_dim(2);
        let mut h = tokens + pixels;
        for b in &self.blocks {
            h = h.clone() + b.fc2.forward(gelu(b.fc1.forward(h)));
        }
        self.head.forward(self.norm.forward(h))
    }
}

/// A fixed batch: ids, images and integer labels.
pub struct Batch {
    pub ids: Tensor<2, Int>,
    pub img: Tensor<4>,
    pub labels: Vec<usize>,
}

/// A deterministic task: the label is decided by the first token and the image brightness.
pub fn batch(n: usize, seed: u64, device: &Device) -> Batch {
    let mut init = Init::new(seed);
    let seq = 4;
    let ids: Vec<i64> = (0..n * seq).map(|_| (init.next_u64() % VOCAB as u64) as i64).collect();
    let img = init.normal([n, 3, 4, 4], 1.0, device);
    let bright: Vec<f32> = img.clone().mean_dim(3).mean_dim(2).mean_dim(1).reshape([n]).into_data().try_into_vec().unwrap();
    let labels = (0..n).map(|i| ((ids[i * seq] as usize % 2) + usize::from(bright[i] > 0.0)) % CLASSES).collect();
    Batch { ids: Tensor::from_data(TensorData::new(ids, [n, seq]), device), img, labels }
}

/// Mean cross-entropy of `logits` against `labels`.
pub fn cross_entropy(logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
    let [n, c] = logits.dims();
    let mut onehot = vec![0f32; n * c];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * c + l] = 1.0;
    }
    let target = Tensor::<2>::from_data(TensorData::new(onehot, [n, c]), &logits.device());
    let logp = crate::burn::tensor::activation::log_softmax(logits, 1);
    (logp * target).sum().neg() / n as f64
}

pub fn accuracy(logits: Tensor<2>, labels: &[usize]) -> f64 {
    let pred: Vec<i64> = logits.argmax(1).into_data().convert::<i64>().try_into_vec().unwrap();
    pred.iter().zip(labels).filter(|(p, l)| **p as usize == **l).count() as f64 / labels.len() as f64
}

/// Adds random noise to every adapter parameter (zero-initialised LoRA B, IA3 vectors, LoHa /
/// LoKr factors, OFT generators) so that every one receives a gradient, as the diffusers
/// golden files do.
pub fn randomize_adapters(model: &mut impl crate::Module, std: f64, seed: u64) {
    let mut init = Init::new(seed);
    use crate::ModuleExt;
    model.for_each_param_mut(|path, mut p| {
        if [".lora_", ".ia3_l.", ".hada_", ".lokr_", ".oft_R."].iter().any(|m| path.contains(m)) {
            let dims = p.as_ref().dims();
            let n: usize = dims.iter().product();
            let base: Vec<f32> = p.as_ref().flat().into_data().try_into_vec().unwrap();
            let noise = init.normal_vec(n);
            let v: Vec<f32> = base.iter().zip(noise).map(|(b, z)| b + z * std as f32).collect();
            p.replace_flat(Tensor::from_data(TensorData::new(v, [n]), &p.device()));
        }
    });
}
