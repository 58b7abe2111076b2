//! Textual-inversion embeddings with the tiny-sd tokenizer and text encoder: save then load in
//! both formats reproduces the text-encoder output; new tokens get new ids; multi-vector
//! prompts expand; bad files are clear errors.
use std::path::{Path, PathBuf};

use knobs_diffusion::clip::embeddings::{self, LearnedEmbedding};
use knobs_diffusion::clip::{ClipTextModel, ClipTokenizer};
use knobs_nn::{Init, cpu};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd");

fn pipeline() -> (ClipTokenizer, ClipTextModel) {
    let tok = ClipTokenizer::from_dir(Path::new(GOLDEN).join("tokenizer")).unwrap();
    let te = ClipTextModel::from_dir(Path::new(GOLDEN).join("text_encoder"), &cpu()).unwrap();
    (tok, te)
}

fn learned(token: &str, n: usize, dim: usize, seed: u64) -> LearnedEmbedding {
    let mut init = Init::new(seed);
    LearnedEmbedding { token: token.into(), vectors: (0..n).map(|_| init.normal_vec(dim)).collect(), file: PathBuf::new() }
}

fn encode(tok: &ClipTokenizer, te: &ClipTextModel, prompt: &str) -> (Vec<u32>, Vec<f32>) {
    let prompt = embeddings::expand_prompt(prompt, tok).unwrap();
    let ids = tok.encode(&prompt).unwrap();
    let out = te.try_forward(ClipTextModel::ids_tensor(std::slice::from_ref(&ids), &cpu()).unwrap()).unwrap();
    (ids, out.last_hidden_state.into_data().try_into_vec().unwrap())
}

#[test]
fn new_tokens_get_new_ids_and_multi_vector_prompts_expand() {
    let (mut tok, mut te) = pipeline();
    assert_eq!((tok.vocab_size(), te.vocab_size()), (1000, 1000));
    let (_, before) = encode(&tok, &te, "a photo of <sks> dog");
    let emb = learned("<sks>", 3, 32, 1);
    let ids = embeddings::add(&emb, &mut tok, &mut te).unwrap();
    assert_eq!(ids, vec![1000, 1001, 1002]);
    assert_eq!(te.vocab_size(), 1003);
    assert_eq!(embeddings::expand_prompt("a photo of <sks> dog", &tok).unwrap(), "a photo of <sks> <sks>_1 <sks>_2 dog");
    let (ids, after) = encode(&tok, &te, "a photo of <sks> dog");
    assert_eq!(&ids[..8], &[998, 320, 530, 516, 1000, 1001, 1002, tok.tokenize("dog").unwrap()[0]]);
    assert_ne!(before, after);
    // The table rows are the learned vectors, and they read back.
    assert_eq!(embeddings::from_model("<sks>", &tok, &te).unwrap().vectors, emb.vectors);
    // Loading the same token twice is refused.
    let e = embeddings::add(&emb, &mut tok, &mut te).unwrap_err().to_string();
    assert!(e.contains("<sks>") && e.contains("already"), "{e}");
}

#[test]
fn both_formats_round_trip_to_identical_text_encoder_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tok, mut te) = pipeline();
    embeddings::add(&learned("<cat-toy>", 2, 32, 2), &mut tok, &mut te).unwrap();
    embeddings::add(&learned("<style>", 1, 32, 3), &mut tok, &mut te).unwrap();
    let prompt = "a <cat-toy> in the <style> style";
    let (want_ids, want) = encode(&tok, &te, prompt);

    let diffusers = dir.path().join("cat").join(embeddings::DIFFUSERS_FILE);
    embeddings::save_diffusers(&diffusers, &embeddings::from_model("<cat-toy>", &tok, &te).unwrap()).unwrap();
    // A1111 names the token after the file stem.
    let a1111 = dir.path().join("style.safetensors");
    embeddings::save_a1111(&a1111, &embeddings::from_model("<style>", &tok, &te).unwrap()).unwrap();
    let sd = knobs_nn::io::read_safetensors(&a1111).unwrap();
    assert_eq!(sd.tensors[embeddings::A1111_KEY].shape().as_slice(), &[1, 32]);
    assert_eq!(sd.metadata["name"], "<style>");

    let (mut tok2, mut te2) = pipeline();
    let (e1, ids1) = embeddings::load(&diffusers, None, &mut tok2, &mut te2).unwrap();
    assert_eq!((e1.token.as_str(), ids1), ("<cat-toy>", vec![1000, 1001]));
    let (e2, _) = embeddings::load(&a1111, Some("<style>"), &mut tok2, &mut te2).unwrap();
    assert_eq!(e2.token, "<style>");
    let (ids, got) = encode(&tok2, &te2, prompt);
    assert_eq!(ids, want_ids);
    assert_eq!(got, want, "identical text-encoder outputs");

    let (mut tok3, mut te3) = pipeline();
    let (e3, _) = embeddings::load(&a1111, None, &mut tok3, &mut te3).unwrap();
    assert_eq!(e3.token, "style", "A1111 token from the file stem");
}

#[test]
fn single_vector_and_wrong_width_and_pickles() {
    let dir = tempfile::tempdir().unwrap();
    // diffusers also writes a bare [dim] vector.
    let file = dir.path().join("one.safetensors");
    let v = Init::new(4).normal_vec(32);
    let t = std::collections::BTreeMap::from([("<one>".to_string(), knobs_nn::burn::tensor::TensorData::new(v.clone(), [32]))]);
    knobs_nn::io::write_safetensors(&file, &t, &Default::default()).unwrap();
    let (mut tok, mut te) = pipeline();
    let (e, ids) = embeddings::load(&file, None, &mut tok, &mut te).unwrap();
    assert_eq!((e.vectors, ids), (vec![v], vec![1000]));

    let wide = dir.path().join("wide.safetensors");
    embeddings::save_diffusers(&wide, &learned("<wide>", 2, 768, 5)).unwrap();
    let err = embeddings::load(&wide, None, &mut tok, &mut te).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("wide.safetensors") && err.contains("<wide>") && err.contains("768") && err.contains("32"), "{err}");
    assert_eq!(tok.vocab_size(), 1001, "nothing added on error");

    let pt = dir.path().join("emb.pt");
    std::fs::write(&pt, b"\x80\x02junk").unwrap();
    let err = embeddings::read(&pt, None).unwrap_err().to_string();
    assert!(err.contains("emb.pt") && err.contains("pickle") && err.contains("safetensors"), "{err}");
}

#[test]
fn non_finite_vectors_and_every_pickle_extension_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (bad, word)) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")].into_iter().enumerate() {
        let mut emb = learned("<bad>", 2, 32, 6);
        emb.vectors[1][7] = bad;
        let file = dir.path().join(format!("bad{i}.safetensors"));
        embeddings::save_a1111(&file, &emb).unwrap();
        let (mut tok, mut te) = pipeline();
        let err = embeddings::load(&file, None, &mut tok, &mut te).unwrap_err().to_string();
        assert!(err.contains(&format!("bad{i}.safetensors")) && err.contains(embeddings::A1111_KEY) && err.contains(word), "{err}");
        assert_eq!(tok.vocab_size(), 1000, "nothing added on error");
    }
    for ext in ["pt", "pth", "bin", "ckpt", "pkl"] {
        let path = dir.path().join(format!("emb.{ext}"));
        let err = embeddings::read(&path, None).unwrap_err().to_string();
        assert!(err.contains(&format!("emb.{ext}")) && err.contains("pickle"), "{err}");
    }
}
