//! Mutations of a seed file: byte-level (flips, interesting bytes, inserts, deletes,
//! duplicated runs, splices from another seed) and, for safetensors files and text, aware of
//! the structure: the header's numbers (shapes, offsets) and the text's numbers replaced by
//! boundary values, with the header length kept consistent, so that inputs reach the checks
//! behind the parser (shapes that multiply past memory, offsets past the end, NaN values).
use rand::Rng;
use rand::rngs::StdRng;

/// Numbers that sit on boundaries readers get wrong.
const NUMBERS: &[&str] = &[
    "0", "-1", "1", "2", "3", "7", "255", "256", "65535", "65536", "2147483647", "2147483648", "4294967295", "4294967296",
    "9223372036854775807", "18446744073709551615", "99999999999999999999", "1e308", "-1e308", "1e-320", "0.5", "-0.0", "NaN",
    "Infinity", "1048576", "123456789",
];

const BYTES: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', b'\n', b'.', b'e', b'-'];

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

/// The header text of a safetensors file, if `data` is one (8-byte little-endian length, then
/// that many bytes of JSON).
fn safetensors_header(data: &[u8]) -> Option<(usize, &str)> {
    let n = u64::from_le_bytes(data.get(..8)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(data.get(8..8usize.checked_add(n)?)?).ok()?;
    text.trim_start().starts_with('{').then_some((n, text))
}

/// Replaces one number in `text` with a boundary value (or a random one).
fn swap_number(text: &str, rng: &mut StdRng) -> Option<String> {
    let bytes = text.as_bytes();
    let starts: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())).collect();
    if starts.is_empty() {
        return None;
    }
    let start = *pick(rng, &starts);
    let end = (start..bytes.len()).find(|&i| !(bytes[i].is_ascii_digit() || matches!(bytes[i], b'.' | b'e' | b'E' | b'-' | b'+'))).unwrap_or(bytes.len());
    let new = if rng.random_bool(0.8) { pick(rng, NUMBERS).to_string() } else { rng.random::<u32>().to_string() };
    Some(format!("{}{new}{}", &text[..start], &text[end..]))
}

/// Replaces one quoted string in `text` with another from the same text, or empties it.
fn swap_string(text: &str, rng: &mut StdRng) -> Option<String> {
    let quotes: Vec<usize> = text.match_indices('"').map(|(i, _)| i).collect();
    if quotes.len() < 4 {
        return None;
    }
    let a = rng.random_range(0..quotes.len() / 2) * 2;
    let b = rng.random_range(0..quotes.len() / 2) * 2;
    let with = if rng.random_bool(0.2) { "" } else { &text[quotes[b] + 1..quotes[b + 1]] };
    Some(format!("{}{with}{}", &text[..quotes[a] + 1], &text[quotes[a + 1]..]))
}

fn mutate_text(text: &str, rng: &mut StdRng) -> Option<String> {
    if rng.random_bool(0.6) { swap_number(text, rng) } else { swap_string(text, rng) }
}

/// One structure-aware or byte-level change of `data`; `other` is another seed to splice from.
fn once(data: &mut Vec<u8>, other: &[u8], rng: &mut StdRng) {
    if let Some((n, header)) = safetensors_header(data).filter(|_| rng.random_bool(0.5))
        && let Some(new) = mutate_text(header, rng) {
            let rest = data[8 + n..].to_vec();
            *data = (new.len() as u64).to_le_bytes().to_vec();
            data.extend_from_slice(new.as_bytes());
            data.extend_from_slice(&rest);
            return;
        }
    if let Ok(text) = std::str::from_utf8(data).map(str::to_string)
        && rng.random_bool(0.5)
            && let Some(new) = mutate_text(&text, rng) {
                *data = new.into_bytes();
                return;
            }
    let len = data.len();
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = *pick(rng, BYTES);
        }
        2 => {
            let i = rng.random_range(0..=len);
            let n = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 1 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(64));
            data.drain(i..i + n);
        }
        4 if len > 1 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(64));
            let run = data[i..i + n].to_vec();
            let at = rng.random_range(0..=len);
            data.splice(at..at, run);
        }
        5 if !other.is_empty() => {
            // Splice: our head, the other seed's tail.
            let i = rng.random_range(0..=len);
            let j = rng.random_range(0..other.len());
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        _ if len > 0 => {
            // Truncate: a file cut short by a crash.
            data.truncate(rng.random_range(0..len));
        }
        _ => data.push(rng.random()),
    }
}

/// A mutant of `seed`: one to four changes stacked.
pub fn mutant(seed: &[u8], other: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        once(&mut data, other, rng);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn safetensors_mutants_keep_a_consistent_header_length() {
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0; 8]);
        let mut rng = StdRng::seed_from_u64(1);
        let mut consistent = 0;
        for _ in 0..200 {
            let mut m = file.clone();
            once(&mut m, &[], &mut rng);
            if safetensors_header(&m).is_some_and(|(n, h)| n == h.len() && m.len() >= 8 + n) && m != file {
                consistent += 1;
            }
        }
        assert!(consistent > 50, "{consistent} of 200 mutants kept a readable header");
    }
}
