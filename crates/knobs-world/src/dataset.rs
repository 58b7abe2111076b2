//! Writing the world to disk in the layouts trainers already read: `00000.png` next to
//! `00000.txt` (kohya, diffusers DreamBooth) and `metadata.jsonl` (diffusers ImageFolder).
//!
//! Image i depends only on (seed, i), so training code can draw any slice in memory with
//! `sample` and get exactly what `write_world` wrote.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use image::{ImageEncoder, RgbImage};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::caption::caption;
use crate::concept::{ConceptSpec, DEFAULT_INSTANCES, Pattern, held_out};
use crate::render::render;
use crate::scene::{Attributes, Colour, Rgb, Scene, Shape};

/// SplitMix64's finaliser: spreads nearby inputs over all 64 bits.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rng seed of image `index` of dataset `seed`.
pub fn index_seed(seed: u64, index: u64) -> u64 {
    splitmix(splitmix(seed) ^ index)
}

/// Scene and caption of image `index` of dataset `seed`: the same draw `write_world` makes.
pub fn sample(seed: u64, index: u64) -> (Scene, String) {
    let mut rng = StdRng::seed_from_u64(index_seed(seed, index));
    let scene = Scene::sample(&mut rng);
    let text = caption(&scene, &mut rng);
    (scene, text)
}

/// File stem of image `index`.
pub fn stem(index: usize) -> String {
    format!("{index:05}")
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        // No fsync: the rename already hides partial files from readers, and a dataset lost
        // to a crash is regenerated exactly; syncing 20k small files costs more than rendering.
        f.write_all(bytes)?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })
}

/// PNG bytes of an image.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .context("encoding PNG")?;
    Ok(bytes)
}

fn write_pair(dir: &Path, index: usize, img: &RgbImage, text: &str) -> Result<()> {
    let stem = stem(index);
    write_atomic(&dir.join(format!("{stem}.png")), &encode_png(img)?)?;
    write_atomic(&dir.join(format!("{stem}.txt")), text.as_bytes())
}

fn create_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create folder {}", out.display()))
}

#[derive(Serialize)]
struct MetadataLine<'a> {
    file_name: String,
    text: &'a str,
    #[serde(flatten)]
    attributes: Attributes,
}

/// Writes images 0..n of dataset `seed` at `size` x `size` into `out`, with a caption file per
/// image and `metadata.jsonl`. Rendering is spread over the available cores; the files do not
/// depend on how many there are.
pub fn write_world(out: &Path, n: usize, seed: u64, size: u32) -> Result<()> {
    ensure!(n > 0, "the dataset needs at least one image");
    ensure!(size > 0, "the image size must be positive");
    create_dir(out)?;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(threads) {
                        let (scene, text) = sample(seed, i as u64);
                        write_pair(out, i, &render(&scene, size), &text)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a render worker panicked"))
    })?;
    let mut jsonl = String::new();
    for i in 0..n {
        let (scene, text) = sample(seed, i as u64);
        let line = MetadataLine { file_name: format!("{}.png", stem(i)), text: &text, attributes: scene.attributes() };
        jsonl += &serde_json::to_string(&line)?;
        jsonl.push('\n');
    }
    write_atomic(&out.join("metadata.jsonl"), jsonl.as_bytes())
}

#[derive(Serialize)]
struct ConceptFile<'a> {
    name: &'a str,
    token: &'a str,
    instance_prompt: String,
    class_prompt: String,
    shape: Shape,
    colour: Colour,
    pattern: Pattern,
    mark: Option<Rgb>,
}

/// Writes one concept's `n` instance images, captions and `concept.json` into `dir`.
pub fn write_concept(dir: &Path, spec: &ConceptSpec, n: usize, size: u32) -> Result<()> {
    ensure!(n > 0, "a concept needs at least one instance image");
    ensure!(size > 0, "the image size must be positive");
    create_dir(dir)?;
    for (i, (img, text)) in spec.instance_images(n, size).iter().enumerate() {
        write_pair(dir, i, img, text)?;
    }
    let file = ConceptFile {
        name: &spec.name,
        token: &spec.token,
        instance_prompt: spec.instance_prompt(),
        class_prompt: spec.class_prompt(),
        shape: spec.shape,
        colour: spec.colour,
        pattern: spec.pattern,
        mark: spec.mark,
    };
    let json = serde_json::to_string_pretty(&file)? + "\n";
    write_atomic(&dir.join("concept.json"), json.as_bytes())
}

/// Writes every held-out concept into its own folder `out/<name>/` with the default number of
/// instance images; returns the folders.
pub fn write_concepts(out: &Path, size: u32) -> Result<Vec<PathBuf>> {
    held_out()
        .iter()
        .map(|spec| {
            let dir = out.join(&spec.name);
            write_concept(&dir, spec, DEFAULT_INSTANCES, size)?;
            Ok(dir)
        })
        .collect()
}
