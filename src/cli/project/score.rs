//! `medmine project score`: the U-Net++ Dice and uncertainty of every image, cached in the
//! project (what the app's "Score images" does and its image list sorts by).
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use crate::store::{Project, ScoreSource};

/// Scores every image with `model` on the CPU, then prints one line per image, most
/// uncertain first: `name<TAB>uncertainty<TAB>dice` (`-` without ground truth).
pub fn score_cmd(dir: &Path, model: &Path) -> Result<()> {
    let mut p = Project::open(dir)?;
    let s = crate::predict::score_project(
        &mut p,
        model,
        &candle_core::Device::Cpu,
        &mut |_, _| {},
        &AtomicBool::new(false),
    )?;
    let reference = model.display().to_string();
    let mut rows: Vec<_> = p
        .scores(ScoreSource::Unet)?
        .into_iter()
        .filter(|(_, s)| s.reference == reference)
        .collect();
    rows.sort_by(|a, b| {
        let u = |s: &crate::store::ImageScore| s.uncertainty.unwrap_or(f64::NEG_INFINITY);
        u(&b.1).total_cmp(&u(&a.1)).then_with(|| a.0.cmp(&b.0))
    });
    for (name, s) in rows {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!("{name}\t{}\t{}", f(s.uncertainty), f(s.dice));
    }
    eprintln!("scored {} images, {} failed", s.scored, s.failed.len());
    for (name, why) in &s.failed {
        eprintln!("  {name}: {why}");
    }
    Ok(())
}
