//! The base-model recipe: its tokenizer keeps every world word whole, and a pretraining run
//! cut into pieces by the time limit ends with exactly the files of an uninterrupted one.
use std::path::Path;

use knobs_diffusion::clip::ClipTokenizer;
use knobs_train::pretrain::tokenizer::{world_words, write};
use knobs_train::pretrain::{Outcome, PretrainConfig, run};

#[test]
fn every_world_word_is_one_token_and_other_words_still_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path()).unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    for w in world_words() {
        assert_eq!(tok.tokenize(&w).unwrap().len(), 1, "`{w}` splits");
    }
    let caption = "a small red star in the top left on a white background";
    assert_eq!(tok.tokenize(caption).unwrap().len(), caption.split_whitespace().count());
    // A rare identifier becomes characters, not an unknown token.
    assert_eq!(tok.tokenize("sks").unwrap().len(), 3);
    assert_eq!(tok.encode("a sks star").unwrap().len(), 24);
}

fn tiny(out: &Path) -> PretrainConfig {
    let mut c = PretrainConfig::recipe(out.to_path_buf());
    c.vae.steps = 3;
    c.vae.batch = 2;
    c.base.steps = 3;
    c.base.batch = 2;
    c.latent_cache = 8;
    c.checkpoint_every = 100;
    c
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.to_string_lossy().into_owned(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_paused_and_resumed_pretraining_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    assert_eq!(run(&tiny(&whole), &mut |_| {}).unwrap(), Outcome::Finished(whole.join("model")));
    let pieces = tmp.path().join("pieces");
    let mut cfg = tiny(&pieces);
    cfg.max_seconds = Some(0.0); // stop after every step
    let mut pauses = 0;
    while let Outcome::Paused { phase, .. } = run(&cfg, &mut |_| {}).unwrap() {
        pauses += 1;
        assert!(pauses < 20, "never finishes");
        if phase == "base" {
            // A paused base phase leaves a complete pipeline to evaluate.
            let preview = pieces.join("preview");
            knobs_diffusion::pipeline::StableDiffusion::from_dir(&preview, &knobs_nn::cpu()).unwrap();
        }
    }
    assert!(pauses >= 4, "each phase must have paused at least twice, paused {pauses} times");
    let strip = |v: Vec<(String, Vec<u8>)>, root: &Path| -> Vec<(String, Vec<u8>)> {
        v.into_iter().map(|(p, b)| (p.replace(root.to_str().unwrap(), ""), b)).collect()
    };
    let (a, b) = (strip(files(&whole.join("model")), &whole), strip(files(&pieces.join("model")), &pieces));
    assert_eq!(a.len(), b.len());
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(ba == bb, "{pa} differs between the resumed and the uninterrupted run");
    }
    // A checkpoint made with other settings is refused, not silently mixed in.
    let mut other = tiny(&pieces);
    other.vae.steps = 4;
    std::fs::remove_dir_all(pieces.join("model/vae")).unwrap();
    let err = run(&other, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("checkpoint was made with"), "{err}");
}
