//! Events from the worker threads, applied to the app state at the start of a frame.
use super::app::{App, Current};
use super::overlay::{CanvasData, LAYER_GT, LAYER_PROB, LAYER_PSEUDO};
use super::worker::{Event, JobOutcome, ModelCommand, StoreCommand};
use crate::store::ReviewState;

impl App {
    pub(super) fn handle_events(&mut self, ctx: &egui::Context) {
        while let Ok(e) = self.workers.events.try_recv() {
            self.handle_event(ctx, e);
        }
    }

    pub(super) fn handle_event(&mut self, ctx: &egui::Context, e: Event) {
        match e {
            Event::Opened { root, rows, model } => {
                // too late to save a dragged window: the store has the new project now
                self.wl.unsaved_since = None;
                self.prefs.recent.retain(|p| p != &root);
                self.prefs.recent.insert(0, root.clone());
                self.prefs.recent.truncate(8);
                self.project = Some(root);
                self.rows = rows;
                self.thumbs.clear();
                self.thumbs_requested.clear();
                self.current = None;
                self.selected = None;
                // models and results belong to the project: the new one's own, or none
                self.model = None;
                self.model_dice = None;
                self.training.result = None;
                self.mining.last = None;
                let root = self.project.clone().unwrap_or_default();
                // the demo's first open: nothing to review yet, so make the first round here
                let first_run = self.demo_root.as_ref() == Some(&root)
                    && model.is_none()
                    && !self.rows.iter().any(|r| r.pseudo_label);
                self.send_model(ModelCommand::SetProject {
                    root: root.clone(),
                    model,
                });
                if first_run {
                    self.first_steps = true;
                    self.send_model(ModelCommand::Job(super::first_run::first_run_job(
                        root,
                        self.device.clone(),
                    )));
                }
                self.next_pending();
                if self.selected.is_none() {
                    self.step(0);
                }
            }
            Event::Listing(rows) => self.rows = rows,
            Event::Scored {
                image,
                model,
                dice,
                uncertainty,
            } => {
                if self.model.as_ref() == Some(&model) {
                    if let Some(r) = self.rows.iter_mut().find(|r| r.name == image) {
                        r.unet_dice = dice;
                        r.uncertainty = Some(uncertainty);
                    }
                }
            }
            Event::Loaded(img) => {
                if self.selected.as_deref() != Some(&img.name) {
                    return; // the user moved on
                }
                let mut data = CanvasData {
                    width: img.width as u32,
                    height: img.height as u32,
                    rgba: std::sync::Arc::new(img.rgba.clone()),
                    layers: Default::default(),
                    versions: [0; 5],
                };
                data.versions[0] = super::overlay::next_version();
                let mut cur = Current {
                    image: *img,
                    data,
                    draft: None,
                    probs: None,
                    sam_iou: None,
                };
                let gt = cur.image.ground_truth.clone();
                let pseudo = cur.image.pseudo.clone();
                Self::set_layer(&mut cur, LAYER_GT, gt.as_ref());
                Self::set_layer(&mut cur, LAYER_PSEUDO, pseudo.as_ref());
                Self::set_layer(&mut cur, LAYER_PROB, None);
                cur.draft = cur.image.edit.clone();
                Self::refresh_draft_layer(&mut cur);
                if self.model.is_some() {
                    self.send_model(ModelCommand::Probability {
                        image: cur.image.name.clone(),
                        path: cur.image.path.clone(),
                    });
                }
                if let (Some(p), true) = (&self.project, self.sam.is_some()) {
                    self.send_model(ModelCommand::Embed {
                        project: p.clone(),
                        image: cur.image.name.clone(),
                        path: cur.image.path.clone(),
                    });
                }
                self.view.fitted = true;
                // the same image again (after a job): it keeps the window on screen
                let same = self.current.as_ref().map(|c| &c.image.name) == Some(&cur.image.name);
                self.flush_window();
                self.current = Some(cur);
                if !same {
                    self.window_for_loaded();
                }
            }
            Event::Reviewed { image, state } => {
                self.saving = self.saving.saturating_sub(1);
                self.set_badge(&image, state);
            }
            Event::MaskSaved { image, state, edit } => {
                self.saving = self.saving.saturating_sub(1);
                self.set_badge(&image, state);
                if let Some(cur) = self.current.as_mut().filter(|c| c.image.name == image) {
                    cur.image.edit = edit.clone();
                    cur.draft = edit;
                    Self::refresh_draft_layer(cur);
                }
            }
            Event::Nothing(msg) => {
                self.saving = self.saving.saturating_sub(1);
                self.toast(ctx, msg, false);
            }
            Event::Thumbnail { image, size, rgba } => {
                let tex = ctx.load_texture(
                    format!("thumb-{image}"),
                    egui::ColorImage::from_rgba_unmultiplied(size, &rgba),
                    egui::TextureOptions::LINEAR,
                );
                self.thumbs.insert(image, tex);
            }
            Event::SamLoaded { path, variant } => {
                self.toast(ctx, format!("SAM {variant} loaded"), false);
                self.prefs.sam_checkpoint = Some(path.clone());
                self.sam = Some((path, variant));
            }
            Event::UnetLoaded {
                project,
                path,
                dice,
                ..
            } => {
                if project != self.project {
                    return; // loaded for the project open before
                }
                self.model = Some(path.clone());
                self.model_dice = dice;
                // the list's U-Net++ Dice and uncertainty are this model's
                self.send_store(StoreCommand::SetModel(Some(path)));
                if let Some(cur) = &self.current {
                    self.send_model(ModelCommand::Probability {
                        image: cur.image.name.clone(),
                        path: cur.image.path.clone(),
                    });
                }
            }
            Event::Embedded { .. } => {}
            Event::SamMask {
                image,
                seq,
                mask,
                iou,
                low_res,
            } => {
                if seq != self.sam_seq {
                    return; // an older click's answer
                }
                self.sam_pending = false;
                let (Some(cur), Some(obj)) = (
                    self.current.as_mut().filter(|c| c.image.name == image),
                    self.sam_object.as_mut(),
                ) else {
                    return;
                };
                // the answer edits the object's base (add or remove), never the whole draft
                let mask = obj.apply(&mask);
                obj.low_res = Some(low_res);
                cur.sam_iou = Some(iou);
                cur.draft = Some(mask.clone());
                Self::refresh_draft_layer(cur);
                self.send_store(StoreCommand::SaveEdit { image, mask });
            }
            Event::Probability {
                image,
                probs,
                uncertainty,
            } => {
                // the list's Dice and uncertainty of this image, for the model it shows (not
                // for an image of the project open before)
                let listed = self.rows.iter().any(|r| r.name == image);
                if let Some(model) = self.model.clone().filter(|_| listed) {
                    let prediction = probs.iter().map(|&v| u8::from(v >= 128)).collect();
                    self.send_store(StoreCommand::SaveScore {
                        image: image.clone(),
                        model,
                        prediction,
                        uncertainty,
                    });
                }
                if let Some(cur) = self.current.as_mut().filter(|c| c.image.name == image) {
                    cur.data.layers[LAYER_PROB] = Some(std::sync::Arc::new(probs.clone()));
                    cur.data.versions[LAYER_PROB + 1] = super::overlay::next_version();
                    cur.probs = Some(probs);
                }
            }
            Event::JobStarted { what } => self.training.started(&what),
            Event::JobProgress { done, total } => self.training.progress(done, total),
            Event::Train(ev) => self.training.train_event(&ev),
            Event::FinetuneDone(r) => {
                if self.project.as_ref() == Some(&r.project) {
                    // the project's first model is the model: nothing to choose between
                    if self.model.is_none() && r.status != crate::train::TrainStatus::Cancelled {
                        self.send_model(ModelCommand::LoadUnet(r.best.clone()));
                    }
                    self.training.finished(r);
                }
            }
            Event::Mined { project, summary } => self.mined(&project, *summary),
            Event::ModelThreadRestarted => {
                // the thread lost its models: load them again
                self.training.job = None;
                if let Some(root) = self.project.clone() {
                    let model = self.model.take();
                    self.send_model(ModelCommand::SetProject { root, model });
                }
                if let Some((sam, _)) = self.sam.take() {
                    let v = self.asked_sam_variant();
                    self.send_model(ModelCommand::LoadSam(sam, v));
                }
            }
            Event::JobDone {
                what,
                outcome,
                message,
            } => {
                let failed = outcome == JobOutcome::Failed;
                self.training.done(&message);
                self.toast(ctx, format!("{what}: {message}"), failed);
                if what == super::first_run::FIRST_RUN && outcome == JobOutcome::Done {
                    // reopen: the list gets the pseudo-labels, the model thread the new model
                    if let Some(root) = self.project.clone() {
                        self.send_store(StoreCommand::Open(root));
                    }
                } else {
                    self.send_store(StoreCommand::Refresh);
                }
            }
            Event::Error { context, message } => {
                self.sam_pending = false;
                if context.starts_with("Review")
                    || context.starts_with("SaveEdit")
                    || context.starts_with("Undo")
                    || context.starts_with("Redo")
                    || context.starts_with("ResetToProposal")
                {
                    self.saving = self.saving.saturating_sub(1);
                }
                self.toast(ctx, format!("{message} ({context})"), true);
            }
            Event::Picked { purpose, path } => self.picked(purpose, path),
        }
    }

    pub(super) fn set_badge(&mut self, image: &str, state: ReviewState) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.name == image) {
            r.state = state;
        }
        if let Some(cur) = self.current.as_mut().filter(|c| c.image.name == image) {
            cur.image.state = state;
        }
    }
}
