//! transformers' `CLIPTokenizer` as SD pipelines call it: `padding="max_length"`,
//! `truncation=True`, `max_length=model_max_length`. The BPE itself is the `tokenizers`
//! crate's, loaded from `tokenizer.json` or, when a folder has only the slow tokenizer's
//! `vocab.json` + `merges.txt` (most SD checkpoints), built with the same pipeline that
//! transformers' converter writes.
use std::path::Path;

use knobs_nn::burn::tensor::Int;
use knobs_nn::error::panic_message;
use knobs_nn::{Device, Error, Result, Tensor};
use serde_json::{Value, json};
use tokenizers::{AddedToken, Tokenizer};

use super::model::ClipTextModel;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's word splitting: the specials, English contractions, letter runs, single digits,
/// and runs of other non-space characters.
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Runs a tokenizers-crate call that may panic on a malformed file (it unwraps inside its
/// deserializers), turning a panic into an error naming `file`.
fn unpanicked<T>(file: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(Error::file(file, format!("malformed tokenizer file ({})", panic_message(&*p)))))
}

/// Text tokenized once when a tokenizer folder is read: letters, digits, punctuation, words
/// that split into several merges.
const PROBE: &str = "a photograph of an astronaut riding a horse, 4k, highly detailed! <sks> zwx dog's";

