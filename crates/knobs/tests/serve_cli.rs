//! `knobs serve` over real HTTP on loopback, on the built-in model: every image equals what
//! `knobs generate` makes with the same settings and adapters, after 100 requests switching
//! among 5 adapters through a cache that holds 2 (no adapter leaks into another request),
//! with several adapters in either order, with an embedding (and without it afterwards), with a
//! PEFT folder; uploads are checked before they are stored; bad requests get 4xx JSON naming
//! the field and leave the loaded state alone; a full queue answers 503.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{ok, s};
use serde_json::{Value, json};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(store: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_knobs"))
        .args(["serve", "--adapters", s(store), "--addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    Server { child, url }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// (status, body bytes)
fn post(url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut r = agent().post(url).header("content-type", "application/json").send(body).unwrap();
    (r.status().as_u16(), r.body_mut().with_config().limit(1 << 30).read_to_vec().unwrap())
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).unwrap_or_else(|e| panic!("not a PNG ({e}): {}", String::from_utf8_lossy(png))).to_rgb8()
}

fn error(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

const PROMPT: &str = "a red circle on a white background";
const STEPS: &str = "4";

/// `knobs generate` on the built-in model with these extra flags.
fn reference(dir: &Path, name: &str, prompt: &str, extra: &[&str]) -> image::RgbImage {
    let out = dir.join(format!("{name}.png"));
    let mut args = vec!["generate", "--prompt", prompt, "--steps", STEPS, "--guidance", "5", "--seed", "3", "--out", s(&out)];
    args.extend_from_slice(extra);
    ok(&args);
    image::open(&out).unwrap().to_rgb8()
}

fn request(prompt: &str, adapters: &[(&str, f32)], embeddings: &[&str]) -> Vec<u8> {
    let adapters: Vec<Value> = adapters.iter().map(|(n, w)| json!({ "name": n, "weight": w })).collect();
    serde_json::to_vec(&json!({ "prompt": prompt, "steps": 4, "guidance": 5, "seed": 3, "adapters": adapters, "embeddings": embeddings })).unwrap()
}

/// Five LoRAs (one training step each at a high rate, different seeds), an IA3 PEFT folder and
/// a textual-inversion embedding, trained on the built-in model into `store`.
fn fill_store(tmp: &Path, store: &Path) {
    std::fs::create_dir_all(store).unwrap();
    let train = |method: &str, seed: usize, extra: &[&str]| -> PathBuf {
        let out = tmp.join(format!("train-{method}-{seed}"));
        let seed = seed.to_string();
        let mut args = vec!["train", "--method", method, "--concept", "striped-star", "--out", s(&out), "--max-train-steps", "1",
            "--num-samples", "0", "--seed", &seed];
        args.extend_from_slice(extra);
        ok(&args);
        out
    };
    for i in 0..5 {
        let out = train("lora", i, &["--rank", "2", "--learning-rate", "0.05"]);
        std::fs::copy(out.join("pytorch_lora_weights.safetensors"), store.join(format!("a{i}.safetensors"))).unwrap();
    }
    let ia3 = train("ia3", 0, &["--learning-rate", "0.5"]);
    let folder = store.join("ia3-star");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(ia3.join("unet_ia3").join(f), folder.join(f)).unwrap();
    }
    let ti = train("textual-inversion", 0, &["--learning-rate", "1"]);
    std::fs::copy(ti.join("learned_embeds.safetensors"), store.join("star-token.safetensors")).unwrap();
}

#[test]
fn served_images_equal_generate_through_cache_switches() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    fill_store(tmp.path(), &store);
    let refs = tmp.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let lora = |i: usize| store.join(format!("a{i}.safetensors"));
    let weight = |i: usize| if i.is_multiple_of(2) { 1.0 } else { 0.7 };
    let base = reference(&refs, "base", PROMPT, &[]);
    let singles: Vec<image::RgbImage> = (0..5).map(|i| reference(&refs, &format!("a{i}"), PROMPT, &["--lora", &format!("{}:{}", s(&lora(i)), weight(i))])).collect();
    for i in 0..5 {
        assert_ne!(singles[i], base, "a{i} changes the image");
        for j in 0..i {
            assert_ne!(singles[i], singles[j], "a{i} and a{j} differ");
        }
    }

    // A cache of two of these LoRA files.
    let bytes = std::fs::metadata(lora(0)).unwrap().len() as f64;
    let cache_mb = (2.5 * bytes / (1024.0 * 1024.0)).to_string();
    let server = serve(&store, &["--cache-mb", &cache_mb]);
    let generate = format!("{}/v1/generate", server.url);

    // 100 requests: pairs of adapters alternating (hits), moving on every 4 (misses and
    // evictions), and every 10th without adapters.
    for i in 0..100 {
        let (status, body) = if i % 10 == 9 {
            let r = post(&generate, &request(PROMPT, &[], &[]));
            assert_eq!(pixels(&r.1), base, "request {i}: no adapters gives the base image");
            r
        } else {
            let k = ((i / 4) % 5 + i % 2) % 5;
            let r = post(&generate, &request(PROMPT, &[(&format!("a{k}"), weight(k))], &[]));
            assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.1));
            assert_eq!(pixels(&r.1), singles[k], "request {i} with a{k} equals `knobs generate --lora a{k}`");
            r
        };
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let (_, listing) = get(&format!("{}/v1/adapters", server.url));
    let listing: Value = serde_json::from_str(&listing).unwrap();
    let loaded = listing["loaded"].as_array().unwrap();
    assert!(loaded.len() <= 2, "the cache holds two: {listing}");
    let names: Vec<&str> = listing["adapters"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a0", "a1", "a2", "a3", "a4", "ia3-star", "star-token"]);
    let a0 = listing["adapters"].as_array().unwrap().iter().find(|a| a["name"] == "a0").unwrap();
    assert_eq!((a0["kind"].as_str(), a0["method"].as_str(), a0["rank"].as_u64()), (Some("adapter"), Some("LoRA"), Some(2)));
    let (_, metrics) = get(&format!("{}/metrics", server.url));
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (hits, misses, evictions) = (value("knobs_adapter_cache_hits_total"), value("knobs_adapter_cache_misses_total"), value("knobs_adapter_cache_evictions_total"));
    assert!(hits >= 30.0 && misses >= 20.0 && evictions >= 18.0, "hits {hits} misses {misses} evictions {evictions}");
    assert_eq!(value("knobs_requests_total{route=\"generate\",status=\"200\"}"), 100.0);
    assert!(metrics.contains("knobs_request_seconds_bucket") && metrics.contains("knobs_base_model_load_seconds"));

    // Several adapters apply in the order given, whatever order they were loaded in.
    for pair in [[3usize, 1], [1, 3], [3, 1]] {
        let flags: Vec<String> = pair.iter().map(|&i| format!("{}:{}", s(&lora(i)), weight(i))).collect();
        let name = format!("pair{}{}", pair[0], pair[1]);
        let want = reference(&refs, &name, PROMPT, &["--lora", &flags[0], "--lora", &flags[1]]);
        let adapters: Vec<(String, f32)> = pair.iter().map(|&i| (format!("a{i}"), weight(i))).collect();
        let refs_: Vec<(&str, f32)> = adapters.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        let (status, body) = post(&generate, &request(PROMPT, &refs_, &[]));
        assert_eq!(status, 200);
        assert_eq!(pixels(&body), want, "{name}");
    }
    // A PEFT folder (IA3).
    let ia3 = reference(&refs, "ia3", PROMPT, &["--lora", s(&store.join("ia3-star"))]);
    assert_ne!(ia3, base);
    assert_eq!(pixels(&post(&generate, &request(PROMPT, &[("ia3-star", 1.0)], &[])).1), ia3);
    // An embedding for one request only: the next request reads its token as plain text.
    let token = "a sks star";
    let with = reference(&refs, "ti", token, &["--embedding", s(&store.join("star-token.safetensors"))]);
    let without = reference(&refs, "no-ti", token, &[]);
    assert_ne!(with, without);
    assert_eq!(pixels(&post(&generate, &request(token, &[], &["star-token"])).1), with);
    assert_eq!(pixels(&post(&generate, &request(token, &[], &[])).1), without, "the embedding does not leak");
    // Several images as JSON with base64 PNGs.
    let mut body: Value = serde_json::from_slice(&request(PROMPT, &[("a2", 1.0)], &[])).unwrap();
    body["format"] = "json".into();
    body["num_images"] = 2.into();
    let (status, out) = post(&generate, &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200);
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["images"].as_array().unwrap().len(), 2);
    use base64::Engine;
    let first = base64::engine::general_purpose::STANDARD.decode(out["images"][0].as_str().unwrap()).unwrap();
    assert_eq!(pixels(&first).dimensions(), (32, 32));
}

