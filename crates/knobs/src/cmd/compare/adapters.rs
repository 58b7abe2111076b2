//! What a training run left behind, sorted by how it loads (a model folder, LoRA files,
//! embeddings, other PEFT adapters), and the few adapter operations compare needs on a loaded
//! pipeline: attach, merge in place, or fold into the weights for good.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use knobs_adapters::formats::lora_files::{self, ComponentLora};
use knobs_adapters::formats::peft;
use knobs_adapters::{AdaptedModel, AdapterConfig};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::Module;
use knobs_train::finetune::save::{EMBEDDING_FILE, HYPERNETWORK_FILE, KOHYA_FILE, LORA_FILE, size_of};

/// The files of a run that compare loads, by kind.
#[derive(Debug, Default)]
pub struct Artefacts {
    /// A full pipeline folder (DreamBooth): used in place of the base model.
    pub model: Option<PathBuf>,
    /// diffusers or kohya LoRA files (`knobs eval --lora`).
    pub loras: Vec<PathBuf>,
    /// Textual-inversion embeddings (`knobs eval --embedding`).
    pub embeddings: Vec<PathBuf>,
    /// PEFT folders of adapters that are not LoRA (IA3), with the component they adapt.
    pub peft: Vec<(String, PathBuf)>,
    /// A1111-style hypernetworks (`knobs eval --hypernetwork`).
    pub hypernetworks: Vec<PathBuf>,
}

fn peft_type(dir: &Path) -> Option<String> {
    let json = super::plan::read_json(&dir.join(peft::CONFIG_FILE)).ok()?;
    json["peft_type"].as_str().map(String::from)
}

impl Artefacts {
    /// Sorts a trainer's `outputs`. LoRA PEFT folders are skipped: the LoRA file beside them
    /// holds the same weights for every component.
    pub fn from_outputs(outputs: &[PathBuf]) -> Result<Artefacts> {
        let mut a = Artefacts::default();
        for p in outputs {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if p.join("model_index.json").is_file() {
                a.model = Some(p.clone());
            } else if p.join(peft::CONFIG_FILE).is_file() {
                match peft_type(p).as_deref() {
                    Some("LORA") => {}
                    _ => a.peft.push((name.rsplit_once('_').map_or("unet", |(c, _)| c).to_string(), p.clone())),
                }
            } else if name == LORA_FILE || name == KOHYA_FILE {
                a.loras.push(p.clone());
            } else if name == EMBEDDING_FILE {
                a.embeddings.push(p.clone());
            } else if name == HYPERNETWORK_FILE {
                a.hypernetworks.push(p.clone());
            }
        }
        let lora_folder_only = a.loras.is_empty() && outputs.iter().any(|p| peft_type(p).as_deref() == Some("LORA"));
        if a.files().is_empty() || lora_folder_only {
            bail!("the run wrote nothing compare knows how to load: {outputs:?}");
        }
        Ok(a)
    }

    /// Everything that is loaded, i.e. what a user keeps to use the result.
    pub fn files(&self) -> Vec<PathBuf> {
        let peft = self.peft.iter().map(|(_, p)| p.clone());
        let files = self.model.iter().chain(&self.loras).chain(&self.embeddings).chain(&self.hypernetworks).cloned();
        files.chain(peft).collect()
    }

    /// Bytes on disk of [`Artefacts::files`].
    pub fn bytes(&self) -> u64 {
        size_of(&self.files())
    }
}

