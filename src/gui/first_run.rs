//! The first run: the demo project opens with no model and nothing to review, so the app
//! trains a small U-Net++ on the demo's labelled images and mines the rest with the
//! self-training labeler (no SAM, no download), in the background on the model thread, through
//! the same library calls as `medmine finetune` and `medmine mine --labeler unet`. The model is
//! recorded as the project's run, so the next open finds it and mines nothing again.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use candle_core::Device;

use super::worker::{CustomJob, JobContext};
use crate::mining::finetune::{finetune_project, FinetuneConfig};
use crate::mining::labeler::SelfTraining;
use crate::mining::{mine_project, MiningConfig};
use crate::progress::NoProgress;
use crate::store::Project;
use crate::train::checkpoint::fresh_checkpoint;

/// What the job is called in the UI.
pub const FIRST_RUN: &str = "first run";

/// The size and width of the first model: seconds per epoch on a 2-core CPU.
const SIZE: usize = 64;
const BASE: usize = 8;

/// The hint shown while the demo has nothing else to say.
pub const FIRST_STEPS: &str = "First steps: the demo's pseudo-labels were made by a small \
    U-Net++ trained here (self-training, no SAM). Review them with A (accept) and R (reject), \
    correct with the brush (B) or SAM clicks (S, after loading SAM weights in the Model panel), \
    then fine-tune and mine the next round.";

/// The first-run job for the project at `root`.
pub fn first_run_job(root: PathBuf, device: Device) -> CustomJob {
    CustomJob {
        what: FIRST_RUN.into(),
        run: Box::new(move |ctx| first_run(&root, &device, ctx)),
    }
}

fn first_run(root: &Path, device: &Device, ctx: &mut JobContext<'_>) -> Result<String> {
    let mut project = Project::open(root)?;
    let init = fresh_checkpoint(
        &root.join("runs").join("first-run-init"),
        BASE,
        SIZE,
        0,
        device,
    )
    .context("writing the first model's initial weights")?;
    let cfg = FinetuneConfig {
        epochs: 12,
        batch: 4,
        lr: 3e-3,
        pseudo_weight: 0.5,
        patience: 0,
        seed: 0,
        max_steps: None,
    };
    let ft = finetune_project(
        &mut project,
        &init,
        &cfg,
        device,
        &mut NoProgress,
        ctx.cancel,
    )?;
    let mined = mine_project(
        &mut project,
        &ft.best,
        &mut SelfTraining,
        &MiningConfig::default(),
        device,
        ctx.progress,
        ctx.cancel,
    )?;
    let dice = ft
        .best_dice
        .map(|d| format!(" (validation Dice {d:.2})"))
        .unwrap_or_default();
    Ok(format!(
        "trained a first U-Net++{dice} and mined {} pseudo-labels with it: review them",
        mined.mined.len()
    ))
}
