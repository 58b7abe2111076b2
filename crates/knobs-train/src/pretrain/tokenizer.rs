//! The base model's tokenizer: CLIP's byte-level BPE (`vocab.json` + `merges.txt`, so
//! transformers' `CLIPTokenizer` loads it) with a vocabulary made for the world. Every word of
//! the world's captions is one token; any other word still tokenizes, as characters, which is
//! what makes identifiers such as `sks` rare.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use knobs_nn::io::atomic_write;
use knobs_world::{Background, Colour, Position, Shape, Size};
use serde_json::json;

use super::recipe::MAX_TOKENS;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars.into_iter().map(|c| char::from_u32(c).expect("valid code point")).collect()
}

/// The words of the world's captions plus a few common prompt words.
pub fn world_words() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut add = |phrase: &str| words.extend(phrase.split_whitespace().map(str::to_string));
    Shape::ALL.iter().for_each(|s| add(s.name()));
    Colour::ALL.iter().for_each(|c| add(c.name()));
    Background::ALL.iter().for_each(|b| add(b.name()));
    Size::ALL.iter().for_each(|s| add(s.name()));
    Position::ALL.iter().for_each(|p| add(p.name()));
    add("a an the in on of and with background photo picture image shape object");
    let mut seen = std::collections::HashSet::new();
    words.retain(|w| seen.insert(w.clone()));
    words
}

/// Applies `merges` (in rank order, lowest first) to a word's symbols, as BPE does.
fn apply(mut symbols: Vec<String>, merges: &[(String, String)]) -> Vec<String> {
    loop {
        let best = (0..symbols.len().saturating_sub(1))
            .filter_map(|i| merges.iter().position(|(a, b)| *a == symbols[i] && *b == symbols[i + 1]).map(|r| (r, i)))
            .min();
        let Some((_, i)) = best else { return symbols };
        let joined = format!("{}{}", symbols[i], symbols[i + 1]);
        symbols.splice(i..i + 2, [joined]);
    }
}

/// `(vocab, merges)`: CLIP's layout (bytes, bytes + `</w>`, one entry per merge, specials).
/// Merges are added until BPE turns every word into one token: each round joins the first
/// pair of a word's current split, after all earlier merges, so a later merge can never
/// undo how an earlier word is split.
pub fn build(words: &[String]) -> (BTreeMap<String, u32>, Vec<(String, String)>) {
    let base = byte_chars();
    let mut order: Vec<String> = base.iter().map(|c| c.to_string()).collect();
    order.extend(base.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in words {
        let mut symbols: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let split = apply(symbols.clone(), &merges);
            if split.len() < 2 {
                break;
            }
            merges.push((split[0].clone(), split[1].clone()));
            let joined = format!("{}{}", split[0], split[1]);
            if !order.contains(&joined) {
                order.push(joined);
            }
        }
    }
    order.push(BOS.into());
    order.push(EOS.into());
    let vocab = order.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    (vocab, merges)
}

/// Writes `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`.
pub fn write(dir: &Path) -> Result<()> {
    let (vocab, merges) = build(&world_words());
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    atomic_write(dir.join("vocab.json"), serde_json::to_string(&vocab)?.as_bytes())?;
    atomic_write(dir.join("merges.txt"), text.as_bytes())?;
    let config = json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": true,
        "clean_up_tokenization_spaces": false
    });
    atomic_write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let special = json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS });
    atomic_write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&special)?.as_bytes())?;
    Ok(())
}
