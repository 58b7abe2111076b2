//! VAE posteriors kept by image content (`--cache-latents`): in memory, and with
//! `--latent-cache DIR` on disk too (kohya's `--cache_latents_to_disk`), so that a resumed run,
//! or another run on the same images with the same VAE, encodes nothing. At 1024 px an SDXL
//! encode takes about half a minute on two CPU cores.
//!
//! A file is named by a hash of the image's pixels and of the VAE encoder's weights, so a
//! folder may be shared by runs on several models: each finds only its own VAE's latents.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use knobs_diffusion::vae::{AutoencoderKL, DiagonalGaussian};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::hash::fnv1a_seeded;
use knobs_nn::io::{read_safetensors, write_safetensors};
use knobs_nn::{Device, ModuleExt, Tensor};

/// What the files of a cache folder say they are.
const FORMAT: &str = "knobs-latents";

pub struct LatentCache {
    memory: Mutex<HashMap<u64, DiagonalGaussian>>,
    disk: Option<Disk>,
    /// Posteriors read from the folder, and encoded, so far.
    read: AtomicUsize,
    encoded: AtomicUsize,
}

struct Disk {
    dir: PathBuf,
    /// The hash of the encoder's weights, part of every file's name.
    vae: u64,
}

impl LatentCache {
    pub fn in_memory() -> Self {
        LatentCache { memory: Mutex::new(HashMap::new()), disk: None, read: AtomicUsize::new(0), encoded: AtomicUsize::new(0) }
    }

    /// A cache that also reads and writes `dir` (made if missing), for `vae`'s latents.
    pub fn on_disk(dir: &Path, vae: &AutoencoderKL) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("--latent-cache {}: cannot create the folder", dir.display()))?;
        Ok(LatentCache { disk: Some(Disk { dir: dir.to_path_buf(), vae: encoder_hash(vae) }), ..Self::in_memory() })
    }

    /// How many posteriors are held in memory.
    pub fn len(&self) -> usize {
        self.memory.lock().expect("latent cache").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many posteriors were read from the folder and how many were encoded.
    pub fn counts(&self) -> (usize, usize) {
        (self.read.load(Ordering::Relaxed), self.encoded.load(Ordering::Relaxed))
    }

    /// The posterior of the image keyed `key`: from memory, else from the folder, else from
    /// `encode` (then kept in both).
    pub fn posterior(&self, key: u64, device: &Device, encode: impl FnOnce() -> Result<DiagonalGaussian>) -> Result<DiagonalGaussian> {
        let mut memory = self.memory.lock().expect("latent cache");
        if let Some(p) = memory.get(&key) {
            return Ok(p.clone());
        }
        let encode = || {
            self.encoded.fetch_add(1, Ordering::Relaxed);
            encode()
        };
        let p = match &self.disk {
            Some(disk) => {
                let (p, read) = disk.posterior(key, device, encode)?;
                self.read.fetch_add(read as usize, Ordering::Relaxed);
                p
            }
            None => encode()?,
        };
        memory.insert(key, p.clone());
        Ok(p)
    }
}

impl Disk {
    fn path(&self, key: u64) -> PathBuf {
        self.dir.join(format!("{:016x}.safetensors", fnv1a_seeded(&key.to_le_bytes(), self.vae)))
    }

    /// The posterior, and whether it was read from the folder.
    fn posterior(&self, key: u64, device: &Device, encode: impl FnOnce() -> Result<DiagonalGaussian>) -> Result<(DiagonalGaussian, bool)> {
        let path = self.path(key);
        if path.exists() {
            let p = read(&path, device).with_context(|| format!("--latent-cache: {} is not a latent file knobs wrote; delete it to encode its image again", path.display()))?;
            return Ok((p, true));
        }
        let p = encode()?;
        let mut tensors = BTreeMap::new();
        tensors.insert("mean".to_string(), p.mean.to_data());
        tensors.insert("logvar".to_string(), p.logvar.to_data());
        let metadata = HashMap::from([("format".to_string(), FORMAT.to_string())]);
        write_safetensors(&path, &tensors, &metadata).with_context(|| format!("--latent-cache: cannot write {}", path.display()))?;
        Ok((p, false))
    }
}

fn read(path: &Path, device: &Device) -> Result<DiagonalGaussian> {
    let file = read_safetensors(path)?;
    if file.metadata.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("its metadata has no format `{FORMAT}`");
    }
    let tensor = |key: &str| -> Result<Tensor<4>> {
        let data = file.get(key)?;
        if data.shape().len() != 4 {
            bail!("`{key}` has shape {:?}, not [1, C, h, w]", data.shape());
        }
        Ok(Tensor::from_data(data.clone(), device))
    };
    let (mean, logvar) = (tensor("mean")?, tensor("logvar")?);
    if mean.dims() != logvar.dims() {
        bail!("`mean` {:?} and `logvar` {:?} differ in shape", mean.dims(), logvar.dims());
    }
    Ok(DiagonalGaussian { mean, logvar })
}

/// FNV-1a over the paths, shapes and stored bytes of the encoder's weights (and its
/// quant_conv): what an encode depends on.
fn encoder_hash(vae: &AutoencoderKL) -> u64 {
    let mut h = knobs_nn::hash::OFFSET_BASIS;
    vae.for_each_param(|path, p| {
        if path.starts_with("encoder.") || path.starts_with("quant_conv.") {
            let data: TensorData = p.to_data();
            h = fnv1a_seeded(path.as_bytes(), h);
            h = fnv1a_seeded(format!("{:?}{:?}", data.shape(), data.dtype()).as_bytes(), h);
            h = fnv1a_seeded(data.bytes(), h);
        }
    });
    h
}
