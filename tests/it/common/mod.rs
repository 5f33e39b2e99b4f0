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
