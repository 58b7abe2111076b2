//! `knobs train` end to end on a tiny model: every method writes files the ecosystem loads,
//! a killed run resumes bit-identically (on another thread count, with AdamW and 8-bit AdamW), textual inversion touches nothing but its rows,
//! prior preservation caches its class images, and bad input names the flag at fault.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fail, knobs, ok, s, tiny_model};
use knobs_nn::io::read_safetensors;

fn train(out: &Path, method: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["train", "--model", s(tiny_model()), "--method", method, "--concept", "striped-star", "--out", s(out), "--json"];
    args.extend_from_slice(extra);
    let stdout = ok(&args);
    serde_json::from_str(stdout.lines().last().unwrap()).expect("--json prints one JSON object")
}

/// Runs `knobs args` writing into `out` and kills it once checkpoint `step` exists, before
/// the run finishes.
fn kill_after_checkpoint(args: &[&str], out: &Path, step: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_knobs")).args(args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join(format!("checkpoints/train-{step:08}.safetensors")).exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("summary.json").exists(), "the run must have been killed before it finished");
}

fn checkpoint_keys(out: &Path) -> BTreeSet<String> {
    let dir = out.join("checkpoints");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let sd = read_safetensors(files.last().unwrap()).unwrap();
    sd.tensors.keys().filter_map(|k| k.strip_prefix("model.")).map(String::from).collect()
}

#[test]
fn lora_files_reload_in_generate_and_reproduce_the_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let summary = train(&out, "lora", &["--max-train-steps", "3", "--rank", "2"]);
    assert_eq!(summary["method"], "lora");
    assert_eq!(summary["steps"], 3);
    assert!(summary["trainable_params"].as_u64().unwrap() > 0);
    assert!(summary["output_bytes"].as_u64().unwrap() > 0);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet_lora/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 2);
    assert_eq!(std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().count(), 4);
    let generated = tmp.path().join("gen.png");
    ok(&["generate", "--model", s(tiny_model()), "--lora", s(&out.join("pytorch_lora_weights.safetensors")), "--prompt", "a sks star",
        "--steps", "25", "--guidance", "5", "--seed", "0", "--num-images", "4", "--out", s(&generated)]);
    for i in 0..4 {
        let a = std::fs::read(tmp.path().join(format!("gen-{i}.png"))).unwrap();
        let b = std::fs::read(out.join(format!("samples/{i}.png"))).unwrap();
        assert!(a == b, "generate with the saved LoRA must reproduce sample {i}");
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = ["--max-train-steps", "30", "--checkpointing-steps", "2", "--rank", "2", "--train-batch-size", "1"];
    // The uninterrupted run on one thread, the killed and resumed one on two: results must
    // not depend on the thread count either.
    let whole = tmp.path().join("whole");
    let mut one_thread = steps.to_vec();
    one_thread.extend_from_slice(&["--threads", "1"]);
    train(&whole, "lora", &one_thread);
    let cut = tmp.path().join("cut");
    let mut args = vec!["--threads", "2", "train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(&cut)];
    args.extend_from_slice(&steps);
    kill_after_checkpoint(&args, &cut, 4);
    let mut resume = args.clone();
    resume.extend_from_slice(&["--resume", s(&cut)]);
    ok(&resume);
    for file in ["pytorch_lora_weights.safetensors", "loss.csv", "samples/0.png"] {
        assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(cut.join(file)).unwrap(), "{file} differs after resume");
    }
}

/// A full fine-tune with 8-bit AdamW: its checkpoints hold 8-bit moments, a killed run resumes
/// bit-identically (on another thread count), and resuming it with another optimizer is refused.
#[test]
fn an_adamw8bit_run_resumes_to_the_same_result_and_keeps_its_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = ["--optimizer", "adamw8bit", "--max-train-steps", "12", "--checkpointing-steps", "2", "--train-batch-size", "1", "--num-samples", "1", "--sample-steps", "4"];
    let whole = tmp.path().join("whole");
    let mut one_thread = steps.to_vec();
    one_thread.extend_from_slice(&["--threads", "1"]);
    train(&whole, "dreambooth", &one_thread);
    let ck = read_safetensors(whole.join("checkpoints/train-00000012.safetensors")).unwrap();
    let codes = ck.tensors.iter().filter(|(k, v)| k.starts_with("optim.exp_avg.") && v.as_slice::<u8>().is_ok()).count();
    assert!(codes > 10 && ck.tensors.keys().any(|k| k.starts_with("optim.exp_avg_sq_absmax.")), "the checkpoint must hold 8-bit moments ({codes} u8 tensors)");
    let cut = tmp.path().join("cut");
    let mut args = vec!["--threads", "2", "train", "--model", s(tiny_model()), "--method", "dreambooth", "--concept", "striped-star", "--out", s(&cut)];
    args.extend_from_slice(&steps);
    kill_after_checkpoint(&args, &cut, 4);
    let mut other = args.clone();
    let at = other.iter().position(|a| *a == "adamw8bit").unwrap();
    other[at] = "adafactor";
    other.extend_from_slice(&["--resume", s(&cut)]);
    let err = fail(&other);
    assert!(err.contains("--optimizer adafactor") && err.contains("adamw8bit"), "{err}");
    let mut resume = args.clone();
    resume.extend_from_slice(&["--resume", s(&cut)]);
    ok(&resume);
    for file in ["model/unet/diffusion_pytorch_model.safetensors", "loss.csv", "samples/0.png"] {
        assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(cut.join(file)).unwrap(), "{file} differs after resume");
    }
}

