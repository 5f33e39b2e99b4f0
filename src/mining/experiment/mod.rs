//! The paper's protocol (issue 5), with the arms that say what the large model adds. For each
//! labelled fraction and seed a project is built from the dataset and its split lists
//! (`train.txt` split into labelled / unlabelled by the fraction and seed, `val.txt` validates,
//! `test.txt` tests), and four arms run, each scored on the test split (mean per-image Dice and
//! IoU at each image's original size):
//! * **baseline**: a U-Net++ trained on the labelled images only;
//! * **mined**: the baseline mines the unlabelled images with the chosen labeler (SAM or an
//!   oracle), the pseudo-labels whose quality reaches the threshold are accepted, and the
//!   baseline is fine-tuned on the labelled images plus the accepted pseudo-labels;
//! * **control**: the baseline fine-tuned on the labelled images only, with the mined arm's
//!   settings and exactly as many optimiser steps as the mined arm took (`max_steps` = the
//!   mined run's steps, no early stopping; its epochs pass over fewer images, so it runs more
//!   of them): `mined - control` is the pseudo-labels' effect, not more training;
//! * **selftrain**: the same as mined with the self-training labeler (the baseline's own
//!   thresholded predictions as pseudo-labels, same acceptance rule), in a second project
//!   (`project-selftrain`): `mined - selftrain` is what the large model's knowledge adds.
//!
//! Further labelers (`--labeler oracle,oracle-box`) add one arm each, `mined-<labeler>` in
//! `project-<labeler>`, mined and fine-tuned like the mined arm and compared with the same
//! baseline, control and selftrain arms (which therefore run once, not once per labeler).
//!
//! Each finished arm leaves a record in its run folder ([`arms`]); an interrupted experiment
//! run again with the same `--out` and settings continues from the finished arms (the baseline
//! from its last epoch). [`results`] describes the report.
mod arms;
mod results;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;

use super::finetune::{finetune_project, finetune_samples, FinetuneConfig, FinetuneError};
use super::labeler::{open_labeler, LabelerKind};
use super::{mine_project, MiningConfig, MiningError};
use crate::data::{self, DataError};
use crate::metrics::{Confusion, Scores};
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::progress::Progress;
use crate::store::{ImportOptions, Project, Role, StoreError};
use crate::train::checkpoint::CheckpointError;
use crate::train::{self, TrainConfig, TrainError, TrainRun, TrainStatus};

pub use crate::mining::labeler::oracle::{oracle_mask, oracle_objects, OracleKind};
pub use arms::{ArmRecord, ARMS};
pub use results::{
    markdown_table, mean_std, write_results, FractionResult, LabelerSummary, MinedArmResult,
    SeedResult,
};

/// Everything an experiment needs.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// Dataset folder (`images/`, `masks/`).
    pub data: PathBuf,
    /// Folder with `train.txt`, `val.txt` and `test.txt`.
    pub split_dir: PathBuf,
    /// Labelled fractions of `train.txt`, each in `(0, 1]`.
    pub fractions: Vec<f64>,
    /// Seeds `first_seed..first_seed + seeds` (labelled split, initialisation, augmentation).
    pub seeds: u64,
    /// The first seed (0 unless a run's seeds are spread over machines or sessions: seed 2
    /// alone is `first_seed: 2, seeds: 1`, with the same results as in a run of seeds 0..3).
    pub first_seed: u64,
    /// The mined arm's labeler (`sam`, `oracle`, `oracle-box`; `unet` makes the mined arm the
    /// self-training arm).
    pub labeler: LabelerKind,
    /// Further mined arms, one per labeler (`mined-<labeler>`). Not part of the settings that
    /// finished arms are checked against: adding one to an earlier experiment runs only the
    /// new arms.
    pub more_labelers: Vec<LabelerKind>,
    /// SAM checkpoint (the `sam` labeler).
    pub sam: Option<PathBuf>,
    /// Baseline training (its `seed` is replaced by each run's seed).
    pub train: TrainConfig,
    /// Fine-tuning with the accepted pseudo-labels (its `seed` is replaced too).
    pub finetune: FinetuneConfig,
    /// Mining; `auto_accept` is the quality threshold (default 0 when `None`).
    pub mining: MiningConfig,
    /// Output folder: one folder per fraction and seed, `settings.json`, `results.json`.
    pub out: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("invalid experiment settings: {0}")]
    Settings(String),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mining(Box<MiningError>),
    #[error(transparent)]
    Finetune(Box<FinetuneError>),
    #[error("training: {0}")]
    Train(Box<TrainError>),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error(transparent)]
    Data(Box<DataError>),
    #[error("U-Net++ checkpoint {}: {source}", .path.display())]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error("{image}: prediction failed: {source}")]
    Predict {
        image: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cancelled (the finished arms are kept; run the same command again to continue)")]
    Cancelled,
}

