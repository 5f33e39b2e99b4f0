//! `medmine experiment`: the paper's protocol, baseline U-Net++ vs U-Net++ fine-tuned with
//! mined pseudo-labels, a control fine-tuned for as many steps on the labelled images only and
//! a self-training arm, per labelled fraction and seed; resumable, with a bar over the arms.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::CliProgress;
use crate::mining::experiment::{
    markdown_table, run_experiment, write_results, ExperimentConfig, ExperimentObserver,
};
use crate::mining::finetune::FinetuneConfig;
use crate::mining::labeler::LabelerKind;
use crate::mining::MiningConfig;
use crate::models::sam::Variant;
use crate::prompts::{PromptConfig, Strategy};
use crate::train::TrainConfig;

#[derive(Args)]
pub struct ExperimentArgs {
    /// Dataset folder with images/ and masks/.
    #[arg(long)]
    data: PathBuf,
    /// Folder with train.txt, val.txt and test.txt.
    #[arg(long)]
    split_dir: PathBuf,
    /// SAM checkpoint (required with --labeler sam), e.g. weights/sam_vit_b_01ec64.pth
    /// (`medmine weights download vit_b` fetches it).
    #[arg(long)]
    sam: Option<PathBuf>,
    /// auto | vit_b | vit_l | vit_h | vit_t | medsam | litemedsam
    #[arg(long, default_value = "auto")]
    sam_variant: String,
    /// The mined arm's labeler: sam; oracle (the ground-truth objects the prompted boxes touch,
    /// whole); oracle-box (the ground truth clipped to the prompted boxes); unet (self-training,
    /// which the selftrain arm runs anyway). Several, comma-separated (`oracle,oracle-box`):
    /// one mined arm each, sharing the baseline, control and selftrain arms; a labeler added
    /// to an earlier experiment's command runs only its own arms.
    #[arg(long, value_delimiter = ',', default_value = "sam")]
    labeler: Vec<String>,
    /// Labelled fractions of train.txt, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,1.0")]
    fractions: Vec<f64>,
    /// Seeds 0..N per fraction (from --first-seed).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// The first seed: `--first-seed 2 --seeds 1` runs seed 2 alone, exactly as it runs in
    /// `--seeds 3` (to spread one experiment's seeds over machines or sessions).
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    #[arg(long, default_value_t = 96)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    base: usize,
    /// Baseline training epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Early stopping patience of both trainings (0 = off).
    #[arg(long, default_value_t = 10)]
    patience: usize,
    /// Fine-tuning epochs of the mined arm and of the control (labelled images only).
    #[arg(long, default_value_t = 10)]
    finetune_epochs: usize,
    /// Fine-tuning learning rate of the mined arm and of the control.
    #[arg(long, default_value_t = 1e-4)]
    finetune_lr: f64,
    /// Loss weight of accepted pseudo-labels in fine-tuning, in [0, 1].
    #[arg(long, default_value_t = 0.5, value_parser = super::unit_f32)]
    pseudo_weight: f32,
    /// Pseudo-labels with a quality score at least this are accepted automatically.
    #[arg(long, default_value_t = 0.5, value_parser = super::unit_f64)]
    accept_threshold: f64,
    /// box | points | box+points | box+points+mask (SAM labeler).
    #[arg(long, default_value = "box+points")]
    strategy: String,
    /// SAM rounds per image (SAM labeler).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Output folder. Run the same command again to continue an interrupted experiment: the
    /// finished arms are read back (other settings are refused).
    #[arg(long)]
    out: PathBuf,
}

/// Log lines above the bars, and a bar over all arms with an ETA.
struct ArmsBar {
    multi: MultiProgress,
    bar: Option<ProgressBar>,
}

impl ExperimentObserver for ArmsBar {
    fn log(&mut self, line: &str) {
        if self.multi.is_hidden() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    fn arms(&mut self, done: usize, total: usize) {
        let multi = &self.multi;
        let bar = self.bar.get_or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(total as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "arms [{bar:30}] {pos}/{len} elapsed {elapsed} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(done as u64);
            // arms finished by an earlier run say nothing about this run's speed
            bar.reset_eta();
            bar
        });
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if bar.is_hidden() {
            println!("arms finished: {done}/{total}");
        }
    }
}

pub fn experiment_cmd(a: ExperimentArgs, device: candle_core::Device) -> Result<()> {
    super::check_size_base(a.size, a.base)?;
    let labelers = a
        .labeler
        .iter()
        .map(|l| l.trim().parse::<LabelerKind>())
        .collect::<Result<Vec<_>, _>>()?;
    let Some((&labeler, more_labelers)) = labelers.split_first() else {
        bail!("--labeler needs at least one labeler");
    };
    if labelers.contains(&LabelerKind::Sam) && a.sam.is_none() {
        bail!(
            "--labeler sam needs --sam FILE; {}",
            crate::mining::SAM_DOWNLOAD_HINT
        );
    }
    let cfg = ExperimentConfig {
        data: a.data,
        split_dir: a.split_dir,
        fractions: a.fractions,
        seeds: a.seeds,
        first_seed: a.first_seed,
        labeler,
        more_labelers: more_labelers.to_vec(),
        sam: a.sam,
        train: TrainConfig {
            size: a.size,
            base: a.base,
            epochs: a.epochs,
            batch: a.batch,
            lr: a.lr,
            patience: a.patience,
            ..TrainConfig::default()
        },
        finetune: FinetuneConfig {
            epochs: a.finetune_epochs,
            batch: a.batch,
            lr: a.finetune_lr,
            pseudo_weight: a.pseudo_weight,
            patience: a.patience,
            seed: 0,
            max_steps: None,
        },
        mining: MiningConfig {
            prompt: PromptConfig {
                strategy: a.strategy.parse::<Strategy>()?,
                ..PromptConfig::default()
            },
            rounds: a.rounds,
            auto_accept: Some(a.accept_threshold),
            sam_variant: Variant::parse(&a.sam_variant)?,
            ..MiningConfig::default()
        },
        // absolute: the arms' records name their checkpoints, and a rerun from another
        // folder must still find them
        out: std::path::absolute(&a.out).with_context(|| format!("--out {}", a.out.display()))?,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let multi = MultiProgress::new();
    let mut progress = CliProgress {
        bar: None,
        multi: Some(multi.clone()),
    };
    let mut arms = ArmsBar { multi, bar: None };
    let results = run_experiment(&cfg, &device, &mut progress, &mut arms, &cancel);
    if let Some(bar) = arms.bar.take() {
        bar.finish_and_clear();
    }
    let results = results?;
    let path = write_results(&cfg.out, &results)?;
    println!();
    print!("{}", markdown_table(&results));
    println!();
    println!("results: {}", path.display());
    Ok(())
}
