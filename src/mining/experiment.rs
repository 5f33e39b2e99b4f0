//! The paper's protocol (issue 5): for each labelled fraction and seed, a project is built from
//! the dataset and its split lists (`train.txt` split into labelled / unlabelled by the
//! fraction and seed, `val.txt` validates, `test.txt` tests); a baseline U-Net++ is trained on
//! the labelled images only; it mines the unlabelled images (SAM, or the oracle labeler); the
//! pseudo-labels whose quality score reaches the threshold are accepted automatically; the
//! U-Net++ is fine-tuned from the baseline on the labelled images plus the accepted
//! pseudo-labels. Both models are scored on the test split (mean per-image Dice and IoU at
//! each image's original size).
//!
//! The oracle labeler answers each prompt with the ground truth: the pseudo-label of an image
//! is its ground-truth mask restricted to the union of the prompted boxes (the U-Net++
//! components' boxes, as in mining). Its quality fields are all 1, so any threshold up to 1
//! accepts it. It gives the loop's upper bound and tests the whole flow without SAM weights.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::finetune::{finetune_project, finetune_samples, FinetuneConfig, FinetuneError};
use super::{mine_project, MiningConfig, MiningError};
use crate::data::{self, DataError, Mask};
use crate::metrics::{Confusion, Scores};
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::progress::Progress;
use crate::prompts::{PromptConfig, Strategy};
use crate::store::{
    Actor, BoxPrompt, ImportOptions, NewPseudoLabel, Project, Prompts, Role, StoreError,
};
use crate::train::checkpoint::CheckpointError;
use crate::train::{self, TrainConfig, TrainError, TrainRun};

/// Who answers the prompts.
#[derive(Clone, Debug, PartialEq)]
pub enum Labeler {
    /// SAM from this checkpoint.
    Sam(PathBuf),
    /// The ground truth restricted to the prompted boxes (see the module doc).
    Oracle,
}

/// Everything an experiment needs.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// Dataset folder (`images/`, `masks/`).
    pub data: PathBuf,
    /// Folder with `train.txt`, `val.txt` and `test.txt`.
    pub split_dir: PathBuf,
    /// Labelled fractions of `train.txt`, each in `(0, 1]`.
    pub fractions: Vec<f64>,
    /// Seeds `0..seeds` (labelled split, initialisation, augmentation).
    pub seeds: u64,
    pub labeler: Labeler,
    /// Baseline training (its `seed` is replaced by each run's seed).
    pub train: TrainConfig,
    /// Fine-tuning with the accepted pseudo-labels (its `seed` is replaced too).
    pub finetune: FinetuneConfig,
    /// Mining; `auto_accept` is the quality threshold (default 0 when `None`).
    pub mining: MiningConfig,
    /// Output folder: one project per fraction and seed, `results.json`.
    pub out: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("invalid experiment settings: {0}")]
    Settings(String),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mining(Box<MiningError>),
    #[error(transparent)]
    Finetune(Box<FinetuneError>),
    #[error("training: {0}")]
    Train(Box<TrainError>),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error(transparent)]
    Data(Box<DataError>),
    #[error("U-Net++ checkpoint {}: {source}", .path.display())]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error("{image}: prediction failed: {source}")]
    Predict {
        image: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

macro_rules! boxed_from {
    ($($t:ty => $v:ident),*) => {
        $(impl From<$t> for ExperimentError {
            fn from(e: $t) -> Self {
                ExperimentError::$v(Box::new(e))
            }
        })*
    };
}
boxed_from!(MiningError => Mining, FinetuneError => Finetune, TrainError => Train,
    StoreError => Store, DataError => Data);

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
    pub mined_model: Scores,
    pub baseline_checkpoint: PathBuf,
    pub mined_checkpoint: PathBuf,
}

