//! transformers' `CLIPTextModel`: token + position embeddings, the causal pre-LN encoder, a
//! final LayerNorm and the pooled output at the end-of-text token.
use std::path::Path;

use knobs_nn::burn::tensor::{DType, Int, TensorData};
use knobs_nn::io::{LoadOptions, StateDict, load_state_dict, read_safetensors};
use knobs_nn::param::like;
use knobs_nn::{Device, Embedding, Error, Init, LayerNorm, Linear, ModuleExt, Result, Tensor, impl_module};

use super::config::ClipTextConfig;
use super::encoder::ClipEncoder;

/// The prefix of every parameter path, as in SD-1.x/2.x checkpoints and transformers < 5.6.
pub const PREFIX: &str = "text_model.";

#[derive(Debug)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}
impl_module!(ClipTextEmbeddings { "token_embedding" => token_embedding, "position_embedding" => position_embedding });

impl ClipTextEmbeddings {
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, s] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device).reshape([1, s]);
        self.token_embedding.forward(ids) + self.position_embedding.forward(positions)
    }
}

/// transformers' `CLIPTextTransformer` (the `text_model` child).
#[derive(Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}
impl_module!(ClipTextTransformer {
    "embeddings" => embeddings,
    "encoder" => encoder,
    "final_layer_norm" => final_layer_norm,
});

/// What `CLIPTextModel(..., output_hidden_states=True)` returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `[B, S, D]`, after the final LayerNorm: the UNet's `encoder_hidden_states`.
    pub last_hidden_state: Tensor<3>,
    /// `[B, D]`: `last_hidden_state` at the end-of-text position.
    pub pooled: Tensor<2>,
    /// The embeddings output, then each layer's output (before the final LayerNorm).
    pub hidden_states: Vec<Tensor<3>>,
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias): the pooled output mapped to
    /// `text_embeds`, SDXL's pooled prompt embedding.
    pub text_projection: Option<Linear>,
    pub config: ClipTextConfig,
    /// Set by [`Self::release`]: the weights are gone and the model encodes nothing.
    released: bool,
}
impl_module!(ClipTextModel { "text_model" => text_model, "text_projection" => text_projection });

impl ClipTextModel {
    /// A randomly initialised model; `config` must be valid (see [`ClipTextConfig::validate`]).
    pub fn new(config: ClipTextConfig, init: &mut Init, device: &Device) -> Result<Self> {
        config.validate()?;
        let act = config.activation()?;
        let d = config.hidden_size;
        let text_model = ClipTextTransformer {
            embeddings: ClipTextEmbeddings {
                token_embedding: Embedding::new(config.vocab_size, d, init, device),
                position_embedding: Embedding::new(config.max_position_embeddings, d, init, device),
            },
            encoder: ClipEncoder::new(&config, act, init, device),
            final_layer_norm: LayerNorm::new(d, config.layer_norm_eps, device),
        };
        let text_projection = config.with_projection().map(|p| Linear::new(d, p, false, init, device));
        Ok(ClipTextModel { text_model, text_projection, config, released: false })
    }