macro_rules! boxed_from {
    ($($t:ty => $v:ident),*) => {
        $(impl From<$t> for ExperimentError {
            fn from(e: $t) -> Self {
                ExperimentError::$v(Box::new(e))
            }
        })*
    };
}
boxed_from!(MiningError => Mining, FinetuneError => Finetune, TrainError => Train,
    StoreError => Store, DataError => Data);

impl ExperimentConfig {
    fn check(&self) -> Result<(), ExperimentError> {
        let bad = |m: String| Err(ExperimentError::Settings(m));
        if self.fractions.is_empty() {
            return bad("no labelled fraction given".into());
        }
        for &f in &self.fractions {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("labelled fraction {f} is not in (0, 1]"));
            }
        }
        if self.seeds == 0 {
            return bad("seeds must be at least 1".into());
        }
        if !self.split_dir.join("test.txt").is_file() {
            return bad(format!(
                "{}: no test.txt (the experiment scores on the test split)",
                self.split_dir.display()
            ));
        }
        let mut seen = vec![self.labeler];
        for &k in &self.more_labelers {
            if seen.contains(&k) {
                return bad(format!("labeler {k} is given twice"));
            }
            if k == LabelerKind::Unet {
                return bad(
                    "unet can only be the first labeler (the selftrain arm is self-training \
                     already)"
                        .into(),
                );
            }
            seen.push(k);
        }
        if seen.contains(&LabelerKind::Sam) {
            match &self.sam {
                Some(p) if p.is_file() => {}
                Some(p) => return Err(MiningError::NoSamCheckpoint { path: p.clone() }.into()),
                None => return Err(MiningError::SamNotGiven.into()),
            }
        }
        Ok(())
    }

    /// What the arms' records depend on (`OUT/settings.json`): everything but the fractions,
    /// the seeds and the output folder.
    fn settings(&self) -> serde_json::Value {
        let mut train = self.train.clone();
        train.seed = 0;
        let mut finetune = self.finetune.clone();
        finetune.seed = 0;
        serde_json::json!({
            "data": self.data,
            "split_dir": self.split_dir,
            "labeler": self.labeler.to_string(),
            "sam": self.sam,
            "train": train,
            "finetune": finetune,
            "mining": format!("{:?}", self.mining),
        })
    }

    /// Every arm of one fraction and seed, in the order they run.
    fn arm_names(&self) -> Vec<String> {
        ARMS.iter()
            .map(|a| a.to_string())
            .chain(self.more_labelers.iter().map(|k| format!("mined-{k}")))
            .collect()
    }

    fn seed_range(&self) -> std::ops::Range<u64> {
        self.first_seed..self.first_seed.saturating_add(self.seeds)
    }

    fn run_dir(&self, fraction: f64, seed: u64) -> PathBuf {
        self.out.join(format!("fraction-{fraction}-seed-{seed}"))
    }
}

/// What an experiment tells its caller besides the training events.
pub trait ExperimentObserver {
    /// One line per stage.
    fn log(&mut self, line: &str);
    /// `done` of `total` arms are finished (those finished by an earlier run included).
    fn arms(&mut self, done: usize, total: usize);
}

