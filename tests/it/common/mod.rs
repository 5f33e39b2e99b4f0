#![allow(dead_code)]
pub mod sam_fixture;
use std::path::PathBuf;

use medmine::data::{self, Dataset, Prepared};

pub fn shared_data() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"));
    assert!(
        p.join("kvasir-seg").is_dir(),
        "test data not found: expected {} (the shared data folder beside the checkout)",
        p.display()
    );
    p
}

pub fn demo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

/// The demo's training split at `size`.
pub fn demo_set(size: usize, list: &str) -> Vec<Prepared> {
    let ds = Dataset::scan(&demo()).expect("demo dataset");
    let list_path = demo().join(list);
    let names = data::read_split_list(&list_path).expect("demo list");
    let samples = ds.select(&names, &list_path).expect("demo select");
    data::prepare(&samples, size).expect("demo prepare")
}

/// The `medmine` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_medmine");

pub fn medmine(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("run medmine")
}

/// Runs and expects success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = medmine(args);
    assert!(
        out.status.success(),
        "medmine {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and expects failure; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = medmine(args);
    assert!(!out.status.success(), "medmine {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name value` line of a command's summary.
pub fn field(out: &str, name: &str) -> usize {
    out.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{out}"))
}

/// Copies a folder tree (a project, a dataset) for a test.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A 64x48 test image and a U-Net++-like probability map with two discs (0.9 inside, 0.05
/// outside): two objects to prompt.
pub fn two_discs() -> (image::RgbImage, Vec<f32>) {
    let (w, h) = (64usize, 48usize);
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let disc = |cx: f32, cy: f32, r: f32, x: usize, y: usize| {
        (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r
    };
    let probs = (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            if disc(16.0, 20.0, 8.0, x, y) || disc(46.0, 26.0, 10.0, x, y) {
                0.9
            } else {
                0.05
            }
        })
        .collect();
    (img, probs)
}
