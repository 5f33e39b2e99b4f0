//! The model thread: owns the device, SAM (with the project's embedding cache) and the
//! U-Net++, and runs clicks, predictions, encoding, mining and fine-tuning, reporting through
//! [`Event`]s. Read top to bottom:
//! 1. [`thread_main`]: the supervisor; a panic outside a job is reported and the thread starts
//!    again with no models (its queue survives);
//! 2. [`Inbox`]: the channel drained into the [`Scheduler`] (what runs next, what is dropped);
//! 3. [`ModelThread::run`]: one command at a time; quick ones guarded (an error or a panic
//!    becomes an [`Event::Error`]), jobs under a [`JobGuard`] (exactly one
//!    [`Event::JobDone`]: done, cancelled or failed, also on panic);
//! 4. the jobs, which serve queued clicks between images or batches ([`serve_interactive`]);
//! 5. [`Models`]: the loaded models and what a click, a probability map or a prefetch does.
//!
//! Cancelling sets the shared flag that every job checks per batch or image.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use anyhow::{anyhow, Context as _, Result};
use candle_core::Device;

use super::scheduler::{panic_message, supervise, Lane, Schedule, Scheduler};
use super::worker::{
    guarded, Event, FinetuneJob, FinetuneResult, JobContext, JobOutcome, ModelCommand, Outbox,
};
use crate::data::{self, Mask};
use crate::mining::finetune::finetune_project;
use crate::mining::labeler::hash::{cached_sha256, hash_cache_in};
use crate::mining::{mine_project, open_labeler, LabelerKind, MiningSummary};
use crate::models::sam::cache::embedding_identity;
use crate::models::sam::cache::EmbeddingCache;
use crate::models::sam::checkpoint::load_sam;
use crate::models::sam::predictor::{Embedding, Prompt, SamPredictor};
use crate::models::sam::Variant;
use crate::models::sam::LOW_RES_SIZE;
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::progress::{Progress, TrainEvent};
use crate::store::Project;
use crate::train::checkpoint;
use crate::train::TrainStatus;

// ----- 1. the supervisor -----

/// The model thread's body: runs until the UI drops its sender.
pub(super) fn thread_main(
    device: Device,
    out: Outbox,
    cancel: Arc<AtomicBool>,
    rx: Receiver<ModelCommand>,
) {
    let mut inbox = Inbox {
        rx,
        queue: Scheduler::default(),
    };
    supervise(
        &mut inbox,
        || ModelThread::new(device.clone(), out.clone(), cancel.clone()),
        |thread, inbox| thread.run(inbox),
        |why| {
            out.error(
                "model thread",
                &anyhow!("crashed ({why}); restarted with no model loaded"),
            );
            out.send(Event::ModelThreadRestarted);
        },
    );
}

// ----- 2. the inbox -----

impl Schedule for ModelCommand {
    fn lane(&self) -> Lane {
        match self {
            ModelCommand::LoadSam(..)
            | ModelCommand::LoadUnet(_)
            | ModelCommand::SetProject { .. } => Lane::Control,
            ModelCommand::Sam { .. } | ModelCommand::Probability { .. } => Lane::Interactive,
            ModelCommand::Finetune(_)
            | ModelCommand::Precompute { .. }
            | ModelCommand::Mine { .. }
            | ModelCommand::Job(_) => Lane::Job,
            ModelCommand::Embed { .. } => Lane::Prefetch,
        }
    }

    fn image(&self) -> Option<&str> {
        match self {
            ModelCommand::Sam { image, .. }
            | ModelCommand::Probability { image, .. }
            | ModelCommand::Embed { image, .. } => Some(image),
            _ => None,
        }
    }

    fn is_click(&self) -> bool {
        matches!(self, ModelCommand::Sam { .. })
    }
}

/// A command's short description (for error contexts and logs).
fn describe(cmd: &ModelCommand) -> String {
    format!("{cmd:?}").chars().take(80).collect()
}

