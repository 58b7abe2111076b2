//! Textual-inversion embeddings: new placeholder tokens whose rows of the CLIP token table
//! were learned. Reads and writes diffusers' `learned_embeds.safetensors` (`{token: [n, dim]}`)
//! and the A1111 / kohya safetensors layout (`emb_params` [n, dim]), and adds the tokens to a
//! [`ClipTokenizer`] and [`ClipTextModel`] as diffusers' `load_textual_inversion` does: a token
//! with n vectors becomes `tok`, `tok_1`, ..., `tok_{n-1}`, and [`expand_prompt`] rewrites
//! prompts to use them all. Pickled `.pt` / `.bin` files are refused, never executed.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{read_checked, write_safetensors};
use knobs_nn::param::like;
use knobs_nn::{Error, Result, Tensor};

use super::model::ClipTextModel;
use super::tokenizer::ClipTokenizer;

/// The file diffusers' textual-inversion script writes.
pub const DIFFUSERS_FILE: &str = "learned_embeds.safetensors";
/// The key of the A1111 / kohya safetensors layout.
pub const A1111_KEY: &str = "emb_params";
/// The keys of an SDXL embedding, one table per text encoder (CLIP-L, OpenCLIP bigG), as
/// A1111, ComfyUI and diffusers' SDXL docs use them.
pub const SDXL_KEYS: [&str; 2] = ["clip_l", "clip_g"];

/// One placeholder token and its learned vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnedEmbedding {
    pub token: String,
    /// `[n_vectors][dim]`.
    pub vectors: Vec<Vec<f32>>,
    /// Where it was read from (named in errors); empty when built in memory.
    pub file: PathBuf,
}

impl LearnedEmbedding {
    pub fn dim(&self) -> usize {
        self.vectors.first().map_or(0, Vec::len)
    }

    /// The tokens the vectors are stored under: `tok`, `tok_1`, ... (diffusers' naming).
    pub fn tokens(&self) -> Vec<String> {
        (0..self.vectors.len()).map(|i| if i == 0 { self.token.clone() } else { format!("{}_{i}", self.token) }).collect()
    }

    fn data(&self) -> TensorData {
        TensorData::new(self.vectors.concat(), [self.vectors.len(), self.dim()])
    }
}

/// Reads an embedding file. `token` overrides the name in the file: diffusers files name
/// their token in the key; A1111 files are named by their file stem, as A1111 does.
pub fn read(path: impl AsRef<Path>, token: Option<&str>) -> Result<LearnedEmbedding> {
    let path = path.as_ref();
    let sd = read_checked(path, "A1111 writes .pt, diffusers .bin; the .safetensors file holds its `emb_params` or `string_to_param.*` tensor")?;
    let keys: Vec<&String> = sd.tensors.keys().collect();
    let stem = || path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let (key, name) = match keys.as_slice() {
        [k] if k.as_str() == A1111_KEY || k.starts_with("string_to_param.") => (k.as_str(), token.map_or_else(stem, str::to_string)),
        [k] => (k.as_str(), token.unwrap_or(k).to_string()),
        _ if keys.iter().any(|k| SDXL_KEYS.contains(&k.as_str())) => {
            return Err(Error::file(path, "an SDXL embedding (clip_l / clip_g, one table per text encoder): load it into an SDXL pipeline"));
        }
        _ => return Err(Error::file(path, format!("expected one tensor ({{token: [n, dim]}} or `{A1111_KEY}`), found keys {keys:?}"))),
    };
    let (values, shape) = sd.f32(key)?;
    let (n, dim) = match shape.as_slice() {
        [d] => (1, *d),
        [n, d] => (*n, *d),
        _ => return Err(Error::key(path, key, format!("shape {shape:?}: expected [dim] or [n_vectors, dim]"))),
    };
    if n == 0 || dim == 0 || name.trim().is_empty() {
        return Err(Error::key(path, key, format!("empty embedding (shape {shape:?}, token {name:?})")));
    }
    let vectors = values.chunks(dim).map(<[f32]>::to_vec).collect();
    Ok(LearnedEmbedding { token: name, vectors, file: path.to_path_buf() })
}