/// One fraction: means and standard deviations over seeds, and the per-seed values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FractionResult {
    pub fraction: f64,
    pub baseline_dice: f64,
    pub baseline_dice_std: f64,
    pub baseline_iou: f64,
    pub baseline_iou_std: f64,
    pub mined_dice: f64,
    pub mined_dice_std: f64,
    pub mined_iou: f64,
    pub mined_iou_std: f64,
    /// `mined - baseline` of the means.
    pub delta_dice: f64,
    pub delta_iou: f64,
    pub baseline_dice_per_seed: Vec<f64>,
    pub mined_dice_per_seed: Vec<f64>,
    pub baseline_iou_per_seed: Vec<f64>,
    pub mined_iou_per_seed: Vec<f64>,
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
        let md = col(&|s| s.mined_model.dice);
        let bi = col(&|s| s.baseline.iou);
        let mi = col(&|s| s.mined_model.iou);
        let (baseline_dice, baseline_dice_std) = mean_std(&bd);
        let (mined_dice, mined_dice_std) = mean_std(&md);
        let (baseline_iou, baseline_iou_std) = mean_std(&bi);
        let (mined_iou, mined_iou_std) = mean_std(&mi);
        Self {
            fraction,
            baseline_dice,
            baseline_dice_std,
            baseline_iou,
            baseline_iou_std,
            mined_dice,
            mined_dice_std,
            mined_iou,
            mined_iou_std,
            delta_dice: mined_dice - baseline_dice,
            delta_iou: mined_iou - baseline_iou,
            baseline_dice_per_seed: bd,
            mined_dice_per_seed: md,
            baseline_iou_per_seed: bi,
            mined_iou_per_seed: mi,
            seeds,
        }
    }
}

/// The results as a Markdown table.
pub fn markdown_table(results: &[FractionResult]) -> String {
    let mut s = String::from(
        "| labelled | seeds | baseline Dice | mined Dice | Δ Dice | baseline IoU | mined IoU | Δ IoU |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {:.0}% | {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:+.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:+.4} |\n",
            r.fraction * 100.0,
            r.seeds.len(),
            r.baseline_dice,
            r.baseline_dice_std,
            r.mined_dice,
            r.mined_dice_std,
            r.delta_dice,
            r.baseline_iou,
            r.baseline_iou_std,
            r.mined_iou,
            r.mined_iou_std,
            r.delta_iou
        ));
    }
    s
}

impl ExperimentConfig {
    fn check(&self) -> Result<(), ExperimentError> {
        let bad = |m: String| Err(ExperimentError::Settings(m));
        if self.fractions.is_empty() {
            return bad("no labelled fraction given".into());
        }
        for &f in &self.fractions {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("labelled fraction {f} is not in (0, 1]"));
            }
        }
        if self.seeds == 0 {
            return bad("seeds must be at least 1".into());
        }
        if !self.split_dir.join("test.txt").is_file() {
            return bad(format!(
                "{}: no test.txt (the experiment scores on the test split)",
                self.split_dir.display()
            ));
        }
        if let Labeler::Sam(p) = &self.labeler {
            if !p.is_file() {
                return Err(MiningError::NoSamCheckpoint { path: p.clone() }.into());
            }
        }
        Ok(())
    }
}

/// Runs the whole protocol; `log` gets one line per stage, `progress` the training events.
/// Writes nothing but the per-run folders under `cfg.out` (see [`write_results`]).
pub fn run_experiment(
    cfg: &ExperimentConfig,
    device: &Device,
    progress: &mut dyn Progress,
    log: &mut dyn FnMut(&str),
    cancel: &AtomicBool,
) -> Result<Vec<FractionResult>, ExperimentError> {
    cfg.check()?;
    let mut results = Vec::new();
    for &fraction in &cfg.fractions {
        let mut seeds = Vec::new();
        for seed in 0..cfg.seeds {
            if cancel.load(Ordering::Relaxed) {
                return Err(ExperimentError::Cancelled);
            }
            seeds.push(run_one(cfg, fraction, seed, device, progress, log, cancel)?);
        }
        results.push(FractionResult::from_seeds(fraction, seeds));
    }
    Ok(results)
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
    std::fs::write(&path, json).map_err(io)?;
    Ok(path)
}

