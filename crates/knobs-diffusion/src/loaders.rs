//! The one owner of a pipeline's adapters, as diffusers' loader mixins are: which component
//! an adapter lives on (`unet`, `text_encoder`), reading every file format onto the right
//! component, weights, merging, saving, and each adapter's config for as long as it is
//! attached, so that training, saving, generating and serving all go through one place.
//!
//! The models themselves know adapters only through the slots of their layers; this module
//! builds a short-lived [`AdaptedModel`] over one component for each operation and keeps the
//! configs between operations.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use knobs_adapters::formats::diffusers::{self as diffusers_lora, DiffusersKeys};
use knobs_adapters::formats::lora_files::{self, ComponentLora};
use knobs_adapters::formats::{kohya, lycoris, peft};
use knobs_adapters::{AdaptedModel, AdapterConfig, AdapterError, Result, hypernetwork};
use knobs_nn::io::read_checked;
use knobs_nn::{Error, Module, ModuleExt};

use crate::clip::embeddings::{self, LearnedEmbedding};
use crate::pipeline::StableDiffusion;
use crate::single_file::keys::{self, UnetLayout};

/// A pipeline part that adapters attach to, named as its folder and its key prefix in
/// diffusers / kohya files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];

    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// Whether `sd` has this component (only SDXL has a second text encoder).
    pub fn is_in(self, sd: &StableDiffusion) -> bool {
        self != Component::TextEncoder2 || sd.is_sdxl()
    }

    /// The components `sd` has.
    pub fn all_in(sd: &StableDiffusion) -> Vec<Component> {
        Component::ALL.into_iter().filter(|c| c.is_in(sd)).collect()
    }

    /// The text encoders `sd` has (both of SDXL's, which its trainers train together).
    pub fn text_encoders(sd: &StableDiffusion) -> Vec<Component> {
        Component::all_in(sd).into_iter().filter(|c| *c != Component::Unet).collect()
    }

    /// The component of a file's key prefix; a file without prefixes (a PEFT folder) adapts
    /// the UNet, as diffusers assumes.
    pub fn from_prefix(prefix: &str) -> std::result::Result<Component, String> {
        match prefix {
            "" | "unet" => Ok(Component::Unet),
            "text_encoder" => Ok(Component::TextEncoder),
            "text_encoder_2" => Ok(Component::TextEncoder2),
            other => Err(format!("component `{other}`, which a Stable Diffusion pipeline lacks (supported: unet, text_encoder, text_encoder_2)")),
        }
    }

    /// The component's model in `sd` (an SD-1.x/2.x pipeline's absent second text encoder
    /// is an empty module).
    pub fn module(self, sd: &StableDiffusion) -> &dyn Module {
        match self {
            Component::Unet => &sd.unet,
            Component::TextEncoder => &sd.text_encoder,
            Component::TextEncoder2 => &sd.text_encoder_2,
        }
    }

    fn model(self, sd: &mut StableDiffusion) -> &mut dyn Module {
        match self {
            Component::Unet => &mut sd.unet,
            Component::TextEncoder => &mut sd.text_encoder,
            Component::TextEncoder2 => &mut sd.text_encoder_2,
        }
    }

    /// Seeds new adapters of each component differently, so that a UNet and a text-encoder
    /// LoRA trained together do not start from the same random matrices.
    fn seed(self, seed: u64) -> u64 {
        match self {
            Component::Unet => seed,
            Component::TextEncoder => seed ^ 1,
            Component::TextEncoder2 => seed ^ 2,
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// LoRA single-file layouts this loader writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFile {
    /// `pytorch_lora_weights.safetensors` (`unet.` / `text_encoder.` prefixes).
    Diffusers,
    /// kohya-ss (`lora_unet_` / `lora_te_`, `.alpha`, `ss_*` metadata).
    Kohya,
}

/// One attached adapter.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: String,
    pub component: Component,
    pub config: Box<dyn AdapterConfig>,
    /// Its weight in the active set (diffusers' `set_adapters`).
    pub weight: f32,
}

/// The adapters of one pipeline. Every method takes the pipeline it manages; use one
/// `PipelineAdapters` per pipeline.
#[derive(Debug, Default)]
pub struct PipelineAdapters {
    attached: Vec<Attached>,
    embeddings: Vec<LearnedEmbedding>,
    seed: u64,
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Nn(Error::file(path, e.to_string()))
}

