//! What an experiment reports: per seed the test scores of the four arms (baseline, mined,
//! control, selftrain: see the module above), per fraction their means, standard deviations
//! and deltas, as a Markdown table and as `results.json`.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExperimentError;
use crate::metrics::Scores;

/// One fraction and seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    pub seed: u64,
    pub labelled: usize,
    pub unlabelled: usize,
    /// Pseudo-labels stored by mining.
    pub mined: usize,
    /// Of them, accepted by the quality threshold (and used by fine-tuning).
    pub accepted: usize,
    pub test_images: usize,
    pub baseline: Scores,
    /// The baseline fine-tuned on the labelled images only.
    #[serde(default)]
    pub control: Scores,
    pub mined_model: Scores,
    /// The baseline fine-tuned with its own accepted predictions (self-training).
    #[serde(default)]
    pub selftrain: Scores,
    /// Best validation Dice of each arm's training (what picked its checkpoint).
    #[serde(default)]
    pub baseline_val_dice: Option<f64>,
    #[serde(default)]
    pub control_val_dice: Option<f64>,
    #[serde(default)]
    pub mined_val_dice: Option<f64>,
    #[serde(default)]
    pub selftrain_val_dice: Option<f64>,
    /// Optimiser steps of the fine-tuning arms (the control takes the mined arm's).
    #[serde(default)]
    pub mined_steps: usize,
    #[serde(default)]
    pub control_steps: usize,
    #[serde(default)]
    pub selftrain_steps: usize,
    /// Self-training pseudo-labels made and accepted.
    #[serde(default)]
    pub selftrain_mined: usize,
    #[serde(default)]
    pub selftrain_accepted: usize,
    pub baseline_checkpoint: PathBuf,
    #[serde(default)]
    pub control_checkpoint: PathBuf,
    pub mined_checkpoint: PathBuf,
    #[serde(default)]
    pub selftrain_checkpoint: PathBuf,
}

/// One fraction: means and standard deviations over seeds, and the per-seed values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FractionResult {
    pub fraction: f64,
    pub baseline_dice: f64,
    pub baseline_dice_std: f64,
    pub baseline_iou: f64,
    pub baseline_iou_std: f64,
    pub control_dice: f64,
    pub control_dice_std: f64,
    pub control_iou: f64,
    pub control_iou_std: f64,
    pub mined_dice: f64,
    pub mined_dice_std: f64,
    pub mined_iou: f64,
    pub mined_iou_std: f64,
    pub selftrain_dice: f64,
    pub selftrain_dice_std: f64,
    pub selftrain_iou: f64,
    pub selftrain_iou_std: f64,
    /// `mined - baseline` of the means.
    pub delta_dice: f64,
    pub delta_iou: f64,
    /// `mined - control` of the means: the pseudo-labels' effect at equal fine-tuning.
    pub delta_dice_vs_control: f64,
    pub delta_iou_vs_control: f64,
    /// `mined - selftrain` of the means: what the large model's labels add over the U-Net++'s
    /// own.
    pub delta_dice_vs_selftrain: f64,
    pub delta_iou_vs_selftrain: f64,
    pub baseline_dice_per_seed: Vec<f64>,
    pub control_dice_per_seed: Vec<f64>,
    pub mined_dice_per_seed: Vec<f64>,
    pub selftrain_dice_per_seed: Vec<f64>,
    pub baseline_iou_per_seed: Vec<f64>,
    pub control_iou_per_seed: Vec<f64>,
    pub mined_iou_per_seed: Vec<f64>,
    pub selftrain_iou_per_seed: Vec<f64>,
    pub seeds: Vec<SeedResult>,
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

impl FractionResult {
    pub fn from_seeds(fraction: f64, seeds: Vec<SeedResult>) -> Self {
        let col = |f: &dyn Fn(&SeedResult) -> f64| seeds.iter().map(f).collect::<Vec<f64>>();
        let bd = col(&|s| s.baseline.dice);
        let cd = col(&|s| s.control.dice);
        let md = col(&|s| s.mined_model.dice);
        let sd = col(&|s| s.selftrain.dice);
        let bi = col(&|s| s.baseline.iou);
        let ci = col(&|s| s.control.iou);
        let mi = col(&|s| s.mined_model.iou);
        let si = col(&|s| s.selftrain.iou);
        let (baseline_dice, baseline_dice_std) = mean_std(&bd);
        let (control_dice, control_dice_std) = mean_std(&cd);
        let (mined_dice, mined_dice_std) = mean_std(&md);
        let (baseline_iou, baseline_iou_std) = mean_std(&bi);
        let (control_iou, control_iou_std) = mean_std(&ci);
        let (mined_iou, mined_iou_std) = mean_std(&mi);
        let (selftrain_dice, selftrain_dice_std) = mean_std(&sd);
        let (selftrain_iou, selftrain_iou_std) = mean_std(&si);
        Self {
            fraction,
            baseline_dice,
            baseline_dice_std,
            baseline_iou,
            baseline_iou_std,
            control_dice,
            control_dice_std,
            control_iou,
            control_iou_std,
            mined_dice,
            mined_dice_std,
            mined_iou,
            mined_iou_std,
            selftrain_dice,
            selftrain_dice_std,
            selftrain_iou,
            selftrain_iou_std,
            delta_dice: mined_dice - baseline_dice,
            delta_iou: mined_iou - baseline_iou,
            delta_dice_vs_control: mined_dice - control_dice,
            delta_iou_vs_control: mined_iou - control_iou,
            delta_dice_vs_selftrain: mined_dice - selftrain_dice,
            delta_iou_vs_selftrain: mined_iou - selftrain_iou,
            baseline_dice_per_seed: bd,
            control_dice_per_seed: cd,
            mined_dice_per_seed: md,
            selftrain_dice_per_seed: sd,
            baseline_iou_per_seed: bi,
            control_iou_per_seed: ci,
            mined_iou_per_seed: mi,
            selftrain_iou_per_seed: si,
            seeds,
        }
    }
}

