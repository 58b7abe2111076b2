//! `knobs adapter inspect`: what an adapter file holds.
use std::path::{Path, PathBuf};

use anyhow::Result;
use knobs_adapters::formats::peft;
use knobs_nn::io::read_safetensors;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the method, config and tensors of a PEFT folder or a safetensors adapter file.
    Inspect {
        /// A PEFT folder (adapter_config.json + adapter_model.safetensors) or a .safetensors file.
        path: PathBuf,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Inspect { path } => inspect(&path),
    }
}

fn inspect(path: &Path) -> Result<()> {
    let weights = if path.is_dir() {
        let config = peft::read_config(path)?;
        println!("{}", serde_json::to_string_pretty(&config.to_peft_json())?);
        path.join(peft::WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    };
    let sd = read_safetensors(&weights)?;
    let mut total = 0usize;
    for (key, t) in &sd.tensors {
        let n: usize = t.shape().as_slice().iter().product();
        total += n;
        println!("{key} {:?}", t.shape().as_slice());
    }
    for (k, v) in &sd.metadata {
        println!("metadata {k} = {}", if v.len() > 200 { &v[..200] } else { v });
    }
    println!("{} tensors, {total} values, {} bytes", sd.tensors.len(), std::fs::metadata(&weights)?.len());
    Ok(())
}