/// An operation on one component's adapters.
pub enum Op<'a> {
    /// Attach a LoRA read from a file.
    Lora(&'a ComponentLora),
    /// Load a PEFT folder of any adapter type.
    Peft(&'a Path),
    /// Merge an attached adapter into the weights (it stays attached and can be unmerged).
    Merge(Box<dyn AdapterConfig>),
    /// Merge an attached adapter and remove it: plain weights, as a model folder stores them.
    Fold(Box<dyn AdapterConfig>),
}

fn apply<M: Module>(model: M, name: &str, op: Op) -> Result<()> {
    let mut am = AdaptedModel::new(model, 0);
    match op {
        Op::Lora(lora) => drop(lora_files::attach(&mut am, name, lora)?),
        Op::Peft(dir) => peft::load(&mut am, dir, name)?,
        Op::Merge(config) => {
            am.adopt(name, config)?;
            am.merge(&[name])?;
        }
        Op::Fold(config) => {
            am.adopt(name, config)?;
            am.merge_and_unload()?;
        }
    }
    Ok(())
}

/// Applies `op` to the component (`unet`, or `""` for a file without prefixes; `text_encoder`).
pub fn on_component(sd: &mut StableDiffusion, component: &str, name: &str, op: Op) -> Result<()> {
    match component {
        "" | "unet" => apply(&mut sd.unet, name, op),
        "text_encoder" => apply(&mut sd.text_encoder, name, op),
        other => bail!("an adapter for component `{other}`, which an SD-1.x/2.x pipeline lacks (supported: unet, text_encoder)"),
    }
}

/// An attached adapter: its component, name and config (to merge it later).
pub type Attached = (String, String, Box<dyn AdapterConfig>);

/// Attaches every LoRA file and PEFT folder of `a` to `sd` (embeddings are added separately).
pub fn attach_all(sd: &mut StableDiffusion, a: &Artefacts) -> Result<Vec<Attached>> {
    let mut out: Vec<Attached> = Vec::new();
    for path in &a.loras {
        for (component, lora) in lora_files::read(path)? {
            let name = format!("adapter{}", out.len());
            on_component(sd, &component, &name, Op::Lora(&lora)).with_context(|| path.display().to_string())?;
            out.push((component, name, Box::new(lora.config.clone())));
        }
    }
    for (component, dir) in &a.peft {
        let name = format!("adapter{}", out.len());
        on_component(sd, component, &name, Op::Peft(dir)).with_context(|| dir.display().to_string())?;
        out.push((component.clone(), name, peft::read_config(dir)?));
    }
    Ok(out)
}

/// A pipeline folder `dir` equal to `base` with the PEFT adapters of `a` folded into their
/// component's weights: how `knobs eval` (which loads LoRA files and embeddings, not IA3)
/// measures them. Unchanged parts are symlinks to the base folder.
pub fn merged_model(base: &Path, a: &Artefacts, dir: &Path) -> Result<()> {
    let mut sd = StableDiffusion::from_dir(base, &knobs_nn::cpu()).with_context(|| format!("--model {}", base.display()))?;
    for (component, name, config) in attach_all(&mut sd, &Artefacts { peft: a.peft.clone(), ..Default::default() })? {
        on_component(&mut sd, &component, &name, Op::Fold(config))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let changed: Vec<&str> = a.peft.iter().map(|(c, _)| c.as_str()).collect();
    link_all(base, dir, &changed)?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    for component in changed {
        let weights = match component {
            "unet" => knobs_nn::io::state_dict(&sd.unet),
            _ => knobs_nn::io::state_dict(&sd.text_encoder),
        };
        let (from, to) = (base.join(component), dir.join(component));
        link_all(&from, &to, &[])?;
        for entry in std::fs::read_dir(&from).with_context(|| format!("cannot read {}", from.display()))? {
            let name = entry?.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(to.join(&name))?;
                knobs_nn::io::write_safetensors(to.join(&name), &weights, &meta)?;
            }
        }
    }
    Ok(())
}

/// `to/NAME` -> `from/NAME` for every entry of `from` except `skip` (those become folders).
fn link_all(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            std::fs::create_dir_all(to.join(&name))?;
        } else {
            let target = entry.path().canonicalize()?;
            std::os::unix::fs::symlink(&target, to.join(&name)).with_context(|| format!("cannot link {}", to.join(&name).display()))?;
        }
    }
    Ok(())
}