/// The commands sent and not yet run.
pub(super) struct Inbox {
    rx: Receiver<ModelCommand>,
    queue: Scheduler<ModelCommand>,
}

impl Inbox {
    fn push(&mut self, cmd: ModelCommand) {
        for d in self.queue.push(cmd) {
            tracing::debug!("model thread: dropped stale {}", describe(&d));
        }
    }

    /// Moves what was sent into the queue without waiting.
    fn drain(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.push(cmd);
        }
    }

    /// The next command to run; `None` once the UI is gone and nothing is queued.
    fn next(&mut self) -> Option<ModelCommand> {
        loop {
            self.drain();
            if let Some(cmd) = self.queue.pop() {
                return Some(cmd);
            }
            let cmd = self.rx.recv().ok()?;
            self.push(cmd);
        }
    }
}

// ----- 3. the loop -----

pub(super) struct ModelThread {
    models: Models,
    out: Outbox,
    cancel: Arc<AtomicBool>,
}

/// How a job ended, with the line the UI shows.
struct JobEnd {
    outcome: JobOutcome,
    message: String,
}

impl JobEnd {
    fn new(cancelled: bool, message: String) -> Self {
        let outcome = if cancelled {
            JobOutcome::Cancelled
        } else {
            JobOutcome::Done
        };
        JobEnd { outcome, message }
    }
}

/// Sends [`Event::JobStarted`] when made and exactly one [`Event::JobDone`]: by [`end`], or
/// as a failure when dropped without it (an unwinding panic included).
///
/// [`end`]: JobGuard::end
pub(super) struct JobGuard {
    out: Outbox,
    what: String,
    ended: bool,
}

impl JobGuard {
    pub(super) fn start(out: &Outbox, what: &str) -> Self {
        out.send(Event::JobStarted { what: what.into() });
        JobGuard {
            out: out.clone(),
            what: what.into(),
            ended: false,
        }
    }

    fn end(mut self, outcome: JobOutcome, message: String) {
        self.ended = true;
        self.send(outcome, message);
    }

    fn send(&self, outcome: JobOutcome, message: String) {
        if outcome == JobOutcome::Failed {
            tracing::error!("{}: {message}", self.what);
        }
        self.out.send(Event::JobDone {
            what: self.what.clone(),
            outcome,
            message,
        });
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.send(
                JobOutcome::Failed,
                "failed: stopped without a result".into(),
            );
        }
    }
}

impl ModelThread {
    fn new(device: Device, out: Outbox, cancel: Arc<AtomicBool>) -> Self {
        Self {
            models: Models {
                device,
                project: None,
                sam: None,
                cache: None,
                unet: None,
            },
            out,
            cancel,
        }
    }

    fn run(&mut self, inbox: &mut Inbox) {
        while let Some(cmd) = inbox.next() {
            if cmd.lane() == Lane::Job {
                self.job(inbox, cmd);
            } else {
                let context = describe(&cmd);
                let (models, out) = (&mut self.models, &self.out);
                guarded(out, &context, || models.quick(cmd, out));
            }
        }
    }

    /// Runs a job command under a [`JobGuard`].
    fn job(&mut self, inbox: &mut Inbox, cmd: ModelCommand) {
        let what = match &cmd {
            ModelCommand::Finetune(_) => "fine-tuning".to_string(),
            ModelCommand::Precompute { .. } => "SAM encoding".to_string(),
            ModelCommand::Mine { .. } => "mining".to_string(),
            ModelCommand::Job(j) => j.what.clone(),
            other => describe(other),
        };
        self.cancel.store(false, Ordering::Relaxed);
        let guard = JobGuard::start(&self.out, &what);
        match catch_unwind(AssertUnwindSafe(|| self.run_job(inbox, cmd))) {
            Ok(Ok(end)) => guard.end(end.outcome, end.message),
            Ok(Err(e)) => guard.end(JobOutcome::Failed, format!("failed: {e:#}")),
            Err(p) => guard.end(
                JobOutcome::Failed,
                format!("failed: crashed: {}", panic_message(p.as_ref())),
            ),
        }
    }