#[test]
fn textual_inversion_trains_only_the_new_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ti");
    let summary = train(&out, "textual-inversion", &["--max-train-steps", "3", "--num-vectors", "2", "--a1111"]);
    assert_eq!(summary["trainable_params"], 2 * 64);
    let keys = checkpoint_keys(&out);
    assert_eq!(keys.into_iter().collect::<Vec<_>>(), vec!["text_encoder.text_model.embeddings.token_embedding.token_rows.placeholder".to_string()]);
    let emb = read_safetensors(out.join("learned_embeds.safetensors")).unwrap();
    let (rows, shape) = emb.f32("sks").unwrap();
    assert_eq!(shape, vec![2, 64]);
    // The rows started as the initializer token ("star") and must have moved.
    let te = read_safetensors(tiny_model().join("text_encoder/model.safetensors")).unwrap();
    let (table, tshape) = te.f32("text_model.embeddings.token_embedding.weight").unwrap();
    let vocab: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny_model().join("tokenizer/vocab.json")).unwrap()).unwrap();
    let star = vocab["star</w>"].as_u64().unwrap() as usize;
    let init = &table[star * tshape[1]..(star + 1) * tshape[1]];
    assert!(rows[..64] != *init, "the learned vector equals its initializer");
    assert!(out.join("sks.safetensors").exists(), "--a1111 writes the A1111 file");
    // The embedding loads into generate (new tokens, nothing else).
    ok(&["generate", "--model", s(tiny_model()), "--embedding", s(&out.join("learned_embeds.safetensors")), "--prompt", "a sks star",
        "--steps", "2", "--out", s(&tmp.path().join("g.png"))]);
}

#[test]
fn dreambooth_with_prior_preservation_caches_class_images_and_writes_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let classes = tmp.path().join("classes");
    let common = ["--max-train-steps", "2", "--class-prompt", "a star", "--num-class-images", "2", "--class-dir", s(&classes), "--train-batch-size", "1"];
    train(&tmp.path().join("db1"), "dreambooth", &common);
    let pngs = |d: &Path| std::fs::read_dir(d).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count();
    assert_eq!(pngs(&classes), 2);
    let stamp = std::fs::metadata(classes.join("class-00000.png")).unwrap().modified().unwrap();
    let out = tmp.path().join("db2");
    train(&out, "dreambooth", &common);
    assert_eq!(std::fs::metadata(classes.join("class-00000.png")).unwrap().modified().unwrap(), stamp, "class images are reused");
    ok(&["generate", "--model", s(&out.join("model")), "--prompt", "a sks star", "--steps", "2", "--out", s(&tmp.path().join("g.png"))]);
    // The fine-tuned UNet differs from the base; the VAE is copied unchanged.
    let base = std::fs::read(tiny_model().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(std::fs::read(out.join("model/unet/diffusion_pytorch_model.safetensors")).unwrap() != base);
    let vae = "vae/diffusion_pytorch_model.safetensors";
    assert!(std::fs::read(out.join("model").join(vae)).unwrap() == std::fs::read(tiny_model().join(vae)).unwrap());
}

#[test]
fn freezing_and_learning_rate_scales_control_what_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("block");
    train(&out, "dreambooth", &["--max-train-steps", "1", "--train-only", r"^unet\.up_blocks\.1\.", "--train-batch-size", "1"]);
    let keys = checkpoint_keys(&out);
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("unet.up_blocks.1.")), "{keys:?}");
    // A zero learning rate everywhere: full training that changes nothing, bit for bit.
    let out = tmp.path().join("zero");
    train(&out, "dreambooth", &["--max-train-steps", "2", "--lr-scale", ".*=0", "--train-batch-size", "1"]);
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let (a, b) = (read_safetensors(tiny_model().join(unet)).unwrap(), read_safetensors(out.join("model").join(unet)).unwrap());
    for (k, v) in &a.tensors {
        assert_eq!(v.as_slice::<f32>().unwrap(), b.tensors[k].as_slice::<f32>().unwrap(), "{k} moved with lr scale 0");
    }
}

