//! `medmine finetune`: one fine-tuning round of the U-Net++ on a project's labelled images and
//! accepted pseudo-labels.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::CliProgress;
use crate::mining::finetune::{
    finetune_project, finetune_samples, FinetuneConfig, FinetuneOutcome,
};
use crate::store::Project;
use crate::train::TrainStatus;

#[derive(Args)]
pub struct FinetuneArgs {
    /// Project folder.
    project: PathBuf,
    /// The U-Net++ to start from (RUN/best.safetensors); its size and width are kept.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Loss weight of accepted / edited pseudo-labels, in [0, 1] (ground truth weighs 1).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true, value_parser = super::unit_f32)]
    pseudo_weight: f32,
    /// Early stopping patience in epochs (0 = off).
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Seeds the batch order and the augmentation (the weights come from the checkpoint).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train for exactly this many optimiser steps instead of --epochs epochs.
    #[arg(long)]
    max_steps: Option<usize>,
}

pub fn finetune_cmd(a: FinetuneArgs, device: candle_core::Device) -> Result<()> {
    let cfg = FinetuneConfig {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        pseudo_weight: a.pseudo_weight,
        patience: a.patience,
        seed: a.seed,
        max_steps: a.max_steps,
    };
    let mut project = Project::open(&a.project)?;
    let samples = finetune_samples(&project)?;
    println!("labelled            {}", samples.labelled.len());
    println!("pseudo              {}", samples.pseudo.len());
    println!("validation          {}", samples.val.len());
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Ctrl-C asks for a clean stop: the current weights are saved and the run is recorded.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let o = finetune_project(
        &mut project,
        &a.checkpoint,
        &cfg,
        &device,
        &mut CliProgress::default(),
        &cancel,
    )?;
    let verdict = match o.status {
        TrainStatus::Finished => "finished",
        TrainStatus::EarlyStopped => "stopped early",
        TrainStatus::Cancelled => "cancelled",
    };
    println!(
        "{verdict} after {} epochs (run {})",
        o.epochs_done, o.run_id
    );
    println!("{}", verdict_line(&o));
    println!("best checkpoint     {}", o.best.display());
    Ok(())
}

/// Whether the round improved on its input model, and by what measure.
fn verdict_line(o: &FinetuneOutcome) -> String {
    match (o.initial_dice, o.best_dice, o.best_train_loss) {
        (Some(initial), _, _) if !o.improved => {
            format!("kept the input model: no epoch beat its validation Dice {initial:.4}")
        }
        (Some(initial), Some(best), _) => format!(
            "improved: best epoch {} has validation Dice {best:.4} (input model {initial:.4})",
            o.best_epoch
        ),
        (_, Some(best), _) => format!("best epoch {} (validation Dice {best:.4})", o.best_epoch),
        (_, _, Some(loss)) => format!(
            "no validation set: best epoch by training loss {} (loss {loss:.4}); whether it \
             beats the input model is not measured",
            o.best_epoch
        ),
        _ => format!("best epoch {} (no epoch finished)", o.best_epoch),
    }
}