/// Runs the whole protocol; `progress` gets the training events. Writes nothing but
/// `OUT/settings.json` and the per-run folders under `cfg.out` (see [`write_results`]).
pub fn run_experiment(
    cfg: &ExperimentConfig,
    device: &Device,
    progress: &mut dyn Progress,
    observer: &mut dyn ExperimentObserver,
    cancel: &AtomicBool,
) -> Result<Vec<FractionResult>, ExperimentError> {
    cfg.check()?;
    arms::check_settings(&cfg.out, &cfg.settings())?;
    let mut total = 0;
    let mut done = 0;
    for &fraction in &cfg.fractions {
        for seed in cfg.seed_range() {
            for arm in cfg.arm_names() {
                total += 1;
                done += arms::read_arm(&cfg.run_dir(fraction, seed), &arm)?.is_some() as usize;
            }
        }
    }
    if done > 0 {
        observer.log(&format!(
            "{done} of {total} arms finished earlier in {}: continuing",
            cfg.out.display()
        ));
    }
    observer.arms(done, total);
    let mut results = Vec::new();
    for &fraction in &cfg.fractions {
        let mut seeds = Vec::new();
        for seed in cfg.seed_range() {
            let mut run = RunCtx {
                cfg,
                fraction,
                seed,
                dir: cfg.run_dir(fraction, seed),
                device,
                progress: &mut *progress,
                observer: &mut *observer,
                cancel,
                done: &mut done,
                total,
            };
            seeds.push(run.run()?);
        }
        let labeler = cfg.labeler.to_string();
        results.push(FractionResult::from_seeds(fraction, &labeler, seeds));
    }
    Ok(results)
}

/// One fraction and seed.
struct RunCtx<'a> {
    cfg: &'a ExperimentConfig,
    fraction: f64,
    seed: u64,
    dir: PathBuf,
    device: &'a Device,
    progress: &'a mut dyn Progress,
    observer: &'a mut dyn ExperimentObserver,
    cancel: &'a AtomicBool,
    done: &'a mut usize,
    total: usize,
}

