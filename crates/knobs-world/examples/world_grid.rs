//! A contact sheet of the world for eyeballing, and the render speed.
//!
//!     cargo run --release -p knobs-world --example world_grid -- /tmp/world_grid.png
//!
//! Also times rendering 10k scenes on one thread and `write_world` of 10k images.
//!
//! Row 1: each class, large and centred. Rows 2-3: sampled scenes with their captions printed.
//! Then one row per held-out concept: its instance images.
use std::time::Instant;

use image::{RgbImage, imageops};
use knobs_world::concept::held_out;
use knobs_world::*;

const CELL: u32 = 32;
const ZOOM: u32 = 3;
const GAP: u32 = 4;
const COLS: u32 = 8;

fn main() -> anyhow::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "world_grid.png".into());
    let mut rows: Vec<Vec<RgbImage>> = Vec::new();
    rows.push(
        Shape::ALL
            .iter()
            .zip(Colour::ALL)
            .map(|(&shape, colour)| {
                let a = Attributes { shape, colour, background: Background::Gray, size: Size::Large, position: Position::Center };
                render(&Scene::new(a), CELL)
            })
            .collect(),
    );
    for r in 0..2 {
        rows.push(
            (0..COLS as u64)
                .map(|i| {
                    let (scene, text) = sample(0, r * COLS as u64 + i);
                    println!("{:>2}: {text}", r * COLS as u64 + i);
                    render(&scene, CELL)
                })
                .collect(),
        );
    }
    for c in held_out() {
        rows.push(c.instance_images(5, CELL).into_iter().map(|(img, _)| img).collect());
    }

    let pitch = CELL * ZOOM + GAP;
    let mut sheet = RgbImage::from_pixel(COLS * pitch + GAP, rows.len() as u32 * pitch + GAP, image::Rgb([255, 255, 255]));
    for (y, row) in rows.iter().enumerate() {
        for (x, img) in row.iter().enumerate() {
            let big = imageops::resize(img, CELL * ZOOM, CELL * ZOOM, imageops::FilterType::Nearest);
            imageops::replace(&mut sheet, &big, (GAP + x as u32 * pitch) as i64, (GAP + y as u32 * pitch) as i64);
        }
    }
    sheet.save(&out)?;
    println!("wrote {out}");

    let n = 10_000u64;
    let t = Instant::now();
    let mut checksum = 0u64;
    for i in 0..n {
        let (scene, _) = sample(0, i);
        checksum = checksum.wrapping_add(render(&scene, CELL).as_raw()[0] as u64);
    }
    let s = t.elapsed().as_secs_f64();
    println!("rendered {n} {CELL}x{CELL} scenes on one thread in {s:.2} s ({:.1} us each; checksum {checksum})", s * 1e6 / n as f64);

    let tmp = tempfile::tempdir()?;
    let t = Instant::now();
    write_world(tmp.path(), n as usize, 0, CELL)?;
    let s = t.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    println!("write_world: {n} PNG + caption pairs and metadata.jsonl in {s:.2} s on {threads} threads");
    Ok(())
}
