use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::session::Session;
use super::TrainError;
use crate::data::{AugmentConfig, Prepared};
use crate::metrics::{Confusion, Scores};
use crate::models::unetpp::{InferenceMode, UNetPlusPlus};
use crate::progress::{EpochRecord, Progress};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Square training size (multiple of 16).
    pub size: usize,
    pub base: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Warm-up length in epochs (fractional allowed).
    pub warmup_epochs: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Stop after this many epochs without a better validation Dice (0 = never).
    pub patience: usize,
    /// Seeds everything random in a run: the initial weights, the batch order of each epoch
    /// and the augmentation of each step.
    pub seed: u64,
    pub augment: AugmentConfig,
    /// Train for exactly this many optimiser steps in total instead of `epochs` epochs (as
    /// many epochs as that takes, the last one possibly partial; early stopping and
    /// cancellation still end a run sooner). The learning-rate schedule spans these steps.
    #[serde(default)]
    pub max_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            size: 96,
            base: 16,
            epochs: 20,
            batch: 8,
            lr: 1e-3,
            weight_decay: 1e-4,
            warmup_epochs: 1.,
            min_lr_ratio: 0.01,
            patience: 10,
            seed: 0,
            augment: AugmentConfig::default(),
            max_steps: None,
        }
    }
}

/// An epoch counts as better (for the best checkpoint and early stopping) only when it beats
/// the best validation Dice by more than this; drift in the last decimals does not count.
pub const MIN_DELTA: f64 = 1e-4;

/// Everything one training run needs.
pub struct TrainRun<'a> {
    pub cfg: TrainConfig,
    pub train: &'a [Prepared],
    pub val: &'a [Prepared],
    pub out_dir: PathBuf,
    pub device: Device,
    /// Start from these weights (fine-tuning) instead of a fresh initialisation.
    pub init: Option<PathBuf>,
    /// Continue from `out_dir/last.*` (weights, optimiser state, epoch).
    pub resume: bool,
    pub data_fingerprint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainStatus {
    Finished,
    EarlyStopped,
    Cancelled,
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub status: TrainStatus,
    /// Completed epochs (a cancelled run's unfinished epoch not counted).
    pub epochs_done: usize,
    /// The epoch saved as `best`; 0 = the input model of a fine-tuning run (no epoch beat it)
    /// or, for a run cancelled before its first epoch ended, the weights at the cancel.
    pub best_epoch: usize,
    /// Validation Dice of the best checkpoint; None without a validation set.
    pub best_dice: Option<f64>,
    /// Without a validation set: the best epoch's mean training loss (the lowest).
    pub best_train_loss: Option<f64>,
    /// Validation Dice of the input model of a fine-tuning run (`init`), before any step.
    pub initial_dice: Option<f64>,
    /// Whether an epoch became the best (`best_epoch > 0`); false when a fine-tuning run
    /// kept its input model because no epoch beat its validation Dice by [`MIN_DELTA`].
    pub improved: bool,
    /// Optimiser steps taken in total (over resumes).
    pub optimizer_steps: usize,
    pub best: PathBuf,
}

/// The trainable variables (BatchNorm running statistics excluded), sorted by name.
pub fn trainable_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().expect("varmap lock");
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Stacks samples into `images [B, 3, S, S]`, `masks [B, 1, S, S]`, `weights [B]`.
pub fn batch_tensors(
    items: &[(Vec<f32>, Vec<f32>, f32)],
    size: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let b = items.len();
    let mut img = Vec::with_capacity(b * 3 * size * size);
    let mut msk = Vec::with_capacity(b * size * size);
    let mut w = Vec::with_capacity(b);
    for (i, m, wt) in items {
        img.extend_from_slice(i);
        msk.extend_from_slice(m);
        w.push(*wt);
    }
    Ok((
        Tensor::from_vec(img, (b, 3, size, size), device)?,
        Tensor::from_vec(msk, (b, 1, size, size), device)?,
        Tensor::from_vec(w, b, device)?,
    ))
}