#[test]
fn ia3_pivotal_kohya_and_config_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ia3");
    train(&out, "ia3", &["--max-train-steps", "1"]);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet_ia3/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "IA3");
    let out = tmp.path().join("pivotal");
    train(&out, "pivotal", &["--max-train-steps", "1", "--format", "kohya"]);
    let kohya = read_safetensors(out.join("lora_kohya.safetensors")).unwrap();
    assert!(kohya.tensors.keys().any(|k| k.starts_with("lora_unet_") && k.ends_with(".alpha")));
    assert_eq!(kohya.metadata["ss_network_dim"], "4");
    assert!(out.join("learned_embeds.safetensors").exists());
    // A TOML config holds the settings; a flag overrides it.
    let toml = tmp.path().join("run.toml");
    std::fs::write(&toml, "method = \"lora\"\nrank = 2\nmax_train_steps = 1\nconcept = \"ringed-circle\"\n").unwrap();
    let out = tmp.path().join("toml");
    ok(&["train", "--config", s(&toml), "--model", s(tiny_model()), "--rank", "3", "--out", s(&out)]);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet_lora/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 3);
    // Memory settings are read from the file too.
    std::fs::write(&toml, "method = \"lora\"\nmax_train_steps = 1\nconcept = \"ringed-circle\"\ncache_latents = true\nrandom_crop = true\n").unwrap();
    let err = fail(&["train", "--config", s(&toml), "--model", s(tiny_model()), "--out", s(&tmp.path().join("mem"))]);
    assert!(err.contains("--cache-latents"), "the file's cache_latents is read: {err}");
}

