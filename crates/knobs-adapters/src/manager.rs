//! Several named adapters on one model, managed as PEFT's `PeftModel` and diffusers'
//! `set_adapters` do: add, activate, weigh, disable, delete, merge, unmerge, unload.
use std::collections::{BTreeMap, HashMap, HashSet};

use knobs_nn::adapter::AdapterState;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::StateDict;
use knobs_nn::{Init, Module, ModuleExt, ParamFn, ParamMutFn};

use crate::target::name_matches;
use crate::{AdapterConfig, AdapterError, Result, strip_adapter_name};

pub struct AdaptedModel<M: Module> {
    pub model: M,
    configs: Vec<(String, Box<dyn AdapterConfig>)>,
    init: Init,
}

impl<M: Module> AdaptedModel<M> {
    /// Wraps `model`; `seed` drives the initialisation of every adapter added later.
    pub fn new(model: M, seed: u64) -> Self {
        AdaptedModel { model, configs: Vec::new(), init: Init::new(seed) }
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn config(&self, name: &str) -> Result<&dyn AdapterConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c.as_ref()).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> AdapterError {
        AdapterError::Unknown(name.to_string(), self.adapter_names())
    }

    pub(crate) fn register(&mut self, name: &str, config: Box<dyn AdapterConfig>) {
        self.configs.retain(|(n, _)| n != name);
        self.configs.push((name.to_string(), config));
    }