fn run_one(
    cfg: &ExperimentConfig,
    fraction: f64,
    seed: u64,
    device: &Device,
    progress: &mut dyn Progress,
    log: &mut dyn FnMut(&str),
    cancel: &AtomicBool,
) -> Result<SeedResult, ExperimentError> {
    let dir = cfg.out.join(format!("fraction-{fraction}-seed-{seed}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| ExperimentError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let mut project = Project::init(&dir.join("project"))?;
    project.import(&ImportOptions {
        split_dir: Some(cfg.split_dir.clone()),
        labelled_fraction: fraction,
        seed,
        ..ImportOptions::new(&cfg.data)
    })?;
    let samples = finetune_samples(&project)?;
    let unlabelled = project
        .images()?
        .iter()
        .filter(|r| r.role == Role::Unlabelled)
        .count();
    log(&format!(
        "fraction {fraction}, seed {seed}: {} labelled, {unlabelled} unlabelled, {} val",
        samples.labelled.len(),
        samples.val.len()
    ));

    // Baseline: the labelled images only.
    let size = cfg.train.size;
    let train_set = data::prepare(&samples.labelled, size)?;
    let val_set = data::prepare(&samples.val, size)?;
    let run = TrainRun {
        cfg: TrainConfig {
            seed,
            ..cfg.train.clone()
        },
        train: &train_set,
        val: &val_set,
        out_dir: dir.join("baseline"),
        device: device.clone(),
        init: None,
        resume: false,
        data_fingerprint: train::fingerprint(&samples.labelled, &samples.val, size),
    };
    let outcome = train::train(&run, progress, cancel)?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ExperimentError::Cancelled);
    }
    let baseline_ckpt = outcome.best;
    let baseline = evaluate_test(&project, &baseline_ckpt, device)?;
    log(&format!(
        "  baseline test Dice {:.4}, IoU {:.4}",
        baseline.0.dice, baseline.0.iou
    ));

    // Mining with automatic acceptance.
    let threshold = cfg.mining.auto_accept.unwrap_or(0.0);
    let mining = MiningConfig {
        auto_accept: Some(threshold),
        ..cfg.mining.clone()
    };
    let (mined, accepted) = match &cfg.labeler {
        Labeler::Sam(sam) => {
            let s = mine_project(
                &mut project,
                &baseline_ckpt,
                sam,
                &mining,
                device,
                &mut |_, _| {},
                cancel,
            )?;
            (s.mined.len(), s.auto_accepted.len())
        }
        Labeler::Oracle => oracle_mine(&mut project, &baseline_ckpt, &mining, device, cancel)?,
    };
    log(&format!(
        "  mined {mined} pseudo-labels, accepted {accepted} (quality >= {threshold})"
    ));

    // Fine-tuning from the baseline with the accepted pseudo-labels.
    let ft = finetune_project(
        &mut project,
        &baseline_ckpt,
        &FinetuneConfig {
            seed,
            ..cfg.finetune.clone()
        },
        device,
        progress,
        cancel,
    )?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ExperimentError::Cancelled);
    }
    let mined_scores = evaluate_test(&project, &ft.best, device)?;
    log(&format!(
        "  mined test Dice {:.4}, IoU {:.4}",
        mined_scores.0.dice, mined_scores.0.iou
    ));
    Ok(SeedResult {
        seed,
        labelled: samples.labelled.len(),
        unlabelled,
        mined,
        accepted,
        test_images: baseline.1,
        baseline: baseline.0,
        mined_model: mined_scores.0,
        baseline_checkpoint: baseline_ckpt,
        mined_checkpoint: ft.best,
    })
}

/// Mean per-image scores of a checkpoint on the project's test images (with ground truth), at
/// each image's original size, and the number of images.
pub fn evaluate_test(
    project: &Project,
    checkpoint: &Path,
    device: &Device,
) -> Result<(Scores, usize), ExperimentError> {
    let unet = Predictor::load(checkpoint, device, InferenceMode::Accurate).map_err(|source| {
        ExperimentError::Checkpoint {
            path: checkpoint.to_path_buf(),
            source,
        }
    })?;
    let mut all = Vec::new();
    for rec in project.images()? {
        if rec.role != Role::Test {
            continue;
        }
        let Some(gt) = project.ground_truth(&rec.name)? else {
            continue;
        };
        let truth = data::load_mask(&gt)?;
        let pred = predict_mask(&unet, project, &rec.name)?;
        all.push(Confusion::from_masks(&pred.to_mask().data, &truth.data).scores());
    }
    Ok((Scores::mean(&all), all.len()))
}

fn predict_mask(
    unet: &Predictor,
    project: &Project,
    name: &str,
) -> Result<crate::predict::ProbMap, ExperimentError> {
    let img = project.load_image(name)?;
    unet.predict(&[&img])
        .map_err(|source| ExperimentError::Predict {
            image: name.to_string(),
            source,
        })?
        .pop()
        .ok_or_else(|| ExperimentError::Predict {
            image: name.to_string(),
            source: candle_core::Error::Msg("no prediction".into()),
        })
}

