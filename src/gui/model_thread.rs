//! The model thread: owns the device, SAM (with the project's embedding cache) and the
//! U-Net++, and runs clicks, predictions, encoding, mining and fine-tuning one command at a
//! time, reporting through [`Event`]s. Cancelling sets the shared flag that every long job
//! checks per batch or image.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use candle_core::Device;

use super::worker::{guarded, Event, FinetuneJob, FinetuneResult, ModelCommand, Outbox};
use crate::data::{self, Mask};
use crate::mining::finetune::finetune_project;
use crate::mining::labeler::hash::{cached_sha256, hash_cache_in};
use crate::mining::labeler::SamLabeler;
use crate::mining::mine_project;
use crate::models::sam::cache::EmbeddingCache;
use crate::models::sam::checkpoint::load_sam;
use crate::models::sam::predictor::{Embedding, Prompt, SamPredictor};
use crate::models::sam::LOW_RES_SIZE;
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::progress::{Progress, TrainEvent};
use crate::store::Project;
use crate::train::checkpoint;

pub(super) struct ModelThread {
    device: Device,
    out: Outbox,
    cancel: Arc<AtomicBool>,
    sam: Option<(PathBuf, SamPredictor)>,
    cache: Option<(PathBuf, EmbeddingCache)>,
    unet: Option<(PathBuf, Predictor)>,
}

/// Forwards training events to the UI.
struct ToUi<'a>(&'a Outbox);

impl Progress for ToUi<'_> {
    fn event(&mut self, event: &TrainEvent) {
        self.0.send(Event::Train(event.clone()));
    }
}

