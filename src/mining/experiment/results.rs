//! What an experiment reports: per seed the test scores of the four arms (baseline, mined,
//! control, selftrain: see the module above) and of the further mined arms (`--labeler
//! oracle,oracle-box`), per fraction their means, standard deviations and deltas, as a Markdown
//! table (one row per fraction and mining labeler) and as `results.json`.
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
    /// The further mined arms (`mined-<labeler>`), in the order the labelers were given.
    #[serde(default)]
    pub more_mined: Vec<MinedArmResult>,
}

/// A further mined arm of one seed: the baseline mined with another labeler and fine-tuned
/// the same way as the mined arm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinedArmResult {
    pub labeler: String,
    pub test: Scores,
    pub val_dice: Option<f64>,
    pub steps: usize,
    pub mined: usize,
    pub accepted: usize,
    pub checkpoint: PathBuf,
}

/// A further labeler over the seeds of one fraction, with its deltas to the shared arms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelerSummary {
    pub labeler: String,
    pub dice: f64,
    pub dice_std: f64,
    pub iou: f64,
    pub iou_std: f64,
    /// Against the baseline, the control and the self-training arm (means).
    pub delta_dice: f64,
    pub delta_dice_vs_control: f64,
    pub delta_dice_vs_selftrain: f64,
    pub delta_iou_vs_control: f64,
    pub dice_per_seed: Vec<f64>,
    pub iou_per_seed: Vec<f64>,
}

/// One fraction: means and standard deviations over seeds, and the per-seed values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FractionResult {
    pub fraction: f64,
    /// The mined arm's labeler.
    #[serde(default)]
    pub labeler: String,
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
    /// The further mined arms' labelers (`--labeler oracle,oracle-box`: `oracle-box`).
    #[serde(default)]
    pub more_mined: Vec<LabelerSummary>,
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
    pub fn from_seeds(fraction: f64, labeler: &str, seeds: Vec<SeedResult>) -> Self {
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
        let labelers: Vec<String> = seeds
            .first()
            .map(|s| s.more_mined.iter().map(|m| m.labeler.clone()).collect())
            .unwrap_or_default();
        let more_mined = labelers
            .into_iter()
            .map(|name| {
                let arm = |s: &SeedResult| {
                    s.more_mined
                        .iter()
                        .find(|m| m.labeler == name)
                        .map(|m| m.test)
                        .unwrap_or_default()
                };
                let d = col(&|s| arm(s).dice);
                let i = col(&|s| arm(s).iou);
                let (dice, dice_std) = mean_std(&d);
                let (iou, iou_std) = mean_std(&i);
                LabelerSummary {
                    labeler: name.clone(),
                    dice,
                    dice_std,
                    iou,
                    iou_std,
                    delta_dice: dice - baseline_dice,
                    delta_dice_vs_control: dice - control_dice,
                    delta_dice_vs_selftrain: dice - selftrain_dice,
                    delta_iou_vs_control: iou - control_iou,
                    dice_per_seed: d,
                    iou_per_seed: i,
                }
            })
            .collect();
        Self {
            fraction,
            labeler: labeler.to_string(),
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
            more_mined,
            seeds,
        }
    }
}

/// The results as a Markdown table (Dice, then IoU; `±` is the standard deviation over
/// seeds): one row per fraction and mining labeler (the further labelers' rows repeat the
/// shared baseline, control and selftrain arms).
pub fn markdown_table(results: &[FractionResult]) -> String {
    let mut s = String::from(
        "| labelled | mined by | seeds | baseline Dice | control Dice | selftrain Dice | \
         mined Dice | Δ Dice mined−baseline | Δ Dice mined−control | Δ Dice mined−selftrain | \
         baseline IoU | mined IoU | Δ IoU mined−control |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let pm = |m: f64, sd: f64| format!("{m:.4} ± {sd:.4}");
    for r in results {
        let main = LabelerSummary {
            labeler: r.labeler.clone(),
            dice: r.mined_dice,
            dice_std: r.mined_dice_std,
            iou: r.mined_iou,
            iou_std: r.mined_iou_std,
            delta_dice: r.delta_dice,
            delta_dice_vs_control: r.delta_dice_vs_control,
            delta_dice_vs_selftrain: r.delta_dice_vs_selftrain,
            delta_iou_vs_control: r.delta_iou_vs_control,
            dice_per_seed: Vec::new(),
            iou_per_seed: Vec::new(),
        };
        for m in std::iter::once(&main).chain(&r.more_mined) {
            let cells = [
                format!("{:.0}%", r.fraction * 100.0),
                m.labeler.clone(),
                r.seeds.len().to_string(),
                pm(r.baseline_dice, r.baseline_dice_std),
                pm(r.control_dice, r.control_dice_std),
                pm(r.selftrain_dice, r.selftrain_dice_std),
                pm(m.dice, m.dice_std),
                format!("{:+.4}", m.delta_dice),
                format!("{:+.4}", m.delta_dice_vs_control),
                format!("{:+.4}", m.delta_dice_vs_selftrain),
                pm(r.baseline_iou, r.baseline_iou_std),
                pm(m.iou, m.iou_std),
                format!("{:+.4}", m.delta_iou_vs_control),
            ];
            s.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
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
            more_mined: vec![MinedArmResult {
                labeler: "oracle-box".into(),
                test: scores(m - 0.1, (m - 0.1) / 2.0),
                val_dice: None,
                steps: 6,
                mined: 3,
                accepted: 3,
                checkpoint: PathBuf::from("mb"),
            }],
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
        let r = FractionResult::from_seeds(
            0.5,
            "oracle",
            vec![seed(0, 0.6, 0.7, 0.8), seed(1, 0.4, 0.5, 0.8)],
        );
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
        // the further labeler: 0.7 on both seeds
        let b = &r.more_mined[0];
        assert_eq!(b.labeler, "oracle-box");
        assert!(close(b.dice, 0.7) && close(b.delta_dice, 0.2));
        assert!(close(b.delta_dice_vs_control, 0.1) && close(b.delta_dice_vs_selftrain, 0.05));
        assert!(close(b.dice_per_seed[1], 0.7) && close(b.delta_iou_vs_control, 0.05));
        let t = markdown_table(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("control Dice") && lines[0].contains("mined−control"));
        assert!(lines[0].contains("selftrain Dice") && lines[0].contains("mined−selftrain"));
        let cols = |l: &str| l.matches('|').count();
        assert_eq!(cols(lines[0]), cols(lines[1]));
        assert_eq!(cols(lines[0]), cols(lines[2]));
        assert_eq!(cols(lines[0]), cols(lines[3]));
        assert!(lines[2].starts_with("| 50% | oracle | 2 | 0.5000 ± 0.1414 | 0.6000 ± 0.1414 | 0.6500 ± 0.0707 | 0.8000 ± 0.0000 | +0.3000 | +0.2000 | +0.1500 |"), "{t}");
        assert!(lines[3].starts_with("| 50% | oracle-box | 2 | 0.5000 ± 0.1414 | 0.6000 ± 0.1414 | 0.6500 ± 0.0707 | 0.7000 ± 0.0000 | +0.2000 | +0.1000 | +0.0500 |"), "{t}");
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
            "more_mined",
        ] {
            o.remove(k);
        }
        let s: SeedResult = serde_json::from_value(v).unwrap();
        assert_eq!(s.control, Scores::default());
        assert_eq!(s.baseline_val_dice, None);
        assert_eq!((s.selftrain, s.mined_steps), (Scores::default(), 0));
        assert!(s.more_mined.is_empty());
    }
}