    fn run_job(&mut self, inbox: &mut Inbox, cmd: ModelCommand) -> Result<JobEnd> {
        match cmd {
            ModelCommand::Finetune(job) => self.finetune(inbox, job),
            ModelCommand::Precompute { project, paths } => self.precompute(inbox, &project, &paths),
            ModelCommand::Mine {
                project,
                labeler,
                sam,
                unet,
                cfg,
            } => {
                let mut p = Project::open(&project)?;
                let cache = p.cache_dir();
                let sam = sam.filter(|_| labeler == LabelerKind::Sam);
                let mut labeler = open_labeler(
                    labeler,
                    sam.as_deref(),
                    cfg.sam_variant
                        .or_else(|| sam.as_deref().and_then(Variant::from_file_name)),
                    &self.models.device,
                    Some(&cache),
                )?;
                let device = self.models.device.clone();
                let (models, out, cancel) = (&mut self.models, &self.out, &*self.cancel);
                let summary = mine_project(
                    &mut p,
                    &unet,
                    labeler.as_mut(),
                    &cfg,
                    &device,
                    &mut |done, total| {
                        out.send(Event::JobProgress { done, total });
                        serve_interactive(models, inbox, out);
                    },
                    cancel,
                )?;
                let end = JobEnd::new(summary.cancelled, mining_message(&summary));
                self.out.send(Event::Mined {
                    project,
                    summary: Box::new(summary),
                });
                Ok(end)
            }
            ModelCommand::Job(job) => {
                let out = &self.out;
                let mut progress = |done, total| out.send(Event::JobProgress { done, total });
                let mut ctx = JobContext {
                    cancel: &self.cancel,
                    progress: &mut progress,
                };
                let message = (job.run)(&mut ctx)?;
                Ok(JobEnd::new(self.cancel.load(Ordering::Relaxed), message))
            }
            other => Err(anyhow!("not a job: {}", describe(&other))),
        }
    }

    // ----- 4. the jobs -----

    /// "Encode all": one image at a time, serving clicks in between.
    fn precompute(
        &mut self,
        inbox: &mut Inbox,
        project: &Path,
        paths: &[PathBuf],
    ) -> Result<JobEnd> {
        let (mut computed, mut cached, mut failed, mut cancelled) = (0, 0, 0, false);
        let total = paths.len();
        self.out.send(Event::JobProgress { done: 0, total });
        for (i, path) in paths.iter().enumerate() {
            if self.cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break;
            }
            let (sam, cache) = self.models.sam_and_cache(project)?;
            let r = cache.precompute(
                std::slice::from_ref(path),
                sam,
                &mut |_, _| {},
                &AtomicBool::new(false),
            );
            computed += r.computed;
            cached += r.cached;
            failed += r.failed.len();
            self.out.send(Event::JobProgress { done: i + 1, total });
            serve_interactive(&mut self.models, inbox, &self.out);
        }
        let verb = if cancelled {
            "cancelled after"
        } else {
            "encoded"
        };
        Ok(JobEnd::new(
            cancelled,
            format!("{verb} {computed} images ({cached} already cached, {failed} failed)"),
        ))
    }

    fn finetune(&mut self, inbox: &mut Inbox, job: FinetuneJob) -> Result<JobEnd> {
        let mut p = Project::open(&job.project)?;
        let device = self.models.device.clone();
        let (start, old_dice) = match &job.checkpoint {
            Some(c) => (
                c.clone(),
                checkpoint::load_meta(c).ok().and_then(|m| m.best_dice),
            ),
            None => {
                let dir = p.runs_dir().join("init");
                let path =
                    checkpoint::fresh_checkpoint(&dir, job.base, job.size, job.cfg.seed, &device)?;
                (path, None)
            }
        };
        let mut to_ui = ToUi {
            out: &self.out,
            models: &mut self.models,
            inbox,
        };
        let o = finetune_project(&mut p, &start, &job.cfg, &device, &mut to_ui, &self.cancel)?;
        self.out.send(Event::FinetuneDone(FinetuneResult {
            project: job.project.clone(),
            best: o.best.clone(),
            status: o.status,
            new_dice: o.best_dice,
            old_dice,
            epochs_done: o.epochs_done,
        }));
        Ok(JobEnd::new(
            o.status == TrainStatus::Cancelled,
            format!("{} epochs, best {}", o.epochs_done, o.best.display()),
        ))
    }
}