#[test]
fn bad_input_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let m = s(tiny_model());
    let err = fail(&["train", "--model", m, "--method", "lora2", "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("--method") && err.contains("lora2"), "{err}");
    let err = fail(&["train", "--model", m, "--concept", "nope", "--out", s(&out)]);
    assert!(err.contains("--concept") && err.contains("nope"), "{err}");
    let err = fail(&["train", "--model", m, "--out", s(&out)]);
    assert!(err.contains("--concept") && err.contains("--instance-dir"), "{err}");
    let err = fail(&["train", "--model", m, "--concept", "striped-star", "--lr-scale", "unet", "--out", s(&out)]);
    assert!(err.contains("--lr-scale"), "{err}");
    let err = fail(&["train", "--model", m, "--concept", "striped-star", "--optimizer", "adam9", "--out", s(&out)]);
    assert!(err.contains("--optimizer") && err.contains("adam9") && err.contains("adamw8bit"), "{err}");
    let err = fail(&["train", "--model", m, "--concept", "striped-star", "--optimizer", "adafactor", "--adam-beta1", "0.8", "--out", s(&out)]);
    assert!(err.contains("--adam-beta1 is not used by --optimizer adafactor"), "{err}");
    let err = fail(&["train", "--model", m, "--concept", "striped-star", "--train-only", "no_such_layer", "--out", s(&out)]);
    assert!(err.contains("--train-only"), "{err}");
    let err = fail(&["train", "--model", s(&tmp.path().join("missing")), "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("--model"), "{err}");
    train(&out, "lora", &["--max-train-steps", "1"]);
    let err = fail(&["train", "--model", m, "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("--resume"), "{err}");
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let err = fail(&["train", "--model", m, "--instance-dir", s(&dir), "--instance-prompt", "a sks star", "--out", s(&tmp.path().join("y"))]);
    assert!(err.contains("--instance-dir"), "{err}");
    let _ = knobs(&["--help"]);
}

#[test]
fn samples_are_optional_and_lora_dropout_is_on_from_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    // A new LoRA's B is zero, so dropout on its input first shows in step 2's loss, and only
    // through signs: AdamW's first update is lr * sign(gradient), which a mask may leave as it
    // is. Step 3's loss follows the gradients' sizes.
    let args = ["--max-train-steps", "3", "--num-samples", "0", "--rank", "2"];
    let a = train(&plain, "lora", &args);
    assert!(!plain.join("samples.png").exists() && !plain.join("samples").exists(), "--num-samples 0 draws no samples");
    assert!(plain.join("pytorch_lora_weights.safetensors").exists());
    assert!(a["seconds_per_step"].as_f64().unwrap() > 0.0);
    // Dropout must be on from the first step, not only after a validation pass switched
    // training mode back on.
    let mut with_dropout = args.to_vec();
    with_dropout.extend_from_slice(&["--lora-dropout", "0.5"]);
    let b = train(&tmp.path().join("dropout"), "lora", &with_dropout);
    assert_ne!(a["final_loss"], b["final_loss"], "--lora-dropout 0.5 left the loss unchanged");
    // The masks are drawn from the run's seed: the same run again gives the same loss.
    let again = train(&tmp.path().join("dropout-again"), "lora", &with_dropout);
    assert_eq!(b["final_loss"], again["final_loss"], "the dropout masks differ between two runs of the same command");
    // The training log reports seconds per step and peak memory as it goes.
    let out = knobs(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--max-train-steps", "1", "--num-samples", "0", "--out", s(&tmp.path().join("log"))]);
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log.lines().find(|l| l.contains("s/step")).unwrap_or_else(|| panic!("no s/step line in {log}"));
    let peak: f64 = line.split(", peak ").nth(1).and_then(|r| r.strip_suffix(" MiB")).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no peak MiB in `{line}`"));
    assert!(peak > 10.0 && peak < 64.0 * 1024.0, "{line}");
}

#[test]
fn settings_of_another_method_and_unknown_config_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let m = s(tiny_model());
    let err = fail(&["train", "--model", m, "--method", "ia3", "--rank", "8", "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("--rank is not used by --method ia3"), "{err}");
    let err = fail(&["train", "--model", m, "--method", "dreambooth", "--placeholder-token", "<x>", "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("--placeholder-token is not used by --method dreambooth"), "{err}");
    let toml = tmp.path().join("bad.toml");
    std::fs::write(&toml, "method = \"lora\"\nrnak = 2\n").unwrap();
    let err = fail(&["train", "--config", s(&toml), "--model", m, "--concept", "striped-star", "--out", s(&out)]);
    assert!(err.contains("unknown key `rnak`") && err.contains("bad.toml"), "{err}");
    // `--help` lists every registered method with its line.
    let help = ok(&["train", "--help"]);
    for name in knobs_train::finetune::Method::names() {
        assert!(help.contains(name), "--help lacks {name}");
    }
}

#[test]
fn memory_savers_keep_what_is_learned() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["--max-train-steps", "3", "--num-samples", "0", "--random-flip"];
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let summary = train(&out, "dreambooth", &args);
        let recomputed = summary["blocks_recomputed"].as_u64().unwrap();
        assert_eq!(recomputed > 0, extra.contains(&"--gradient-checkpointing"), "{name}: {recomputed} blocks recomputed");
        (std::fs::read(out.join("model/unet/diffusion_pytorch_model.safetensors")).unwrap(), std::fs::read_to_string(out.join("loss.csv")).unwrap())
    };
    let (plain, plain_loss) = run("plain", &[]);
    let losses = |csv: &str| csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap()).collect::<Vec<_>>();
    let close = |other: &str| {
        assert_eq!(losses(&plain_loss).len(), losses(other).len());
        for (a, b) in losses(&plain_loss).iter().zip(losses(other)) {
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{plain_loss} vs {other}");
        }
    };
    // Checkpointing runs each UNet block again in the backward pass: the first loss to the
    // bit, the later ones to rounding (its gradients add in another order).
    let (checkpointed, checkpointed_loss) = run("checkpointed", &["--gradient-checkpointing"]);
    assert_eq!(losses(&plain_loss)[0], losses(&checkpointed_loss)[0]);
    assert_eq!(checkpointed.len(), plain.len());
    close(&checkpointed_loss);
    // Cached latents are encoded one image at a time instead of per batch: the same losses to
    // float rounding.
    let (_, cached_loss) = run("cached", &["--cache-latents"]);
    close(&cached_loss);
    // Frozen matrices in f16: the run trains (exactness against f32 is tested in knobs-train).
    let (half, half_loss) = run("half", &["--weights-dtype", "f16"]);
    assert!(!half.is_empty() && losses(&half_loss).iter().all(|l| l.is_finite()));
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--weights-dtype", "f8", "--out", s(&tmp.path().join("y"))]);
    assert!(err.contains("--weights-dtype"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--cache-latents", "--random-crop", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--cache-latents") && err.contains("--random-crop"), "{err}");
}

/// `--latent-cache DIR` writes each image's posterior once and later runs read it: the same
/// losses as `--cache-latents` alone; values changed in the files change the losses (so they
/// are read); a file that is not a latent file is refused by name.
#[test]
fn a_latent_cache_folder_is_written_once_and_read_by_later_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("latents");
    let base = ["--max-train-steps", "3", "--rank", "2", "--num-samples", "0", "--random-flip"];
    let counts = std::cell::RefCell::new((0, 0));
    let run = |name: &str, extra: &[&str]| -> Vec<f64> {
        let out = tmp.path().join(name);
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let summary = train(&out, "lora", &args);
        *counts.borrow_mut() = (summary["latents_read"].as_u64().unwrap(), summary["latents_encoded"].as_u64().unwrap());
        losses(&out)
    };
    let in_memory = run("memory", &["--cache-latents"]);
    let first = run("first", &["--latent-cache", s(&cache)]);
    assert_eq!(first, in_memory, "--latent-cache changed the losses of --cache-latents");
    let encoded = counts.borrow().1;
    assert!(encoded > 0 && counts.borrow().0 == 0, "{:?}", counts.borrow());
    let mut files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty() && files.iter().all(|f| f.extension().is_some_and(|e| e == "safetensors")), "{files:?}");
    assert_eq!(encoded as usize, files.len(), "one file per image encoded");
    let written: Vec<_> = files.iter().map(|f| std::fs::metadata(f).unwrap().modified().unwrap()).collect();
    assert_eq!(run("again", &["--latent-cache", s(&cache)]), first, "a run reading the cache differs");
    assert_eq!(*counts.borrow(), (encoded, 0), "the second run read every latent and encoded none");
    let now: Vec<_> = files.iter().map(|f| std::fs::metadata(f).unwrap().modified().unwrap()).collect();
    assert_eq!(written, now, "the second run rewrote cached latents");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), files.len(), "the second run encoded new images");
    // Shifted means in every file: the run reads them, so its losses move.
    for f in &files {
        let mut sd = read_safetensors(f).unwrap();
        let mean = sd.tensors["mean"].clone();
        let shifted: Vec<f32> = mean.try_to_vec::<f32>().unwrap().iter().map(|v| v + 1.0).collect();
        sd.tensors.insert("mean".into(), knobs_nn::burn::tensor::TensorData::new(shifted, mean.shape().to_vec()));
        knobs_nn::io::write_safetensors(f, &sd.tensors, &sd.metadata).unwrap();
    }
    assert_ne!(run("shifted", &["--latent-cache", s(&cache)]), first, "the cached files were not read");
    std::fs::write(&files[0], b"not a safetensors file").unwrap();
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--max-train-steps", "3", "--random-flip", "--latent-cache", s(&cache), "--out", s(&tmp.path().join("junk"))]);
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(err.contains("--latent-cache") && err.contains(name) && err.contains("delete it"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--latent-cache", s(&cache), "--random-crop", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--latent-cache") && err.contains("--random-crop"), "{err}");
    // A folder that cannot be made (its parent is a file) is named with the flag.
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--max-train-steps", "1", "--latent-cache", s(&blocker.join("latents")), "--out", s(&tmp.path().join("y"))]);
    assert!(err.contains("--latent-cache") && err.contains("cannot create the folder") && err.contains("a-file"), "{err}");
}

/// Frozen text encoders are freed once every prompt the run uses is encoded: the same losses,
/// validation grid, samples and adapter file as a run that holds them (--keep-text-encoders);
/// a run that trains them keeps them.
#[test]
fn releasing_frozen_text_encoders_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["--max-train-steps", "2", "--train-batch-size", "2", "--caption-dropout", "0.5", "--validation-steps", "1", "--num-samples", "2", "--sample-steps", "2"];
    let files = ["loss.csv", "validation/step-000001.png", "samples.png", "pytorch_lora_weights.safetensors"];
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let summary = train(&out, "lora", &args);
        (summary["text_encoders_released"].as_bool().expect("the summary says"), files.map(|f| std::fs::read(out.join(f)).unwrap()))
    };
    let (released, with_release) = run("released", &[]);
    let (kept, with_encoders) = run("kept", &["--keep-text-encoders"]);
    assert!(released && !kept);
    for (i, f) in files.iter().enumerate() {
        assert!(with_release[i] == with_encoders[i], "{f} differs when the text encoders are released");
    }
    assert!(!run("trained", &["--train-text-encoder"]).0, "a trained text encoder is kept");
}

