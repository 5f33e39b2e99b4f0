//! One training run's moving parts (model, variables, optimiser, schedule, checkpoint paths,
//! position) and the steps of [`super::train`] as methods: open (fresh, fine-tune or resume),
//! run an epoch's remaining steps, finish an epoch, stop on a cancel.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::DType;
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, CheckpointMeta, PartialEpoch};
use super::loss::deep_supervision_loss;
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::trainer::{
    append_metrics, batch_tensors, io_err, steps_per_epoch, trainable_vars, validate, TrainOutcome,
    TrainRun, TrainStatus, MIN_DELTA,
};
use super::TrainError;
use crate::data::augment;
use crate::models::unetpp::{Config, SeededInit, UNetPlusPlus};
use crate::progress::{EpochRecord, Progress, TrainEvent};

/// How long a run is: `epochs` epochs of `steps_per_epoch` steps, or `max_steps` steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub steps_per_epoch: usize,
    pub epochs: usize,
    pub total_steps: usize,
}

impl Plan {
    pub fn new(epochs: usize, max_steps: Option<usize>, samples: usize, batch: usize) -> Self {
        let steps_per_epoch = steps_per_epoch(samples, batch);
        match max_steps {
            Some(total_steps) => Self {
                steps_per_epoch,
                epochs: total_steps.div_ceil(steps_per_epoch),
                total_steps,
            },
            None => Self {
                steps_per_epoch,
                epochs,
                total_steps: epochs * steps_per_epoch,
            },
        }
    }

    /// Optimiser steps of epoch `epoch` (1-based): all of them, but in the last epoch of a
    /// `max_steps` run only those left.
    pub fn steps_in(&self, epoch: usize) -> usize {
        let before = (epoch - 1) * self.steps_per_epoch;
        self.total_steps
            .saturating_sub(before)
            .min(self.steps_per_epoch)
    }
}

/// Where a run stands.
#[derive(Clone, Debug, Default)]
struct Position {
    /// Completed epochs.
    epoch: usize,
    /// Criterion of the best checkpoint, higher is better: its validation Dice, or minus its
    /// training loss without a validation set.
    best: Option<f64>,
    best_epoch: usize,
    initial_dice: Option<f64>,
    /// The unfinished epoch `epoch + 1`, once it has taken a step.
    partial: Option<PartialEpoch>,
}

pub(super) struct Session<'a> {
    run: &'a TrainRun<'a>,
    map: VarMap,
    model: UNetPlusPlus,
    opt: AdamW,
    plan: Plan,
    schedule: Schedule,
    /// The sidecar of the next checkpoint written (model, size, data, settings).
    meta: CheckpointMeta,
    pos: Position,
    last: PathBuf,
    best: PathBuf,
    optim: PathBuf,
    metrics: PathBuf,
}

