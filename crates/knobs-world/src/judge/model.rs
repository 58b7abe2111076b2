//! The judge's network: a small CNN on 32x32 RGB in [-1, 1]. Conv + GroupNorm + SiLU stages
//! (32x32 -> 16x16 -> 8x8 -> 4x4, then one more at 4x4 to widen the receptive field over a
//! large shape). The last map is flattened (position and size need the spatial layout: no
//! global pooling alone) and, for translation-invariant evidence of the shape, also averaged
//! and max-pooled over space; a linear layer maps all of it to the feature, and one linear
//! head per attribute reads the feature. Two auxiliary heads (the pattern kind and whether
//! there is a centre mark) make the feature carry what tells patterned concepts apart, which
//! the embedding needs.
use knobs_nn::ops::silu;
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Linear, Tensor, impl_module};
use serde::{Deserialize, Serialize};

use crate::concept::Pattern;
use crate::scene::{Background, Colour, Position, Shape, Size};

/// The heads in output order: name and number of classes. The first five are the world's
/// attributes; `pattern` (none + the five kinds) and `mark` (none / some) are auxiliary.
pub const HEADS: [(&str, usize); 7] = [
    ("shape", Shape::ALL.len()),
    ("colour", Colour::ALL.len()),
    ("background", Background::ALL.len()),
    ("size", Size::ALL.len()),
    ("position", Position::ALL.len()),
    ("pattern", 1 + Pattern::KINDS.len()),
    ("mark", 2),
];
/// Index of each head in [`HEADS`].
pub const SHAPE: usize = 0;
pub const COLOUR: usize = 1;
pub const BACKGROUND: usize = 2;
pub const SIZE: usize = 3;
pub const POSITION: usize = 4;
pub const PATTERN: usize = 5;
pub const MARK: usize = 6;

/// The architecture, as written to `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Input side in pixels.
    pub image_size: usize,
    /// Input channels: 3 (RGB) or 4 (RGB + the foreground channel of `data::network_input`).
    pub in_channels: usize,
    /// Output channels of each stage (the first is the stem).
    pub channels: Vec<usize>,
    /// Stride of each stage.
    pub strides: Vec<usize>,
    pub groups: usize,
    /// Width of the feature the heads read.
    pub feature_dim: usize,
    /// Which conv stage's channel-mean the embedding uses as its texture part (0 = stem).
    pub texture_stage: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            image_size: 32,
            in_channels: 4,
            channels: vec![16, 48, 96, 64, 64],
            strides: vec![1, 2, 2, 2, 1],
            groups: 8,
            feature_dim: 128,
            texture_stage: 1,
        }
    }
}

impl NetConfig {
    /// Side of the last stage's map.
    pub fn final_side(&self) -> usize {
        self.image_size / self.strides.iter().product::<usize>()
    }
    fn last_channels(&self) -> usize {
        self.channels.last().copied().unwrap_or(0)
    }
    /// Width of what the feature layer reads: the flattened last map, its spatial mean and max.
    pub fn flat_dim(&self) -> usize {
        self.last_channels() * (self.final_side().pow(2) + 2)
    }
}

/// conv -> GroupNorm -> SiLU.
pub struct Stage {
    pub conv: Conv2d,
    pub norm: GroupNorm,
}
impl_module!(Stage { "conv" => conv, "norm" => norm });

impl Stage {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        silu(self.norm.forward(self.conv.forward(x)))
    }
}

pub struct JudgeNet {
    pub config: NetConfig,
    pub stages: Vec<Stage>,
    pub fc: Linear,
    pub heads: Vec<Linear>,
}
impl_module!(JudgeNet { "stages" => stages, "fc" => fc, "heads" => heads });

/// What one forward pass gives.
pub struct Output {
    /// Logits per head, `[N, classes]`, in [`HEADS`] order.
    pub logits: Vec<Tensor<2>>,
    /// The feature before its activation, `[N, feature_dim]`.
    pub feature: Tensor<2>,
    /// Channel means of the texture stage, `[N, C]`.
    pub texture: Tensor<2>,
}

impl JudgeNet {
    pub fn new(config: NetConfig, seed: u64, device: &Device) -> Self {
        assert!(config.channels.len() >= 2, "the judge needs a stem and at least one stage");
        assert_eq!(config.channels.len(), config.strides.len(), "one stride per stage");
        assert!(config.texture_stage < config.channels.len(), "texture_stage is past the last stage");
        let mut init = Init::new(seed);
        let mut c_in = config.in_channels;
        let stages = config
            .channels
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let stride = config.strides[i];
                let stage = Stage {
                    conv: Conv2d::new(c_in, c, 3, stride, 1, true, &mut init, device),
                    norm: GroupNorm::new(config.groups.min(c), c, 1e-5, device),
                };
                c_in = c;
                stage
            })
            .collect();
        let fc = Linear::new(config.flat_dim(), config.feature_dim, true, &mut init, device);
        let heads = HEADS.iter().map(|&(_, n)| Linear::new(config.feature_dim, n, true, &mut init, device)).collect();
        JudgeNet { config, stages, fc, heads }
    }

    /// `x`: `[N, in_channels, S, S]` (see `data::network_input`) with S the configured size.
    pub fn forward(&self, x: Tensor<4>) -> Output {
        let n = x.dims()[0];
        let mut h = x;
        let mut texture = None;
        for (i, stage) in self.stages.iter().enumerate() {
            h = stage.forward(h);
            if i == self.config.texture_stage {
                let [_, c, _, _] = h.dims();
                texture = Some(h.clone().mean_dim(3).mean_dim(2).reshape([n, c]));
            }
        }
        let [_, c, hh, ww] = h.dims();
        let spatial: Tensor<3> = h.reshape([n, c, hh * ww]);
        let mean: Tensor<2> = spatial.clone().mean_dim(2).reshape([n, c]);
        let max: Tensor<2> = spatial.clone().max_dim(2).reshape([n, c]);
        let flat = Tensor::cat(vec![spatial.reshape([n, c * hh * ww]), mean, max], 1);
        let feature = self.fc.forward(flat);
        let act = silu(feature.clone());
        let logits = self.heads.iter().map(|head| head.forward(act.clone())).collect();
        Output { logits, feature, texture: texture.expect("texture stage exists") }
    }
}