    /// Loads a diffusers `text_encoder/` folder: `config.json` and `model.safetensors`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, DType::F32)
    }

    /// [`Self::from_dir`] with the weight matrices stored in `weights` as they load (see
    /// [`knobs_nn::ParamMut::assign_as`]).
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &Device, weights: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(dir.join("config.json"))?;
        let mut model = Self::new(config, &mut Init::for_loading(), device)?;
        let sd = normalize_keys(read_safetensors(dir.join("model.safetensors"))?);
        load_state_dict(&mut model, &sd, LoadOptions::frozen_as(weights))?;
        Ok(model)
    }

    /// Frees every weight (each becomes an empty tensor), keeping the config and the layer
    /// count: what a training run keeps of a frozen encoder once it has encoded every prompt
    /// it will use. Encoding afterwards is an error ([`Self::try_forward`]) or a panic
    /// ([`Self::forward`]); the model is not usable again.
    pub fn release(&mut self) {
        self.for_each_param_mut(|_, mut p| p.release());
        self.released = true;
    }

    pub fn is_released(&self) -> bool {
        self.released
    }

    fn check_not_released(&self) -> Result<()> {
        if self.released {
            return Err(Error::param("text_encoder", "its weights were released after the prompts were encoded; load the model again to encode new prompts"));
        }
        Ok(())
    }

    /// transformers' `gradient_checkpointing_enable` (and its disabling): each encoder layer
    /// keeps only its input for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`). A frozen encoder whose input takes no gradient runs as it is.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.text_model.encoder.gradient_checkpointing = on;
    }

    pub fn num_layers(&self) -> usize {
        self.text_model.encoder.layers.len()
    }

    /// The current number of token embeddings (grows with [`Self::resize_token_embeddings`]).
    pub fn vocab_size(&self) -> usize {
        self.text_model.embeddings.token_embedding.num_embeddings()
    }

    /// `ids` `[B, S]` (S <= `max_position_embeddings`, ids < [`Self::vocab_size`]). Use
    /// [`Self::try_forward`] for ids from outside the tokenizer; this one does not check them.
    pub fn forward(&self, ids: Tensor<2, Int>) -> ClipOutput {
        let (hidden_states, last_hidden_state) = self.encode(ids.clone(), self.num_layers());
        let pooled = self.pool(&ids, last_hidden_state.clone());
        ClipOutput { last_hidden_state, pooled, hidden_states }
    }

    /// `text_embeds` of a `CLIPTextModelWithProjection`: `text_projection(pooled)`, `[B, P]`;
    /// `None` for a plain `CLIPTextModel`.
    pub fn text_embeds(&self, out: &ClipOutput) -> Option<Tensor<2>> {
        self.text_projection.as_ref().map(|p| p.forward(out.pooled.clone()))
    }

    /// [`Self::forward`] after checking the ids' shape and range (this reads the ids back
    /// from the device).
    pub fn try_forward(&self, ids: Tensor<2, Int>) -> Result<ClipOutput> {
        self.check_not_released()?;
        self.check_ids(&ids)?;
        Ok(self.forward(ids))
    }

    /// diffusers' `clip_skip`: the final LayerNorm applied to the output of the layer
    /// `clip_skip` from the end (0 = `last_hidden_state`). Later layers are not run.
    pub fn forward_clip_skip(&self, ids: Tensor<2, Int>, clip_skip: usize) -> Result<Tensor<3>> {
        self.check_not_released()?;
        let n = self.num_layers();
        if clip_skip > n {
            return Err(Error::param("clip_skip", format!("{clip_skip} exceeds the {n} layers of the text encoder")));
        }
        Ok(self.encode(ids, n - clip_skip).1)
    }

    /// The hidden states of the first `layers` layers and the final LayerNorm of the last.
    fn encode(&self, ids: Tensor<2, Int>, layers: usize) -> (Vec<Tensor<3>>, Tensor<3>) {
        assert!(!self.released, "a released text encoder was asked to encode (use try_forward for an error)");
        let tm = &self.text_model;
        let hidden_states = tm.encoder.forward_layers(tm.embeddings.forward(ids), layers);
        let last = tm.final_layer_norm.forward(hidden_states.last().unwrap().clone());
        (hidden_states, last)
    }

    /// The row of `last` at the first position holding the pooling token: `eos_token_id`,
    /// or for legacy configs the largest id. A row without it pools at position 0, as
    /// torch's argmax over an all-false row does.
    fn pool(&self, ids: &Tensor<2, Int>, last: Tensor<3>) -> Tensor<2> {
        let [b, s, d] = last.dims();
        let device = last.device();
        let hit = if self.config.legacy_pooling() {
            ids.clone().equal(ids.clone().max_dim(1).expand([b, s]))
        } else {
            ids.clone().equal_elem(self.config.eos_token_id)
        };
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device).reshape([1, s]).expand([b, s]);
        let first = positions.mask_fill(hit.bool_not(), s as i64).min_dim(1);
        let first = first.clone().mask_fill(first.equal_elem(s as i64), 0);
        last.gather(1, first.reshape([b, 1, 1]).expand([b, 1, d])).reshape([b, d])
    }

    fn check_ids(&self, ids: &Tensor<2, Int>) -> Result<()> {
        let [b, s] = ids.dims();
        let max_len = self.config.max_position_embeddings;
        if b == 0 || s == 0 || s > max_len {
            return Err(Error::param("input_ids", format!("shape [{b}, {s}]: need a non-empty batch of at most {max_len} positions")));
        }
        let values: Vec<i64> = ids.to_data().convert::<i64>().try_into_vec().map_err(|e| Error::param("input_ids", format!("{e:?}")))?;
        let vocab = self.vocab_size() as i64;
        if let Some(bad) = values.iter().find(|&&v| v < 0 || v >= vocab) {
            return Err(Error::param("input_ids", format!("id {bad} is outside the vocabulary of {vocab} tokens")));
        }
        Ok(())
    }

    /// Grows (or shrinks) the token embedding table to `n` rows, as transformers'
    /// `resize_token_embeddings` after tokens were added for textual inversion. New rows
    /// start at the mean of the old ones (the centre of transformers' `mean_resizing`
    /// draw); trainers usually overwrite them with an initializer token's embedding.
    pub fn resize_token_embeddings(&mut self, n: usize) {
        let emb = &mut self.text_model.embeddings.token_embedding;
        let [old, d] = emb.weight.dims();
        let w = knobs_nn::param::f32_value(&emb.weight).inner();
        let new = if n <= old {
            w.slice([0..n, 0..d])
        } else {
            let mean = w.clone().mean_dim(0).repeat_dim(0, n - old);
            Tensor::cat(vec![w, mean], 0)
        };
        emb.weight = like(&emb.weight, new);
        self.config.vocab_size = n;
    }

    /// Token ids as a `[B, S]` tensor.
    pub fn ids_tensor(ids: &[Vec<u32>], device: &Device) -> Result<Tensor<2, Int>> {
        let s = ids.first().map_or(0, |r| r.len());
        if let Some(r) = ids.iter().find(|r| r.len() != s) {
            return Err(Error::param("input_ids", format!("rows differ in length ({} and {s})", r.len())));
        }
        let flat: Vec<i64> = ids.iter().flatten().map(|&v| v as i64).collect();
        Ok(Tensor::from_data(TensorData::new(flat, [ids.len(), s]), device))
    }
}

/// Brings a text-encoder state dict to this model's names: transformers >= 5.6 saves
/// `CLIPTextModel` without the `text_model.` level (the tiny fixture does), older files and
/// SD checkpoints have it; and `embeddings.position_ids` is a buffer, not a parameter.
pub fn normalize_keys(mut sd: StateDict) -> StateDict {
    let tensors = std::mem::take(&mut sd.tensors);
    sd.tensors = tensors
        .into_iter()
        .filter(|(k, _)| !k.ends_with("embeddings.position_ids"))
        .map(|(k, v)| if k.starts_with(PREFIX) || k.starts_with("text_projection.") { (k, v) } else { (format!("{PREFIX}{k}"), v) })
        .collect();
    sd
}