#[test]
fn bad_requests_and_uploads_are_refused_by_field_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let out = tmp.path().join("lora");
    ok(&["train", "--method", "lora", "--concept", "striped-star", "--out", s(&out), "--max-train-steps", "1", "--num-samples", "0",
        "--rank", "2", "--learning-rate", "0.05"]);
    let file = out.join("pytorch_lora_weights.safetensors");
    let refs = tmp.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let want = reference(&refs, "mine", PROMPT, &["--lora", s(&file)]);

    // Bad flags are named before anything is served.
    for (flags, named) in [(vec!["--max-queue", "0"], "--max-queue"), (vec!["--cache-mb=-1"], "--cache-mb"), (vec!["--model", "/nonexistent/model"], "/nonexistent/model")] {
        let mut a = vec!["serve", "--adapters", s(&store), "--addr", "127.0.0.1:0"];
        a.extend(flags);
        let err = common::fail(&a);
        assert!(err.contains(named), "{err}");
    }
    let server = serve(&store, &["--max-queue", "1"]);
    let (status, page) = get(&server.url);
    assert!(status == 200 && page.contains("knobs serve") && page.contains("/v1/generate"));
    assert_eq!(get(&format!("{}/healthz", server.url)), (200, "ok".to_string()));
    let upload = |name: &str, body: &[u8]| -> (u16, Value) {
        let mut r = agent().post(format!("{}/v1/adapters?name={name}", server.url)).send(body).unwrap();
        (r.status().as_u16(), serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap())
    };
    // Not a safetensors file; a LoRA of another model (the golden tiny-sd's); a bad name.
    let (status, e) = upload("junk", b"not a safetensors file");
    assert_eq!((status, e["field"].as_str()), (422, Some("body")), "{e}");
    let other = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let (status, e) = upload("other", &std::fs::read(other).unwrap());
    assert_eq!((status, e["field"].as_str()), (422, Some("body")), "{e}");
    let (status, e) = upload("..%2Fx", b"x");
    assert_eq!((status, e["field"].as_str()), (400, Some("name")), "{e}");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0, "nothing refused is stored");
    // A good one is stored, listed and used; a second of that name conflicts.
    let (status, e) = upload("mine", &std::fs::read(&file).unwrap());
    assert_eq!(status, 201, "{e}");
    assert_eq!(e["method"], "LoRA");
    assert_eq!(upload("mine", &std::fs::read(&file).unwrap()).0, 409);

    let generate = format!("{}/v1/generate", server.url);
    let check = |body: &[u8], status: u16, field: &str| {
        let (got, out) = post(&generate, body);
        let e = error(&out);
        assert_eq!((got, e["field"].as_str()), (status, Some(field)), "{e}");
    };
    check(&request(PROMPT, &[("nope", 1.0)], &[]), 404, "adapters[0].name");
    check(&request(PROMPT, &[("mine", 1.0)], &["mine"]), 400, "embeddings[0]");
    check(b"{\"prompt\": \"a\", ", 400, "body");
    check(br#"{"prompt": "a", "width": 30}"#, 400, "width");
    check(br#"{"prompt": "a", "sed": 1}"#, 400, "sed");
    check(br#"{"prompt": "a", "prompt_2": "b"}"#, 400, "prompt_2");
    // None of that disturbed the loaded state.
    let (status, body) = post(&generate, &request(PROMPT, &[("mine", 1.0)], &[]));
    assert_eq!(status, 200);
    assert_eq!(pixels(&body), want);

    // A full queue: one long request runs, one waits, the third is refused at once.
    let slow = serde_json::to_vec(&json!({ "prompt": PROMPT, "steps": 250 })).unwrap();
    let background: Vec<_> = (0..2)
        .map(|_| {
            let (url, slow) = (generate.clone(), slow.clone());
            let t = std::thread::spawn(move || post(&url, &slow).0);
            std::thread::sleep(std::time::Duration::from_millis(300));
            t
        })
        .collect();
    let (status, out) = post(&generate, &request(PROMPT, &[], &[]));
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&out));
    for t in background {
        assert_eq!(t.join().unwrap(), 200);
    }

    // Deleting removes the file and detaches it.
    let del = |name: &str| agent().delete(format!("{}/v1/adapters/{name}", server.url)).call().unwrap().status().as_u16();
    assert_eq!(del("mine"), 200);
    assert!(!store.join("mine.safetensors").exists());
    assert_eq!(del("mine"), 404);
    check(&request(PROMPT, &[("mine", 1.0)], &[]), 404, "adapters[0].name");
}