/// LoHa, LoKr, DoRA and OFT train from the command line, write PEFT folders (and LyCORIS files
/// with --format kohya), and `knobs generate --lora` takes either back.
#[test]
fn lycoris_family_methods_train_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    for (method, peft_type, extra) in [
        ("loha", "LOHA", &["--format", "kohya"][..]),
        ("lokr", "LOKR", &["--format", "kohya", "--decompose-both"][..]),
        ("dora", "LORA", &["--format", "kohya", "--conv"][..]),
        ("oft", "OFT", &["--oft-block-size", "8"][..]),
    ] {
        let out = tmp.path().join(method);
        let mut args = vec!["--max-train-steps", "2"];
        args.extend_from_slice(extra);
        train(&out, method, &args);
        let folder = out.join(format!("unet_{method}"));
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["peft_type"], peft_type, "{method}");
        let mut sources = vec![out.clone()];
        if method != "oft" {
            let file = out.join("lycoris_kohya.safetensors");
            let sd = read_safetensors(&file).unwrap();
            assert!(sd.tensors.keys().all(|k| k.starts_with("lora_unet_")), "{method}");
            assert!(sd.metadata["ss_network_module"] == "lycoris.kohya", "{method}");
            sources.push(file);
        }
        for (i, src) in sources.iter().enumerate() {
            let png = tmp.path().join(format!("{method}{i}.png"));
            ok(&["generate", "--model", s(tiny_model()), "--prompt", "a striped star", "--steps", "2", "--lora", s(src), "--out", s(&png)]);
            assert!(png.exists(), "{method}: {}", src.display());
        }
    }
    // Bad input names the flag.
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "oft", "--rank", "8", "--concept", "striped-star", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--rank") && err.contains("oft"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "lokr", "--decompose-factor", "0", "--concept", "striped-star", "--out", s(&tmp.path().join("y"))]);
    assert!(err.contains("--decompose-factor"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "oft", "--oft-block-size", "1", "--concept", "striped-star", "--out", s(&tmp.path().join("z"))]);
    assert!(err.contains("--oft-block-size"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "lora", "--oft-block-size", "8", "--concept", "striped-star", "--out", s(&tmp.path().join("w"))]);
    assert!(err.contains("--oft-block-size") && err.contains("lora"), "{err}");
}

