//! The paper's protocol (issue 5): for each labelled fraction and seed, a project is built from
//! the dataset and its split lists (`train.txt` split into labelled / unlabelled by the
//! fraction and seed, `val.txt` validates, `test.txt` tests); a baseline U-Net++ is trained on
//! the labelled images only; a control fine-tunes the baseline on the labelled images only;
//! the baseline mines the unlabelled images (SAM, or the [`oracle`] labeler); the pseudo-labels
//! whose quality score reaches the threshold are accepted automatically; the U-Net++ is
//! fine-tuned from the baseline on the labelled images plus the accepted pseudo-labels, with
//! the control's settings. The three models are scored on the test split (mean per-image Dice
//! and IoU at each image's original size); [`results`] describes the report.
//!
//! The control runs before mining, when the project has no accepted pseudo-label yet, so the
//! same [`finetune_project`] trains it on the labelled images alone.
mod oracle;
mod results;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use super::finetune::{finetune_project, finetune_samples, FinetuneConfig, FinetuneError};
use super::labeler::SamLabeler;
use super::{mine_project, MiningConfig, MiningError};
use crate::data::{self, DataError};
use crate::metrics::{Confusion, Scores};
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::progress::Progress;
use crate::store::{ImportOptions, Project, Role, StoreError};
use crate::train::checkpoint::CheckpointError;
use crate::train::{self, TrainConfig, TrainError, TrainRun};

pub use oracle::{oracle_mask, oracle_mine, oracle_objects, OracleKind};
pub use results::{markdown_table, mean_std, write_results, FractionResult, SeedResult};

/// Who answers the prompts.
#[derive(Clone, Debug, PartialEq)]
pub enum Labeler {
    /// SAM from this checkpoint.
    Sam(PathBuf),
    /// The ground truth answering the prompted boxes (the `oracle` module's doc).
    Oracle(OracleKind),
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
    let baseline_val_dice = outcome.best_dice;
    let baseline = evaluate_test(&project, &baseline_ckpt, device)?;
    log(&format!(
        "  baseline test Dice {:.4}, IoU {:.4}",
        baseline.0.dice, baseline.0.iou
    ));
    let ft_cfg = FinetuneConfig {
        seed,
        ..cfg.finetune.clone()
    };

    // Control: the same fine-tuning on the labelled images only (before mining, the project
    // has no accepted pseudo-label).
    let control = finetune_project(
        &mut project,
        &baseline_ckpt,
        &ft_cfg,
        device,
        progress,
        cancel,
    )?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ExperimentError::Cancelled);
    }
    if control.pseudo != 0 {
        return Err(ExperimentError::Settings(format!(
            "the control fine-tuning found {} accepted pseudo-labels in a new project",
            control.pseudo
        )));
    }
    let control_scores = evaluate_test(&project, &control.best, device)?;
    log(&format!(
        "  control (fine-tuned on the labelled images only) test Dice {:.4}, IoU {:.4}",
        control_scores.0.dice, control_scores.0.iou
    ));

    // Mining with automatic acceptance.
    let threshold = cfg.mining.auto_accept.unwrap_or(0.0);
    let mining = MiningConfig {
        auto_accept: Some(threshold),
        ..cfg.mining.clone()
    };
    let (mined, accepted) = match &cfg.labeler {
        Labeler::Sam(sam) => {
            let cache = project.cache_dir();
            let mut sam = SamLabeler::load(sam, mining.sam_variant, device, Some(&cache))?;
            let s = mine_project(
                &mut project,
                &baseline_ckpt,
                &mut sam,
                &mining,
                device,
                &mut |_, _| {},
                cancel,
            )?;
            (s.mined.len(), s.auto_accepted.len())
        }
        Labeler::Oracle(kind) => {
            oracle_mine(&mut project, *kind, &baseline_ckpt, &mining, device, cancel)?
        }
    };
    log(&format!(
        "  mined {mined} pseudo-labels, accepted {accepted} (quality >= {threshold})"
    ));

    // Fine-tuning from the baseline with the accepted pseudo-labels.
    let ft = finetune_project(
        &mut project,
        &baseline_ckpt,
        &ft_cfg,
        device,
        progress,
        cancel,
    )?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ExperimentError::Cancelled);
    }
    let mined_scores = evaluate_test(&project, &ft.best, device)?;
    log(&format!(
        "  mined test Dice {:.4}, IoU {:.4} ({} labelled + {} pseudo-labelled)",
        mined_scores.0.dice, mined_scores.0.iou, ft.labelled, ft.pseudo
    ));
    Ok(SeedResult {
        seed,
        labelled: samples.labelled.len(),
        unlabelled,
        mined,
        accepted,
        test_images: baseline.1,
        baseline: baseline.0,
        control: control_scores.0,
        mined_model: mined_scores.0,
        baseline_val_dice,
        control_val_dice: control.best_dice,
        mined_val_dice: ft.best_dice,
        baseline_checkpoint: baseline_ckpt,
        control_checkpoint: control.best,
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