/// On an SDXL pipeline the second prompt and the micro-conditioning sizes reach the model as
/// `knobs generate --prompt-2 --original-size --crop --target-size` pass them.
#[test]
fn sdxl_conditioning_matches_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/tiny-sdxl");
    let png = tmp.path().join("xl.png");
    ok(&["generate", "--model", model, "--prompt", "a red circle", "--prompt-2", "a blue square", "--original-size", "48x64", "--crop", "4,8",
        "--target-size", "64x64", "--steps", "3", "--guidance", "5", "--seed", "2", "--out", s(&png)]);
    let want = image::open(&png).unwrap().to_rgb8();
    let plain = tmp.path().join("plain.png");
    ok(&["generate", "--model", model, "--prompt", "a red circle", "--steps", "3", "--guidance", "5", "--seed", "2", "--out", s(&plain)]);
    assert_ne!(image::open(&plain).unwrap().to_rgb8(), want, "the conditioning changes the image");
    let server = serve(&tmp.path().join("store"), &["--model", model]);
    let body = json!({ "prompt": "a red circle", "prompt_2": "a blue square", "original_size": [48, 64], "crop_top_left": [4, 8],
        "target_size": [64, 64], "steps": 3, "guidance": 5, "seed": 2 });
    let (status, out) = post(&format!("{}/v1/generate", server.url), &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    assert_eq!(pixels(&out), want);
}