/// `--caption-prefix` and `--caption-dropout` change what the instance images are trained
/// under (so the losses move), a dropout outside [0, 1] is named, and a run without them keeps
/// its fingerprint (its checkpoints from before the flags existed still resume).
#[test]
fn caption_prefix_and_dropout_change_the_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let losses = |name: &str, extra: &[&str]| -> String {
        let out = tmp.path().join(name);
        let mut args = vec!["--max-train-steps", "3", "--num-samples", "0", "--train-batch-size", "2"];
        args.extend_from_slice(extra);
        train(&out, "lora", &args);
        std::fs::read_to_string(out.join("loss.csv")).unwrap()
    };
    let plain = losses("plain", &[]);
    assert_eq!(losses("again", &[]), plain, "deterministic");
    assert_ne!(losses("prefix", &["--caption-prefix", "a drawing,"]), plain);
    assert_ne!(losses("dropout", &["--caption-dropout", "0.5"]), plain);
    let ck = read_safetensors(tmp.path().join("plain/checkpoints/train-00000003.safetensors")).unwrap();
    assert!(!ck.metadata["config"].contains("caption"), "defaults stay out of the fingerprint");
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--caption-dropout", "1.5", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--caption-dropout"), "{err}");
}

/// `--ema-decay`: the averaged parameters are written beside the trained ones (OUT/ema/),
/// differ from them after a few steps, are kept in checkpoints, and a resumed run ends with
/// the same average as an uninterrupted one; a decay outside [0, 1) is named.
#[test]
fn ema_weights_are_saved_alongside_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let common = ["--rank", "2", "--num-samples", "0", "--train-batch-size", "1", "--ema-decay", "0.5", "--learning-rate", "1e-2"];
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<&str> = vec!["train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(out), "--max-train-steps", "24", "--checkpointing-steps", "2"];
        a.extend_from_slice(&common);
        a.into_iter().map(String::from).collect()
    };
    let whole = tmp.path().join("whole");
    let a = args(&whole);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let read = |p: &Path| read_safetensors(p.join("unet_lora/adapter_model.safetensors")).unwrap().tensors;
    let (trained, averaged) = (read(&whole), read(&whole.join("ema")));
    assert_eq!(trained.keys().collect::<Vec<_>>(), averaged.keys().collect::<Vec<_>>());
    assert_ne!(trained, averaged, "the average lags the trained values");
    let ck = read_safetensors(whole.join("checkpoints/train-00000024.safetensors")).unwrap();
    assert!(ck.tensors.keys().any(|k| k.starts_with("ema.")) && ck.metadata.contains_key("ema_updates"));
    let split = tmp.path().join("split");
    let a = args(&split);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    kill_after_checkpoint(&a, &split, 2);
    ok(&a);
    assert_eq!(read(&split.join("ema")), averaged, "a resumed run ends with the same average");
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--ema-decay", "1", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--ema-decay"), "{err}");
}

/// `--bucket`: a folder of mixed 48x32, 32x48 and 32x32 images of the built-in world trains
/// each ratio in its own bucket (within 32x32 pixels, kohya's rule), the files generate at every
/// ratio, and a checkpoint made with buckets is not resumed without them.
#[test]
fn bucketing_trains_every_ratio_and_generates_at_each() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    ok(&["world", "render", "--out", s(&world), "--n", "6", "--size", "48"]);
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for i in 0..6 {
        let img = image::open(world.join(format!("{i:05}.png"))).unwrap().to_rgb8();
        let img = match i % 3 {
            0 => image::imageops::crop_imm(&img, 0, 8, 48, 32).to_image(),
            1 => image::imageops::crop_imm(&img, 8, 0, 32, 48).to_image(),
            _ => image::imageops::resize(&img, 32, 32, image::imageops::FilterType::Triangle),
        };
        img.save(mixed.join(format!("{i:05}.png"))).unwrap();
        std::fs::copy(world.join(format!("{i:05}.txt")), mixed.join(format!("{i:05}.txt"))).unwrap();
    }
    let args = |out: &Path, bucket: bool| -> Vec<String> {
        let mut a = vec!["train", "--model", s(tiny_model()), "--method", "lora", "--instance-dir", s(&mixed), "--out", s(out), "--rank", "2",
            "--max-train-steps", "6", "--train-batch-size", "2", "--checkpointing-steps", "3", "--num-samples", "0", "--json"];
        if bucket {
            a.push("--bucket");
        }
        a.into_iter().map(String::from).collect()
    };
    let run = |out: &Path, bucket: bool| -> serde_json::Value {
        let a = args(out, bucket);
        let stdout = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let out = tmp.path().join("bucketed");
    let summary = run(&out, true);
    assert_eq!(summary["buckets"], serde_json::json!({ "24x40": 2, "32x32": 2, "40x24": 2 }), "{summary}");
    let losses = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    assert_eq!(losses.lines().count(), 7);
    let square = tmp.path().join("square");
    let plain = run(&square, false);
    assert!(plain.get("buckets").is_none(), "{plain}");
    assert_ne!(std::fs::read_to_string(square.join("loss.csv")).unwrap(), losses, "buckets train on other crops");

    let lora = out.join("pytorch_lora_weights.safetensors");
    for (w, h) in [(48, 32), (32, 48), (40, 24), (32, 32)] {
        let png = tmp.path().join(format!("gen-{w}x{h}.png"));
        ok(&["generate", "--model", s(tiny_model()), "--lora", s(&lora), "--prompt", "a red circle", "--steps", "2", "--width", &w.to_string(),
            "--height", &h.to_string(), "--out", s(&png)]);
        assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (w, h));
    }

    // The same folder without --bucket in a bucketed run's folder is another run.
    let a = args(&out, false);
    let err = fail(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("other settings"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "hyper-lora", "--concept", "striped-star", "--bucket", "--out", s(&tmp.path().join("h"))]);
    assert!(err.contains("--bucket") && err.contains("hyper-lora"), "{err}");
}

