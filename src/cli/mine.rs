//! `medmine mine`: one knowledge-mining pass over a project's unlabelled images.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::mining::shard::{mine_shard, ShardSummary};
use crate::mining::{mine_project, open_labeler, LabelerKind, MiningConfig, MiningSummary, Remine};
use crate::models::sam::Variant;
use crate::models::unetpp::InferenceMode;
use crate::prompts::{PromptConfig, Strategy};
use crate::store::{Project, ShardSpec};

#[derive(Args)]
pub struct MineArgs {
    /// Project folder.
    project: PathBuf,
    /// Who labels: sam (SAM prompted by the U-Net++), unet (self-training: the U-Net++'s own
    /// thresholded prediction, no SAM), oracle / oracle-box (the ground truth answering the
    /// prompted boxes; needs masks for the unlabelled images).
    #[arg(long, default_value = "sam")]
    labeler: String,
    /// SAM checkpoint (.pth/.pt as published, or .safetensors), e.g.
    /// weights/sam_vit_b_01ec64.pth (`medmine weights download vit_b` fetches it); needed by
    /// --labeler sam only.
    #[arg(long)]
    sam: Option<PathBuf>,
    /// auto | vit_b | vit_l | vit_h | vit_t | medsam | litemedsam (auto: detected from the
    /// checkpoint's keys; MedSAM has SAM vit_b's keys and needs `medsam`).
    #[arg(long, default_value = "auto")]
    sam_variant: String,
    /// The U-Net++ whose predictions become the prompts (RUN/best.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// U-Net++ inference: accurate or fast:L.
    #[arg(long, default_value = "accurate")]
    mode: String,
    /// box | points | box+points | box+points+mask (MedSAM / LiteMedSAM: always box, as their
    /// official code).
    #[arg(long, default_value = "box+points")]
    strategy: String,
    /// SAM rounds per image: 1 = no refinement (the best-scoring round is the pseudo-label).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Stop refining when two successive masks have at least this IoU.
    #[arg(long, default_value_t = 0.95, value_parser = super::unit_f64)]
    stop_iou: f64,
    /// Foreground threshold of the U-Net++ probability.
    #[arg(long, default_value_t = 0.5, value_parser = super::unit_f32)]
    threshold: f32,
    /// Components with fewer pixels are not prompted (nor kept by self-training).
    #[arg(long, default_value_t = 25)]
    min_area: usize,
    /// Ask SAM for three masks per prompt and keep the most confident.
    #[arg(long)]
    multimask: bool,
    /// Accept the images mined now whose quality score (SAM IoU x stability x agreement x
    /// 1/(1 + |component count change|)) is at least S.
    #[arg(long, value_name = "S", value_parser = super::unit_f64)]
    auto_accept: Option<f64>,
    /// Which pending or rejected images with a pseudo-label are mined again: changed (made by
    /// another U-Net++ checkpoint or labeler, by content hash), all, or none. Accepted and
    /// edited images are never re-mined.
    #[arg(long, default_value = "changed")]
    remine: String,
    /// Mine only shard K of N (0-based K, e.g. $SLURM_ARRAY_TASK_ID/N): the project is read,
    /// never written; the result goes to --shard-out, merged later by `medmine project merge`.
    #[arg(long, value_name = "K/N", requires = "shard_out")]
    shard: Option<String>,
    /// The shard's folder (its own SQLite file and masks). Run the same command again on it
    /// to continue a stopped job.
    #[arg(long, value_name = "DIR", requires = "shard")]
    shard_out: Option<PathBuf>,
}

