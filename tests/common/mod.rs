#![allow(dead_code)]
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