/// `--max-memory`: the estimate made before the first step is within 25% below and 30% above
/// the measured peak RSS on the built-in architecture (LoRA and full, batch 1 and 8) and on
/// tiny-sd, and a limit below it refuses the run, saying what to change. High is the safe side
/// (a run refused that might fit, never one let through to run out of memory), and the fused
/// ops have moved the small models' peaks below the fit: full fine-tunes there peak 19-24%
/// under the estimate (2026-12-07), a run or two a day went past the 25% this bound had.
#[test]
fn max_memory_predicts_the_peak_and_refuses_runs_above_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny_sd = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd");
    // The last two with their UNet blocks checkpointed.
    let cases: [(&str, &str, &str); 7] = [
        (s(tiny_model()), "lora", "1"),
        (s(tiny_model()), "lora", "8"),
        (s(tiny_model()), "dreambooth", "8"),
        (tiny_sd, "lora", "4"),
        (tiny_sd, "dreambooth", "4"),
        (s(tiny_model()), "lora", "8"),
        (s(tiny_model()), "dreambooth", "8"),
    ];
    for (i, (model, method, batch)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("m{i}"));
        let mut args = vec!["train", "--model", model, "--method", method, "--concept", "striped-star", "--max-train-steps", "2", "--train-batch-size", batch,
            "--num-samples", "0", "--json", "--out", s(&out)];
        if i >= 5 {
            args.push("--gradient-checkpointing");
        }
        let stdout = ok(&args);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let (estimate, peak) = (v["estimated_peak_bytes"].as_f64().unwrap(), v["peak_rss_bytes"].as_f64().unwrap());
        let ratio = estimate / peak;
        eprintln!("{model} {method} batch {batch}: estimate {:.1} MiB, peak {:.1} MiB ({ratio:.2})", estimate / 1048576.0, peak / 1048576.0);
        assert!((0.75..=1.3).contains(&ratio), "{method} batch {batch} on {model}: estimate {estimate} vs peak RSS {peak}");
    }
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--train-batch-size", "8", "--max-memory", "0.02", "--out", s(&tmp.path().join("x"))]);
    assert!(err.contains("--max-memory 0.02") && err.contains("GiB") && err.contains("--train-batch-size 1") && err.contains("--weights-dtype f16"), "{err}");
    assert!(err.contains("--gradient-checkpointing"), "{err}");
    assert!(!tmp.path().join("x/checkpoints").exists(), "refused before the first step");
    let err = fail(&["train", "--model", s(tiny_model()), "--concept", "striped-star", "--max-memory", "0", "--out", s(&tmp.path().join("y"))]);
    assert!(err.contains("--max-memory"), "{err}");
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().skip(1).map(|l| l.split_once(',').unwrap().1.parse().unwrap()).collect()
}