impl ModelThread {
    pub(super) fn new(device: Device, out: Outbox, cancel: Arc<AtomicBool>) -> Self {
        Self {
            device,
            out,
            cancel,
            sam: None,
            cache: None,
            unet: None,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<ModelCommand>) {
        while let Ok(cmd) = rx.recv() {
            // only the newest SAM prompt matters: skip stale ones queued behind a slow call
            let cmd = match cmd {
                ModelCommand::Sam { .. } => {
                    let mut newest = cmd;
                    while let Ok(next) = rx.try_recv() {
                        match next {
                            ModelCommand::Sam { .. } => newest = next,
                            other => {
                                self.handle(newest);
                                newest = other;
                            }
                        }
                    }
                    newest
                }
                other => other,
            };
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: ModelCommand) {
        let out = self.out.clone();
        let context = format!("{cmd:?}").chars().take(80).collect::<String>();
        guarded(&out, &context, || self.handle_inner(cmd));
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
            let cache = EmbeddingCache::with_checkpoint_hash(Some(&dir), 8, &sha256)?;
            self.cache = Some((dir.clone(), cache));
        }
        let (_, sam) = self.sam.as_ref().context("no SAM checkpoint is loaded")?;
        let (_, cache) = self.cache.as_ref().expect("cache just set");
        Ok((sam, cache))
    }

    /// The embedding of an image file: from the project's cache, else encoded now.
    fn embedding(&mut self, project: &Path, image: &Path) -> Result<Embedding> {
        let (sam, cache) = self.sam_and_cache(project)?;
        Ok(cache.get_or_compute(image, sam)?)
    }

    fn handle_inner(&mut self, cmd: ModelCommand) -> Result<()> {
        match cmd {
            ModelCommand::LoadSam(path) => {
                let sam = load_sam(&path, None, &self.device)
                    .with_context(|| format!("loading SAM from {}", path.display()))?;
                let variant = sam.config().name().to_string();
                self.sam = Some((path.clone(), SamPredictor::new(sam)));
                self.cache = None;
                self.out.send(Event::SamLoaded { path, variant });
            }
            ModelCommand::LoadUnet(path) => {
                let p = Predictor::load(&path, &self.device, InferenceMode::Accurate)
                    .with_context(|| format!("loading U-Net++ from {}", path.display()))?;
                let (size, dice) = (p.size(), p.meta.best_dice);
                self.unet = Some((path.clone(), p));
                self.out.send(Event::UnetLoaded { path, size, dice });
            }
            ModelCommand::Embed {
                project,
                image,
                path,
            } => {
                self.embedding(&project, &path)?;
                self.out.send(Event::Embedded { image });
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
                self.out.send(Event::SamMask {
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
                self.out.send(Event::Probability {
                    image,
                    probs: prob.to_u8(),
                });
            }
            ModelCommand::Finetune(job) => self.finetune(job)?,
            ModelCommand::Precompute { project, paths } => {
                self.start_job("encoding");
                let out = self.out.clone();
                let cancel = self.cancel.clone();
                let (sam, cache) = self.sam_and_cache(&project)?;
                let r = cache.precompute(
                    &paths,
                    sam,
                    &mut |done, total| out.send(Event::JobProgress { done, total }),
                    &cancel,
                );
                let verb = if r.cancelled {
                    "cancelled after"
                } else {
                    "encoded"
                };
                self.out.send(Event::JobDone {
                    what: "SAM encoding".into(),
                    message: format!(
                        "{verb} {} images ({} already cached, {} failed)",
                        r.computed,
                        r.cached,
                        r.failed.len()
                    ),
                });
            }
            ModelCommand::Mine {
                project,
                sam,
                unet,
                cfg,
            } => {
                self.start_job("mining");
                let mut p = Project::open(&project)?;
                let out = self.out.clone();
                let cache = p.cache_dir();
                let labeler = SamLabeler::load(&sam, cfg.sam_variant, &self.device, Some(&cache));
                let mut labeler = match labeler {
                    Ok(l) => l,
                    Err(e) => return self.job_failed("mining", e.into()),
                };
                let summary = mine_project(
                    &mut p,
                    &unet,
                    &mut labeler,
                    &cfg,
                    &self.device,
                    &mut |done, total| out.send(Event::JobProgress { done, total }),
                    &self.cancel,
                );
                let summary = match summary {
                    Ok(s) => s,
                    Err(e) => return self.job_failed("mining", e.into()),
                };
                let verb = if summary.cancelled {
                    "cancelled after"
                } else {
                    "mined"
                };
                self.out.send(Event::JobDone {
                    what: "mining".into(),
                    message: format!(
                        "{verb} {} images ({} with no component, {} failed)",
                        summary.mined.len(),
                        summary.no_component.len(),
                        summary.failed.len()
                    ),
                });
            }
        }
        Ok(())
    }

    fn start_job(&self, what: &str) {
        self.cancel.store(false, Ordering::Relaxed);
        self.out.send(Event::JobStarted { what: what.into() });
    }

    fn job_failed(&self, what: &str, e: anyhow::Error) -> Result<()> {
        self.out.send(Event::JobDone {
            what: what.into(),
            message: format!("failed: {e:#}"),
        });
        Err(e)
    }

    fn finetune(&mut self, job: FinetuneJob) -> Result<()> {
        self.start_job("fine-tuning");
        let mut p = Project::open(&job.project)?;
        let (start, old_dice) = match &job.checkpoint {
            Some(c) => (
                c.clone(),
                checkpoint::load_meta(c).ok().and_then(|m| m.best_dice),
            ),
            None => {
                let dir = p.runs_dir().join("init");
                let path = checkpoint::fresh_checkpoint(
                    &dir,
                    job.base,
                    job.size,
                    job.cfg.seed,
                    &self.device,
                )?;
                (path, None)
            }
        };
        let outcome = finetune_project(
            &mut p,
            &start,
            &job.cfg,
            &self.device,
            &mut ToUi(&self.out),
            &self.cancel,
        );
        let o = match outcome {
            Ok(o) => o,
            Err(e) => return self.job_failed("fine-tuning", e.into()),
        };
        self.out.send(Event::FinetuneDone(FinetuneResult {
            best: o.best.clone(),
            status: o.status,
            new_dice: o.best_dice,
            old_dice,
            epochs_done: o.epochs_done,
        }));
        self.out.send(Event::JobDone {
            what: "fine-tuning".into(),
            message: format!("{} epochs, best {}", o.epochs_done, o.best.display()),
        });
        Ok(())
    }
}