/// Mean Dice and IoU of the accurate-mode prediction (logit > 0) at the training size.
pub fn validate(
    model: &UNetPlusPlus,
    val: &[Prepared],
    size: usize,
    batch: usize,
    device: &Device,
) -> candle_core::Result<Scores> {
    let mut scores = Vec::with_capacity(val.len());
    for chunk in val.chunks(batch.max(1)) {
        let items: Vec<_> = chunk
            .iter()
            .map(|p| (p.image.clone(), p.mask.clone(), 1.0))
            .collect();
        let (x, _, _) = batch_tensors(&items, size, device)?;
        let logits = model.infer(&x, InferenceMode::Accurate)?;
        let pred = logits.gt(0f32)?.flatten_from(1)?.to_vec2::<u8>()?;
        for (p, s) in pred.iter().zip(chunk) {
            let c = Confusion::from_pairs(p.iter().zip(&s.mask).map(|(&a, &b)| (a > 0, b > 0.5)));
            scores.push(c.scores());
        }
    }
    Ok(Scores::mean(&scores))
}

/// Runs training to the end, `max_steps`, early stop, cancellation (checked every batch) or a
/// non-finite loss (an error; the checkpoints of the last good epoch stay in place).
///
/// The initial weights come from `cfg.seed` ([`crate::models::unetpp::SeededInit`]), or from
/// `init`. A fine-tuning run (`init`) with a validation set first validates its input model:
/// that Dice (epoch 0, saved as `best`) is the one to beat, so the best checkpoint is never
/// worse than the input on the validation split. Without a validation set the best epoch is
/// the one with the lowest training loss, and no Dice is reported.
///
/// A run cancelled mid-epoch saves its exact position (see
/// [`checkpoint::PartialEpoch`](super::checkpoint::PartialEpoch)); `resume` continues at that
/// step with the same batch order, augmentation and optimiser step count.
pub fn train(
    run: &TrainRun,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    check_run(run)?;
    let mut session = Session::open(run, progress)?;
    let mut status = TrainStatus::Finished;
    while !session.done() {
        if session.run_epoch(progress, cancel)? {
            status = TrainStatus::Cancelled;
            session.cancelled(progress)?;
            break;
        }
        if session.finish_epoch(progress)? {
            status = TrainStatus::EarlyStopped;
            break;
        }
    }
    Ok(session.outcome(status))
}

fn check_run(run: &TrainRun) -> Result<(), TrainError> {
    let cfg = &run.cfg;
    if cfg.size == 0 || !cfg.size.is_multiple_of(16) {
        return Err(TrainError::Config(format!(
            "size {} is not a multiple of 16",
            cfg.size
        )));
    }
    if cfg.batch == 0 || cfg.epochs == 0 || cfg.max_steps == Some(0) {
        return Err(TrainError::Config(
            "batch, epochs and max_steps must be at least 1".into(),
        ));
    }
    if run.train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    if let Some(bad) =
        run.train.iter().chain(run.val).find(|p| {
            p.image.len() != 3 * cfg.size * cfg.size || p.mask.len() != cfg.size * cfg.size
        })
    {
        return Err(TrainError::Config(format!(
            "{} was not prepared at size {}",
            bad.name, cfg.size
        )));
    }
    Ok(())
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Steps per epoch: full batches, plus the remainder when it has at least 2 samples
/// (BatchNorm needs more than one value per channel).
pub(super) fn steps_per_epoch(n: usize, batch: usize) -> usize {
    let full = n / batch;
    if n % batch >= 2 || full == 0 {
        full + 1
    } else {
        full
    }
}

pub(super) fn append_metrics(path: &Path, record: &EpochRecord) -> Result<(), TrainError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let line = serde_json::to_string(record).unwrap_or_default();
    writeln!(f, "{line}").map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_cover_the_set() {
        assert_eq!(steps_per_epoch(16, 4), 4);
        assert_eq!(steps_per_epoch(17, 4), 4); // a lone sample is skipped
        assert_eq!(steps_per_epoch(18, 4), 5);
        assert_eq!(steps_per_epoch(3, 8), 1);
    }
}
