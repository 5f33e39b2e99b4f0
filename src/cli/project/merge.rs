//! `medmine project merge`: mining shards into the project ([`crate::mining::shard`]).
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::mining::shard::merge_shards;
use crate::store::Project;

pub fn merge_cmd(dir: &Path, shards: &[PathBuf], partial: bool) -> Result<()> {
    let mut p = Project::open(dir)?;
    let s = merge_shards(&mut p, shards, partial)?;
    for (spec, folder) in &s.shards {
        println!("shard {spec}: {}", folder.display());
    }
    if !s.missing.is_empty() {
        let names: Vec<String> = s.missing.iter().map(|m| m.to_string()).collect();
        println!("missing shards (not merged yet) {}", names.join(", "));
    }
    println!("merged              {}", s.merged.len());
    println!("skipped: reviewed meanwhile {}", s.skipped_reviewed.len());
    println!("already merged      {}", s.already_merged);
    println!("no component        {}", s.no_component);
    println!("failed              {}", s.failed.len());
    crate::cli::mine::failed_images(&s.failed, " of the shards")
}