impl<'a> Session<'a> {
    /// Builds the model (seeded), then starts fresh, from `init`, or resumes from `last.*`.
    pub fn open(run: &'a TrainRun<'a>, progress: &mut dyn Progress) -> Result<Self, TrainError> {
        let cfg = &run.cfg;
        let dir = &run.out_dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let map = VarMap::new();
        let model_cfg = Config::with_base(cfg.base);
        let model = SeededInit::new(cfg.seed).model(&model_cfg, &map, DType::F32, &run.device)?;
        let opt = AdamW::new(
            trainable_vars(&map),
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let plan = Plan::new(cfg.epochs, cfg.max_steps, run.train.len(), cfg.batch);
        let schedule = Schedule {
            lr: cfg.lr,
            warmup_steps: (cfg.warmup_epochs * plan.steps_per_epoch as f64).round() as usize,
            total_steps: plan.total_steps,
            min_ratio: cfg.min_lr_ratio,
        };
        let mut meta = CheckpointMeta::new(model_cfg, cfg.size);
        meta.data_fingerprint = run.data_fingerprint.clone();
        meta.train = serde_json::to_value(cfg).unwrap_or_default();
        let mut s = Self {
            run,
            map,
            model,
            opt,
            plan,
            schedule,
            meta,
            pos: Position::default(),
            last: dir.join("last.safetensors"),
            best: dir.join("best.safetensors"),
            optim: dir.join("last.optim.safetensors"),
            metrics: dir.join("metrics.jsonl"),
        };
        if run.resume {
            s.resume()?;
        } else {
            s.start(progress)?;
        }
        progress.event(&TrainEvent::Started {
            first_epoch: s.pos.epoch + 1,
            epochs: s.plan.epochs,
            steps_per_epoch: s.plan.steps_per_epoch,
        });
        Ok(s)
    }

    fn has_val(&self) -> bool {
        !self.run.val.is_empty()
    }

    /// A fresh run: the input weights if any (validated: the Dice to beat), a fresh metrics
    /// log, no stale `best` of an earlier run in the folder.
    fn start(&mut self, progress: &mut dyn Progress) -> Result<(), TrainError> {
        let run = self.run;
        if let Some(init) = &run.init {
            let meta = checkpoint::load_meta(init)?;
            if meta.model != self.meta.model {
                return Err(TrainError::Config(format!(
                    "{} is a U-Net++ with base {}, this run uses base {}",
                    init.display(),
                    meta.model.base,
                    run.cfg.base
                )));
            }
            checkpoint::load_into(&self.map, init, run.cfg.base)?;
        }
        for stale in [self.best.clone(), checkpoint::sidecar_path(&self.best)] {
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(io_err(&stale))?;
            }
        }
        std::fs::write(&self.metrics, b"").map_err(io_err(&self.metrics))?;
        if run.init.is_some() && self.has_val() {
            let c = &run.cfg;
            let dice = validate(&self.model, run.val, c.size, c.batch, &run.device)?.dice;
            self.pos.best = Some(dice);
            self.pos.initial_dice = Some(dice);
            self.save_best()?;
            progress.event(&TrainEvent::Message(format!(
                "input model: validation Dice {dice:.4} (an epoch must beat it to become best)"
            )));
        }
        Ok(())
    }

    /// Continues from `last.*`: weights, optimiser state and step count, position.
    fn resume(&mut self) -> Result<(), TrainError> {
        let cfg = &self.run.cfg;
        let meta = checkpoint::load_meta(&self.last)?;
        if meta.model != self.meta.model || meta.size != cfg.size {
            return Err(TrainError::Config(format!(
                "{} was trained with base {} at size {}, not base {} at size {}",
                self.last.display(),
                meta.model.base,
                meta.size,
                cfg.base,
                cfg.size
            )));
        }
        if let Some(p) = &meta.partial_epoch {
            let steps = self.plan.steps_in(meta.epoch + 1);
            if p.batch != cfg.batch || p.steps > steps {
                return Err(TrainError::Config(format!(
                    "{} stopped at step {} of an epoch with batch {}: resume it with the same \
                     data and batch size (this run has batch {}, {steps} steps in that epoch)",
                    self.last.display(),
                    p.steps,
                    p.batch,
                    cfg.batch,
                )));
            }
        }
        checkpoint::load_into(&self.map, &self.last, cfg.base)?;
        let opt_state = checkpoint::load_tensors(&self.optim, &self.run.device)?;
        // files from before the step count was kept: the count at the epoch boundary
        let legacy = meta.epoch * self.plan.steps_per_epoch;
        self.opt
            .load_state(&opt_state, meta.optimizer_steps.unwrap_or(legacy))?;
        let best = if self.has_val() {
            meta.best_dice
        } else {
            // older files stored minus the training loss as best_dice
            meta.best_train_loss.map(|l| -l).or(meta.best_dice)
        };
        self.pos = Position {
            epoch: meta.epoch,
            best,
            best_epoch: meta.best_epoch,
            initial_dice: meta.initial_dice,
            partial: meta.partial_epoch,
        };
        Ok(())
    }

    /// Whether the run has taken all its epochs.
    pub fn done(&self) -> bool {
        self.pos.epoch >= self.plan.epochs
    }