impl PipelineAdapters {
    /// `seed` drives the initialisation of adapters added for training.
    pub fn new(seed: u64) -> Self {
        PipelineAdapters { seed, ..Default::default() }
    }

    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// The textual-inversion embeddings loaded so far.
    pub fn embeddings(&self) -> &[LearnedEmbedding] {
        &self.embeddings
    }

    pub fn get(&self, name: &str) -> Option<&Attached> {
        self.attached.iter().find(|a| a.name == name)
    }

    fn components_of(&self, name: &str) -> Vec<Component> {
        let set: BTreeSet<Component> = self.attached.iter().filter(|a| a.name == name).map(|a| a.component).collect();
        set.into_iter().collect()
    }

    /// Runs `f` on a manager of `component` that knows every adapter attached there, and
    /// keeps what `f` leaves (adapters added, deleted or merged away).
    pub fn on<R>(&mut self, sd: &mut StableDiffusion, component: Component, f: impl FnOnce(&mut AdaptedModel<&mut dyn Module>) -> Result<R>) -> Result<R> {
        if !component.is_in(sd) {
            return Err(AdapterError::Nn(Error::param(component.name(), "this SD-1.x/2.x pipeline has no second text encoder (an SDXL component)")));
        }
        let mut am = AdaptedModel::new(component.model(sd), component.seed(self.seed));
        for a in self.attached.iter().filter(|a| a.component == component) {
            am.adopt(&a.name, a.config.clone())?;
        }
        let out = f(&mut am);
        let now: Vec<(String, Box<dyn AdapterConfig>)> = am.adapter_names().into_iter().map(|n| (n.clone(), am.config(&n).expect("listed").clone_box())).collect();
        // Keep the order and weights of adapters still there; append new ones.
        self.attached.retain(|a| a.component != component || now.iter().any(|(n, _)| *n == a.name));
        for (name, config) in now {
            if !self.attached.iter().any(|a| a.component == component && a.name == name) {
                self.attached.push(Attached { name, component, config, weight: 1.0 });
            }
        }
        out
    }

    /// Attaches a new adapter for training: initialised from the seed, its parameters
    /// trainable and everything else on that component frozen. Returns the adapted layers.
    pub fn add(&mut self, sd: &mut StableDiffusion, component: Component, name: &str, config: Box<dyn AdapterConfig>) -> Result<Vec<String>> {
        self.on(sd, component, |am| am.add_adapter(name, config))
    }

    /// Attaches an A1111-style hypernetwork described by `config` for training.
    pub fn add_hypernetwork(&mut self, sd: &mut StableDiffusion, name: &str, config: hypernetwork::HypernetworkConfig) -> Result<Vec<String>> {
        self.on(sd, Component::Unet, |am| hypernetwork::attach(am, name, config))
    }