    /// Attaches a new adapter to every layer its targets select, makes it active alongside
    /// those already active, and makes it (and its `modules_to_save`) the only trainable
    /// parameters. Returns the paths of the adapted layers.
    pub fn add_adapter(&mut self, name: &str, config: Box<dyn AdapterConfig>) -> Result<Vec<String>> {
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(AdapterError::Config(format!("an adapter named `{name}` is already loaded; delete it first")));
        }
        if name.is_empty() || name.contains('.') {
            return Err(AdapterError::Config(format!("adapter name `{name}` must be non-empty and contain no `.`")));
        }
        let paths: HashSet<String> = config.targets().select(&self.model)?.into_iter().collect();
        self.check_modules_to_save(config.as_ref())?;
        let mut error = None;
        let init = &mut self.init;
        self.model.for_each_layer_mut(|path, layer| {
            if error.is_none() && paths.contains(path) {
                error = config.attach(path, layer, name, init).err();
            }
        });
        if let Some(e) = error {
            self.remove_from_layers(name);
            return Err(e);
        }
        self.register(name, config);
        self.train_adapter(name)?;
        let mut sorted: Vec<String> = paths.into_iter().collect();
        sorted.sort();
        Ok(sorted)
    }

    fn check_modules_to_save(&self, config: &dyn AdapterConfig) -> Result<()> {
        let modules = self.base_module_paths();
        for pattern in config.modules_to_save() {
            if !modules.iter().any(|m| name_matches(pattern, m)) {
                return Err(AdapterError::NoMatch { pattern: pattern.clone(), near: modules.iter().take(5).cloned().collect() });
            }
        }
        Ok(())
    }

    /// Paths of the adapter parameters of `name`, in memory (with the adapter name).
    pub fn adapter_param_paths(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.model.for_each_layer(|path, layer| {
            layer.visit_adapter(path, name, &mut ParamFn(|p: &str, _: knobs_nn::ParamRef<'_>| out.push(p.to_string())));
        });
        out
    }

    fn all_adapter_param_paths(&self) -> HashSet<String> {
        self.adapter_names().iter().flat_map(|n| self.adapter_param_paths(n)).collect()
    }

    /// Modules owning base parameters (`a.b.weight` -> `a.b`).
    fn base_module_paths(&self) -> Vec<String> {
        let adapter = self.all_adapter_param_paths();
        let mut out: Vec<String> = self
            .model
            .param_paths()
            .into_iter()
            .filter(|p| !adapter.contains(p))
            .filter_map(|p| p.rsplit_once('.').map(|(m, _)| m.to_string()))
            .collect();
        out.dedup();
        out
    }

    /// Base parameters that `modules_to_save` of adapter `name` selects.
    fn saved_module_params(&self, name: &str) -> Result<Vec<String>> {
        let patterns = self.config(name)?.modules_to_save().to_vec();
        let adapter = self.all_adapter_param_paths();
        Ok(self
            .model
            .param_paths()
            .into_iter()
            .filter(|p| !adapter.contains(p))
            .filter(|p| p.rsplit_once('.').is_some_and(|(m, _)| patterns.iter().any(|pat| name_matches(pat, m))))
            .collect())
    }

    /// Takes charge of adapter `name` that was attached to this model earlier (by another
    /// `AdaptedModel` over the same layers), so that it can be saved, merged or deleted.
    pub fn adopt(&mut self, name: &str, config: Box<dyn AdapterConfig>) -> Result<()> {
        let mut found = false;
        self.model.for_each_layer(|_, layer| found |= layer.adapter_states().iter().any(|(n, _)| n == name));
        if !found {
            return Err(AdapterError::Config(format!("no layer of the model carries an adapter named `{name}`")));
        }
        self.register(name, config);
        Ok(())
    }

    /// Freezes everything except adapter `name` and its `modules_to_save`.
    pub fn train_adapter(&mut self, name: &str) -> Result<()> {
        let trainable: HashSet<String> = self.adapter_param_paths(name).into_iter().chain(self.saved_module_params(name)?).collect();
        self.model.train_only(|p| trainable.contains(p));
        Ok(())
    }

    /// Freezes every parameter and takes it out of autodiff, for inference.
    pub fn freeze(&mut self) {
        self.model.for_inference();
    }

    pub(crate) fn set_state(&mut self, name: &str, mut f: impl FnMut(&mut AdapterState)) {
        self.model.for_each_layer_mut(|_, mut layer| {
            layer.for_each_state(|n, s| {
                if n == name {
                    f(s)
                }
            })
        });
    }

    fn check_names(&self, names: &[&str]) -> Result<()> {
        match names.iter().find(|n| !self.configs.iter().any(|(c, _)| c == *n)) {
            Some(n) => Err(self.unknown(n)),
            None => Ok(()),
        }
    }

    /// Makes exactly `names` active.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        self.check_names(names)?;
        self.model.for_each_layer_mut(|_, mut layer| layer.for_each_state(|n, s| s.active = names.contains(&n)));
        Ok(())
    }

    /// diffusers' `set_adapters(names, weights)`: exactly these adapters active, each with
    /// its weight.
    pub fn set_adapters(&mut self, weights: &[(&str, f32)]) -> Result<()> {
        let names: Vec<&str> = weights.iter().map(|(n, _)| *n).collect();
        self.set_active(&names)?;
        for (name, w) in weights {
            self.set_state(name, |s| s.weight = *w);
        }
        Ok(())
    }

    /// Adapters active on at least one layer, in the order they were added.
    pub fn active_adapters(&self) -> Vec<String> {
        let mut found = HashSet::new();
        self.model.for_each_layer(|_, layer| {
            found.extend(layer.adapter_states().into_iter().filter(|(_, s)| s.active).map(|(n, _)| n));
        });
        self.adapter_names().into_iter().filter(|n| found.contains(n)).collect()
    }

    /// Runs `f` on the base model alone (PEFT's `disable_adapter` context). Merged adapters
    /// are unmerged first, as PEFT does.
    pub fn with_disabled<R>(&mut self, f: impl FnOnce(&M) -> R) -> R {
        self.unmerge();
        self.model.for_each_layer_mut(|_, mut l| l.set_enabled(false));
        let out = f(&self.model);
        self.model.for_each_layer_mut(|_, mut l| l.set_enabled(true));
        out
    }

    pub(crate) fn remove_from_layers(&mut self, name: &str) {
        self.model.for_each_layer_mut(|_, mut layer| {
            layer.unmerge_adapter(name);
            layer.remove_adapter(name);
        });
    }

    /// Removes adapter `name`, unmerging it first if it was merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_names(&[name])?;
        self.remove_from_layers(name);
        self.configs.retain(|(n, _)| n != name);
        Ok(())
    }

    /// Folds `names` (the active adapters when empty) into the base weights.
    pub fn merge(&mut self, names: &[&str]) -> Result<()> {
        self.check_names(names)?;
        let names: Vec<String> = if names.is_empty() { self.active_adapters() } else { names.iter().map(|s| s.to_string()).collect() };
        for n in &names {
            self.config(n)?.check_merge().map_err(|e| AdapterError::Config(format!("adapter `{n}`: {e}")))?;
        }
        let mut merged: HashMap<String, Vec<String>> = HashMap::new();
        let mut error = None;
        self.model.for_each_layer_mut(|path, mut layer| {
            for n in &names {
                if error.is_some() {
                    return;
                }
                match layer.merge_adapter(n) {
                    Ok(true) => merged.entry(path.to_string()).or_default().push(n.clone()),
                    Ok(false) => {}
                    Err(e) => error = Some(AdapterError::Config(format!("merging into `{path}`: {e}"))),
                }
            }
        });
        let Some(e) = error else { return Ok(()) };
        // Take out what this call merged, last first, so a failed merge leaves the model as it was.
        self.model.for_each_layer_mut(|path, mut layer| {
            for n in merged.get(path).into_iter().flatten().rev() {
                layer.unmerge_adapter(n);
            }
        });
        Err(e)
    }

    /// Subtracts every merged adapter back out of the base weights.
    pub fn unmerge(&mut self) {
        self.model.for_each_layer_mut(|_, mut layer| {
            for n in layer.adapter_names().iter().rev() {
                layer.unmerge_adapter(n);
            }
        });
    }

    /// Merges the active adapters and returns the plain model; an error if one of them cannot
    /// be merged (a hypernetwork).
    pub fn merge_and_unload(mut self) -> Result<M> {
        self.merge(&[])?;
        Ok(self.strip())
    }

    /// Removes every adapter without merging and returns the base model.
    pub fn unload(mut self) -> M {
        self.unmerge();
        self.strip()
    }

    fn strip(mut self) -> M {
        self.model.for_each_layer_mut(|_, mut layer| {
            for n in layer.adapter_names() {
                layer.remove_adapter(&n);
            }
        });
        self.model
    }

    /// Switches train-only behaviour (dropout) of every adapter.
    pub fn set_training(&mut self, training: bool) {
        self.model.for_each_layer_mut(|_, mut l| l.set_training(training));
    }

    /// The tensors of adapter `name` under PEFT's file keys (without `base_model.model.`):
    /// adapter parameters without the adapter name, and `modules_to_save` parameters as is.
    pub fn adapter_state_dict(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        self.check_names(&[name])?;
        let mut out = BTreeMap::new();
        self.model.for_each_layer(|path, layer| {
            layer.visit_adapter(path, name, &mut ParamFn(|p: &str, t: knobs_nn::ParamRef<'_>| {
                out.insert(strip_adapter_name(p, name), t.to_data());
            }));
        });
        let saved: HashSet<String> = self.saved_module_params(name)?.into_iter().collect();
        self.model.for_each_param(|p, t| {
            if saved.contains(p) {
                out.insert(p.to_string(), t.to_data());
            }
        });
        Ok(out)
    }

    /// Loads adapter `name`'s tensors from `sd`, whose keys are `prefix` + file key. Every
    /// adapter parameter must be present with its shape, and every key under `prefix` must
    /// belong to this adapter: a key for a module the model lacks is an error.
    pub fn load_adapter_state_dict(&mut self, name: &str, sd: &StateDict, prefix: &str) -> Result<()> {
        self.check_names(&[name])?;
        let saved: HashSet<String> = self.saved_module_params(name)?.into_iter().collect();
        let mut used = HashSet::new();
        let mut error: Option<knobs_nn::Error> = None;
        let mut take = |key: String, mut p: knobs_nn::ParamMut<'_>| {
            if error.is_some() {
                return;
            }
            let full = format!("{prefix}{key}");
            match sd.tensors.get(&full) {
                Some(d) => match p.assign(&full, d.clone()) {
                    Ok(()) => {
                        used.insert(full);
                    }
                    Err(e) => error = Some(e.in_file(&sd.file)),
                },
                None => error = Some(knobs_nn::Error::key(&sd.file, full, "the adapter needs this tensor and the file lacks it")),
            }
        };
        self.model.for_each_layer_mut(|path, mut layer| {
            layer.visit_adapter_mut(path, name, &mut ParamMutFn(|p: &str, t: knobs_nn::ParamMut<'_>| take(strip_adapter_name(p, name), t)));
        });
        self.model.for_each_param_mut(|p, t| {
            if saved.contains(p) {
                take(p.to_string(), t)
            }
        });
        if let Some(e) = error {
            return Err(e.into());
        }
        if let Some(extra) = sd.tensors.keys().find(|k| k.starts_with(prefix) && !used.contains(*k)) {
            return Err(knobs_nn::Error::key(&sd.file, extra, format!("fits no `{name}` adapter parameter: the model has no such module, or the adapter's targets do not cover it")).into());
        }
        Ok(())
    }
}