/// The counts of a mining pass, in one line.
pub(super) fn mining_message(s: &MiningSummary) -> String {
    let verb = if s.cancelled {
        "cancelled after mining"
    } else {
        "mined"
    };
    format!(
        "{verb} {}, unchanged {}, kept {}, skipped (reviewed meanwhile) {}, no component {}, \
         failed {}, auto-accepted {}",
        s.mined.len(),
        s.unchanged.len(),
        s.kept.len(),
        s.skipped_reviewed.len(),
        s.no_component.len(),
        s.failed.len(),
        s.auto_accepted.len()
    )
}

/// Runs the queued interactive commands (clicks, probability maps): what a job does between
/// two images or batches.
fn serve_interactive(models: &mut Models, inbox: &mut Inbox, out: &Outbox) {
    inbox.drain();
    while let Some(cmd) = inbox.queue.pop_interactive() {
        let context = describe(&cmd);
        guarded(out, &context, || models.quick(cmd, out));
        inbox.drain();
    }
}

/// Forwards training events to the UI and serves clicks after each step.
struct ToUi<'a> {
    out: &'a Outbox,
    models: &'a mut Models,
    inbox: &'a mut Inbox,
}

impl Progress for ToUi<'_> {
    fn event(&mut self, event: &TrainEvent) {
        self.out.send(Event::Train(event.clone()));
        if matches!(event, TrainEvent::Step { .. }) {
            serve_interactive(self.models, self.inbox, self.out);
        }
    }
}

// ----- 5. the models -----

/// What the model thread has loaded, for the project it was last told about.
struct Models {
    device: Device,
    project: Option<PathBuf>,
    sam: Option<(PathBuf, SamPredictor)>,
    cache: Option<(PathBuf, EmbeddingCache)>,
    unet: Option<(PathBuf, Predictor)>,
}

