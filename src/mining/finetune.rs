//! Fine-tuning rounds: the U-Net++ continues from its checkpoint on the labelled images (ground
//! truth, weight 1) plus the accepted or edited pseudo-labels (weight `pseudo_weight`),
//! validates on the project's val split and keeps the best epoch; the new model mines the next
//! round. The run, its epochs and its checkpoints are recorded in the project store.
//!
//! The input checkpoint's validation Dice is the one to beat: the best checkpoint of a round is
//! never worse than its input on the val split ([`FinetuneOutcome::improved`] says whether an
//! epoch beat it). A pseudo-label's weight scales its share of each batch's loss against a
//! fixed normaliser (see [`crate::train::loss`]); a weight of 0 leaves the pseudo-labels out
//! altogether, so the round is exactly the one on the labelled images alone.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::{self, DataError, Sample};
use crate::progress::{Progress, TrainEvent};
use crate::store::{Project, Role, RunStatus, StoreError};
use crate::train::checkpoint::{self, CheckpointError};
use crate::train::{self, TrainConfig, TrainError, TrainRun, TrainStatus};

/// Settings of one fine-tuning round (the size and width come from the checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Loss weight of an accepted / edited pseudo-label, in `[0, 1]` (ground truth weighs 1).
    pub pseudo_weight: f32,
    /// Stop after this many epochs without a better validation Dice (0 = never).
    pub patience: usize,
    pub seed: u64,
    /// Train for exactly this many optimiser steps instead of `epochs` epochs (see
    /// [`TrainConfig::max_steps`]): gives two rounds on different amounts of data the same
    /// number of steps.
    #[serde(default)]
    pub max_steps: Option<usize>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch: 8,
            lr: 1e-4,
            pseudo_weight: 0.5,
            patience: 5,
            seed: 0,
            max_steps: None,
        }
    }
}

impl FinetuneConfig {
    fn check(&self) -> Result<(), FinetuneError> {
        let bad = |m: String| Err(FinetuneError::Settings(m));
        if !self.pseudo_weight.is_finite() || !(0.0..=1.0).contains(&self.pseudo_weight) {
            return bad(format!(
                "pseudo-label weight {} is not in [0, 1]",
                self.pseudo_weight
            ));
        }
        if self.epochs == 0 || self.batch == 0 || self.max_steps == Some(0) {
            return bad("epochs, batch and max steps must be at least 1".into());
        }
        if !self.lr.is_finite() || self.lr <= 0. {
            return bad(format!("learning rate {} is not positive", self.lr));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error("invalid fine-tuning settings: {0}")]
    Settings(String),
    #[error("U-Net++ checkpoint {}: {source}", .path.display())]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error(
        "nothing to fine-tune on: no labelled image with ground truth and no accepted or edited \
         pseudo-label"
    )]
    NoData,
    #[error(
        "nothing to fine-tune on: no labelled image with ground truth, and a pseudo-label \
         weight of 0 leaves out the {0} accepted or edited pseudo-labels"
    )]
    OnlyZeroWeight(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("fine-tuning run {run} failed: {source}")]
    Train {
        run: i64,
        #[source]
        source: TrainError,
    },
}

/// What a fine-tuning round did.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneOutcome {
    /// Id of the run in the project store.
    pub run_id: i64,
    /// `PROJECT/runs/finetune-N`.
    pub dir: PathBuf,
    /// The best checkpoint: the model that mines the next round.
    pub best: PathBuf,
    pub last: PathBuf,
    pub status: TrainStatus,
    pub epochs_done: usize,
    /// 0 when no epoch beat the input model (then `best` holds the input's weights).
    pub best_epoch: usize,
    /// None without a validation set (the best epoch is then the lowest training loss).
    pub best_dice: Option<f64>,
    /// Without a validation set: the best epoch's mean training loss (the lowest).
    pub best_train_loss: Option<f64>,
    /// The input checkpoint's validation Dice (None without a validation set).
    pub initial_dice: Option<f64>,
    /// Whether an epoch beat the input model (`best_epoch > 0`); false: `best` is the input.
    pub improved: bool,
    /// Optimiser steps taken.
    pub optimizer_steps: usize,
    /// Labelled images with ground truth used (weight 1).
    pub labelled: usize,
    /// Accepted or edited pseudo-labels used (weight `pseudo_weight`; 0 when that is 0).
    pub pseudo: usize,
    /// Validation images with ground truth.
    pub val: usize,
}

