//! `knobs demo`: the adapter core end to end on a model that is not a UNet. Trains each
//! method on the toy task with the base frozen, checks the base is untouched, merges, and
//! writes each adapter as a PEFT folder.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use knobs_adapters::formats::peft;
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, AdapterConfig, Pattern};
use knobs_nn::io::state_dict;
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::toy::{TinyNet, accuracy, batch, cross_entropy};
use knobs_nn::ModuleExt;

#[derive(clap::Args)]
pub struct Args {
    /// Methods to train, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "lora,ia3")]
    methods: Vec<String>,
    /// Optimizer steps per method.
    #[arg(long, default_value_t = 150)]
    steps: usize,
    /// Folder for the trained adapters (PEFT format).
    #[arg(long, default_value = "knobs-demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print a JSON summary instead of a table.
    #[arg(long)]
    json: bool,
}

fn config(method: &str) -> Result<(Box<dyn AdapterConfig>, f64)> {
    Ok(match method {
        "lora" => (Box::new(LoraConfig::new(4, 8.0, Pattern::names(&["embed", "conv", "fc1", "fc2", "head"]))), 2e-2),
        "ia3" => (Box::new(Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2", "head"]), Pattern::names(&["fc2"]))), 5e-2),
        other => anyhow::bail!("--methods: unknown method `{other}`; supported: lora, ia3"),
    })
}

pub fn run(args: Args) -> Result<()> {
    let device = knobs_nn::device::training();
    let data = batch(64, args.seed + 1, &device);
    let held_out = batch(64, args.seed + 2, &device);
    let mut rows = Vec::new();
    for method in &args.methods {
        let (cfg, lr) = config(method)?;
        let mut m = AdaptedModel::new(TinyNet::new(args.seed, &device), args.seed + 3);
        let base = state_dict(&m.model);
        let base_acc = accuracy(m.model.forward(data.ids.clone(), data.img.clone()), &data.labels);
        m.add_adapter(method, cfg)?;
        let mut opt = AdamW::new(AdamWConfig { lr, weight_decay: 0.0, ..Default::default() });
        let bar = ProgressBar::new(args.steps as u64);
        bar.set_style(ProgressStyle::with_template("{msg:>5} [{bar:30}] {pos}/{len} loss {prefix} {per_sec} eta {eta}").unwrap());
        bar.set_message(method.clone());
        let start = Instant::now();
        for _ in 0..args.steps {
            let loss = cross_entropy(m.model.forward(data.ids.clone(), data.img.clone()), &data.labels);
            bar.set_prefix(format!("{:.4}", loss.clone().into_scalar::<f32>()));
            let grads = collect_grads(&m.model, &loss.backward());
            opt.step(&mut m.model, &grads, |_| lr);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let acc = accuracy(m.model.forward(data.ids.clone(), data.img.clone()), &data.labels);
        let after = state_dict(&m.model);
        ensure!(base.iter().all(|(k, v)| after[k] == *v), "a base parameter changed during {method} training");
        let dir = args.out.join(method);
        peft::save(&m, method, &dir).with_context(|| format!("saving {}", dir.display()))?;
        let unmerged = m.model.forward(held_out.ids.clone(), held_out.img.clone());
        m.merge(&[])?;
        let merged = m.model.forward(held_out.ids.clone(), held_out.img.clone());
        let merge_diff: f32 = (merged - unmerged).abs().max().into_scalar();
        let bytes = std::fs::metadata(dir.join(peft::WEIGHTS_FILE))?.len();
        rows.push(serde_json::json!({
            "method": method, "trainable_params": m.model.num_trainable_params(), "total_params": m.model.num_params(),
            "steps": args.steps, "seconds": seconds, "train_accuracy_before": base_acc, "train_accuracy_after": acc,
            "merge_max_abs_diff": merge_diff, "adapter_file_bytes": bytes, "adapter_dir": dir,
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<6} {:>10} {:>9} {:>9} {:>9} {:>10}  folder", "method", "trainable", "acc.base", "acc.after", "seconds", "merge.diff");
        for r in &rows {
            println!(
                "{:<6} {:>10} {:>9.3} {:>9.3} {:>9.2} {:>10.1e}  {}",
                r["method"].as_str().unwrap(), r["trainable_params"], r["train_accuracy_before"].as_f64().unwrap(),
                r["train_accuracy_after"].as_f64().unwrap(), r["seconds"].as_f64().unwrap(), r["merge_max_abs_diff"].as_f64().unwrap(),
                r["adapter_dir"].as_str().unwrap()
            );
        }
    }
    Ok(())
}