impl RunCtx<'_> {
    fn run(&mut self) -> Result<SeedResult, ExperimentError> {
        let (fraction, seed) = (self.fraction, self.seed);
        let opts = ImportOptions {
            split_dir: Some(self.cfg.split_dir.clone()),
            labelled_fraction: fraction,
            seed,
            ..ImportOptions::new(&self.cfg.data)
        };
        let mut project = arms::open_or_import(&self.dir.join("project"), &opts)?;
        let images = project.images()?;
        let unlabelled = images.iter().filter(|r| r.role == Role::Unlabelled).count();
        let samples = finetune_samples(&project)?;
        self.log(format!(
            "fraction {fraction}, seed {seed}: {} labelled, {unlabelled} unlabelled, {} val, {} test",
            samples.labelled.len(),
            samples.val.len(),
            images.iter().filter(|r| r.role == Role::Test).count()
        ));

        let baseline = self.arm("baseline", |c| c.baseline(&project))?;
        let labeler = self.cfg.labeler;
        let mined = self.arm("mined", |c| {
            c.mining_arm("mined", &mut project, &baseline, labeler)
        })?;
        let control = self.arm("control", |c| c.control(&mut project, &baseline, &mined))?;
        let selftrain = self.arm("selftrain", |c| {
            if labeler == LabelerKind::Unet {
                c.log("  selftrain: the mined arm's labeler is self-training already".into());
                return Ok(ArmRecord {
                    arm: "selftrain".into(),
                    ..mined.clone()
                });
            }
            let mut p = arms::open_or_import(&c.dir.join("project-selftrain"), &opts)?;
            c.mining_arm("selftrain", &mut p, &baseline, LabelerKind::Unet)
        })?;
        let mut more_mined = Vec::new();
        for &kind in &self.cfg.more_labelers {
            let name = format!("mined-{kind}");
            let rec = self.arm(&name, |c| {
                let mut p = arms::open_or_import(&c.dir.join(format!("project-{kind}")), &opts)?;
                c.mining_arm(&name, &mut p, &baseline, kind)
            })?;
            more_mined.push(MinedArmResult {
                labeler: kind.to_string(),
                test: rec.test,
                val_dice: rec.val_dice,
                steps: rec.optimizer_steps,
                mined: rec.mined,
                accepted: rec.accepted,
                checkpoint: rec.checkpoint,
            });
        }
        Ok(SeedResult {
            seed,
            labelled: baseline.labelled,
            unlabelled,
            mined: mined.mined,
            accepted: mined.accepted,
            test_images: baseline.test_images,
            baseline: baseline.test,
            control: control.test,
            mined_model: mined.test,
            selftrain: selftrain.test,
            baseline_val_dice: baseline.val_dice,
            control_val_dice: control.val_dice,
            mined_val_dice: mined.val_dice,
            selftrain_val_dice: selftrain.val_dice,
            mined_steps: mined.optimizer_steps,
            control_steps: control.optimizer_steps,
            selftrain_steps: selftrain.optimizer_steps,
            selftrain_mined: selftrain.mined,
            selftrain_accepted: selftrain.accepted,
            baseline_checkpoint: baseline.checkpoint,
            control_checkpoint: control.checkpoint,
            mined_checkpoint: mined.checkpoint,
            selftrain_checkpoint: selftrain.checkpoint,
            more_mined,
        })
    }

    fn log(&mut self, line: String) {
        self.observer.log(&line);
    }

    fn check_cancel(&self) -> Result<(), ExperimentError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(ExperimentError::Cancelled);
        }
        Ok(())
    }

    /// The record of `name` from an earlier run, or runs the arm and records it.
    fn arm(
        &mut self,
        name: &str,
        run: impl FnOnce(&mut Self) -> Result<ArmRecord, ExperimentError>,
    ) -> Result<ArmRecord, ExperimentError> {
        if let Some(rec) = arms::read_arm(&self.dir, name)? {
            self.log(format!(
                "  {name}: finished earlier (test Dice {:.4})",
                rec.test.dice
            ));
            return Ok(rec);
        }
        self.check_cancel()?;
        let start = Instant::now();
        let mut rec = run(self)?;
        rec.seconds = start.elapsed().as_secs_f64();
        arms::write_arm(&self.dir, &rec)?;
        *self.done += 1;
        self.observer.arms(*self.done, self.total);
        Ok(rec)
    }

    /// A record with the checkpoint's test scores.
    fn scored(
        &mut self,
        arm: &str,
        project: &Project,
        checkpoint: PathBuf,
        val_dice: Option<f64>,
        optimizer_steps: usize,
        (labelled, pseudo): (usize, usize),
    ) -> Result<ArmRecord, ExperimentError> {
        let (test, test_images) = evaluate_test(project, &checkpoint, self.device)?;
        self.log(format!(
            "  {arm}: test Dice {:.4}, IoU {:.4} ({labelled} labelled + {pseudo} pseudo-labelled, \
             {optimizer_steps} steps)",
            test.dice, test.iou
        ));
        Ok(ArmRecord {
            arm: arm.into(),
            test,
            test_images,
            val_dice,
            checkpoint,
            optimizer_steps,
            labelled,
            pseudo,
            mined: 0,
            accepted: 0,
            seconds: 0.0,
        })
    }

    /// The U-Net++ on the labelled images only; continues from its last epoch if a killed run
    /// left one.
    fn baseline(&mut self, project: &Project) -> Result<ArmRecord, ExperimentError> {
        let samples = finetune_samples(project)?;
        let size = self.cfg.train.size;
        let train_set = data::prepare(&samples.labelled, size)?;
        let val_set = data::prepare(&samples.val, size)?;
        let out_dir = self.dir.join("baseline");
        let resume = out_dir.join("last.json").is_file();
        if resume {
            self.log("  baseline: continuing from its last epoch".into());
        }
        let run = TrainRun {
            cfg: TrainConfig {
                seed: self.seed,
                ..self.cfg.train.clone()
            },
            train: &train_set,
            val: &val_set,
            out_dir,
            device: self.device.clone(),
            init: None,
            resume,
            data_fingerprint: train::fingerprint(&samples.labelled, &samples.val, size),
        };
        let outcome = train::train(&run, self.progress, self.cancel)?;
        if outcome.status == TrainStatus::Cancelled {
            return Err(ExperimentError::Cancelled);
        }
        self.check_cancel()?;
        self.scored(
            "baseline",
            project,
            outcome.best,
            outcome.best_dice,
            outcome.optimizer_steps,
            (samples.labelled.len(), 0),
        )
    }

    fn finetune(
        &mut self,
        project: &mut Project,
        from: &Path,
        cfg: &FinetuneConfig,
    ) -> Result<super::finetune::FinetuneOutcome, ExperimentError> {
        let ft = finetune_project(project, from, cfg, self.device, self.progress, self.cancel)?;
        if ft.status == TrainStatus::Cancelled {
            return Err(ExperimentError::Cancelled);
        }
        self.check_cancel()?;
        Ok(ft)
    }

    /// Mining with `labeler` and automatic acceptance, then fine-tuning from the baseline on
    /// the labelled images plus the accepted pseudo-labels. A mining pass that a killed run
    /// left half done continues (images mined by the same models are not mined again).
    fn mining_arm(
        &mut self,
        arm: &str,
        project: &mut Project,
        baseline: &ArmRecord,
        labeler: LabelerKind,
    ) -> Result<ArmRecord, ExperimentError> {
        let threshold = self.cfg.mining.auto_accept.unwrap_or(0.0);
        let mining = MiningConfig {
            auto_accept: Some(threshold),
            ..self.cfg.mining.clone()
        };
        let cache = project.cache_dir();
        let mut labeler = open_labeler(
            labeler,
            self.cfg.sam.as_deref(),
            mining.sam_variant,
            self.device,
            Some(&cache),
        )?;
        let s = mine_project(
            project,
            &baseline.checkpoint,
            labeler.as_mut(),
            &mining,
            self.device,
            &mut |_, _| {},
            self.cancel,
        )?;
        if s.cancelled {
            return Err(ExperimentError::Cancelled);
        }
        if let Some((image, reason)) = s.failed.into_iter().next() {
            return Err(MiningError::Invalid { image, reason }.into());
        }
        let mined = s.mined.len() + s.unchanged.len() + s.kept.len();
        let accepted = finetune_samples(project)?.pseudo.len();
        self.log(format!(
            "  {arm}: {} labeler made {mined} pseudo-labels, {accepted} accepted (quality >= \
             {threshold})",
            labeler.name()
        ));
        let cfg = FinetuneConfig {
            seed: self.seed,
            ..self.cfg.finetune.clone()
        };
        let ft = self.finetune(project, &baseline.checkpoint, &cfg)?;
        let mut rec = self.scored(
            arm,
            project,
            ft.best,
            ft.best_dice,
            ft.optimizer_steps,
            (ft.labelled, ft.pseudo),
        )?;
        rec.mined = mined;
        rec.accepted = accepted;
        Ok(rec)
    }

    /// The baseline fine-tuned on the labelled images only (pseudo-label weight 0 leaves the
    /// accepted ones out), for exactly the mined arm's optimiser steps.
    fn control(
        &mut self,
        project: &mut Project,
        baseline: &ArmRecord,
        mined: &ArmRecord,
    ) -> Result<ArmRecord, ExperimentError> {
        let cfg = FinetuneConfig {
            seed: self.seed,
            pseudo_weight: 0.0,
            patience: 0,
            max_steps: Some(mined.optimizer_steps.max(1)),
            ..self.cfg.finetune.clone()
        };
        let ft = self.finetune(project, &baseline.checkpoint, &cfg)?;
        if ft.pseudo != 0 {
            return Err(ExperimentError::Settings(format!(
                "the control fine-tuning used {} pseudo-labels",
                ft.pseudo
            )));
        }
        self.scored(
            "control",
            project,
            ft.best,
            ft.best_dice,
            ft.optimizer_steps,
            (ft.labelled, 0),
        )
    }
}