/// The training and validation samples of a fine-tuning round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinetuneSamples {
    /// Labelled images with their ground truth (weight 1).
    pub labelled: Vec<Sample>,
    /// Accepted or edited images with their current mask (weight `pseudo_weight`).
    pub pseudo: Vec<Sample>,
    /// Val images with their ground truth.
    pub val: Vec<Sample>,
}

/// The training and validation samples of a project.
///
/// Labelled images train with their ground truth; unlabelled (or labelled but without ground
/// truth) images whose review is accepted or edited train with their current mask (the edited
/// version, else the newest pseudo-label); val images with ground truth validate. Val and test
/// images never train.
pub fn finetune_samples(project: &Project) -> Result<FinetuneSamples, StoreError> {
    let mut out = FinetuneSamples::default();
    for rec in project.images()? {
        let sample = |mask: PathBuf| -> Result<Sample, StoreError> {
            Ok(Sample {
                name: rec.name.clone(),
                image: project.image_file(&rec.name)?,
                mask: Some(mask),
            })
        };
        match rec.role {
            Role::Val => {
                if let Some(gt) = project.ground_truth(&rec.name)? {
                    out.val.push(sample(gt)?);
                }
            }
            Role::Test => {}
            Role::Labelled | Role::Unlabelled => {
                let gt = match rec.role {
                    Role::Labelled => project.ground_truth(&rec.name)?,
                    _ => None,
                };
                if let Some(gt) = gt {
                    out.labelled.push(sample(gt)?);
                } else if project.review(&rec.name)?.state.is_accepted() {
                    if let Some((mask, _)) = project.current_mask(&rec.name)? {
                        out.pseudo.push(sample(mask)?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Passes every event on and records each finished epoch in the store.
struct Recording<'a> {
    inner: &'a mut dyn Progress,
    project: &'a mut Project,
    run: i64,
    error: Option<StoreError>,
}

impl Progress for Recording<'_> {
    fn event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Epoch(r) = event {
            if let Err(e) = self.project.add_epoch(self.run, r) {
                self.inner.event(&TrainEvent::Message(format!(
                    "could not record epoch {} in the project: {e}",
                    r.epoch
                )));
                self.error.get_or_insert(e);
            }
        }
        self.inner.event(event);
    }
}

fn next_run_dir(runs: &Path) -> (String, PathBuf) {
    (1..)
        .map(|n| {
            let name = format!("finetune-{n}");
            let dir = runs.join(&name);
            (name, dir)
        })
        .find(|(_, dir)| !dir.exists())
        .expect("an unused run folder")
}

/// One fine-tuning round from `checkpoint` (see the module docs), through the same observer
/// and cancel flag as [`train::train`]. A cancelled run is recorded as `cancelled` (its
/// checkpoints stay usable), a failed one as `failed` with the error as its message.
pub fn finetune_project(
    project: &mut Project,
    checkpoint: &Path,
    cfg: &FinetuneConfig,
    device: &Device,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<FinetuneOutcome, FinetuneError> {
    cfg.check()?;
    let meta = checkpoint::load_meta(checkpoint).map_err(|source| FinetuneError::Checkpoint {
        path: checkpoint.to_path_buf(),
        source,
    })?;
    let size = meta.size;
    let FinetuneSamples {
        labelled,
        mut pseudo,
        val,
    } = finetune_samples(project)?;
    if labelled.is_empty() && pseudo.is_empty() {
        return Err(FinetuneError::NoData);
    }
    if cfg.pseudo_weight == 0. {
        // weight 0: the same round as on the labelled images alone (same batches, same
        // BatchNorm statistics), not one that also runs the pseudo-labels at weight 0
        if labelled.is_empty() {
            return Err(FinetuneError::OnlyZeroWeight(pseudo.len()));
        }
        pseudo.clear();
    }
    let mut train_set = data::prepare(&labelled, size)?;
    let mut pseudo_set = data::prepare(&pseudo, size)?;
    for p in &mut pseudo_set {
        p.weight = cfg.pseudo_weight;
    }
    train_set.append(&mut pseudo_set);
    let val_set = data::prepare(&val, size)?;
    let all_train: Vec<Sample> = labelled.iter().chain(&pseudo).cloned().collect();

    let train_cfg = TrainConfig {
        size,
        base: meta.model.base,
        epochs: cfg.epochs,
        batch: cfg.batch,
        lr: cfg.lr,
        patience: cfg.patience,
        seed: cfg.seed,
        max_steps: cfg.max_steps,
        ..TrainConfig::default()
    };
    let runs = project.runs_dir();
    let (name, dir) = next_run_dir(&runs);
    let config = serde_json::json!({
        "kind": "finetune",
        "checkpoint": checkpoint.to_string_lossy(),
        "finetune": cfg,
        "train": train_cfg,
        "labelled": labelled.len(),
        "pseudo": pseudo.len(),
        "val": val.len(),
    });
    let run_id = project.start_run(&name, &config, &dir)?;
    progress.event(&TrainEvent::Message(format!(
        "fine-tuning run {run_id} ({name}): {} labelled + {} pseudo-labelled (weight {}), {} \
         validation images at size {size}",
        labelled.len(),
        pseudo.len(),
        cfg.pseudo_weight,
        val.len()
    )));
    if val_set.is_empty() {
        progress.event(&TrainEvent::Message(
            "no validation image with ground truth: the best epoch is the one with the lowest \
             training loss"
                .into(),
        ));
    }
    let run = TrainRun {
        cfg: train_cfg,
        train: &train_set,
        val: &val_set,
        out_dir: dir.clone(),
        device: device.clone(),
        init: Some(checkpoint.to_path_buf()),
        resume: false,
        data_fingerprint: train::fingerprint(&all_train, &val, size),
    };
    let mut rec = Recording {
        inner: progress,
        project,
        run: run_id,
        error: None,
    };
    let result = train::train(&run, &mut rec, cancel);
    let Recording {
        project,
        error: record_error,
        ..
    } = rec;
    let best = dir.join("best.safetensors");
    let last = dir.join("last.safetensors");
    let existing = |p: &Path| p.is_file().then(|| p.to_path_buf());
    match result {
        Ok(outcome) => {
            let status = match outcome.status {
                TrainStatus::Cancelled => RunStatus::Cancelled,
                TrainStatus::Finished | TrainStatus::EarlyStopped => RunStatus::Done,
            };
            let message = record_error
                .as_ref()
                .map(|e| format!("some epochs were not recorded: {e}"));
            project.finish_run(
                run_id,
                status,
                existing(&outcome.best).as_deref(),
                existing(&last).as_deref(),
                message.as_deref(),
            )?;
            Ok(FinetuneOutcome {
                run_id,
                dir,
                best: outcome.best,
                last,
                status: outcome.status,
                epochs_done: outcome.epochs_done,
                best_epoch: outcome.best_epoch,
                best_dice: outcome.best_dice,
                best_train_loss: outcome.best_train_loss,
                initial_dice: outcome.initial_dice,
                improved: outcome.improved,
                optimizer_steps: outcome.optimizer_steps,
                labelled: labelled.len(),
                pseudo: pseudo.len(),
                val: val.len(),
            })
        }
        Err(source) => {
            // Best effort: the training error is the one to report.
            let _ = project.finish_run(
                run_id,
                RunStatus::Failed,
                existing(&best).as_deref(),
                existing(&last).as_deref(),
                Some(&source.to_string()),
            );
            Err(FinetuneError::Train {
                run: run_id,
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(FinetuneConfig::default().check().is_ok());
        for w in [-0.1, 1.5, f32::NAN] {
            let cfg = FinetuneConfig {
                pseudo_weight: w,
                ..Default::default()
            };
            let e = cfg.check().unwrap_err().to_string();
            assert!(
                e.contains("pseudo-label weight") && e.contains("[0, 1]"),
                "{e}"
            );
        }
        let cfg = FinetuneConfig {
            epochs: 0,
            ..Default::default()
        };
        assert!(cfg.check().is_err());
    }

    #[test]
    fn run_folders_are_numbered() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(next_run_dir(d.path()).0, "finetune-1");
        std::fs::create_dir_all(d.path().join("finetune-1")).unwrap();
        assert_eq!(next_run_dir(d.path()).0, "finetune-2");
    }
}
