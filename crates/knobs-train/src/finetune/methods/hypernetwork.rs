//! A1111-style hypernetwork: residual MLPs on the key / value context of the UNet's
//! attention layers. Saved as one safetensors file with A1111's keys and settings.
use std::path::PathBuf;

use anyhow::{Result, bail};
use knobs_adapters::hypernetwork::{A1111_KEY_MODULE, A1111_VALUE_MODULE, Activation, HypernetworkConfig, Structure};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::{ADAPTER, Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};
use crate::finetune::outputs::HYPERNETWORK_FILE;

#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "A1111 hypernetwork (hypernetwork)")]
pub struct HypernetworkOptions {
    /// Layer structure: comma-separated width multipliers, starting and ending with 1.
    #[arg(long, value_delimiter = ',', default_value = "1,2,1")]
    pub hypernetwork_layers: Vec<f64>,
    /// A1111's activation names: linear, relu, leakyrelu, elu, swish (A1111's hard swish),
    /// tanh, sigmoid, silu, gelu, mish, ...
    #[arg(long, default_value = "linear")]
    pub hypernetwork_activation: String,
    /// A LayerNorm after every layer (A1111's layer normalization).
    #[arg(long)]
    pub hypernetwork_layer_norm: bool,
    /// Dropout while training: one probability (after every hidden layer) or A1111's dropout
    /// structure, one value per layer entry (e.g. 0,0.3,0).
    #[arg(long, value_delimiter = ',')]
    pub hypernetwork_dropout: Vec<f64>,
    /// Context widths that get a module pair (A1111's enable sizes), comma-separated;
    /// default: every width of the UNet's attention layers.
    #[arg(long, value_delimiter = ',')]
    pub hypernetwork_widths: Vec<usize>,
}

defaults_from_clap!(HypernetworkOptions);

impl HypernetworkOptions {
    /// The structure these settings describe, checked; errors name the flag.
    pub fn structure(&self) -> Result<Structure> {
        let layers = &self.hypernetwork_layers;
        let activation = Activation::parse(&self.hypernetwork_activation).map_err(|e| anyhow::anyhow!("--hypernetwork-activation: {e}"))?;
        let dropout = match self.hypernetwork_dropout[..] {
            [] => vec![0.0; layers.len()],
            [p] => Structure::dropout_after_hidden(layers.len(), p),
            _ => self.hypernetwork_dropout.clone(),
        };
        let s = Structure { layer_structure: layers.clone(), activation, add_layer_norm: self.hypernetwork_layer_norm, activate_output: false, dropout_structure: dropout };
        if let Err(e) = s.validate() {
            let flag = if e.starts_with("dropout") { "--hypernetwork-dropout" } else { "--hypernetwork-layers" };
            bail!("{flag}: {e}");
        }
        if let [p] = self.hypernetwork_dropout[..] {
            if !(0.0..1.0).contains(&p) {
                bail!("--hypernetwork-dropout: {p} is not a probability in [0, 1)");
            }
            if p > 0.0 && layers.len() < 3 {
                bail!("--hypernetwork-dropout {p}: --hypernetwork-layers {layers:?} has no hidden layer to drop out");
            }
        }
        if self.hypernetwork_widths.contains(&0) {
            bail!("--hypernetwork-widths: widths must be positive");
        }
        Ok(s)
    }

    /// The hypernetwork on the UNet's `to_k` / `to_v` (every attention layer whose context
    /// width it covers, as A1111).
    pub fn config(&self) -> Result<HypernetworkConfig> {
        let config = HypernetworkConfig::new(&[A1111_KEY_MODULE], &[A1111_VALUE_MODULE], self.structure()?)?;
        Ok(if self.hypernetwork_widths.is_empty() { config } else { config.with_sizes(self.hypernetwork_widths.clone())? })
    }
}

pub struct Hypernetwork;

impl TrainMethod for Hypernetwork {
    fn name(&self) -> &'static str {
        "hypernetwork"
    }
    fn about(&self) -> &'static str {
        "A1111-style hypernetwork: residual MLPs on the key/value context"
    }
    fn defaults(&self) -> Defaults {
        // A1111's learning rate for SD is 5e-6; scaled like DreamBooth's (diffusers' 5e-6 ->
        // 5e-5 here).
        Defaults { learning_rate: 5e-5, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Hypernetwork]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        cfg.hypernetwork.structure()?;
        super::require_steps(cfg)
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        let o = &cfg.hypernetwork;
        let layers = match adapters.add_hypernetwork(sd, ADAPTER, o.config()?) {
            Err(e) if !o.hypernetwork_widths.is_empty() => return Err(anyhow::Error::new(e).context(format!("--hypernetwork-widths {:?}", o.hypernetwork_widths))),
            other => other?,
        };
        tracing::info!("hypernetwork on {} layers", layers.len());
        Ok(Attached { trainable: adapters.parameter_paths(sd, ADAPTER)?, placeholder: None })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        // Not a PEFT method: one file with A1111's keys and settings.
        let path = cfg.out.join(HYPERNETWORK_FILE);
        adapters.save_hypernetwork(sd, ADAPTER, &path)?;
        Ok(vec![path])
    }
}