    /// Pipeline paths (`unet.…`) of every parameter of adapter `name`: exactly what training
    /// the adapter changes.
    pub fn parameter_paths(&mut self, sd: &mut StableDiffusion, name: &str) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for c in self.components_of(name) {
            let paths = self.on(sd, c, |am| Ok(am.adapter_param_paths(name)))?;
            out.extend(paths.into_iter().map(|p| format!("{}.{p}", c.name())));
        }
        Ok(out)
    }

    /// Reads a LoRA in any format knobs knows (PEFT folder, diffusers folder or file, kohya
    /// file) and attaches each component's part as adapter `name` with `weight`; frozen.
    /// On an error nothing of the file stays attached.
    pub fn load_lora(&mut self, sd: &mut StableDiffusion, path: &Path, name: &str, weight: f32) -> Result<Vec<Component>> {
        if let Some(folders) = peft_folders(path)? {
            return self.attach_each(sd, name, weight, &folders, |am, dir| peft::load(am, dir, name));
        }
        if path.is_file() {
            let file = read_checked(path, "")?;
            if lycoris::is_lycoris(&file) {
                let parts: Vec<_> = components(path, lycoris::read(&file)?)?.into_iter().map(|(c, p)| (c, (p, kohya_names(sd, c)))).collect();
                return self.attach_each(sd, name, weight, &parts, |am, (part, names)| lycoris::attach_named(am, name, part, path, names).map(drop));
            }
        }
        let mut parts = components(path, lora_files::read(path)?)?;
        for (c, part) in parts.iter_mut().filter(|(_, p)| p.kohya_names) {
            part.resolve_kohya_in(&kohya_names(sd, *c))?;
        }
        self.attach_each(sd, name, weight, &parts, |am, lora| lora_files::attach(am, name, lora).map(drop))
    }

    /// Attaches one part per component as adapter `name` with `weight`, all or none: on an
    /// error the components already done lose the adapter again.
    fn attach_each<T>(&mut self, sd: &mut StableDiffusion, name: &str, weight: f32, parts: &[(Component, T)], attach: impl Fn(&mut AdaptedModel<&mut dyn Module>, &T) -> Result<()>) -> Result<Vec<Component>> {
        let mut done = Vec::new();
        for (c, part) in parts {
            if let Err(e) = self.on(sd, *c, |am| attach(am, part)) {
                for c in done {
                    self.on(sd, c, |am| am.delete_adapter(name))?;
                }
                return Err(e);
            }
            done.push(*c);
        }
        self.set_weight(name, weight);
        Ok(done)
    }

    /// Writes adapter `name` (LoHa, LoKr or DoRA; every component it is on) as one LyCORIS file
    /// (for SDXL with sd-scripts' names: SGM UNet blocks, `te1` / `te2`).
    pub fn save_lycoris_file(&mut self, sd: &mut StableDiffusion, name: &str, path: &Path) -> Result<()> {
        let mut parts = Vec::new();
        for c in self.components_of(name) {
            let mut part = self.on(sd, c, |am| lycoris::from_adapter(am, name))?;
            if let Some(sgm) = sgm_names(sd, c) {
                part.modules = std::mem::take(&mut part.modules).into_iter().map(|(p, m)| (sgm(&p), m)).collect();
            }
            parts.push((c.name(), part));
        }
        if parts.is_empty() {
            return Err(file_error(path, format!("no adapter named `{name}` to save")));
        }
        let refs: Vec<(&str, &lycoris::LycorisPart)> = parts.iter().map(|(n, p)| (*n, p)).collect();
        lycoris::save(path, &refs, sd.is_sdxl().then_some(kohya::SDXL_ARCHITECTURE))
    }

    /// Loads a PEFT folder of any adapter type onto `component` as `name`; frozen.
    pub fn load_peft(&mut self, sd: &mut StableDiffusion, component: Component, dir: &Path, name: &str) -> Result<()> {
        self.on(sd, component, |am| peft::load(am, dir, name))
    }

    /// Loads an A1111-style hypernetwork file onto the UNet with A1111's `strength`.
    /// Hypernetworks apply one after another: the last one loaded transforms the context
    /// first.
    pub fn load_hypernetwork(&mut self, sd: &mut StableDiffusion, path: &Path, name: &str, strength: f32) -> Result<Vec<String>> {
        self.on(sd, Component::Unet, |am| hypernetwork::load(am, path, name, strength))
    }

    /// Adds a textual-inversion embedding's tokens to the tokenizer and text encoder (both
    /// of them for an SDXL `clip_l` / `clip_g` file). Returns the first encoder's embedding
    /// and ids.
    pub fn load_embedding(&mut self, sd: &mut StableDiffusion, path: &Path) -> Result<(LearnedEmbedding, Vec<u32>)> {
        self.load_embedding_as(sd, path, None)
    }

    /// [`Self::load_embedding`] under `token` instead of the name the file gives.
    pub fn load_embedding_as(&mut self, sd: &mut StableDiffusion, path: &Path, token: Option<&str>) -> Result<(LearnedEmbedding, Vec<u32>)> {
        let sdxl_file = embeddings::is_sdxl_file(path)?;
        let (Some(tok2), Some(te2)) = (sd.tokenizer_2.as_mut(), sd.text_encoder_2.as_mut()) else {
            let (emb, ids) = embeddings::load(path, token, &mut sd.tokenizer, &mut sd.text_encoder)?;
            self.embeddings.push(emb.clone());
            return Ok((emb, ids));
        };
        if !sdxl_file {
            return Err(file_error(path, "an SD-1.x/2.x embedding (one table); an SDXL pipeline needs clip_l and clip_g tables, one per text encoder"));
        }
        let [l, g] = embeddings::read_sdxl(path, token)?;
        // Both or neither.
        embeddings::check(&l, &sd.tokenizer, &sd.text_encoder)?;
        embeddings::check(&g, tok2, te2)?;
        embeddings::add(&g, tok2, te2)?;
        let ids = embeddings::add(&l, &mut sd.tokenizer, &mut sd.text_encoder)?;
        self.embeddings.push(l.clone());
        Ok((l, ids))
    }

    fn set_weight(&mut self, name: &str, weight: f32) {
        for a in self.attached.iter_mut().filter(|a| a.name == name) {
            a.weight = weight;
        }
    }

    /// diffusers' `set_adapters`: exactly `weights` active, each with its weight, on every
    /// component that carries it. An unknown name is an error.
    pub fn set_adapters(&mut self, sd: &mut StableDiffusion, weights: &[(&str, f32)]) -> Result<()> {
        if let Some((n, _)) = weights.iter().find(|(n, _)| self.get(n).is_none()) {
            let known: Vec<String> = self.attached.iter().map(|a| a.name.clone()).collect();
            return Err(AdapterError::Unknown(n.to_string(), known));
        }
        for (n, w) in weights {
            self.set_weight(n, *w);
        }
        for c in Component::all_in(sd) {
            let here: Vec<(String, f32)> =
                weights.iter().filter(|(n, _)| self.components_of(n).contains(&c)).map(|(n, w)| (n.to_string(), *w)).collect();
            let refs: Vec<(&str, f32)> = here.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            self.on(sd, c, |am| am.set_adapters(&refs))?;
        }
        Ok(())
    }

    /// Makes every attached adapter active with the weight it was loaded with.
    pub fn activate_all(&mut self, sd: &mut StableDiffusion) -> Result<()> {
        let mut weights: Vec<(String, f32)> = Vec::new();
        for a in &self.attached {
            if !weights.iter().any(|(n, _)| *n == a.name) {
                weights.push((a.name.clone(), a.weight));
            }
        }
        let refs: Vec<(&str, f32)> = weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        self.set_adapters(sd, &refs)
    }

    /// Folds adapter `name` into the base weights on every component (it stays attached and
    /// can be unmerged exactly).
    pub fn merge(&mut self, sd: &mut StableDiffusion, name: &str) -> Result<()> {
        sd.unet.check_weights_in_memory()?;
        for c in self.components_of(name) {
            self.on(sd, c, |am| am.merge(&[name]))?;
        }
        Ok(())
    }

    /// Subtracts every merged adapter back out.
    pub fn unmerge(&mut self, sd: &mut StableDiffusion) -> Result<()> {
        for c in Component::all_in(sd) {
            self.on(sd, c, |am| {
                am.unmerge();
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Merges every active adapter for good and removes them all: plain weights, as a model
    /// folder stores them.
    pub fn fuse(&mut self, sd: &mut StableDiffusion) -> Result<()> {
        sd.unet.check_weights_in_memory()?;
        for c in Component::all_in(sd) {
            let model = c.model(sd);
            let mut am = AdaptedModel::new(model, 0);
            for a in self.attached.iter().filter(|a| a.component == c) {
                am.adopt(&a.name, a.config.clone())?;
            }
            am.merge_and_unload()?;
        }
        self.attached.clear();
        Ok(())
    }

    /// Removes adapter `name` (unmerging it first) from every component.
    pub fn delete(&mut self, sd: &mut StableDiffusion, name: &str) -> Result<()> {
        let components = self.components_of(name);
        if components.is_empty() {
            let known: Vec<String> = self.attached.iter().map(|a| a.name.clone()).collect();
            return Err(AdapterError::Unknown(name.to_string(), known));
        }
        for c in components {
            self.on(sd, c, |am| am.delete_adapter(name))?;
        }
        Ok(())
    }

    /// Writes adapter `name` as one PEFT folder per component, `{component}_{suffix}` in
    /// `dir` (diffusers' training scripts' `unet_lora/`). Returns the folders.
    pub fn save_peft(&mut self, sd: &mut StableDiffusion, name: &str, dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for c in self.components_of(name) {
            let folder = dir.join(format!("{}_{suffix}", c.name()));
            self.on(sd, c, |am| peft::save(am, name, &folder))?;
            out.push(folder);
        }
        Ok(out)
    }

    /// Writes LoRA adapter `name` (every component it is on) as one file; kohya files of SDXL
    /// get sd-scripts' names (SGM UNet blocks, `te1` / `te2`).
    pub fn save_lora_file(&mut self, sd: &mut StableDiffusion, name: &str, path: &Path, layout: LoraFile) -> Result<()> {
        let mut parts = Vec::new();
        for c in self.components_of(name) {
            let mut part = self.on(sd, c, |am| ComponentLora::from_adapter(am, name))?;
            if let (LoraFile::Kohya, Some(sgm)) = (layout, sgm_names(sd, c)) {
                part.rename_modules(sgm)?;
            }
            parts.push((c.name(), part));
        }
        if parts.is_empty() {
            return Err(file_error(path, format!("no adapter named `{name}` to save")));
        }
        let refs: Vec<(&str, &ComponentLora)> = parts.iter().map(|(n, c)| (*n, c)).collect();
        match layout {
            LoraFile::Diffusers => diffusers_lora::save(path, &refs, DiffusersKeys::Diffusers),
            LoraFile::Kohya => kohya::save(path, &refs, Some(if sd.is_sdxl() { kohya::SDXL_ARCHITECTURE } else { "stable-diffusion-v1/lora" })),
        }
    }

    /// Writes hypernetwork `name` with A1111's keys and settings.
    pub fn save_hypernetwork(&mut self, sd: &mut StableDiffusion, name: &str, path: &Path) -> Result<()> {
        self.on(sd, Component::Unet, |am| hypernetwork::save(am, name, path))
    }
}

/// The PEFT folders that `path` stands for when they are not plain LoRA (which the LoRA file
/// readers take, with their key-style tolerance): a PEFT folder of another method (DoRA, LoHa,
/// LoKr, OFT, IA3), onto the component its name starts with (`text_encoder_loha` ->
/// text encoder, anything else the UNet); or a `knobs train` output folder holding
/// `<component>_<method>/` PEFT folders. `None`: read `path` as a LoRA file or folder.
fn peft_folders(path: &Path) -> Result<Option<Vec<(Component, PathBuf)>>> {
    let component_of = |dir: &Path| {
        let n = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        match n.strip_prefix("text_encoder") {
            Some(rest) if rest.starts_with("_2") => Component::TextEncoder2,
            Some(_) => Component::TextEncoder,
            None => Component::Unet,
        }
    };
    if !path.is_dir() {
        return Ok(None);
    }
    if path.join(peft::CONFIG_FILE).exists() {
        return Ok(if peft::is_plain_lora(path)? { None } else { Some(vec![(component_of(path), path.to_path_buf())]) });
    }
    if path.join(lora_files::DIFFUSERS_FILE).exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|e| file_error(path, format!("cannot list: {e}")))?;
    let folders: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join(peft::CONFIG_FILE).exists()).collect();
    let mut found = Vec::new();
    for c in Component::ALL {
        let mut here: Vec<PathBuf> = folders
            .iter()
            // `unet/` (diffusers' SDXL PEFT layout) or `unet_lora/` (knobs train output).
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().strip_prefix(c.name()).is_some_and(|rest| rest.is_empty() || (rest.starts_with('_') && !rest.starts_with("_2")))))
            .cloned()
            .collect();
        here.sort();
        if here.len() > 1 {
            return Err(file_error(path, format!("holds several {} adapters ({here:?}); pass one of them", c.name())));
        }
        found.extend(here.into_iter().map(|p| (c, p)));
    }
    Ok(if found.is_empty() { None } else { Some(found) })
}

