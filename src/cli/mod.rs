//! The `medmine` command line: one function per subcommand, no pipeline logic of its own.
//! Subcommand names and flags are a contract that outside scripts use.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::data::{self, AugmentConfig, Dataset};
use crate::device::{describe, DeviceChoice};
use crate::metrics::Scores;
use crate::models::unetpp::InferenceMode;
use crate::predict::{self, Predictor};
use crate::progress::{Progress, TrainEvent};
use crate::train::{self, TrainConfig, TrainRun, TrainStatus};

mod bench;
mod check;
mod experiment;
mod finetune;
mod mine;
mod project;
mod segment;
mod weights;

/// `medmine --version`: version, git commit and compiled features (also in the app's About).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MEDMINE_GIT_COMMIT"),
    "; features: ",
    env!("MEDMINE_FEATURES"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "medmine",
    version = VERSION,
    about = "Semi-supervised medical image segmentation: U-Net++ + knowledge mined from SAM"
)]
struct Cli {
    /// auto | cpu | cuda[:N] | metal
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Without a subcommand the desktop app opens (as `medmine gui`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a U-Net++ on the labelled part of a dataset.
    Train(TrainArgs),
    /// Predict binary masks (at each image's original size) with a trained checkpoint.
    Predict(PredictArgs),
    /// Compare predicted masks with ground truth: Dice, IoU, precision, recall.
    Evaluate(EvaluateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Project store: create, import a dataset, status, relink, export.
    #[command(subcommand)]
    Project(project::ProjectCommand),
    /// Review pseudo-labels: accept, reject, reset to pending, edit, undo, redo; list the queue.
    Review(project::ReviewArgs),
    /// Segment one image with SAM from box / point / mask prompts.
    Segment(segment::SegmentArgs),
    /// Mine pseudo-labels for the unlabelled images: U-Net++ prompts -> SAM -> pending review.
    Mine(mine::MineArgs),
    /// Fine-tune the U-Net++ from a checkpoint on labelled images + accepted pseudo-labels.
    Finetune(finetune::FinetuneArgs),
    /// The paper's protocol: baseline vs mined U-Net++ per labelled fraction and seed.
    Experiment(experiment::ExperimentArgs),
    /// The official SAM checkpoints: list, verify (SHA-256), download (resumable).
    #[command(subcommand)]
    Weights(weights::WeightsCommand),
    /// Open the desktop app (review, correct, fine-tune); the default without a subcommand.
    Gui(GuiArgs),
    /// Check that this device computes what the CPU computes: U-Net++ gradients, inference,
    /// training and SAM against the official outputs (with --device cpu: the device-generic
    /// op path against the fast one).
    Check(check::CheckArgs),
}

#[derive(Args, Default)]
struct GuiArgs {
    /// Project folder to open (default: the most recent one, else the demo project).
    project: Option<PathBuf>,
    /// SAM checkpoint to load at start (default: the one used last).
    #[arg(long)]
    sam: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    /// Dataset folder with images/ and masks/.
    #[arg(long)]
    data: PathBuf,
    /// Training split (one image file name per line); default: every labelled image.
    #[arg(long)]
    train_list: Option<PathBuf>,
    /// Validation split; without it the best epoch is the one with the lowest training loss.
    #[arg(long)]
    val_list: Option<PathBuf>,
    #[arg(long, default_value_t = 96)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    base: usize,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seeded fraction of the training split used as labelled (the rest is the unlabelled pool).
    #[arg(long, default_value_t = 1.0)]
    labelled_fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_epochs: f64,
    /// Early stopping patience in epochs (0 = off).
    #[arg(long, default_value_t = 10)]
    patience: usize,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Start from this checkpoint's weights (fine-tuning).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace a finished or stopped run in --out (without it, an existing run is refused).
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    #[arg(long)]
    out: PathBuf,
}

/// Files that make a folder a training run (what `--force` replaces).
const RUN_FILES: [&str; 5] = [
    "best.safetensors",
    "best.json",
    "last.safetensors",
    "last.json",
    "metrics.jsonl",
];

/// A command-line value in `[0, 1]` (thresholds, scores, weights); NaN is refused.
pub(crate) fn unit_f64(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("`{s}` is not a number in [0, 1]"));
    }
    Ok(v)
}

/// As [`unit_f64`], for `f32` options.
pub(crate) fn unit_f32(s: &str) -> std::result::Result<f32, String> {
    unit_f64(s).map(|v| v as f32)
}

