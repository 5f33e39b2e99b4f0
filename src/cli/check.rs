//! `medmine check`: does this device compute what the CPU computes (see [`crate::check`]).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::check::{run_checks, table, tested_name, CheckOptions};

#[derive(Args)]
pub struct CheckArgs {
    /// The SAM parity fixtures (the repository's tests/fixtures, with sam/, sam_vit_t/,
    /// medsam/ and litemedsam/);
    /// default: tests/fixtures where it exists. Without them the SAM checks are skipped.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Skip the SAM checks even where the fixtures exist.
    #[arg(long)]
    no_sam: bool,
    /// Training steps of the U-Net++ overfit run.
    #[arg(long, default_value_t = crate::check::unetpp::DEFAULT_OVERFIT_STEPS)]
    overfit_steps: usize,
}

pub fn check_cmd(a: CheckArgs, device: candle_core::Device) -> Result<()> {
    let fixtures = match (a.no_sam, a.fixtures) {
        (true, _) => None,
        (false, Some(dir)) => Some(dir),
        (false, None) => {
            let dir = PathBuf::from("tests/fixtures");
            dir.join("sam/manifest.json").is_file().then_some(dir)
        }
    };
    println!("tested: {}", tested_name(&device));
    println!("reference: the CPU's fast path (U-Net++), the official PyTorch outputs (SAM)");
    if crate::ops::generic_forced() && device.is_cpu() {
        println!(
            "note: {}=generic makes the CPU reference generic too",
            crate::ops::path::OPS_ENV
        );
    }
    if fixtures.is_none() {
        println!("SAM checks skipped (no fixtures: give --fixtures tests/fixtures)");
    }
    let opts = CheckOptions {
        fixtures,
        overfit_steps: a.overfit_steps.max(1),
    };
    let rows = run_checks(&device, &opts, &mut |r| {
        println!(
            "{}: {} {:.3e} (limit {:.1e}) {}{}",
            r.name,
            r.measure,
            r.value,
            r.limit,
            if r.passed() { "pass" } else { "FAIL" },
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            }
        )
    })?;
    println!();
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed on this device", rows.len());
    }
    Ok(())
}