/// The results as a Markdown table (Dice, then IoU; `±` is the standard deviation over
/// seeds).
pub fn markdown_table(results: &[FractionResult]) -> String {
    let mut s = String::from(
        "| labelled | seeds | baseline Dice | control Dice | selftrain Dice | mined Dice | \
         Δ Dice mined−baseline | Δ Dice mined−control | Δ Dice mined−selftrain | baseline IoU | \
         mined IoU | Δ IoU mined−control |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let pm = |m: f64, sd: f64| format!("{m:.4} ± {sd:.4}");
    for r in results {
        let cells = [
            format!("{:.0}%", r.fraction * 100.0),
            r.seeds.len().to_string(),
            pm(r.baseline_dice, r.baseline_dice_std),
            pm(r.control_dice, r.control_dice_std),
            pm(r.selftrain_dice, r.selftrain_dice_std),
            pm(r.mined_dice, r.mined_dice_std),
            format!("{:+.4}", r.delta_dice),
            format!("{:+.4}", r.delta_dice_vs_control),
            format!("{:+.4}", r.delta_dice_vs_selftrain),
            pm(r.baseline_iou, r.baseline_iou_std),
            pm(r.mined_iou, r.mined_iou_std),
            format!("{:+.4}", r.delta_iou_vs_control),
        ];
        s.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    s
}

/// Writes `results` to `OUT/results.json`.
pub fn write_results(out: &Path, results: &[FractionResult]) -> Result<PathBuf, ExperimentError> {
    let path = out.join("results.json");
    let io = |source| ExperimentError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let json = serde_json::to_string_pretty(results).expect("results serialise");
    crate::fsutil::write_durable(&path, json.as_bytes()).map_err(|e| ExperimentError::Io {
        path: e.path,
        source: e.source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(dice: f64, iou: f64) -> Scores {
        Scores {
            dice,
            iou,
            ..Scores::default()
        }
    }

    fn seed(seed: u64, b: f64, c: f64, m: f64) -> SeedResult {
        let st = (b + m) / 2.0;
        SeedResult {
            seed,
            labelled: 4,
            unlabelled: 4,
            mined: 3,
            accepted: 2,
            test_images: 5,
            baseline: scores(b, b / 2.0),
            control: scores(c, c / 2.0),
            mined_model: scores(m, m / 2.0),
            selftrain: scores(st, st / 2.0),
            baseline_val_dice: Some(b),
            control_val_dice: None,
            mined_val_dice: None,
            selftrain_val_dice: None,
            mined_steps: 6,
            control_steps: 6,
            selftrain_steps: 5,
            selftrain_mined: 4,
            selftrain_accepted: 1,
            baseline_checkpoint: PathBuf::from("b"),
            control_checkpoint: PathBuf::from("c"),
            mined_checkpoint: PathBuf::from("m"),
            selftrain_checkpoint: PathBuf::from("s"),
        }
    }

    #[test]
    fn mean_and_std() {
        assert_eq!(mean_std(&[]), (0.0, 0.0));
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn fraction_means_deltas_and_table() {
        let r =
            FractionResult::from_seeds(0.5, vec![seed(0, 0.6, 0.7, 0.8), seed(1, 0.4, 0.5, 0.8)]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(r.baseline_dice, 0.5) && close(r.control_dice, 0.6));
        assert!(close(r.mined_dice, 0.8) && close(r.mined_dice_std, 0.0));
        assert!(close(r.delta_dice, 0.3) && close(r.delta_dice_vs_control, 0.2));
        assert!(close(r.delta_iou_vs_control, 0.1));
        // selftrain per seed: 0.7 and 0.6
        assert!(close(r.selftrain_dice, 0.65) && close(r.delta_dice_vs_selftrain, 0.15));
        assert!(close(r.delta_iou_vs_selftrain, 0.075));
        assert_eq!(r.control_dice_per_seed, vec![0.7, 0.5]);
        assert_eq!(r.control_iou_per_seed, vec![0.35, 0.25]);
        let t = markdown_table(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].contains("control Dice") && lines[0].contains("mined−control"));
        assert!(lines[0].contains("selftrain Dice") && lines[0].contains("mined−selftrain"));
        let cols = |l: &str| l.matches('|').count();
        assert_eq!(cols(lines[0]), cols(lines[1]));
        assert_eq!(cols(lines[0]), cols(lines[2]));
        assert!(lines[2].starts_with("| 50% | 2 | 0.5000 ± 0.1414 | 0.6000 ± 0.1414 | 0.6500 ± 0.0707 | 0.8000 ± 0.0000 | +0.3000 | +0.2000 | +0.1500 |"), "{t}");
    }

    #[test]
    fn older_results_without_a_control_still_read() {
        let mut v = serde_json::to_value(seed(0, 0.5, 0.6, 0.7)).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "control",
            "control_checkpoint",
            "baseline_val_dice",
            "selftrain",
            "selftrain_checkpoint",
            "mined_steps",
        ] {
            o.remove(k);
        }
        let s: SeedResult = serde_json::from_value(v).unwrap();
        assert_eq!(s.control, Scores::default());
        assert_eq!(s.baseline_val_dice, None);
        assert_eq!((s.selftrain, s.mined_steps), (Scores::default(), 0));
    }
}
