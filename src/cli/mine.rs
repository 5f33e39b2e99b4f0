//! `medmine mine`: one knowledge-mining pass over a project's unlabelled images.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::mining::{mine_project, MiningConfig, SAM_DOWNLOAD_HINT};
use crate::models::sam::Variant;
use crate::models::unetpp::InferenceMode;
use crate::prompts::{PromptConfig, Strategy};
use crate::store::Project;

#[derive(Args)]
pub struct MineArgs {
    /// Project folder.
    project: PathBuf,
    /// SAM checkpoint (.pth/.pt as published, or .safetensors), e.g.
    /// weights/sam_vit_b_01ec64.pth (`medmine weights download vit_b` fetches it).
    #[arg(long)]
    sam: Option<PathBuf>,
    /// auto | vit_b | vit_l | vit_h | vit_t (auto: detected from the checkpoint's keys).
    #[arg(long, default_value = "auto")]
    sam_variant: String,
    /// The U-Net++ whose predictions become the prompts (RUN/best.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// U-Net++ inference: accurate or fast:L.
    #[arg(long, default_value = "accurate")]
    mode: String,
    /// box | points | box+points | box+points+mask
    #[arg(long, default_value = "box+points")]
    strategy: String,
    /// SAM rounds per image: 1 = no refinement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Stop refining when two successive masks have at least this IoU.
    #[arg(long, default_value_t = 0.95)]
    stop_iou: f64,
    /// Foreground threshold of the U-Net++ probability.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Components with fewer pixels are not prompted.
    #[arg(long, default_value_t = 25)]
    min_area: usize,
    /// Ask SAM for three masks per prompt and keep the most confident.
    #[arg(long)]
    multimask: bool,
    /// Accept the images mined now whose quality score (SAM IoU x stability x agreement x
    /// 1/(1 + |component count change|)) is at least S.
    #[arg(long, value_name = "S")]
    auto_accept: Option<f64>,
    /// Also re-mine images that already have a pseudo-label (never accepted or edited ones).
    #[arg(long)]
    remine: bool,
}

pub fn mine_cmd(a: MineArgs, device: candle_core::Device) -> Result<()> {
    let Some(sam) = a.sam.clone() else {
        bail!("mining needs a SAM checkpoint (--sam FILE); {SAM_DOWNLOAD_HINT}");
    };
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
        remine: a.remine,
        sam_variant: Variant::parse(&a.sam_variant)?,
        unet_mode: a
            .mode
            .parse::<InferenceMode>()
            .map_err(anyhow::Error::msg)?,
    };
    let mut project = Project::open(&a.project)?;
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
        "mining {} with strategy {strategy}, up to {} rounds (stop at IoU {})",
        a.project.display(),
        cfg.rounds,
        cfg.stop_iou
    );
    let s = mine_project(
        &mut project,
        &a.checkpoint,
        &sam,
        &cfg,
        &device,
        &mut |done, total| {
            if done == 0 {
                // The images are chosen: from here on a person's review of one of them wins.
                println!("selected {total} images");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
        &cancel,
    )?;
    bar.finish_and_clear();
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!("unlabelled images   {}", s.unlabelled);
    println!("mined               {}", s.mined.len());
    println!("components          {}", s.components);
    println!("sam rounds          {}", s.rounds);
    println!("converged           {}", s.converged);
    println!("no component        {}", s.no_component.len());
    println!("already mined       {}", s.already_mined.len());
    println!("failed              {}", s.failed.len());
    println!("mean quality        {}", f(s.mean_quality));
    println!("mean sam iou        {}", f(s.mean_sam_iou));
    println!("mean stability      {}", f(s.mean_stability));
    println!("mean agreement      {}", f(s.mean_agreement));
    println!("component count changed {}", s.component_count_changed);
    if a.auto_accept.is_some() {
        println!("auto-accepted       {}", s.auto_accepted.len());
    }
    println!("skipped: reviewed meanwhile {}", s.skipped_reviewed.len());
    if s.cancelled {
        println!("cancelled: the images mined so far are stored");
    }
    if !s.failed.is_empty() {
        let lines: Vec<String> = s.failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
        bail!(
            "{} images could not be read:\n{}",
            s.failed.len(),
            lines.join("\n")
        );
    }
    Ok(())
}
