//! What each method attaches and trains. Every method ends in the same state: the pipeline
//! with its adapters (or new token rows) attached and exactly the parameters it learns marked
//! trainable, so one training loop serves them all.
use anyhow::{Context, Result, bail};
use knobs_adapters::hypernetwork::{self, A1111_KEY_MODULE, A1111_VALUE_MODULE, HypernetworkConfig};
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, AdapterConfig, Pattern, tokens};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::ModuleExt;
use regex::Regex;

use super::config::{Method, TrainConfig};
use super::data::concept;

/// The adapter name every method trains under (PEFT's default).
pub const ADAPTER: &str = "default";

/// What was attached, for saving.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The placeholder token and its extra vector tokens (`tok`, `tok_1`, ...).
    pub placeholder: Option<String>,
    pub unet_adapter: Option<Box<dyn AdapterConfig>>,
    pub text_encoder_adapter: Option<Box<dyn AdapterConfig>>,
}

fn names(list: &[String]) -> Pattern {
    Pattern::Names(list.to_vec())
}

/// The hypernetwork the `--hypernetwork-*` settings describe, on the UNet's `to_k` / `to_v`
/// (every attention layer whose context width it covers, as A1111).
pub fn hypernetwork_config(cfg: &TrainConfig) -> Result<HypernetworkConfig> {
    let config = HypernetworkConfig::new(&[A1111_KEY_MODULE], &[A1111_VALUE_MODULE], cfg.hypernetwork_structure()?)?;
    Ok(if cfg.hypernetwork_widths.is_empty() { config } else { config.with_sizes(cfg.hypernetwork_widths.clone())? })
}

pub fn unet_adapter_config(cfg: &TrainConfig) -> Result<Option<Box<dyn AdapterConfig>>> {
    let mut targets = cfg.target_modules.clone();
    if cfg.conv {
        targets.extend(["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"].map(String::from));
    }
    Ok(match cfg.method {
        Method::Lora | Method::Pivotal => Some(Box::new(LoraConfig::new(cfg.rank, cfg.lora_alpha(), names(&targets)))),
        Method::Ia3 => Some(Box::new(Ia3Config::new(names(&["to_k", "to_v", "ff.net.2"].map(String::from)), names(&["ff.net.2".to_string()])))),
        Method::Hypernetwork => Some(Box::new(hypernetwork_config(cfg)?)),
        _ => None,
    })
}

/// Adds the placeholder tokens, grows the token table, starts the new rows at the
/// initializer token's embedding and attaches them as the trainable token rows.
fn add_placeholder(cfg: &TrainConfig, sd: &mut StableDiffusion) -> Result<String> {
    let spec = cfg.concept.as_deref().map(concept).transpose()?;
    let token = cfg.placeholder_token.clone().or_else(|| spec.as_ref().map(|s| s.token.clone())).context("--placeholder-token is required")?;
    let init_word = cfg.initializer_token.clone().or_else(|| spec.as_ref().map(|s| s.shape.name().to_string())).context("--initializer-token is required")?;
    let init_ids = sd.tokenizer.tokenize(&init_word)?;
    let [init_id] = init_ids[..] else {
        bail!("--initializer-token `{init_word}` is {} tokens for this tokenizer; it must be exactly one", init_ids.len());
    };
    let old = sd.tokenizer.vocab_size();
    let tokens: Vec<String> = (0..cfg.num_vectors).map(|i| if i == 0 { token.clone() } else { format!("{token}_{i}") }).collect();
    for t in &tokens {
        if sd.tokenizer.token_to_id(t).is_some() {
            bail!("--placeholder-token `{t}` is already in the tokenizer's vocabulary; choose a new token");
        }
    }
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let ids = sd.tokenizer.add_tokens(&refs)?;
    anyhow::ensure!(ids[0] as usize == old, "new tokens did not get consecutive ids from {old}");
    sd.text_encoder.resize_token_embeddings(sd.tokenizer.vocab_size());
    let table = &mut sd.text_encoder.text_model.embeddings.token_embedding;
    let [_, dim] = table.weight.dims();
    let init_row = table.weight.clone().inner().slice([init_id as usize..init_id as usize + 1, 0..dim]);
    let rows = init_row.repeat_dim(0, tokens.len());
    table.weight = knobs_nn::param::like(&table.weight, table.weight.clone().inner().slice_assign([old..old + tokens.len(), 0..dim], rows));
    tokens::attach(table, ADAPTER, old, tokens.len())?;
    Ok(token)
}

pub fn prepare(cfg: &TrainConfig, sd: &mut StableDiffusion) -> Result<Prepared> {
    let mut p = Prepared::default();
    if cfg.method.learns_tokens() {
        p.placeholder = Some(add_placeholder(cfg, sd)?);
    }
    if cfg.method == Method::Hypernetwork {
        let config = hypernetwork_config(cfg)?;
        let layers = match hypernetwork::attach(&mut AdaptedModel::new(&mut sd.unet, cfg.seed), ADAPTER, config.clone()) {
            Err(e) if !cfg.hypernetwork_widths.is_empty() => return Err(anyhow::Error::new(e).context(format!("--hypernetwork-widths {:?}", cfg.hypernetwork_widths))),
            other => other?,
        };
        tracing::info!("hypernetwork on {} layers", layers.len());
        p.unet_adapter = Some(Box::new(config));
    } else if let Some(config) = unet_adapter_config(cfg)? {
        AdaptedModel::new(&mut sd.unet, cfg.seed).add_adapter(ADAPTER, config.clone())?;
        p.unet_adapter = Some(config);
    }
    if cfg.train_text_encoder && cfg.method.learns_lora() {
        let config: Box<dyn AdapterConfig> = Box::new(LoraConfig::new(cfg.rank, cfg.lora_alpha(), names(&cfg.text_encoder_target_modules)));
        AdaptedModel::new(&mut sd.text_encoder, cfg.seed ^ 1).add_adapter(ADAPTER, config.clone())?;
        p.text_encoder_adapter = Some(config);
    }
    set_trainable(cfg, sd)?;
    Ok(p)
}

/// Whether the method learns the parameter at `path` (a path of the whole pipeline).
fn learned_by(cfg: &TrainConfig, path: &str) -> bool {
    let lora = path.contains(".lora_");
    let rows = path.contains(".token_rows.");
    match cfg.method {
        Method::Dreambooth => path.starts_with("unet.") || (cfg.train_text_encoder && path.starts_with("text_encoder.")),
        Method::Lora | Method::HyperLora => lora,
        Method::Ia3 => path.contains(".ia3_l."),
        Method::TextualInversion => rows,
        Method::Pivotal => lora || rows,
        Method::Hypernetwork => path.contains(&format!(".{}.", hypernetwork::PARAM_SEGMENT)),
    }
}

/// Marks what the method learns, narrowed by `--train-only` (tuning by freezing), trainable
/// and freezes everything else. Returns the number of trainable parameters.
pub fn set_trainable(cfg: &TrainConfig, sd: &mut StableDiffusion) -> Result<usize> {
    let only: Vec<Regex> = cfg.train_only.iter().map(|p| Regex::new(p)).collect::<Result<_, _>>()?;
    sd.train_only(|path| learned_by(cfg, path) && (only.is_empty() || only.iter().any(|r| r.is_match(path))));
    let n = sd.num_trainable_params();
    if n == 0 {
        bail!("nothing to train: --train-only {:?} matches none of the parameters that --method {} learns", cfg.train_only, cfg.method.name());
    }
    Ok(n)
}