impl Models {
    /// Runs a control, interactive or prefetch command.
    fn quick(&mut self, cmd: ModelCommand, out: &Outbox) -> Result<()> {
        match cmd {
            ModelCommand::LoadSam(path, asked) => {
                // the Model panel's "SAM kind", else the file: a ViT named like MedSAM runs
                // as MedSAM (its tensors are SAM vit_b's)
                let variant = asked.or_else(|| Variant::from_file_name(&path));
                let sam = load_sam(&path, variant, &self.device)
                    .with_context(|| format!("loading SAM from {}", path.display()))?;
                let cfg = sam.config();
                let variant = match (cfg.variant(), cfg.rules) {
                    (Some(v), _) => v.name().to_string(),
                    (None, crate::models::sam::InputRules::Sam) => "custom".to_string(),
                    // a custom size (the test fixtures) run by MedSAM's or LiteMedSAM's rules
                    (None, rules) => format!("custom ({rules:?} rules)"),
                };
                self.sam = Some((path.clone(), SamPredictor::new(sam)));
                self.cache = None;
                out.send(Event::SamLoaded { path, variant });
            }
            ModelCommand::LoadUnet(path) => self.load_unet(path, out)?,
            ModelCommand::SetProject { root, model } => {
                // the previous project's model, fine-tuned or not, and its embeddings go
                self.project = Some(root);
                self.unet = None;
                self.cache = None;
                if let Some(m) = model {
                    self.load_unet(m, out)?;
                }
            }
            ModelCommand::Embed {
                project,
                image,
                path,
            } => {
                self.embedding(&project, &path)?;
                out.send(Event::Embedded { image });
            }
            ModelCommand::Sam {
                project,
                image,
                path,
                prompt,
                seq,
            } => {
                let emb = self.embedding(&project, &path)?;
                let (_, sam) = self.sam.as_ref().context("no SAM checkpoint is loaded")?;
                let p = Prompt {
                    points: prompt
                        .points_in_image
                        .iter()
                        .map(|&(x, y, pos)| (x, y, u8::from(pos)))
                        .collect(),
                    bbox: prompt.box_in_image,
                    mask_input: match &prompt.mask_input {
                        Some(v) => Some(candle_core::Tensor::from_slice(
                            v.as_slice(),
                            (1, LOW_RES_SIZE, LOW_RES_SIZE),
                            &self.device,
                        )?),
                        None => None,
                    },
                };
                let pred = sam.predict(&emb, &p, false)?;
                let (h, w) = emb.original_size;
                let best = pred.best();
                let data: Vec<u8> = pred.masks.get(best)?.flatten_all()?.to_vec1()?;
                let low_res: Vec<f32> = pred
                    .low_res_logits
                    .get(best)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                out.send(Event::SamMask {
                    image,
                    seq,
                    mask: Mask {
                        width: w,
                        height: h,
                        data,
                    },
                    iou: pred.iou_predictions[best],
                    low_res: std::sync::Arc::new(low_res),
                });
            }
            ModelCommand::Probability { image, path } => {
                let (_, unet) = self.unet.as_ref().context("no U-Net++ is loaded")?;
                let img = data::load_image(&path)?;
                let prob = unet
                    .predict(&[&img])?
                    .pop()
                    .context("one probability map")?;
                out.send(Event::Probability {
                    image,
                    probs: prob.to_u8(),
                    uncertainty: crate::metrics::mean_binary_entropy(&prob.data),
                });
            }
            job => return Err(anyhow!("{} is a job", describe(&job))),
        }
        Ok(())
    }

    fn load_unet(&mut self, path: PathBuf, out: &Outbox) -> Result<()> {
        let p = Predictor::load(&path, &self.device, InferenceMode::Accurate)
            .with_context(|| format!("loading U-Net++ from {}", path.display()))?;
        let (size, dice) = (p.size(), p.meta.best_dice);
        self.unet = Some((path.clone(), p));
        out.send(Event::UnetLoaded {
            project: self.project.clone(),
            path,
            size,
            dice,
        });
        Ok(())
    }

    /// The loaded SAM and the embedding cache of the project at `project`.
    fn sam_and_cache(&mut self, project: &Path) -> Result<(&SamPredictor, &EmbeddingCache)> {
        let (sam_path, _) = self.sam.as_ref().context("no SAM checkpoint is loaded")?;
        // `Project::cache_dir` of the project at `project` (the same folder `mine` uses)
        let dir = project.join("cache").join("sam-embeddings");
        if self.cache.as_ref().map(|(d, _)| d) != Some(&dir) {
            // hashed once per checkpoint file (path, size, modification time), as `mine` does
            let hashes = hash_cache_in(&project.join("cache"));
            let sha256 = cached_sha256(sam_path, Some(&hashes))?;
            let rules = self.sam.as_ref().map(|(_, p)| p.sam.config().rules);
            let id = embedding_identity(&sha256, rules.unwrap_or_default());
            let cache = EmbeddingCache::with_checkpoint_hash(Some(&dir), 8, &id)?;
            self.cache = Some((dir.clone(), cache));
        }
        let (_, sam) = self.sam.as_ref().context("no SAM checkpoint is loaded")?;
        let (_, cache) = self.cache.as_ref().context("no embedding cache")?;
        Ok((sam, cache))
    }

    /// The embedding of an image file: from the project's cache, else encoded now.
    fn embedding(&mut self, project: &Path, image: &Path) -> Result<Embedding> {
        let (sam, cache) = self.sam_and_cache(project)?;
        Ok(cache.get_or_compute(image, sam)?)
    }
}