/// The kohya names of `c`'s layers: their own (`down_blocks_1_attentions_0_proj_in`) and,
/// for the UNet, the original code's block names (`input_blocks_4_1_proj_in`), which
/// sd-scripts writes for SDXL.
fn kohya_names(sd: &StableDiffusion, c: Component) -> kohya::KohyaNames {
    let mut names = kohya::KohyaNames::of(c.module(sd));
    let Some(layout) = (c == Component::Unet).then(|| UnetLayout::of(&sd.unet.config).ok()).flatten() else { return names };
    sd.unet.for_each_layer(|path, _| {
        if let Some(sgm) = keys::unet_layer(path, &layout) {
            names.alias(path, &sgm);
        }
    });
    names
}

/// For an SDXL UNet, the map from layer paths to the original code's (what sd-scripts'
/// SDXL files name); `None` elsewhere.
fn sgm_names(sd: &StableDiffusion, c: Component) -> Option<impl Fn(&str) -> String> {
    let layout = (sd.is_sdxl() && c == Component::Unet).then(|| UnetLayout::of(&sd.unet.config).ok()).flatten()?;
    Some(move |path: &str| keys::unet_layer(path, &layout).unwrap_or_else(|| path.to_string()))
}

/// A reader's parts keyed by component prefix (`unet`, `text_encoder`, `""`), as components;
/// a prefix the pipeline lacks names the file.
fn components<T>(path: &Path, parts: std::collections::BTreeMap<String, T>) -> Result<Vec<(Component, T)>> {
    parts.into_iter().map(|(prefix, part)| Ok((Component::from_prefix(&prefix).map_err(|e| file_error(path, e))?, part))).collect()
}
