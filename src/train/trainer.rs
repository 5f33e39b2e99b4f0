use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointMeta};
use super::loss::deep_supervision_loss;
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::TrainError;
use crate::data::{augment, AugmentConfig, Prepared};
use crate::metrics::{Confusion, Scores};
use crate::models::unetpp::{Config, InferenceMode, UNetPlusPlus};
use crate::progress::{EpochRecord, Progress, TrainEvent};

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
    pub seed: u64,
    pub augment: AugmentConfig,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub status: TrainStatus,
    pub epochs_done: usize,
    pub best_epoch: usize,
    pub best_dice: Option<f64>,
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

struct State {
    epoch: usize,
    best_dice: Option<f64>,
    best_epoch: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs training to the end, early stop, cancellation (checked every batch) or a non-finite
/// loss (an error; the checkpoints of the last good epoch stay in place).
pub fn train(
    run: &TrainRun,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    let cfg = &run.cfg;
    if cfg.size == 0 || !cfg.size.is_multiple_of(16) {
        return Err(TrainError::Config(format!(
            "size {} is not a multiple of 16",
            cfg.size
        )));
    }
    if cfg.batch == 0 || cfg.epochs == 0 {
        return Err(TrainError::Config(
            "batch and epochs must be at least 1".into(),
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
    let dir = &run.out_dir;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let device = &run.device;

    let map = VarMap::new();
    let model_cfg = Config::with_base(cfg.base);
    let model = UNetPlusPlus::new(
        &model_cfg,
        VarBuilder::from_varmap(&map, DType::F32, device),
    )?;
    let mut opt = AdamW::new(
        trainable_vars(&map),
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;

    let last = dir.join("last.safetensors");
    let best = dir.join("best.safetensors");
    let optim_path = dir.join("last.optim.safetensors");
    let metrics_path = dir.join("metrics.jsonl");
    let mut state = State {
        epoch: 0,
        best_dice: None,
        best_epoch: 0,
    };
    if run.resume {
        let meta = checkpoint::load_meta(&last)?;
        if meta.model != model_cfg || meta.size != cfg.size {
            return Err(TrainError::Config(format!(
                "{} was trained with base {} at size {}, not base {} at size {}",
                last.display(),
                meta.model.base,
                meta.size,
                cfg.base,
                cfg.size
            )));
        }
        checkpoint::load_into(&map, &last, cfg.base)?;
        let opt_state = checkpoint::load_tensors(&optim_path, device)?;
        let steps = meta.epoch * steps_per_epoch(run.train.len(), cfg.batch);
        opt.load_state(&opt_state, steps)?;
        state = State {
            epoch: meta.epoch,
            best_dice: meta.best_dice,
            best_epoch: meta.best_epoch,
        };
    } else {
        if let Some(init) = &run.init {
            let meta = checkpoint::load_meta(init)?;
            if meta.model != model_cfg {
                return Err(TrainError::Config(format!(
                    "{} is a U-Net++ with base {}, this run uses base {}",
                    init.display(),
                    meta.model.base,
                    cfg.base
                )));
            }
            checkpoint::load_into(&map, init, cfg.base)?;
        }
        // a fresh run starts a fresh metrics log
        std::fs::write(&metrics_path, b"").map_err(io_err(&metrics_path))?;
    }

    let steps = steps_per_epoch(run.train.len(), cfg.batch);
    let schedule = Schedule {
        lr: cfg.lr,
        warmup_steps: (cfg.warmup_epochs * steps as f64).round() as usize,
        total_steps: cfg.epochs * steps,
        min_ratio: cfg.min_lr_ratio,
    };
    let mut meta = CheckpointMeta::new(model_cfg.clone(), cfg.size);
    meta.data_fingerprint = run.data_fingerprint.clone();
    meta.train = serde_json::to_value(cfg).unwrap_or_default();

    progress.event(&TrainEvent::Started {
        first_epoch: state.epoch + 1,
        epochs: cfg.epochs,
        steps_per_epoch: steps,
    });

    let save_last = |meta: &mut CheckpointMeta, opt: &AdamW, state: &State| {
        meta.epoch = state.epoch;
        meta.best_dice = state.best_dice;
        meta.best_epoch = state.best_epoch;
        let (tensors, _) = opt.state();
        checkpoint::save_tensors(&tensors, &optim_path)?;
        checkpoint::save(&map, meta, &last)
    };

    let mut status = TrainStatus::Finished;
    'epochs: while state.epoch < cfg.epochs {
        let epoch = state.epoch + 1;
        let started = Instant::now();
        let mut order: Vec<usize> = (0..run.train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            cfg.seed ^ (epoch as u64) << 32,
        ));
        let mut loss_sum = 0.;
        let mut lr = cfg.lr;
        let mut seen = 0usize;
        for (step, idx) in order.chunks(cfg.batch).take(steps).enumerate() {
            let global_step = (epoch - 1) * steps + step;
            let mut rng =
                ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(global_step as u64 * 7919));
            let items: Vec<_> = idx
                .iter()
                .map(|&i| {
                    let p = &run.train[i];
                    let (img, msk) = augment(&p.image, &p.mask, cfg.size, &cfg.augment, &mut rng);
                    (img, msk, p.weight)
                })
                .collect();
            let (x, y, w) = batch_tensors(&items, cfg.size, device)?;
            let heads = model.forward_t(&x, true)?;
            let loss = deep_supervision_loss(&heads, &y, &w)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch,
                    step: step + 1,
                    loss: loss_value,
                    dir: dir.clone(),
                });
            }
            let grads = loss.backward()?;
            lr = schedule.lr_at(global_step);
            opt.step(&grads, lr)?;
            loss_sum += loss_value * idx.len() as f64;
            seen += idx.len();
            progress.event(&TrainEvent::Step {
                epoch,
                step: step + 1,
                steps_per_epoch: steps,
                loss: loss_value,
                lr,
            });
            if cancel.load(Ordering::Relaxed) {
                status = TrainStatus::Cancelled;
                break 'epochs;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let val = if run.val.is_empty() {
            None
        } else {
            Some(validate(&model, run.val, cfg.size, cfg.batch, device)?)
        };
        let train_loss = loss_sum / seen.max(1) as f64;
        // without a validation set, the best epoch is the one with the lowest training loss
        let criterion = val.map(|s| s.dice).unwrap_or(-train_loss);
        let improved = state.best_dice.is_none_or(|b| criterion > b + MIN_DELTA);
        let record = EpochRecord {
            epoch,
            train_loss,
            val_dice: val.map(|s| s.dice),
            val_iou: val.map(|s| s.iou),
            lr,
            seconds,
            images_per_s: seen as f64 / seconds.max(1e-9),
            best: improved,
        };
        state.epoch = epoch;
        if improved {
            state.best_dice = Some(criterion);
            state.best_epoch = epoch;
        }
        meta.metrics = Some(record.clone());
        if improved {
            meta.epoch = epoch;
            meta.best_dice = state.best_dice;
            meta.best_epoch = epoch;
            checkpoint::save(&map, &meta, &best)?;
        }
        save_last(&mut meta, &opt, &state)?;
        append_metrics(&metrics_path, &record)?;
        progress.event(&TrainEvent::Epoch(record));
        if cfg.patience > 0 && epoch - state.best_epoch >= cfg.patience {
            progress.event(&TrainEvent::Message(format!(
                "early stop: no better validation Dice for {} epochs (best {:.4} at epoch {})",
                cfg.patience,
                state.best_dice.unwrap_or(0.),
                state.best_epoch
            )));
            status = TrainStatus::EarlyStopped;
            break;
        }
    }

    if status == TrainStatus::Cancelled {
        // a cancelled run leaves usable weights: the current ones as `last`, and as `best`
        // too when no epoch has finished yet
        save_last(&mut meta, &opt, &state)?;
        if !best.exists() {
            checkpoint::save(&map, &meta, &best)?;
        }
        progress.event(&TrainEvent::Message(format!(
            "cancelled during epoch {}; weights saved to {}",
            state.epoch + 1,
            last.display()
        )));
    }
    Ok(TrainOutcome {
        status,
        epochs_done: state.epoch,
        best_epoch: state.best_epoch,
        best_dice: state.best_dice,
        best,
    })
}

/// Steps per epoch: full batches, plus the remainder when it has at least 2 samples
/// (BatchNorm needs more than one value per channel).
fn steps_per_epoch(n: usize, batch: usize) -> usize {
    let full = n / batch;
    if n % batch >= 2 || full == 0 {
        full + 1
    } else {
        full
    }
}

fn append_metrics(path: &Path, record: &EpochRecord) -> Result<(), TrainError> {
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