/// The network's input size and width, checked before anything is allocated.
pub(crate) fn check_size_base(size: usize, base: usize) -> Result<()> {
    if !(16..=2048).contains(&size) || !size.is_multiple_of(16) {
        bail!("--size {size}: must be a multiple of 16 from 16 to 2048 (pixels per side)");
    }
    if !(1..=256).contains(&base) {
        bail!("--base {base}: must be from 1 to 256 (filters of the first level)");
    }
    Ok(())
}

impl TrainArgs {
    /// Every numeric option in its own words, and what --out already holds.
    fn check(&self) -> Result<()> {
        check_size_base(self.size, self.base)?;
        if self.epochs == 0 || self.batch == 0 {
            bail!("--epochs and --batch must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {}: must be a positive number", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay {}: must be 0 or more", self.weight_decay);
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            bail!("--warmup-epochs {}: must be 0 or more", self.warmup_epochs);
        }
        if !(self.labelled_fraction > 0.0 && self.labelled_fraction <= 1.0) {
            bail!(
                "--labelled-fraction {}: must be in (0, 1]",
                self.labelled_fraction
            );
        }
        let existing: Vec<&str> = RUN_FILES
            .into_iter()
            .filter(|f| self.out.join(f).exists())
            .collect();
        if self.resume && !self.out.join("last.json").is_file() {
            bail!(
                "{}: no run to resume (no last.json); start it without --resume",
                self.out.display()
            );
        }
        if !self.resume && !self.force && !existing.is_empty() {
            bail!(
                "{} already holds a training run ({}); continue it with --resume, replace it \
                 with --force, or choose another --out",
                self.out.display(),
                existing.join(", ")
            );
        }
        Ok(())
    }
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder of images (or a dataset folder with images/).
    #[arg(long)]
    images: PathBuf,
    /// Only the images named in this list.
    #[arg(long)]
    list: Option<PathBuf>,
    /// Output folder for <stem>.png binary masks (0/255).
    #[arg(long)]
    out: PathBuf,
    /// Also write 8-bit probability maps here.
    #[arg(long)]
    probs: Option<PathBuf>,
    /// accurate (mean of the four heads) or fast:L (pruned to depth L = 1..4).
    #[arg(long, default_value = "accurate")]
    mode: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Args)]
struct EvaluateArgs {
    /// Predicted masks (<stem>.png).
    #[arg(long)]
    pred: PathBuf,
    /// Ground-truth masks (matched by file stem).
    #[arg(long)]
    gt: PathBuf,
    /// Only the images named in this list.
    #[arg(long)]
    list: Option<PathBuf>,
    /// Write per-image and mean scores as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Project commands use no compute device (and `status --json` must print only JSON).
    let command = match cli.command.unwrap_or(Command::Gui(GuiArgs::default())) {
        Command::Project(c) => return project::project_cmd(c),
        Command::Review(a) => return project::review_cmd(a),
        Command::Weights(c) => return weights::weights_cmd(c),
        other => other,
    };
    let choice: DeviceChoice = cli.device.parse()?;
    let (device, why) = choice.open_explained()?;
    match why {
        Some(why) => println!("device: {} ({why})", describe(&device)),
        None => println!("device: {}", describe(&device)),
    }
    match command {
        Command::Train(a) => train_cmd(a, device),
        Command::Predict(a) => predict_cmd(a, device),
        Command::Evaluate(a) => evaluate_cmd(a),
        Command::Segment(a) => segment::segment_cmd(a, device),
        Command::Mine(a) => mine::mine_cmd(a, device),
        Command::Finetune(a) => finetune::finetune_cmd(a, device),
        Command::Experiment(a) => experiment::experiment_cmd(a, device),
        Command::Gui(a) => gui_cmd(a, device),
        Command::Check(a) => check::check_cmd(a, device),
        Command::Bench(c) => bench::bench_cmd(c, device),
        Command::Project(c) => project::project_cmd(c),
        Command::Review(a) => project::review_cmd(a),
        Command::Weights(c) => weights::weights_cmd(c),
    }
}

#[cfg(feature = "gui")]
fn gui_cmd(a: GuiArgs, device: candle_core::Device) -> Result<()> {
    crate::gui::run(a.project, a.sam, device)
}

#[cfg(not(feature = "gui"))]
fn gui_cmd(_: GuiArgs, _: candle_core::Device) -> Result<()> {
    anyhow::bail!("this medmine was built without the `gui` feature; see `medmine --help`")
}

fn select(ds: &Dataset, list: Option<&Path>) -> Result<Vec<data::Sample>> {
    match list {
        None => Ok(ds.labelled()),
        Some(path) => Ok(ds.select(&data::read_split_list(path)?, path)?),
    }
}

