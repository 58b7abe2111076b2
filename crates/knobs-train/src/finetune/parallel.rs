//! Data-parallel training (`--devices`): a replica of the pipeline on each device after the
//! first, each step's batch split between them by rows. Every replica draws the whole batch's
//! noise and timesteps and computes only its rows (`Objective::per_sample_rows`), so a run on
//! N devices with batch B equals one device with batch N x B. Gradients are summed on the
//! first device, which alone steps the optimizer; the trained values are then copied to the
//! other replicas.
use std::path::Path;

use anyhow::{Context, Result, bail};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::device::Target;
use knobs_nn::io::{LoadOptions, StateDict, load_state_dict};
use knobs_nn::optim::{Grads, collect_grads};
use knobs_nn::{ModuleExt, Tensor};
use rand::rngs::StdRng;

use super::config::TrainConfig;
use super::trainer::{Batch, attach_for_training, load_for_training, objective_for};
use crate::objective::{LossOptions, Objective};

/// One extra device's copy of the pipeline and its objective.
pub struct Replica {
    pub target: Target,
    sd: StableDiffusion,
    objective: Objective,
    /// Owns the replica's adapters (kept alive with it).
    _adapters: PipelineAdapters,
}

/// The devices of `--devices`, or just the run's own.
pub fn targets(cfg: &TrainConfig) -> Result<Vec<Target>> {
    let Some(list) = &cfg.run.devices else { return Ok(vec![knobs_nn::device::selected()]) };
    let targets = knobs_nn::device::parse_list(list)?;
    if targets[0] != knobs_nn::device::selected() {
        bail!("--devices {list}: the first device is the run's own; it differs from --device {}", knobs_nn::device::selected());
    }
    if cfg.method.own_loop() {
        bail!("--devices: --method {} runs its own loop, on one device", cfg.method);
    }
    Ok(targets)
}

/// The pipeline on each of `targets` (the first excluded: the caller's), prepared as the
/// trainer prepares its own: same weights dtype, compute dtype, adapters (same seed: same
/// initial values) and trainable set.
pub fn replicas(cfg: &TrainConfig, model: &Path, targets: &[Target]) -> Result<Vec<Replica>> {
    targets
        .iter()
        .skip(1)
        .map(|&target| {
            let dev = knobs_nn::device::training_on(target).with_context(|| format!("--devices: {target}"))?;
            let mut sd = load_for_training(cfg, model, &dev).with_context(|| format!("on {target}"))?;
            let mut adapters = PipelineAdapters::new(cfg.optim.seed);
            attach_for_training(cfg, &mut sd, &mut adapters)?;
            let objective = objective_for(cfg, &sd, &dev)?;
            Ok(Replica { target, sd, objective, _adapters: adapters })
        })
        .collect()
}

/// Copies the trained values of `primary` into every replica.
pub fn broadcast(primary: &StableDiffusion, replicas: &mut [Replica]) -> Result<()> {
    if replicas.is_empty() {
        return Ok(());
    }
    let mut trained = StateDict::default();
    primary.for_each_param(|path, p| {
        if p.is_trainable() {
            trained.tensors.insert(path.to_string(), p.to_data());
        }
    });
    for r in replicas {
        load_state_dict(&mut r.sd, &trained, LoadOptions { allow_missing: true, ..Default::default() }).with_context(|| format!("copying the trained values to {}", r.target))?;
    }
    Ok(())
}

/// The rows each of `parts` devices computes: the batch is `instances` rows then as many
/// class rows (prior preservation) or none; each device takes an equal run of each.
pub fn split_rows(instances: usize, total: usize, parts: usize) -> Vec<Vec<usize>> {
    let (per_instance, classes) = (instances / parts, total - instances);
    let per_class = classes / parts;
    (0..parts)
        .map(|i| (i * per_instance..(i + 1) * per_instance).chain(instances + i * per_class..instances + (i + 1) * per_class).collect())
        .collect()
}

/// Each row's share of the loss: the instance mean plus `prior_weight` times the class mean.
fn row_weights(rows: &[usize], instances: usize, total: usize, prior_weight: f64, accum: usize) -> Vec<f32> {
    rows.iter()
        .map(|&r| if r < instances { 1.0 / instances as f64 } else { prior_weight / (total - instances) as f64 } / accum as f64)
        .map(|w| w as f32)
        .collect()
}

/// One micro-step over every device: the loss value and the summed gradients, on the
/// primary's device.
#[allow(clippy::too_many_arguments)]
pub fn step(
    primary: (&StableDiffusion, &Objective),
    replicas: &[Replica],
    batch: &Batch,
    (rng, dropout_seed): (&StdRng, u64),
    options: LossOptions,
    prior_weight: f64,
    accum: usize,
) -> Result<(f64, Grads)> {
    let parts = 1 + replicas.len();
    let rows = split_rows(batch.instances, batch.images.len(), parts);
    let devices: Vec<(&StableDiffusion, &Objective)> = std::iter::once(primary).chain(replicas.iter().map(|r| (&r.sd, &r.objective))).collect();
    let results: Vec<Result<(f64, Grads)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .zip(&rows)
            .enumerate()
            .map(|(i, (&(sd, objective), rows))| {
                let mut rng = rng.clone();
                scope.spawn(move || -> Result<(f64, Grads)> {
                    // Adapter dropout: a stream of its own per device, fixed by the step's seed.
                    knobs_nn::dropout::seed_thread(dropout_seed.wrapping_add(i as u64));
                    let per = objective.per_sample_rows(sd, &batch.images, &batch.sizes, &batch.prompts, &mut rng, options, rows)?;
                    let weights = row_weights(rows, batch.instances, batch.images.len(), prior_weight, accum);
                    let weights = Tensor::<1>::from_floats(weights.as_slice(), &per.device());
                    let loss = (per * weights).sum();
                    let value = loss.clone().into_scalar::<f32>() as f64;
                    Ok((value, collect_grads(sd, &loss.backward())))
                })
            })
            .collect();
        handles.into_iter().map(|h| knobs_nn::join_helping(h).unwrap_or_else(|_| Err(anyhow::anyhow!("a device's step panicked")))).collect()
    });
    let mut value = 0.0;
    let mut total: Option<Grads> = None;
    for result in results {
        let (v, grads) = result?;
        value += v;
        match &mut total {
            // The primary's gradients come first: the sum lives where they are.
            None => total = Some(grads),
            Some(acc) => {
                for (k, g) in grads {
                    let sum = match acc.get(&k) {
                        Some(a) => a.clone() + g.to_device(&a.device()),
                        None => bail!("{k}: a gradient on one device only"),
                    };
                    acc.insert(k, sum);
                }
            }
        }
    }
    Ok((value, total.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_instances_and_classes_evenly() {
        assert_eq!(split_rows(4, 4, 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(split_rows(4, 8, 2), vec![vec![0, 1, 4, 5], vec![2, 3, 6, 7]]);
        let w = row_weights(&[0, 1, 4, 5], 4, 8, 0.5, 1);
        assert_eq!(w, [0.25, 0.25, 0.125, 0.125]);
    }
}
