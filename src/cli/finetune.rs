//! `medmine finetune`: one fine-tuning round of the U-Net++ on a project's labelled images and
//! accepted pseudo-labels.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::CliProgress;
use crate::mining::finetune::{finetune_project, finetune_samples, FinetuneConfig};
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
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pseudo_weight: f32,
    /// Early stopping patience in epochs (0 = off).
    #[arg(long, default_value_t = 5)]
    patience: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn finetune_cmd(a: FinetuneArgs, device: candle_core::Device) -> Result<()> {
    let cfg = FinetuneConfig {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        pseudo_weight: a.pseudo_weight,
        patience: a.patience,
        seed: a.seed,
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
        "{verdict} after {} epochs (run {}); best epoch {} (validation Dice {})",
        o.epochs_done,
        o.run_id,
        o.best_epoch,
        o.best_dice.map_or("n/a".into(), |d| format!("{d:.4}"))
    );
    println!("best checkpoint     {}", o.best.display());
    Ok(())
}