/// The oracle's answer: `truth` restricted to the union of the boxes (`[x0, y0, x1, y1]`,
/// inclusive-exclusive, in pixels).
pub fn oracle_mask(truth: &Mask, boxes: &[[f32; 4]]) -> Mask {
    let mut data = vec![0u8; truth.width * truth.height];
    for b in boxes {
        let clamp = |v: f32, hi: usize| (v.max(0.0).floor() as usize).min(hi);
        let (x0, x1) = (clamp(b[0], truth.width), clamp(b[2].ceil(), truth.width));
        let (y0, y1) = (clamp(b[1], truth.height), clamp(b[3].ceil(), truth.height));
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * truth.width + x;
                data[i] = u8::from(truth.data[i] != 0);
            }
        }
    }
    Mask {
        width: truth.width,
        height: truth.height,
        data,
    }
}

/// Mining with the oracle labeler: prompts from the U-Net++ as in [`mine_project`], the
/// answer from the ground truth; stored as pseudo-labels with quality 1, then accepted by
/// `cfg.auto_accept`. Returns `(stored, accepted)`.
pub fn oracle_mine(
    project: &mut Project,
    unet_checkpoint: &Path,
    cfg: &MiningConfig,
    device: &Device,
    cancel: &AtomicBool,
) -> Result<(usize, usize), ExperimentError> {
    let unet = Predictor::load(unet_checkpoint, device, cfg.unet_mode).map_err(|source| {
        ExperimentError::Checkpoint {
            path: unet_checkpoint.to_path_buf(),
            source,
        }
    })?;
    let prompt_cfg = PromptConfig {
        strategy: Strategy::Box,
        ..cfg.prompt.clone()
    };
    let mut stored = 0;
    for rec in project.images()? {
        if cancel.load(Ordering::Relaxed) {
            return Err(ExperimentError::Cancelled);
        }
        if rec.role != Role::Unlabelled {
            continue;
        }
        let Some(gt) = project.ground_truth(&rec.name)? else {
            continue;
        };
        let probs = predict_mask(&unet, project, &rec.name)?;
        let prompts =
            crate::prompts::prompts_from_probs(&probs.data, probs.width, probs.height, &prompt_cfg)
                .map_err(|e| MiningError::Prompts {
                    image: rec.name.clone(),
                    source: e,
                })?;
        if prompts.components.is_empty() {
            continue;
        }
        let boxes: Vec<[f32; 4]> = prompts.components.iter().map(|c| c.box_in_image).collect();
        let truth = data::load_mask(&gt)?;
        let round = project
            .latest_pseudo_label(&rec.name)?
            .map_or(0, |p| p.round + 1);
        let label = NewPseudoLabel {
            round,
            mask: oracle_mask(&truth, &boxes),
            prompts: Prompts {
                boxes_in_image: boxes
                    .iter()
                    .map(|b| BoxPrompt {
                        x0: b[0],
                        y0: b[1],
                        x1: b[2],
                        y1: b[3],
                    })
                    .collect(),
                points_in_image: Vec::new(),
                mask_prompt: false,
                strategy: Some("oracle".into()),
            },
            sam_iou: Some(1.0),
            stability: Some(1.0),
            agreement: Some(1.0),
            sam_checkpoint: Some("oracle".into()),
            unet_checkpoint: Some(unet_checkpoint.display().to_string()),
        };
        project.add_pseudo_label(&rec.name, &label)?;
        stored += 1;
    }
    let accepted = match cfg.auto_accept {
        Some(min) => {
            let note = format!("auto-accepted: quality >= {min}");
            project
                .accept_by_quality(
                    min,
                    Actor {
                        reviewer: Some("medmine experiment"),
                        note: Some(&note),
                    },
                )?
                .len()
        }
        None => 0,
    };
    Ok((stored, accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_keeps_truth_inside_boxes_only() {
        let truth = Mask {
            width: 4,
            height: 2,
            data: vec![1, 1, 0, 1, 1, 0, 1, 1],
        };
        let m = oracle_mask(&truth, &[[0.0, 0.0, 2.0, 2.0]]);
        assert_eq!(m.data, vec![1, 1, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn mean_and_std() {
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 2f64.sqrt()).abs() < 1e-12);
    }
}