    /// Takes the remaining steps of the current epoch (all of them, or those after a resumed
    /// partial epoch); true when cancelled (the position is then mid-epoch).
    pub fn run_epoch(
        &mut self,
        progress: &mut dyn Progress,
        cancel: &AtomicBool,
    ) -> Result<bool, TrainError> {
        let cfg = &self.run.cfg;
        let epoch = self.pos.epoch + 1;
        let mut order: Vec<usize> = (0..self.run.train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            cfg.seed ^ (epoch as u64) << 32,
        ));
        let steps = self.plan.steps_in(epoch);
        let mut part = self.pos.partial.take().unwrap_or(PartialEpoch {
            batch: cfg.batch,
            ..Default::default()
        });
        for (step, idx) in order.chunks(cfg.batch).enumerate().take(steps) {
            if step < part.steps {
                continue;
            }
            let started = Instant::now();
            let (loss, lr) = self.step(epoch, step, idx)?;
            part.steps = step + 1;
            part.loss_sum += loss * idx.len() as f64;
            part.seen += idx.len();
            part.seconds += started.elapsed().as_secs_f64();
            progress.event(&TrainEvent::Step {
                epoch,
                step: step + 1,
                steps_per_epoch: self.plan.steps_per_epoch,
                loss,
                lr,
            });
            if cancel.load(Ordering::Relaxed) {
                self.pos.partial = Some(part);
                return Ok(true);
            }
        }
        self.pos.partial = Some(part);
        Ok(false)
    }

    /// One optimiser step on the batch `idx` (step `step` of epoch `epoch`, 0-based): its
    /// loss and learning rate.
    fn step(&mut self, epoch: usize, step: usize, idx: &[usize]) -> Result<(f64, f64), TrainError> {
        let cfg = &self.run.cfg;
        let global_step = (epoch - 1) * self.plan.steps_per_epoch + step;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(global_step as u64 * 7919));
        let items: Vec<_> = idx
            .iter()
            .map(|&i| {
                let p = &self.run.train[i];
                let (img, msk) = augment(&p.image, &p.mask, cfg.size, &cfg.augment, &mut rng);
                (img, msk, p.weight)
            })
            .collect();
        let (x, y, w) = batch_tensors(&items, cfg.size, &self.run.device)?;
        let heads = self.model.forward_t(&x, true)?;
        let loss = deep_supervision_loss(&heads, &y, &w)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(TrainError::NonFinite {
                epoch,
                step: step + 1,
                loss: value,
                dir: self.run.out_dir.clone(),
            });
        }
        let grads = loss.backward()?;
        let lr = self.schedule.lr_at(global_step);
        self.opt.step(&grads, lr)?;
        Ok((value, lr))
    }

    /// Validates the finished epoch, keeps it as `best` when it beats the best so far by
    /// [`MIN_DELTA`], saves `last` and the metrics; true when early stopping ends the run.
    pub fn finish_epoch(&mut self, progress: &mut dyn Progress) -> Result<bool, TrainError> {
        let run = self.run;
        let cfg = &run.cfg;
        let epoch = self.pos.epoch + 1;
        let part = self.pos.partial.take().unwrap_or_default();
        let val = if self.has_val() {
            Some(validate(
                &self.model,
                run.val,
                cfg.size,
                cfg.batch,
                &run.device,
            )?)
        } else {
            None
        };
        let train_loss = part.loss_sum / part.seen.max(1) as f64;
        let last_step = (epoch - 1) * self.plan.steps_per_epoch + part.steps.max(1) - 1;
        // without a validation set, the best epoch is the one with the lowest training loss
        let criterion = val.map(|s| s.dice).unwrap_or(-train_loss);
        let improved = self.pos.best.is_none_or(|b| criterion > b + MIN_DELTA);
        let record = EpochRecord {
            epoch,
            train_loss,
            val_dice: val.map(|s| s.dice),
            val_iou: val.map(|s| s.iou),
            lr: self.schedule.lr_at(last_step),
            seconds: part.seconds,
            images_per_s: part.seen as f64 / part.seconds.max(1e-9),
            best: improved,
        };
        self.pos.epoch = epoch;
        self.meta.metrics = Some(record.clone());
        if improved {
            self.pos.best = Some(criterion);
            self.pos.best_epoch = epoch;
            self.save_best()?;
        }
        self.save_last()?;
        append_metrics(&self.metrics, &record)?;
        progress.event(&TrainEvent::Epoch(record));
        let stalled = epoch - self.pos.best_epoch;
        if cfg.patience > 0 && stalled >= cfg.patience {
            progress.event(&TrainEvent::Message(self.early_stop_message()));
            return Ok(true);
        }
        Ok(false)
    }

    fn early_stop_message(&self) -> String {
        let (patience, best, at) = (
            self.run.cfg.patience,
            self.pos.best.unwrap_or(0.),
            self.pos.best_epoch,
        );
        if self.has_val() {
            format!(
                "early stop: no better validation Dice for {patience} epochs (best {best:.4} at \
                 epoch {at})"
            )
        } else {
            format!(
                "early stop: no lower training loss for {patience} epochs (no validation set; \
                 best epoch by training loss {at}, loss {:.4})",
                -best
            )
        }
    }

    /// A cancelled run leaves usable weights: the current ones as `last` with the exact
    /// position, and as `best` too when there is no best yet.
    pub fn cancelled(&mut self, progress: &mut dyn Progress) -> Result<(), TrainError> {
        self.save_last()?;
        if !self.best.exists() {
            self.save_best()?;
        }
        let steps = self.pos.partial.as_ref().map_or(0, |p| p.steps);
        progress.event(&TrainEvent::Message(format!(
            "cancelled during epoch {} after step {steps}; weights saved to {} (--resume \
             continues from there)",
            self.pos.epoch + 1,
            self.last.display()
        )));
        Ok(())
    }

    /// The sidecar for the current position.
    fn position_meta(&self) -> CheckpointMeta {
        let mut meta = self.meta.clone();
        let p = &self.pos;
        meta.epoch = p.epoch;
        meta.best_epoch = p.best_epoch;
        meta.best_dice = p.best.filter(|_| self.has_val());
        meta.best_train_loss = p.best.filter(|_| !self.has_val()).map(|c| -c);
        meta.initial_dice = p.initial_dice;
        meta.optimizer_steps = Some(self.opt.steps_taken());
        meta.partial_epoch = p.partial.clone();
        meta
    }

    fn save_last(&self) -> Result<(), TrainError> {
        let (tensors, _) = self.opt.state();
        checkpoint::save_tensors(&tensors, &self.optim)?;
        checkpoint::save(&self.map, &self.position_meta(), &self.last)?;
        Ok(())
    }

    fn save_best(&self) -> Result<(), TrainError> {
        let mut meta = self.position_meta();
        meta.partial_epoch = None;
        checkpoint::save(&self.map, &meta, &self.best)?;
        Ok(())
    }

    pub fn outcome(&self, status: TrainStatus) -> TrainOutcome {
        let has_val = self.has_val();
        TrainOutcome {
            status,
            epochs_done: self.pos.epoch,
            best_epoch: self.pos.best_epoch,
            best_dice: self.pos.best.filter(|_| has_val),
            best_train_loss: self.pos.best.filter(|_| !has_val).map(|c| -c),
            initial_dice: self.pos.initial_dice,
            improved: self.pos.best_epoch > 0,
            optimizer_steps: self.opt.steps_taken(),
            best: self.best.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_steps_sets_the_length_of_a_run() {
        // 18 samples, batch 4: 5 steps per epoch
        let p = Plan::new(3, None, 18, 4);
        assert_eq!((p.steps_per_epoch, p.epochs, p.total_steps), (5, 3, 15));
        assert_eq!((p.steps_in(1), p.steps_in(3)), (5, 5));
        // 12 steps: two full epochs and two steps of a third, whatever `epochs` says
        let p = Plan::new(3, Some(12), 18, 4);
        assert_eq!((p.epochs, p.total_steps), (3, 12));
        assert_eq!((p.steps_in(1), p.steps_in(2), p.steps_in(3)), (5, 5, 2));
        let p = Plan::new(1, Some(12), 18, 4);
        assert_eq!(p.epochs, 3);
        let p = Plan::new(9, Some(10), 18, 4);
        assert_eq!((p.epochs, p.steps_in(2)), (2, 5));
    }
}