/// Mean per-image scores of a checkpoint on the project's test images (with ground truth), at
/// each image's original size, and the number of images.
pub fn evaluate_test(
    project: &Project,
    checkpoint: &Path,
    device: &Device,
) -> Result<(Scores, usize), ExperimentError> {
    let unet = Predictor::load(checkpoint, device, InferenceMode::Accurate).map_err(|source| {
        ExperimentError::Checkpoint {
            path: checkpoint.to_path_buf(),
            source,
        }
    })?;
    let mut all = Vec::new();
    for rec in project.images()? {
        if rec.role != Role::Test {
            continue;
        }
        let Some(gt) = project.ground_truth(&rec.name)? else {
            continue;
        };
        let truth = data::load_mask(&gt)?;
        let pred = predict_mask(&unet, project, &rec.name)?;
        all.push(Confusion::from_masks(&pred.to_mask().data, &truth.data).scores());
    }
    Ok((Scores::mean(&all), all.len()))
}

fn predict_mask(
    unet: &Predictor,
    project: &Project,
    name: &str,
) -> Result<crate::predict::ProbMap, ExperimentError> {
    let img = project.load_image(name)?;
    unet.predict(&[&img])
        .map_err(|source| ExperimentError::Predict {
            image: name.to_string(),
            source,
        })?
        .pop()
        .ok_or_else(|| ExperimentError::Predict {
            image: name.to_string(),
            source: candle_core::Error::Msg("no prediction".into()),
        })
}