#[derive(Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    max_len: usize,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("max_len", &self.max_len).field("vocab", &self.vocab_size()).finish()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` (or `vocab.json` + `merges.txt`)
    /// and, when present, `tokenizer_config.json` for `model_max_length` and the special tokens.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, format!("cannot read: {e}")))?;
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            json!({})
        };
        let fast = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tok = if fast.exists() {
            unpanicked(&fast, || Tokenizer::from_file(&fast).map_err(|e| Error::file(&fast, format!("cannot load tokenizer: {e}"))))?
        } else if vocab.exists() && merges.exists() {
            unpanicked(&vocab, || from_vocab_merges(&vocab, &merges))?
        } else {
            return Err(Error::file(dir, "no tokenizer: needs tokenizer.json, or vocab.json and merges.txt"));
        };
        let max_len = match cfg.get("model_max_length").and_then(Value::as_u64) {
            // Configs without a real limit write a huge sentinel; CLIP's context is 77.
            Some(n) if (3..=1_000_000).contains(&n) => n as usize,
            _ => 77,
        };
        let special = |key: &str, default: &str| -> Result<u32> {
            let name = match cfg.get(key) {
                Some(Value::String(s)) => s.as_str(),
                Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or(default),
                _ => default,
            };
            let file = if cfg_path.exists() { cfg_path.as_path() } else { dir };
            tok.token_to_id(name).ok_or_else(|| Error::key(file, key, format!("token `{name}` is not in the vocabulary")))
        };
        let (bos, eos) = (special("bos_token", BOS)?, special("eos_token", EOS)?);
        // SD-2's tokenizer pads with "!" (id 0), SD-1's with the end-of-text token.
        let pad = special("pad_token", EOS)?;
        let clip = Self::new(tok, max_len, bos, eos, pad)?;
        // A vocabulary and merges that disagree make the tokenizers crate panic mid-prompt;
        // one probe finds most such files here, where the error can name them.
        let file = if fast.exists() { fast } else { merges };
        clip.tokenize(PROBE).map_err(|e| Error::file(&file, format!("the tokenizer is inconsistent: {e}")))?;
        Ok(clip)
    }

    /// Wraps a loaded tokenizer. Its own truncation and padding are switched off: this type
    /// adds the specials, truncates and pads itself.
    pub fn new(mut tok: Tokenizer, max_len: usize, bos: u32, eos: u32, pad: u32) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::param("model_max_length", "must be at least 2 (begin and end tokens)"));
        }
        tok.with_truncation(None).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        tok.with_padding(None);
        Ok(ClipTokenizer { tok, max_len, bos, eos, pad })
    }

    pub fn model_max_length(&self) -> usize {
        self.max_len
    }
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    /// Vocabulary size including added tokens: the row count the token embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    /// The same tokenizer, padding with `token` (SD-2.x's tokenizer pads with "!").
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        self.pad = self.tok.token_to_id(token).ok_or_else(|| Error::param("pad_token", format!("`{token}` is not in the vocabulary")))?;
        Ok(self)
    }

    /// Writes a diffusers `tokenizer/` folder (`tokenizer.json`, `tokenizer_config.json`) that
    /// [`Self::from_dir`] and transformers read back as this tokenizer.
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
        let name = |id: u32| self.tok.id_to_token(id).unwrap_or_default();
        let config = json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_len,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "pad_token": name(self.pad),
            "unk_token": name(self.eos),
        });
        let json = self.tok.to_string(true).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        knobs_nn::io::atomic_write(dir.join("tokenizer.json"), json.as_bytes())?;
        knobs_nn::io::atomic_write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config).expect("JSON").as_bytes())
    }

    /// The BPE ids of `text` without begin/end tokens, untruncated. A panic inside the
    /// tokenizers crate (inconsistent vocabulary and merges) becomes an error.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tok.encode(text, false)))
            .map_err(|p| Error::Invalid(format!("the tokenizer failed on {text:?} ({}): its vocabulary and merges disagree", panic_message(&*p))))?
            .map_err(|e| Error::Invalid(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[bos, up to max_len-2 tokens, eos, pad...]`, exactly `model_max_length` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.tokenize(text)?;
        let keep = body.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    /// [`Self::encode_batch`] as a `[B, model_max_length]` tensor for [`ClipTextModel::forward`].
    pub fn encode_tensor(&self, texts: &[&str], device: &Device) -> Result<Tensor<2, Int>> {
        ClipTextModel::ids_tensor(&self.encode_batch(texts)?, device)
    }

    /// Adds tokens (e.g. textual-inversion placeholders) that are always kept whole, with
    /// the flags transformers' `add_tokens` uses (normalized, not special), so ids and
    /// splits match a Python run. New tokens get ids from the current vocabulary size on;
    /// a token already known keeps its id. Returns each token's id.
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        if let Some(t) = tokens.iter().find(|t| t.trim().is_empty()) {
            return Err(Error::Invalid(format!("cannot add the blank token {t:?}")));
        }
        let added: Vec<AddedToken> = tokens.iter().map(|t| AddedToken::from(*t, false)).collect();
        self.tok.add_tokens(added).map_err(|e| Error::Invalid(format!("cannot add tokens {tokens:?}: {e}")))?;
        tokens
            .iter()
            .map(|t| self.tok.token_to_id(t).ok_or_else(|| Error::Invalid(format!("token {t:?} was not added"))))
            .collect()
    }
}

/// The `tokenizer.json` transformers' CLIP converter writes for a slow tokenizer's files.
fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let vocab_text = std::fs::read_to_string(vocab_path).map_err(|e| Error::file(vocab_path, format!("cannot read: {e}")))?;
    let vocab: serde_json::Map<String, Value> =
        serde_json::from_str(&vocab_text).map_err(|e| Error::file(vocab_path, format!("not a JSON token->id map: {e}")))?;
    let merges_text = std::fs::read_to_string(merges_path).map_err(|e| Error::file(merges_path, format!("cannot read: {e}")))?;
    let mut merges = Vec::new();
    for (i, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        match line.split_once(' ') {
            Some((a, b)) => merges.push(json!([a, b])),
            None => return Err(Error::file(merges_path, format!("line {}: not a merge pair: {line:?}", i + 1))),
        }
    }
    let id_of = |t: &str| {
        vocab.get(t).and_then(Value::as_u64).ok_or_else(|| Error::key(vocab_path, t, "special token missing from the vocabulary"))
    };
    let special = |t: &str, id: u64| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let (bos, eos) = (id_of(BOS)?, id_of(EOS)?);
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS, bos), special(EOS, eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos], "cls": [BOS, bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let err = |e: &dyn std::fmt::Display| Error::file(merges_path, format!("cannot build the BPE tokenizer: {e}"));
    let text = serde_json::to_string(&spec).map_err(|e| err(&e))?;
    text.parse::<Tokenizer>().map_err(|e| err(&e))
}
