//! `knobs world` end to end: the dataset and concept layouts, the concept list, clear errors.
mod common;

use common::{fail, ok};
use std::path::Path;

fn names(dir: &Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    v.sort();
    v
}

#[test]
fn render_writes_images_captions_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("world");
    let o = out.to_str().unwrap();
    ok(&["world", "render", "--out", o, "--n", "3", "--seed", "5"]);
    assert_eq!(names(&out, ".png"), ["00000.png", "00001.png", "00002.png"]);
    assert_eq!(names(&out, ".txt"), ["00000.txt", "00001.txt", "00002.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("metadata.jsonl")).unwrap().lines().count(), 3);
    let img = image::open(out.join("00001.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 32));
    let (scene, text) = knobs_world::sample(5, 1);
    assert_eq!(std::fs::read_to_string(out.join("00001.txt")).unwrap(), text);
    assert_eq!(img, knobs_world::render(&scene, 32));

    let big = tmp.path().join("big");
    ok(&["world", "render", "--out", big.to_str().unwrap(), "--n", "1", "--size", "64"]);
    assert_eq!(image::open(big.join("00000.png")).unwrap().to_rgb8().dimensions(), (64, 64));
}

#[test]
fn concepts_list_prints_only_the_names() {
    let stdout = ok(&["world", "concepts", "--list"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["striped-star", "ringed-circle", "checkered-square", "spotted-heart"]);
}

#[test]
fn concepts_write_one_folder_each() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().to_str().unwrap();
    ok(&["world", "concepts", "--out", o]);
    for name in ["striped-star", "ringed-circle", "checkered-square", "spotted-heart"] {
        let dir = tmp.path().join(name);
        assert_eq!(names(&dir, ".png").len(), 5, "{name}");
        assert_eq!(names(&dir, ".txt").len(), 5, "{name}");
        assert!(dir.join("concept.json").is_file());
    }
    let one = tmp.path().join("one");
    ok(&["world", "concepts", "--out", one.to_str().unwrap(), "--concept", "ringed-circle", "--n", "4"]);
    assert_eq!(names(&one, "").len(), 1);
    assert_eq!(names(&one.join("ringed-circle"), ".png").len(), 4);
    assert_eq!(std::fs::read_to_string(one.join("ringed-circle/00003.txt")).unwrap(), "a zwx circle");
}

#[test]
fn bad_input_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().to_str().unwrap();
    assert!(fail(&["world", "render", "--out", o, "--n", "0"]).contains("--n"));
    assert!(fail(&["world", "render", "--out", o, "--size", "0"]).contains("--size"));
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("sub");
    let err = fail(&["world", "render", "--out", under_file.to_str().unwrap(), "--n", "1"]);
    assert!(err.contains("--out"), "{err}");
    let err = fail(&["world", "concepts", "--out", o, "--concept", "glittery-cube"]);
    assert!(err.contains("--concept") && err.contains("glittery-cube") && err.contains("striped-star"), "{err}");
    assert!(fail(&["world", "concepts"]).contains("--out"));
    assert!(fail(&["world", "render", "--n", "2"]).contains("--out"));
}