/// Adds `emb`'s tokens to the tokenizer and their vectors to the text encoder's token table
/// (grown as transformers' `resize_token_embeddings`). Returns the new ids, in token order.
pub fn add(emb: &LearnedEmbedding, tokenizer: &mut ClipTokenizer, text_encoder: &mut ClipTextModel) -> Result<Vec<u32>> {
    check(emb, tokenizer, text_encoder)?;
    let tokens = emb.tokens();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let ids = tokenizer.add_tokens(&refs).map_err(|e| e.in_file(&emb.file))?;
    if tokenizer.vocab_size() > text_encoder.vocab_size() {
        text_encoder.resize_token_embeddings(tokenizer.vocab_size());
    }
    let table = &mut text_encoder.text_model.embeddings.token_embedding.weight;
    let [rows, d] = table.dims();
    let mut values: Vec<f32> = table.to_data().convert::<f32>().try_into_vec().map_err(|e| Error::Invalid(format!("token table: {e:?}")))?;
    for (&id, v) in ids.iter().zip(&emb.vectors) {
        let id = id as usize;
        if id >= rows {
            return Err(Error::key(&emb.file, &emb.token, format!("token id {id} lies outside the text encoder's {rows}-row table")));
        }
        values[id * d..(id + 1) * d].copy_from_slice(v);
    }
    *table = like(table, Tensor::from_data(TensorData::new(values, [rows, d]), &table.device()));
    Ok(ids)
}

/// Whether `path` is an SDXL embedding (`clip_l` / `clip_g` tables).
pub fn is_sdxl_file(path: impl AsRef<Path>) -> Result<bool> {
    let sd = read_checked(path, "")?;
    Ok(SDXL_KEYS.iter().any(|k| sd.tensors.contains_key(*k)))
}

/// Reads an SDXL embedding: `[clip_l, clip_g]`, both under `token` (default: the file stem,
/// as A1111 names embeddings; for a `learned_embeds.safetensors`, which names no token, the
/// `name` its writer recorded), with the same number of vectors.
pub fn read_sdxl(path: impl AsRef<Path>, token: Option<&str>) -> Result<[LearnedEmbedding; 2]> {
    let path = path.as_ref();
    let sd = read_checked(path, "")?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let recorded = sd.metadata.get("name").filter(|_| path.file_name().and_then(|n| n.to_str()) == Some(DIFFUSERS_FILE));
    let token = token.or(recorded.map(String::as_str)).unwrap_or(stem).to_string();
    if let Some(k) = sd.tensors.keys().find(|k| !SDXL_KEYS.contains(&k.as_str())) {
        return Err(Error::key(path, k, "an SDXL embedding holds only clip_l and clip_g"));
    }
    let table = |key: &str| -> Result<LearnedEmbedding> {
        let (values, shape) = sd.f32(key).map_err(|_| Error::key(path, key, "missing: an SDXL embedding has one table per text encoder"))?;
        let [n, dim] = shape[..] else { return Err(Error::key(path, key, format!("shape {shape:?}: expected [n_vectors, dim]"))) };
        if n == 0 || dim == 0 || token.trim().is_empty() {
            return Err(Error::key(path, key, format!("empty embedding (shape {shape:?}, token {token:?})")));
        }
        Ok(LearnedEmbedding { token: token.clone(), vectors: values.chunks(dim).map(<[f32]>::to_vec).collect(), file: path.to_path_buf() })
    };
    let (l, g) = (table("clip_l")?, table("clip_g")?);
    if l.vectors.len() != g.vectors.len() {
        return Err(Error::key(path, "clip_g", format!("{} vectors, clip_l has {}", g.vectors.len(), l.vectors.len())));
    }
    Ok([l, g])
}

/// Writes an SDXL embedding: `clip_l` (first text encoder) and `clip_g` (second), `[n, dim]`
/// each; the metadata records the token.
pub fn save_sdxl(path: impl AsRef<Path>, clip_l: &LearnedEmbedding, clip_g: &LearnedEmbedding) -> Result<()> {
    let tensors = BTreeMap::from([(SDXL_KEYS[0].to_string(), clip_l.data()), (SDXL_KEYS[1].to_string(), clip_g.data())]);
    let meta = HashMap::from([("name".to_string(), clip_l.token.clone()), ("format".to_string(), "pt".to_string())]);
    write_safetensors(path, &tensors, &meta)
}