pub fn mine_cmd(a: MineArgs, device: candle_core::Device) -> Result<()> {
    let kind: LabelerKind = a.labeler.parse()?;
    let strategy: Strategy = a.strategy.parse()?;
    let cfg = MiningConfig {
        prompt: PromptConfig {
            strategy,
            threshold: a.threshold,
            min_area: a.min_area,
            ..PromptConfig::default()
        },
        rounds: a.rounds,
        stop_iou: a.stop_iou,
        multimask: a.multimask,
        auto_accept: a.auto_accept,
        remine: a.remine.parse::<Remine>()?,
        sam_variant: Variant::parse(&a.sam_variant)?,
        unet_mode: a
            .mode
            .parse::<InferenceMode>()
            .map_err(anyhow::Error::msg)?,
    };
    if kind != LabelerKind::Sam && a.sam.is_some() {
        eprintln!("note: --sam is not used by --labeler {kind}");
    }
    let shard = match (&a.shard, &a.shard_out) {
        (Some(k), Some(out)) => Some((k.parse::<ShardSpec>()?, out.clone())),
        _ => None,
    };
    let mut project = if shard.is_some() {
        Project::open_read_only(&a.project)?
    } else {
        Project::open(&a.project)?
    };
    let cache = match &shard {
        Some((_, out)) => out.join("cache"),
        None => project.cache_dir(),
    };
    let sam = if kind == LabelerKind::Sam {
        a.sam.as_deref()
    } else {
        None
    };
    let mut labeler = open_labeler(kind, sam, cfg.sam_variant, &device, Some(&cache))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Ctrl-C stops after the current image; what is stored stays stored.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("mining [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    println!(
        "mining {} with labeler {} ({}), strategy {strategy}, up to {} rounds (stop at IoU {}), \
         re-mining {}",
        a.project.display(),
        kind,
        labeler.id(),
        cfg.rounds,
        cfg.stop_iou,
        cfg.remine
    );
    if let Some((spec, out)) = shard {
        let s = mine_shard(
            &project,
            &out,
            spec,
            &a.checkpoint,
            labeler.as_mut(),
            &cfg,
            &device,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
            &cancel,
        )?;
        bar.finish_and_clear();
        return print_shard_summary(&s, &out);
    }
    let mut announced = false;
    let s = mine_project(
        &mut project,
        &a.checkpoint,
        labeler.as_mut(),
        &cfg,
        &device,
        &mut |done, total| {
            if !announced {
                // printed once the images are chosen (before any is mined)
                // from here on a person's review of one of them wins
                bar.suspend(|| {
                    println!("selected {total} images");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                });
                announced = true;
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
        &cancel,
    )?;
    bar.finish_and_clear();
    print_summary(&s, a.auto_accept.is_some());
    failed_images(&s.failed, "")
}

fn print_shard_summary(s: &ShardSummary, out: &std::path::Path) -> Result<()> {
    if let Some(info) = &s.info {
        println!("shard               {}", info.spec);
        println!("shard id            {}", info.shard_id);
        println!("u-net++ sha256      {}", info.unet_hash);
        println!("labeler id          {}", info.labeler);
    }
    println!("shard folder        {}", out.display());
    println!("selected            {}", s.selected);
    println!("done by an earlier job {}", s.resumed);
    println!("mined               {}", s.mined);
    println!("no component        {}", s.no_component);
    println!("failed              {}", s.failed.len());
    if s.cancelled {
        println!("cancelled: run the same command again to continue");
    } else {
        println!("finished: merge with `medmine project merge PROJECT SHARD_DIR...`");
    }
    failed_images(&s.failed, "")
}

/// An error listing the images that could not be mined (`what`: where they were), if any.
pub(super) fn failed_images(failed: &[(String, String)], what: &str) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
    bail!(
        "{} images{what} could not be mined:\n{}",
        failed.len(),
        lines.join("\n")
    )
}

/// One `name value` line per count (the tests read them by name).
fn print_summary(s: &MiningSummary, auto_accept: bool) {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!("u-net++ sha256      {}", s.unet_hash);
    println!("labeler id          {}", s.labeler);
    println!("unlabelled images   {}", s.unlabelled);
    println!("mined               {}", s.mined.len());
    println!("unchanged           {}", s.unchanged.len());
    println!("kept: accepted/edited {}", s.kept.len());
    println!("skipped: reviewed meanwhile {}", s.skipped_reviewed.len());
    println!("no component        {}", s.no_component.len());
    println!("failed              {}", s.failed.len());
    println!("components          {}", s.components);
    println!("rounds              {}", s.rounds);
    println!("converged           {}", s.converged);
    println!("earlier round chosen {}", s.earlier_round_chosen);
    println!("mean quality        {}", f(s.mean_quality));
    println!("mean sam iou        {}", f(s.mean_sam_iou));
    println!("mean stability      {}", f(s.mean_stability));
    println!("mean agreement      {}", f(s.mean_agreement));
    println!("component count changed {}", s.component_count_changed);
    if auto_accept {
        println!("auto-accepted       {}", s.auto_accepted.len());
    }
    if s.cancelled {
        println!("cancelled: the images mined so far are stored");
    }
}