fn write_list(path: &Path, samples: &[data::Sample]) -> Result<()> {
    let text: String = samples.iter().map(|s| format!("{}\n", s.name)).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn train_cmd(a: TrainArgs, device: candle_core::Device) -> Result<()> {
    a.check()?;
    let ds = Dataset::scan(&a.data)?;
    if let Some(report) = ds.skipped_report() {
        eprintln!("{report}");
    }
    let val_samples = match &a.val_list {
        Some(p) => ds.select(&data::read_split_list(p)?, p)?,
        None => Vec::new(),
    };
    let is_val = |name: &str| val_samples.iter().any(|v| v.name == name);
    let mut train_all = select(&ds, a.train_list.as_deref())?;
    if a.train_list.is_none() {
        // without a training list: every labelled image that does not validate
        train_all.retain(|s| !is_val(&s.name));
    }
    // as `import` does: an image may not train and validate
    let overlap: Vec<&str> = train_all
        .iter()
        .filter(|s| is_val(&s.name))
        .map(|s| s.name.as_str())
        .collect();
    if !overlap.is_empty() {
        bail!(
            "{} of the validation images are also in the training list ({}{}); an image may be \
             in one list only",
            overlap.len(),
            overlap[..overlap.len().min(3)].join(", "),
            if overlap.len() > 3 { ", ..." } else { "" }
        );
    }
    let names: Vec<String> = train_all.iter().map(|s| s.name.clone()).collect();
    let (labelled, unlabelled) = data::split_labelled(&names, a.labelled_fraction, a.seed)?;
    let labelled_samples: Vec<_> = labelled.iter().filter_map(|n| ds.get(n).cloned()).collect();
    let pool: Vec<_> = unlabelled
        .iter()
        .filter_map(|n| ds.get(n).cloned())
        .collect();
    if a.force {
        for f in RUN_FILES {
            let p = a.out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    println!(
        "labelled: {} of {} training images (fraction {}, seed {}); unlabelled pool: {}; validation: {}",
        labelled_samples.len(),
        names.len(),
        a.labelled_fraction,
        a.seed,
        pool.len(),
        val_samples.len()
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_list(&a.out.join("labelled.txt"), &labelled_samples)?;
    write_list(&a.out.join("unlabelled.txt"), &pool)?;
    let train_set = data::prepare(&labelled_samples, a.size)?;
    let val_set = data::prepare(&val_samples, a.size)?;
    let cfg = TrainConfig {
        size: a.size,
        base: a.base,
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_epochs: a.warmup_epochs,
        patience: a.patience,
        seed: a.seed,
        augment: if a.no_augment {
            AugmentConfig::none()
        } else {
            AugmentConfig::default()
        },
        ..TrainConfig::default()
    };
    let run = TrainRun {
        cfg,
        train: &train_set,
        val: &val_set,
        out_dir: a.out.clone(),
        device,
        init: a.init,
        resume: a.resume,
        data_fingerprint: train::fingerprint(&labelled_samples, &val_samples, a.size),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Ctrl-C asks for a clean stop: the current weights are saved before exiting.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let outcome = train::train(&run, &mut CliProgress::default(), &cancel)?;
    let verdict = match outcome.status {
        TrainStatus::Finished => "finished",
        TrainStatus::EarlyStopped => "stopped early",
        TrainStatus::Cancelled => "cancelled",
    };
    let best = match (outcome.best_dice, outcome.best_train_loss) {
        (Some(d), _) => format!("best epoch {} (validation Dice {d:.4})", outcome.best_epoch),
        (None, Some(l)) => format!(
            "no validation set: best epoch by training loss {} (loss {l:.4})",
            outcome.best_epoch
        ),
        (None, None) => format!("best epoch {} (no epoch finished)", outcome.best_epoch),
    };
    let kept = match outcome.initial_dice {
        Some(d) if !outcome.improved => {
            format!("; kept the input model: no epoch beat its validation Dice {d:.4}")
        }
        Some(d) => format!("; input model validation Dice {d:.4}"),
        None => String::new(),
    };
    println!(
        "{verdict} after {} epochs; {best}{kept}; checkpoint {}",
        outcome.epochs_done,
        outcome.best.display()
    );
    Ok(())
}

/// Progress bar per epoch (loss, speed, ETA) and a summary line per epoch; inside `multi`
/// (above a longer job's bar) when given.
#[derive(Default)]
struct CliProgress {
    bar: Option<ProgressBar>,
    multi: Option<MultiProgress>,
}

impl CliProgress {
    /// Prints a line above the bars (plainly where they are hidden: not a terminal).
    fn say(&self, line: &str) {
        match (&self.multi, &self.bar) {
            (Some(m), _) if !m.is_hidden() => {
                let _ = m.println(line);
            }
            (None, Some(bar)) if !bar.is_hidden() => bar.println(line),
            _ => println!("{line}"),
        }
    }
}

impl Progress for CliProgress {
    fn event(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Started {
                first_epoch,
                epochs,
                steps_per_epoch,
            } => self.say(&format!(
                "training epochs {first_epoch}..={epochs}, {steps_per_epoch} steps each"
            )),
            TrainEvent::Step {
                epoch,
                step,
                steps_per_epoch,
                loss,
                lr,
            } => {
                let multi = self.multi.clone();
                let bar = self.bar.get_or_insert_with(|| {
                    let bar = ProgressBar::new(*steps_per_epoch as u64);
                    let bar = match &multi {
                        Some(m) => m.insert_from_back(1, bar),
                        None => bar,
                    };
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar
                });
                bar.set_prefix(format!("epoch {epoch}"));
                bar.set_position(*step as u64);
                bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
            }
            TrainEvent::Epoch(r) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                let val = match (r.val_dice, r.val_iou) {
                    (Some(d), Some(i)) => format!("val Dice {d:.4} IoU {i:.4}"),
                    _ => "no validation set".into(),
                };
                let best = match (r.best, r.val_dice.is_some()) {
                    (false, _) => "",
                    (true, true) => "  *best",
                    (true, false) => "  *best by training loss",
                };
                self.say(&format!(
                    "epoch {:>3}  loss {:.4}  {val}  {:.2} img/s  {:.0} s{best}",
                    r.epoch, r.train_loss, r.images_per_s, r.seconds,
                ));
            }
            TrainEvent::Message(m) => self.say(m),
        }
    }
}

fn predict_cmd(a: PredictArgs, device: candle_core::Device) -> Result<()> {
    let mode: InferenceMode = a.mode.parse().map_err(anyhow::Error::msg)?;
    let predictor = Predictor::load(&a.checkpoint, &device, mode)?;
    let mut samples = predict::image_files(&a.images)?;
    if let Some(list) = &a.list {
        let names = data::read_split_list(list)?;
        samples = predict::filter_by_list(samples, &names, list)?;
    }
    // every output name up front (lossless for names that are not UTF-8): two inputs that
    // would write one file are refused before anything is written
    let mut out_names: std::collections::HashMap<std::ffi::OsString, &Path> =
        std::collections::HashMap::new();
    for path in &samples {
        let name = mask_name(path);
        if let Some(other) = out_names.insert(name.clone(), path) {
            bail!(
                "{} and {} would both be written to {}; predict them into separate folders \
                 or rename one",
                other.display(),
                path.display(),
                a.out.join(&name).display()
            );
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    if let Some(p) = &a.probs {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let bar = ProgressBar::new(samples.len() as u64);
    let mut failed = Vec::new();
    for chunk in samples.chunks(a.batch.max(1)) {
        let mut loaded = Vec::new();
        for path in chunk {
            match data::load_image(path) {
                Ok(img) => loaded.push((path, img)),
                Err(e) => failed.push(e.to_string()),
            }
        }
        if loaded.is_empty() {
            bar.inc(chunk.len() as u64);
            continue; // every image of this batch failed to load (listed at the end)
        }
        let refs: Vec<_> = loaded.iter().map(|(_, i)| i).collect();
        let maps = predictor.predict(&refs)?;
        for ((path, _), map) in loaded.iter().zip(maps) {
            let name = mask_name(path);
            data::save_mask_png(&a.out.join(&name), &map.to_mask())?;
            if let Some(p) = &a.probs {
                data::save_gray_png(&p.join(&name), map.width, map.height, &map.to_u8())?;
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!(
        "predicted {} masks into {} ({:?} mode, size {})",
        samples.len() - failed.len(),
        a.out.display(),
        mode,
        predictor.size()
    );
    if !failed.is_empty() {
        bail!(
            "{} images could not be read:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// The mask file name of an input image: its stem (bytes kept as they are) + `.png`.
fn mask_name(path: &Path) -> std::ffi::OsString {
    let mut name = path
        .file_stem()
        .map(|s| s.to_os_string())
        .unwrap_or_else(|| "image".into());
    name.push(".png");
    name
}

fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    let names = a.list.as_deref().map(data::read_split_list).transpose()?;
    let report = crate::evaluate::evaluate_dirs(&a.pred, &a.gt, names.as_deref())?;
    let m: Scores = report.mean;
    println!("images     {}", report.images.len());
    println!("dice       {:.4}", m.dice);
    println!("iou        {:.4}", m.iou);
    println!("precision  {:.4}", m.precision);
    println!("recall     {:.4}", m.recall);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