/// What [`add`] would refuse: a width other than the encoder's, or a token the tokenizer has.
pub fn check(emb: &LearnedEmbedding, tokenizer: &ClipTokenizer, text_encoder: &ClipTextModel) -> Result<()> {
    let hidden = text_encoder.config.hidden_size;
    if emb.dim() != hidden {
        return Err(Error::key(&emb.file, &emb.token, format!("embedding width {} does not match the text encoder's hidden size {hidden}", emb.dim())));
    }
    if let Some(t) = emb.tokens().iter().find(|t| tokenizer.token_to_id(t).is_some()) {
        return Err(Error::key(&emb.file, t, "token already in the tokenizer's vocabulary; pass another token name"));
    }
    Ok(())
}

/// [`read`] then [`add`].
pub fn load(path: impl AsRef<Path>, token: Option<&str>, tokenizer: &mut ClipTokenizer, text_encoder: &mut ClipTextModel) -> Result<(LearnedEmbedding, Vec<u32>)> {
    let emb = read(path, token)?;
    let ids = add(&emb, tokenizer, text_encoder)?;
    Ok((emb, ids))
}

/// The current vectors of `token` (and `token_1`, ... when present) from the text encoder,
/// e.g. after training, ready to save.
pub fn from_model(token: &str, tokenizer: &ClipTokenizer, text_encoder: &ClipTextModel) -> Result<LearnedEmbedding> {
    let first = tokenizer.token_to_id(token).ok_or_else(|| Error::param(token, "not in the tokenizer's vocabulary"))?;
    let mut ids = vec![first];
    while let Some(id) = tokenizer.token_to_id(&format!("{token}_{}", ids.len())) {
        ids.push(id);
    }
    let table = &text_encoder.text_model.embeddings.token_embedding.weight;
    let [rows, d] = table.dims();
    let values: Vec<f32> = table.to_data().convert::<f32>().try_into_vec().map_err(|e| Error::Invalid(format!("token table: {e:?}")))?;
    let vectors = ids
        .iter()
        .map(|&id| (id as usize) < rows)
        .zip(&ids)
        .map(|(ok, &id)| if ok { Ok(values[id as usize * d..(id as usize + 1) * d].to_vec()) } else { Err(Error::param(token, format!("id {id} outside the {rows}-row table"))) })
        .collect::<Result<_>>()?;
    Ok(LearnedEmbedding { token: token.to_string(), vectors, file: PathBuf::new() })
}

/// diffusers' prompt rewrite for multi-vector tokens: every added token `tok` in the prompt
/// becomes `tok tok_1 ... tok_{n-1}`. Like diffusers, the rewrite replaces every occurrence
/// of the token's text in the prompt.
pub fn expand_prompt(prompt: &str, tokenizer: &ClipTokenizer) -> Result<String> {
    let added: HashMap<u32, String> = tokenizer.inner().get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content)).collect();
    let mut seen = Vec::new();
    for id in tokenizer.tokenize(prompt)? {
        if let Some(t) = added.get(&id).filter(|t| !seen.contains(*t)) {
            seen.push(t.clone());
        }
    }
    let mut out = prompt.to_string();
    for token in seen {
        let mut replacement = token.clone();
        let mut i = 1;
        while let Some(next) = tokenizer.token_to_id(&format!("{token}_{i}")).and_then(|id| added.get(&id)) {
            replacement.push(' ');
            replacement.push_str(next);
            i += 1;
        }
        if i > 1 {
            out = out.replace(&token, &replacement);
        }
    }
    Ok(out)
}

/// Writes diffusers' format: one tensor `[n, dim]` keyed by the token.
pub fn save_diffusers(path: impl AsRef<Path>, emb: &LearnedEmbedding) -> Result<()> {
    let tensors = BTreeMap::from([(emb.token.clone(), emb.data())]);
    write_safetensors(path, &tensors, &HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Writes the A1111 / kohya format: `emb_params` `[n, dim]`; A1111 names the token after the
/// file stem, so save it as `<token>.safetensors`. The metadata records the token.
pub fn save_a1111(path: impl AsRef<Path>, emb: &LearnedEmbedding) -> Result<()> {
    let tensors = BTreeMap::from([(A1111_KEY.to_string(), emb.data())]);
    let meta = HashMap::from([
        ("name".to_string(), emb.token.clone()),
        ("vectors".to_string(), emb.vectors.len().to_string()),
        ("format".to_string(), "pt".to_string()),
    ]);
    write_safetensors(path, &tensors, &meta)
}
