//! What a training run left behind, sorted by how it loads (a model folder, LoRA files,
//! embeddings, other PEFT adapters), and the few adapter operations compare needs on a loaded
//! pipeline (through its `PipelineAdapters`): attach, merge in place, or fold into the
//! weights for good.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use knobs_adapters::formats::peft;
use knobs_diffusion::loaders::{Component, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_train::finetune::outputs::{EMBEDDING_FILE, HYPERNETWORK_FILE, KOHYA_FILE, LORA_FILE, size_of};

/// The files of a run that compare loads, by kind.
#[derive(Debug, Default)]
pub struct Artefacts {
    /// A full pipeline folder (DreamBooth): used in place of the base model.
    pub model: Option<PathBuf>,
    /// diffusers or kohya LoRA files (`knobs eval --lora`).
    pub loras: Vec<PathBuf>,
    /// Textual-inversion embeddings (`knobs eval --embedding`).
    pub embeddings: Vec<PathBuf>,
    /// PEFT folders of adapters that are not plain LoRA (DoRA, LoHa, LoKr, OFT, IA3), with the
    /// component they adapt.
    pub peft: Vec<(Component, PathBuf)>,
    /// A1111-style hypernetworks (`knobs eval --hypernetwork`).
    pub hypernetworks: Vec<PathBuf>,
}

/// A PEFT folder of plain LoRA (not DoRA), whose weights the LoRA file beside it also holds.
fn plain_lora(dir: &Path) -> bool {
    peft::is_plain_lora(dir).unwrap_or(false)
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
                if !plain_lora(p) {
                    let prefix = name.rsplit_once('_').map_or("", |(c, _)| c);
                    a.peft.push((Component::from_prefix(prefix).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?, p.clone()));
                }
            } else if name == LORA_FILE || name == KOHYA_FILE {
                a.loras.push(p.clone());
            } else if name == EMBEDDING_FILE {
                a.embeddings.push(p.clone());
            } else if name == HYPERNETWORK_FILE {
                a.hypernetworks.push(p.clone());
            }
        }
        let lora_folder_only = a.loras.is_empty() && outputs.iter().any(|p| plain_lora(p));
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

/// Attaches every LoRA file and PEFT folder of `a` to `sd` (embeddings and hypernetworks
/// are added separately); returns the adapter names.
pub fn attach_all(sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, a: &Artefacts) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for path in &a.loras {
        let name = format!("adapter{}", names.len());
        adapters.load_lora(sd, path, &name, 1.0).with_context(|| path.display().to_string())?;
        names.push(name);
    }
    for (component, dir) in &a.peft {
        let name = format!("adapter{}", names.len());
        adapters.load_peft(sd, *component, dir, &name).with_context(|| dir.display().to_string())?;
        names.push(name);
    }
    Ok(names)
}

/// A pipeline folder `dir` equal to `base` with the PEFT adapters of `a` folded into their
/// component's weights: how `knobs eval` (which loads LoRA files and embeddings, not IA3)
/// measures them. Unchanged parts are symlinks to the base folder.
pub fn merged_model(base: &Path, a: &Artefacts, dir: &Path) -> Result<()> {
    let mut sd = StableDiffusion::from_dir(base, &knobs_nn::device::inference()).with_context(|| format!("--model {}", base.display()))?;
    let mut adapters = PipelineAdapters::new(0);
    attach_all(&mut sd, &mut adapters, &Artefacts { peft: a.peft.clone(), ..Default::default() })?;
    adapters.fuse(&mut sd)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let changed: Vec<&str> = a.peft.iter().map(|(c, _)| c.name()).collect();
    link_all(base, dir, &changed)?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    for (component, _) in &a.peft {
        let weights = knobs_nn::io::state_dict(component.module(&sd));
        let (from, to) = (base.join(component.name()), dir.join(component.name()));
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