/// Mixed precision: bf16 and fp16 compute follow the f32 run's loss curve step by step (same
/// draws, only the UNet's arithmetic is narrower), the LoRA files stay f32, an fp16 run (its
/// loss scale in the checkpoints) resumes bit-identically, and methods with their own loop
/// refuse the flag.
#[test]
fn mixed_precision_follows_f32_and_fp16_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = ["--max-train-steps", "8", "--checkpointing-steps", "2", "--rank", "2", "--train-batch-size", "2", "--num-samples", "1", "--sample-steps", "4"];
    let reference = tmp.path().join("f32");
    train(&reference, "lora", &steps);
    let want = losses(&reference);
    for mp in ["bf16", "fp16"] {
        let out = tmp.path().join(mp);
        let mut args = steps.to_vec();
        args.extend_from_slice(&["--mixed-precision", mp]);
        train(&out, "lora", &args);
        let got = losses(&out);
        let worst = got.iter().zip(&want).map(|(g, w)| ((g - w) / w).abs()).fold(0.0, f64::max);
        println!("{mp}: losses {got:?} against f32 {want:?}, worst relative difference {worst:.2e}");
        assert!(worst < 5e-3 && worst > 0.0, "{mp}: worst relative loss difference {worst}");
        let file = read_safetensors(out.join("pytorch_lora_weights.safetensors")).unwrap();
        assert!(file.tensors.values().all(|t| t.dtype() == knobs_nn::burn::tensor::DType::F32), "{mp}: LoRA files stay f32");
        if mp == "fp16" {
            let ck = read_safetensors(out.join("checkpoints/train-00000008.safetensors")).unwrap();
            assert_eq!(ck.metadata["loss_scale"], "65536 8", "no overflow on this tiny run: the scale stays, 8 good steps");
        }
    }
    let cut = tmp.path().join("cut");
    let mut args = vec!["train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(&cut), "--mixed-precision", "fp16"];
    args.extend_from_slice(&steps);
    kill_after_checkpoint(&args, &cut, 4);
    args.extend_from_slice(&["--resume", s(&cut)]);
    ok(&args);
    for file in ["pytorch_lora_weights.safetensors", "loss.csv"] {
        assert!(std::fs::read(tmp.path().join("fp16").join(file)).unwrap() == std::fs::read(cut.join(file)).unwrap(), "{file} differs after resume");
    }
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "hyper-lora", "--concept", "striped-star", "--out", s(&tmp.path().join("h")), "--mixed-precision", "bf16"]);
    assert!(err.contains("--mixed-precision") && err.contains("hyper-lora"), "{err}");
}

/// Data-parallel training: `--devices cpu,cpu` with batch 1 per device equals one device with
/// batch 2 (each replica draws the whole batch's noise and takes its rows; gradients summed on
/// the first), with and without prior preservation; bad device lists are named.
#[test]
fn two_replicas_equal_one_device_with_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [("plain", vec![]), ("prior", vec!["--class-prompt", "a photo of a star", "--num-class-images", "4"])] {
        let steps = ["--max-train-steps", "4", "--rank", "2", "--num-samples", "1", "--sample-steps", "4", "--checkpointing-steps", "4"];
        let one = tmp.path().join(format!("{name}-one"));
        let mut args: Vec<&str> = steps.to_vec();
        args.extend_from_slice(&extra);
        args.extend_from_slice(&["--train-batch-size", "2"]);
        train(&one, "lora", &args);
        let two = tmp.path().join(format!("{name}-two"));
        let mut args: Vec<&str> = steps.to_vec();
        args.extend_from_slice(&extra);
        // One thread: the replicas' work then runs in a pool whose only thread is the one
        // that waits for them (knobs_nn::join_helping).
        args.extend_from_slice(&["--train-batch-size", "1", "--devices", "cpu,cpu", "--threads", "1"]);
        train(&two, "lora", &args);
        let (a, b) = (losses(&one), losses(&two));
        let loss_err = a.iter().zip(&b).map(|(x, y)| ((x - y) / x).abs()).fold(0.0, f64::max);
        let (fa, fb) = (read_safetensors(one.join("pytorch_lora_weights.safetensors")).unwrap(), read_safetensors(two.join("pytorch_lora_weights.safetensors")).unwrap());
        // Against the largest LoRA value of the file: AdamW moves every value by about the
        // learning rate whatever its gradient's size, so a gradient of ~0 whose rounding
        // differs moves its value the other way.
        let weight_err = fa.relative_distance(&fb).unwrap();
        println!("{name}: losses {b:?} against {a:?}: worst {loss_err:.2e}; LoRA weights {weight_err:.2e}");
        assert!(loss_err < 1e-5, "{name}: loss curves differ by {loss_err}");
        assert!(weight_err < 1e-3, "{name}: LoRA weights differ by {weight_err}");
    }
    // Adapter dropout on two replicas: each device's thread draws its masks from its own seeded
    // stream, so the run repeats (one generator shared by the threads would hand out masks in
    // whatever order the threads ran).
    let args = ["--max-train-steps", "3", "--rank", "2", "--num-samples", "0", "--lora-dropout", "0.5", "--train-batch-size", "1", "--devices", "cpu,cpu"];
    let runs: Vec<Vec<f64>> = (0..2)
        .map(|i| {
            let out = tmp.path().join(format!("dropout-{i}"));
            train(&out, "lora", &args);
            losses(&out)
        })
        .collect();
    assert_eq!(runs[0], runs[1], "--devices cpu,cpu with --lora-dropout: two runs of one command differ");
    let out = tmp.path().join("bad");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(&out), "--devices", "cpu,cuda:1"]);
    assert!(err.contains("--device cuda:1") && err.contains("`cuda` feature"), "{err}");
    let err = fail(&["train", "--model", s(tiny_model()), "--method", "lora", "--concept", "striped-star", "--out", s(&out), "--devices", "cpu,gpu"]);
    assert!(err.contains("--device \"gpu\""), "{err}");
}
