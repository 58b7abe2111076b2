//! Textual inversion: new token rows in the text encoder's embedding table, started at an
//! initializer word's embedding; the model stays frozen. Saved as a diffusers
//! `learned_embeds.safetensors` (and A1111's format with `--a1111`).
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use knobs_adapters::tokens;
use knobs_diffusion::clip::embeddings;
use knobs_diffusion::loaders::{Component, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};
use crate::finetune::data::concept;
use crate::finetune::outputs::EMBEDDING_FILE;

#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "Tokens (textual-inversion, pivotal)")]
pub struct TokenOptions {
    /// The new token (default with --concept: the concept's own, e.g. `sks`).
    #[arg(long)]
    pub placeholder_token: Option<String>,
    /// A one-token word whose embedding the new rows start from (default with --concept: its
    /// shape's name).
    #[arg(long)]
    pub initializer_token: Option<String>,
    /// Vectors per placeholder (`tok`, `tok_1`, ...).
    #[arg(long, default_value_t = 1)]
    pub num_vectors: usize,
    /// Also write the embedding in A1111's format.
    #[arg(long = "a1111")]
    pub a1111_embedding: bool,
}

defaults_from_clap!(TokenOptions);

/// The adapter name of the learned token rows: not the LoRA's, so that pivotal tuning's text
/// encoder LoRA is saved without them.
const TOKEN_ROWS: &str = "placeholder";

/// Adds the placeholder tokens to every tokenizer (both of SDXL's), grows each token table,
/// starts the new rows at the initializer token's embedding and attaches them as trainable
/// rows. Returns the token and the rows' parameter paths.
pub fn add_placeholder(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
    let o = &cfg.tokens;
    let spec = cfg.data.concept.as_deref().map(concept).transpose()?;
    let token = o.placeholder_token.clone().or_else(|| spec.as_ref().map(|s| s.token.clone())).context("--placeholder-token is required")?;
    let init_word = o.initializer_token.clone().or_else(|| spec.as_ref().map(|s| s.shape.name().to_string())).context("--initializer-token is required")?;
    let tokens: Vec<String> = (0..o.num_vectors).map(|i| if i == 0 { token.clone() } else { format!("{token}_{i}") }).collect();
    // Every check before any change, so that a refusal leaves both encoders as they were.
    let mut inits = Vec::new();
    for (tokenizer, _) in sd.text_pairs_mut() {
        let init_ids = tokenizer.tokenize(&init_word)?;
        let [init_id] = init_ids[..] else {
            bail!("--initializer-token `{init_word}` is {} tokens for this tokenizer; it must be exactly one", init_ids.len());
        };
        if let Some(t) = tokens.iter().find(|t| tokenizer.token_to_id(t).is_some()) {
            bail!("--placeholder-token `{t}` is already in the tokenizer's vocabulary; choose a new token");
        }
        inits.push(init_id as usize);
    }
    for ((tokenizer, text_encoder), init_id) in sd.text_pairs_mut().into_iter().zip(inits) {
        let old = tokenizer.vocab_size();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let ids = tokenizer.add_tokens(&refs)?;
        anyhow::ensure!(ids[0] as usize == old, "new tokens did not get consecutive ids from {old}");
        text_encoder.resize_token_embeddings(tokenizer.vocab_size());
        let table = &mut text_encoder.text_model.embeddings.token_embedding;
        let [_, dim] = table.weight.dims();
        let init_row = table.weight.clone().inner().slice([init_id..init_id + 1, 0..dim]);
        let rows = init_row.repeat_dim(0, tokens.len());
        table.weight = knobs_nn::param::like(&table.weight, table.weight.clone().inner().slice_assign([old..old + tokens.len(), 0..dim], rows));
        tokens::attach(table, TOKEN_ROWS, old, tokens.len())?;
    }
    let mut trainable = std::collections::BTreeSet::new();
    for c in Component::text_encoders(sd) {
        let rows = adapters.on(sd, c, |am| Ok(am.adapter_param_paths(TOKEN_ROWS)))?;
        trainable.extend(rows.into_iter().map(|p| format!("{c}.{p}")));
    }
    Ok(Attached { trainable, placeholder: Some(token) })
}

/// `learned_embeds.safetensors` (diffusers) and, with `--a1111`, `TOKEN.safetensors`; for
/// SDXL both hold `clip_l` / `clip_g`, the layout A1111, ComfyUI and diffusers' SDXL loading
/// use.
pub fn save_embedding(cfg: &TrainConfig, sd: &mut StableDiffusion, attached: &Attached) -> Result<Vec<PathBuf>> {
    let token = attached.placeholder.as_deref().context("no placeholder token was added")?;
    let mut learned = Vec::new();
    for (tokenizer, text_encoder) in sd.text_pairs_mut() {
        // The learned rows are read from the table with them merged in, then taken out again.
        text_encoder.text_model.embeddings.token_embedding.merge_adapter(TOKEN_ROWS)?;
        let emb = embeddings::from_model(token, tokenizer, text_encoder);
        text_encoder.text_model.embeddings.token_embedding.unmerge_adapter(TOKEN_ROWS);
        learned.push(emb?);
    }
    let write = |path: &PathBuf, a1111: bool| -> Result<()> {
        match (&learned[..], a1111) {
            ([l, g], _) => embeddings::save_sdxl(path, l, g)?,
            ([emb], false) => embeddings::save_diffusers(path, emb)?,
            ([emb], true) => embeddings::save_a1111(path, emb)?,
            _ => bail!("{} text encoders: expected one or two", learned.len()),
        }
        Ok(())
    };
    let path = cfg.out.join(EMBEDDING_FILE);
    write(&path, false)?;
    let mut out = vec![path];
    if cfg.tokens.a1111_embedding {
        let path = cfg.out.join(format!("{token}.safetensors"));
        write(&path, true)?;
        out.push(path);
    }
    Ok(out)
}

/// Checks `--num-vectors` and that a placeholder can be named.
pub fn check_tokens(cfg: &TrainConfig) -> Result<()> {
    if cfg.tokens.num_vectors == 0 {
        bail!("--num-vectors must be at least 1");
    }
    if cfg.data.concept.is_none() && cfg.tokens.placeholder_token.is_none() {
        bail!("--method {} needs --placeholder-token", cfg.method);
    }
    super::require_steps(cfg)
}

pub struct TextualInversion;

impl TrainMethod for TextualInversion {
    fn name(&self) -> &'static str {
        "textual-inversion"
    }
    fn about(&self) -> &'static str {
        "learn new token embeddings only; the model stays frozen"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 5e-3, max_train_steps: 400 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Tokens]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        check_tokens(cfg)
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        add_placeholder(cfg, sd, adapters)
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, _: &mut PipelineAdapters, attached: &Attached) -> Result<Vec<PathBuf>> {
        save_embedding(cfg, sd, attached)
    }
}
