//! diffusers `UNet2DConditionModel`: predicts noise (or v) from a noisy latent, its timestep
//! and the text encoder's hidden states.
use std::path::Path;

use knobs_nn::burn::tensor::DType;
use knobs_nn::ops::{autocast, silu};
use knobs_nn::io::{LoadOptions, SafetensorsReader, load_file, load_reader};
use knobs_nn::param::{f32_value, value_as};
use knobs_nn::{Conv2d, Device, Error, GroupNorm, Init, Result, Tensor, impl_module};

use super::config::UNetConfig;
use super::down::{BlockCommon, DownBlock};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::mid::UNetMidBlock2DCrossAttn;
use super::up::UpBlock;
use super::weights::{DeferredLoad, WeightsState};

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `text_time` conditioning: sinusoidal features of each time id, and the MLP that
    /// maps them with the pooled text embedding onto the time embedding.
    pub add_time_proj: Option<Timesteps>,
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// What the forward pass computes in: f32, or bf16 / f16 for mixed precision (inputs
    /// cast on entry, weights cast where used, norms and softmax in f32, output in f32).
    /// Without autodiff on the CPU, bf16 keeps f32 activations and rounds the products only
    /// (`autocast::plan`).
    pub compute_dtype: DType,
    /// In memory, deferred ([`Self::defer_weights`]) or released ([`Self::release`]).
    weights: WeightsState,
}
impl_module!(UNet2DConditionModel {
    "conv_in" => conv_in, "time_embedding" => time_embedding, "add_embedding" => add_embedding, "down_blocks" => down_blocks,
    "mid_block" => mid_block, "up_blocks" => up_blocks, "conv_norm_out" => conv_norm_out, "conv_out" => conv_out,
});

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`): the pooled text embedding
/// `[B, pooled]` and the time ids `[B, n]` (original height and width, crop top and left,
/// target height and width).
#[derive(Debug, Clone)]
pub struct AddedCond {
    pub text_embeds: Tensor<2>,
    pub time_ids: Tensor<2>,
}

/// Block outputs of one forward pass, named as diffusers' modules (the first element of a
/// block's tuple output: for a down block, the features after its downsampler).
#[derive(Debug, Clone)]
pub struct UNetIntermediates {
    pub time_proj: Tensor<2>,
    pub time_embedding: Tensor<2>,
    pub conv_in: Tensor<4>,
    pub down_blocks: Vec<Tensor<4>>,
    pub mid_block: Option<Tensor<4>>,
    pub up_blocks: Vec<Tensor<4>>,
    pub conv_norm_out: Tensor<4>,
}

impl UNetIntermediates {
    /// `(name, tensor)` pairs with diffusers' module names, tensors flattened to `[B, rest]`.
    pub fn named(&self) -> Vec<(String, Tensor<2>)> {
        let flat4 = |t: &Tensor<4>| -> Tensor<2> {
            let [b, c, h, w] = t.dims();
            t.clone().reshape([b, c * h * w])
        };
        let mut out = vec![("time_proj".to_string(), self.time_proj.clone()), ("time_embedding".to_string(), self.time_embedding.clone())];
        out.push(("conv_in".into(), flat4(&self.conv_in)));
        out.extend(self.down_blocks.iter().enumerate().map(|(i, t)| (format!("down_blocks.{i}"), flat4(t))));
        out.extend(self.mid_block.iter().map(|t| ("mid_block".to_string(), flat4(t))));
        out.extend(self.up_blocks.iter().enumerate().map(|(i, t)| (format!("up_blocks.{i}"), flat4(t))));
        out.push(("conv_norm_out".into(), flat4(&self.conv_norm_out)));
        out
    }
}

impl UNet2DConditionModel {
    /// A randomly initialised model (PyTorch's default initialisation).
    pub fn new(config: UNetConfig, init: &mut Init, device: &Device) -> Result<Self> {
        config.validate()?;
        let down = config.down_plans()?;
        let up = config.up_plans()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let common = BlockCommon { temb, groups: config.groups(), eps: config.norm_eps, use_linear_projection: config.use_linear_projection };
        let (k_in, k_out) = (config.conv_in_kernel, config.conv_out_kernel);

        let conv_in = Conv2d::new(config.in_channels, ch[0], k_in, 1, k_in / 2, true, init, device);
        let time_proj = Timesteps::new(ch[0], config.flip_sin_to_cos, config.freq_shift);
        let time_embedding = TimestepEmbedding::new(ch[0], temb, init, device);
        let (add_time_proj, add_embedding) = match (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
            (Some(dim), Some(input)) if config.addition_embed_type.is_some() => {
                (Some(Timesteps::new(dim, config.flip_sin_to_cos, config.freq_shift)), Some(TimestepEmbedding::new(input, temb, init, device)))
            }
            _ => (None, None),
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, plan) in down.iter().enumerate() {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let downsample = (i + 1 < n).then_some(config.downsample_padding);
            down_blocks.push(DownBlock::new(c_in, plan, downsample, common, init, device));
        }
        let mid_block = config
            .mid_block_type
            .is_some()
            .then(|| UNetMidBlock2DCrossAttn::new(&down[n - 1], config.mid_block_scale_factor, common, init, device));
        let mut up_blocks = Vec::with_capacity(n);
        for (i, plan) in up.iter().enumerate() {
            // Reversed channel list: the block below's width comes in, the next level up's skip.
            let prev = if i == 0 { ch[n - 1] } else { ch[n - i] };
            let skip_in = ch[n - 1 - (i + 1).min(n - 1)];
            up_blocks.push(UpBlock::new(prev, skip_in, plan, i + 1 < n, common, init, device));
        }
        let conv_norm_out = GroupNorm::new(config.groups(), ch[0], config.norm_eps, device);
        let conv_out = Conv2d::new(ch[0], config.out_channels, k_out, 1, k_out / 2, true, init, device);
        Ok(UNet2DConditionModel { config, conv_in, time_proj, time_embedding, add_time_proj, add_embedding, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out, compute_dtype: DType::F32, weights: WeightsState::Loaded })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (every tensor
    /// must match a parameter and vice versa).
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, DType::F32)
    }

    /// [`Self::from_dir`] with the weight matrices and kernels stored in `weights` as they
    /// load (see [`knobs_nn::ParamMut::assign_as`]).
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &Device, weights: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let mut model = Self::placeholders_from_dir(dir, device)?;
        load_file(&mut model, dir.join("diffusion_pytorch_model.safetensors"), LoadOptions::frozen_as(weights))?;
        Ok(model)
    }

    /// The model `dir/config.json` describes, its weights placeholders for a load.
    fn placeholders_from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config = UNetConfig::from_file(dir.join("config.json"))?;
        Self::new(config, &mut Init::for_loading(), device).map_err(|e| e.in_file(dir.join("config.json")))
    }

    /// The model of [`Self::from_dir_as`] with placeholders for weights: the file is opened and
    /// its header checked now, and its tensors are read by [`Self::load_deferred_weights`].
    pub fn deferred_from_dir_as(dir: impl AsRef<Path>, device: &Device, weights: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let mut model = Self::placeholders_from_dir(dir, device)?;
        let file = SafetensorsReader::open(dir.join("diffusion_pytorch_model.safetensors"))?;
        model.defer_weights(Box::new(move |unet| load_reader(unet, &file, LoadOptions::frozen_as(weights)).map(drop)));
        Ok(model)
    }

    /// Leaves the weights as they are (placeholders, for a model built with
    /// `Init::for_loading`) until [`Self::load_deferred_weights`] runs `load`. Adapters can
    /// be attached meanwhile (`load` sees the model without them); running, merging into or
    /// saving the model is an error.
    pub fn defer_weights(&mut self, load: DeferredLoad) {
        self.weights = WeightsState::Deferred(load);
    }

    pub fn is_deferred(&self) -> bool {
        matches!(self.weights, WeightsState::Deferred(_))
    }

    /// Reads the deferred weights; nothing when they are loaded already. A failed read leaves
    /// the model unusable: its error is returned, and any later use is an error naming `unet`
    /// and that failure.
    pub fn load_deferred_weights(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.weights, WeightsState::Loaded) {
            WeightsState::Deferred(load) => {
                // Adapters attached meanwhile are not in the file.
                let read = knobs_nn::ModuleExt::without_adapters(self, load);
                if let Err(e) = &read {
                    self.weights = WeightsState::ReadFailed(e.to_string());
                }
                read
            }
            other => {
                self.weights = other;
                Ok(())
            }
        }
    }

    /// diffusers' `enable_gradient_checkpointing` (and its disabling): each resnet and each
    /// transformer block keeps only its inputs for the backward pass, which runs it again, so
    /// a training step holds one such block's activations at a time, for one more forward
    /// pass of the blocks (`knobs_nn::checkpoint`).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        let transformers = |attentions: &mut Vec<super::transformer::Transformer2DModel>| attentions.iter_mut().for_each(|a| a.gradient_checkpointing = on);
        for block in &mut self.down_blocks {
            block.gradient_checkpointing = on;
            transformers(&mut block.attentions);
        }
        if let Some(block) = &mut self.mid_block {
            block.gradient_checkpointing = on;
            transformers(&mut block.attentions);
        }
        for block in &mut self.up_blocks {
            block.gradient_checkpointing = on;
            transformers(&mut block.attentions);
        }
    }

    /// An error naming `unet` when the weights are deferred or released.
    pub fn check_weights_in_memory(&self) -> Result<()> {
        self.weights.check_in_memory()
    }

    /// `sample` `[B, in, H, W]`, `timesteps` `[B]` (or `[1]`, shared), `encoder_hidden_states`
    /// `[B, M, cross_attention_dim]` -> `[B, out, H, W]`.
    pub fn forward(&self, sample: Tensor<4>, timesteps: Tensor<1>, encoder_hidden_states: Tensor<3>) -> Tensor<4> {
        self.run(sample, timesteps, encoder_hidden_states, None, None)
    }

    /// `forward` with the added conditioning a `text_time` UNet (SDXL) needs; `None` is
    /// `forward`.
    pub fn forward_with_cond(&self, sample: Tensor<4>, timesteps: Tensor<1>, encoder_hidden_states: Tensor<3>, added: Option<&AddedCond>) -> Tensor<4> {
        self.run(sample, timesteps, encoder_hidden_states, added, None)
    }

    /// The `text_time` embedding added to the time embedding: `add_embedding(cat(text_embeds,
    /// add_time_proj(time_ids) per row))`, `[B, time_embed_dim]`.
    pub fn added_embedding(&self, added: &AddedCond) -> Option<Tensor<2>> {
        let (proj, mlp) = (self.add_time_proj.as_ref()?, self.add_embedding.as_ref()?);
        let [b, n] = added.time_ids.dims();
        let features = proj.forward(added.time_ids.clone().reshape([b * n])).reshape([b, n * proj.dim]);
        // In the pooled embedding's dtype (f32, or the compute dtype under mixed precision).
        let features = value_as(&features, added.text_embeds.dtype());
        Some(mlp.forward(Tensor::cat(vec![added.text_embeds.clone(), features], 1)))
    }

    /// `forward`, also returning every block's output.
    pub fn forward_with_intermediates(&self, sample: Tensor<4>, timesteps: Tensor<1>, encoder_hidden_states: Tensor<3>) -> (Tensor<4>, UNetIntermediates) {
        let mut cap = None;
        let out = self.run(sample, timesteps, encoder_hidden_states, None, Some(&mut cap));
        (out, cap.expect("run fills the capture"))
    }

    /// Frees every weight (each becomes an empty tensor), keeping the config: what a caller
    /// that generates once keeps of the UNet when the latents are denoised. Running it
    /// afterwards is an error ([`Self::check_inputs`]); the model is not usable again.
    pub fn release(&mut self) {
        knobs_nn::ModuleExt::for_each_param_mut(self, |_, mut p| p.release());
        self.weights = WeightsState::Released;
    }

    pub fn is_released(&self) -> bool {
        matches!(self.weights, WeightsState::Released)
    }

    /// Checks shapes up front so that a wrong input is an error, not a panic deep inside;
    /// `added` must be given exactly when the UNet has `addition_embed_type: "text_time"`.
    pub fn check_inputs(&self, sample: &Tensor<4>, timesteps: &Tensor<1>, encoder_hidden_states: &Tensor<3>, added: Option<&AddedCond>) -> Result<()> {
        let [b, c, _, _] = sample.dims();
        let bad = |key: &str, msg: String| Err(Error::param(key, msg));
        self.check_weights_in_memory()?;
        if c != self.config.in_channels {
            return bad("sample", format!("has {c} channels, the UNet takes {}", self.config.in_channels));
        }
        let t = timesteps.dims()[0];
        if t != b && t != 1 {
            return bad("timesteps", format!("has {t} entries for a batch of {b}"));
        }
        let [eb, _, ed] = encoder_hidden_states.dims();
        if eb != b {
            return bad("encoder_hidden_states", format!("batch {eb} differs from the sample's {b}"));
        }
        match (&self.add_time_proj, &self.add_embedding, added) {
            (Some(proj), Some(mlp), Some(a)) => {
                let ([tb, n], [pb, pd]) = (a.time_ids.dims(), a.text_embeds.dims());
                if tb != b || pb != b {
                    return bad("added_cond", format!("time_ids batch {tb} and text_embeds batch {pb} must equal the sample's {b}"));
                }
                if pd + n * proj.dim != mlp.linear_1.d_in() {
                    return bad("added_cond", format!("text_embeds width {pd} + {n} time ids x {} = {}, the UNet's add_embedding takes {} (projection_class_embeddings_input_dim)", proj.dim, pd + n * proj.dim, mlp.linear_1.d_in()));
                }
            }
            (Some(_), _, None) => {
                return bad("added_cond", "this UNet (addition_embed_type \"text_time\") needs the pooled text embedding and time ids: use forward_with_cond".into());
            }
            (None, _, Some(_)) => return bad("added_cond", "this UNet has no added conditioning (addition_embed_type) to take text_embeds / time_ids".into()),
            _ => {}
        }
        for p in self.config.down_plans()? {
            if p.cross_attn && p.cross_attention_dim != ed {
                return bad("encoder_hidden_states", format!("width {ed} differs from cross_attention_dim {}", p.cross_attention_dim));
            }
        }
        Ok(())
    }

    fn run(&self, sample: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>, added: Option<&AddedCond>, cap: Option<&mut Option<UNetIntermediates>>) -> Tensor<4> {
        let (dtype, products) = autocast::plan(self.compute_dtype, &sample);
        autocast::with_products(products, || self.run_in(dtype, sample, timesteps, context, added, cap))
    }

    fn run_in(&self, dtype: DType, sample: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>, added: Option<&AddedCond>, cap: Option<&mut Option<UNetIntermediates>>) -> Tensor<4> {
        let b = sample.dims()[0];
        let timesteps = if timesteps.dims()[0] == b { timesteps } else { timesteps.expand([b]) };
        let sample = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample };
        let (sample, context) = (value_as(&sample, dtype), value_as(&context, dtype));
        let t_proj = value_as(&self.time_proj.forward(timesteps), dtype);
        let temb = self.time_embedding.forward(t_proj.clone());
        let added = added.map(|a| AddedCond { text_embeds: value_as(&a.text_embeds, dtype), time_ids: a.time_ids.clone() });
        let temb = match added.as_ref().and_then(|a| self.added_embedding(a)) {
            Some(aug) => temb + aug,
            None => temb,
        };
        let temb_act = silu(temb.clone());

        let mut x = self.conv_in.forward(sample);
        let keep = cap.is_some();
        let conv_in = keep.then(|| x.clone());
        let mut skips = vec![x.clone()];
        let mut downs = Vec::new();
        for block in &self.down_blocks {
            x = block.forward(x, &temb_act, &context, &mut skips);
            if keep {
                downs.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &temb_act, &context);
        }
        let mid = (keep && self.mid_block.is_some()).then(|| x.clone());
        let mut ups = Vec::new();
        for block in &self.up_blocks {
            x = block.forward(x, &temb_act, &context, &mut skips);
            if keep {
                ups.push(x.clone());
            }
        }
        let normed = self.conv_norm_out.forward(x);
        if let Some(slot) = cap {
            *slot = Some(UNetIntermediates {
                time_proj: t_proj,
                time_embedding: temb,
                conv_in: conv_in.expect("kept"),
                down_blocks: downs,
                mid_block: mid,
                up_blocks: ups,
                conv_norm_out: normed.clone(),
            });
        }
        f32_value(&self.conv_out.forward(silu(normed)))
    }
}
