//! Fine-tuning from a button: the settings dialog, live plots of the training loss and the
//! validation Dice (egui_plot), ETA and cancel, and the result beside the previous model.
use std::path::PathBuf;
use std::time::Instant;

use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::app::{App, Intent};
use super::worker::{FinetuneJob, FinetuneResult};
use crate::mining::finetune::FinetuneConfig;
use crate::progress::TrainEvent;
use crate::train::TrainStatus;

/// The training button's label while a model is loaded.
pub const FINETUNE: &str = "Start fine-tuning…";
/// The training button's label while there is no model yet.
pub const TRAIN_FIRST: &str = "Train a first model…";

/// The training panel's state: settings, the running job, its curves and the last result.
pub struct Training {
    pub dialog_open: bool,
    pub epochs: usize,
    /// Fine-tuning an existing model.
    pub lr: f64,
    /// Training a first model from scratch: a larger step (what `medmine train` uses).
    pub lr_first: f64,
    pub pseudo_weight: f32,
    /// For a first model (no checkpoint yet).
    pub size: usize,
    pub base: usize,
    /// The running job's name.
    pub job: Option<String>,
    pub started_at: Option<Instant>,
    pub done: usize,
    pub total: usize,
    /// (global step, loss)
    pub loss: Vec<[f64; 2]>,
    /// (epoch, validation Dice)
    pub val_dice: Vec<[f64; 2]>,
    pub steps_per_epoch: usize,
    pub epochs_total: usize,
    pub result: Option<FinetuneResult>,
    /// The result arrived and is not yet scrolled into view.
    pub result_unseen: bool,
    pub last_message: Option<String>,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            dialog_open: false,
            epochs: 10,
            lr: 1e-4,
            lr_first: 3e-3,
            pseudo_weight: 0.5,
            size: 64,
            base: 8,
            job: None,
            started_at: None,
            done: 0,
            total: 0,
            loss: Vec::new(),
            val_dice: Vec::new(),
            steps_per_epoch: 0,
            epochs_total: 0,
            result: None,
            result_unseen: false,
            last_message: None,
        }
    }
}

impl Training {
    pub fn running(&self) -> bool {
        self.job.is_some()
    }

    pub fn job(&mut self, project: PathBuf, checkpoint: Option<PathBuf>) -> FinetuneJob {
        let first = checkpoint.is_none();
        FinetuneJob {
            project,
            checkpoint,
            size: self.size,
            base: self.base,
            cfg: FinetuneConfig {
                epochs: self.epochs,
                // the rate the dialog showed for this case
                lr: if first { self.lr_first } else { self.lr },
                pseudo_weight: self.pseudo_weight,
                batch: 6,
                ..FinetuneConfig::default()
            },
        }
    }

    pub fn started(&mut self, what: &str) {
        self.job = Some(what.into());
        self.started_at = Some(Instant::now());
        self.done = 0;
        self.total = 0;
        self.loss.clear();
        self.val_dice.clear();
        self.result = None;
        self.last_message = None;
    }

    pub fn progress(&mut self, done: usize, total: usize) {
        self.done = done;
        self.total = total;
    }

    pub fn train_event(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Started {
                epochs,
                steps_per_epoch,
                first_epoch,
            } => {
                self.epochs_total = *epochs;
                self.steps_per_epoch = *steps_per_epoch;
                self.total = epochs * steps_per_epoch;
                self.done = first_epoch * steps_per_epoch;
            }
            TrainEvent::Step {
                epoch,
                step,
                steps_per_epoch,
                loss,
                ..
            } => {
                let global = epoch * steps_per_epoch + step + 1;
                self.done = global;
                self.loss.push([global as f64, *loss]);
            }
            TrainEvent::Epoch(r) => {
                if let Some(d) = r.val_dice {
                    self.val_dice.push([(r.epoch + 1) as f64, d]);
                }
            }
            TrainEvent::Message(m) => self.last_message = Some(m.clone()),
        }
    }

    pub fn finished(&mut self, r: FinetuneResult) {
        self.result = Some(r);
        self.result_unseen = true;
    }

    pub fn done(&mut self, message: &str) {
        self.job = None;
        self.last_message = Some(message.into());
    }

    /// Seconds left, from the steps done so far.
    pub fn eta(&self) -> Option<f64> {
        let t = self.started_at?.elapsed().as_secs_f64();
        (self.done > 0 && self.total > self.done)
            .then(|| t / self.done as f64 * (self.total - self.done) as f64)
    }
}

impl App {
    /// The model and training section of the inspector.
    pub(super) fn training_panel_ui(&mut self, ui: &mut egui::Ui) {
        let running = self.training.running();
        let can_train = self.project.is_some()
            && self.rows.iter().any(|r| {
                r.state.is_accepted() || (r.role == crate::store::Role::Labelled && r.ground_truth)
            });
        ui.horizontal(|ui| {
            // without a model there is nothing to fine-tune: say what the button does
            let (label, hover) = if self.model.is_none() {
                (
                    TRAIN_FIRST,
                    "Train a U-Net++ from scratch on the labelled images (and any accepted \
                     pseudo-labels)",
                )
            } else {
                (
                    FINETUNE,
                    "Fine-tune the U-Net++ on labelled images + accepted pseudo-labels",
                )
            };
            let b = ui
                .add_enabled(can_train && !running, egui::Button::new(label))
                .on_hover_text(hover);
            if b.clicked() {
                self.training.dialog_open = true;
            }
            if running
                && ui
                    .button("Cancel")
                    .on_hover_text("Stop after this batch")
                    .clicked()
            {
                self.intents.push(Intent::CancelJob);
            }
        });
        self.training_result_ui(ui);
        let t = &self.training;
        if let Some(job) = &t.job {
            let frac = if t.total > 0 {
                t.done as f32 / t.total as f32
            } else {
                0.0
            };
            let eta = t.eta().map_or(String::new(), |s| format!(", ETA {s:.0} s"));
            ui.add(
                egui::ProgressBar::new(frac).text(format!("{job}: {}/{}{eta}", t.done, t.total)),
            );
        }
        if !t.loss.is_empty() || !t.val_dice.is_empty() {
            Plot::new("training-plot")
                .height(140.0)
                .legend(Legend::default())
                .show(ui, |plot| {
                    if !t.loss.is_empty() {
                        let per_epoch = t.steps_per_epoch.max(1) as f64;
                        let pts: PlotPoints =
                            t.loss.iter().map(|[s, l]| [s / per_epoch, *l]).collect();
                        plot.line(Line::new("training loss", pts));
                    }
                    if !t.val_dice.is_empty() {
                        let pts: PlotPoints = t.val_dice.iter().copied().collect();
                        plot.line(Line::new("validation Dice", pts));
                    }
                });
        }
    }

    /// The last fine-tuning's result and what to do with its model: right under the start
    /// button, where the eye is when the run ends (the plot comes after it).
    fn training_result_ui(&mut self, ui: &mut egui::Ui) {
        if let Some(r) = self.training.result.clone() {
            let fmt = |d: Option<f64>| d.map_or("n/a".into(), |d| format!("{d:.4}"));
            let status = match r.status {
                TrainStatus::Finished => "finished",
                TrainStatus::EarlyStopped => "stopped early",
                TrainStatus::Cancelled => "cancelled",
            };
            ui.label(format!(
                "{status} after {} epochs: validation Dice {} (previous model {})",
                r.epochs_done,
                fmt(r.new_dice),
                fmt(r.old_dice)
            ));
            ui.horizontal(|ui| {
                if ui
                    .button("Use this model")
                    .on_hover_text("Predictions and mining use the new checkpoint")
                    .clicked()
                {
                    self.intents.push(Intent::LoadUnet(r.best.clone()));
                }
                let can_mine = self.mining_labeler() != crate::mining::LabelerKind::Sam;
                if ui
                    .add_enabled(
                        can_mine,
                        egui::Button::new("Mine next round with this model"),
                    )
                    .on_hover_text(
                        "Load the new model, then mine the unlabelled images with it (pending \
                         and rejected ones again; the labeler of the Mining dialog)",
                    )
                    .on_disabled_hover_text(
                        "Load a SAM checkpoint first, or choose self-training in Mine…",
                    )
                    .clicked()
                {
                    self.model = Some(r.best.clone());
                    self.intents.push(Intent::LoadUnet(r.best.clone()));
                    self.intents.push(Intent::Mine);
                }
            });
            // the run ended: bring the choice into view (the inspector is taller than a laptop)
            if std::mem::take(&mut self.training.result_unseen) {
                ui.scroll_to_cursor(Some(egui::Align::BOTTOM));
            }
        }
    }

    /// What fine-tuning would train and validate on, as the list shows the images:
    /// (labelled with ground truth, accepted or edited pseudo-labels, validation with ground
    /// truth), the same rule as [`crate::mining::finetune`].
    fn training_set(&self) -> (usize, usize, usize) {
        use crate::store::Role;
        let (mut labelled, mut pseudo, mut val) = (0, 0, 0);
        for r in &self.rows {
            match r.role {
                Role::Val => val += usize::from(r.ground_truth),
                Role::Test => {}
                Role::Labelled if r.ground_truth => labelled += 1,
                Role::Labelled | Role::Unlabelled => pseudo += usize::from(r.state.is_accepted()),
            }
        }
        (labelled, pseudo, val)
    }

    /// The fine-tuning settings dialog.
    pub(super) fn training_window_ui(&mut self, ctx: &egui::Context) {
        if !self.training.dialog_open {
            return;
        }
        let mut open = true;
        let mut start = false;
        let first = self.model.is_none();
        let set = self.training_set();
        egui::Window::new(if first {
            "Train a first model"
        } else {
            "Fine-tuning"
        })
        .open(&mut open)
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            let t = &mut self.training;
            egui::Grid::new("finetune-settings").show(ui, |ui| {
                ui.label("Epochs");
                ui.add(egui::DragValue::new(&mut t.epochs).range(1..=500));
                ui.end_row();
                // a first model from scratch and a fine-tune want different steps: the
                // dialog shows and edits the one this run will use
                let (label, lr) = if first {
                    ("Learning rate (from scratch)", &mut t.lr_first)
                } else {
                    ("Learning rate", &mut t.lr)
                };
                ui.label(label);
                ui.add(egui::DragValue::new(lr).range(1e-6..=1e-1).speed(1e-5));
                ui.end_row();
                ui.label("Pseudo-label weight")
                    .on_hover_text("Loss weight of accepted pseudo-labels (ground truth = 1)");
                ui.add(egui::Slider::new(&mut t.pseudo_weight, 0.0..=1.0));
                ui.end_row();
                if first {
                    ui.label("Input size (first model)");
                    ui.add(egui::DragValue::new(&mut t.size).range(32..=1024).speed(16));
                    ui.end_row();
                    ui.label("Width (base channels)");
                    ui.add(egui::DragValue::new(&mut t.base).range(4..=64));
                    ui.end_row();
                }
            });
            t.size = (t.size / 16).max(2) * 16;
            let (labelled, pseudo, val) = set;
            ui.label(format!(
                "Trains on {labelled} labelled images + {pseudo} accepted pseudo-labels \
                     (weight {:.2}); validates on {val} images.",
                t.pseudo_weight
            ));
            if val == 0 {
                // what "the best epoch" then means, before the user starts the run
                ui.label(
                    "No validation images: the epoch with the lowest training loss is \
                         kept, and whether it beats the current model is not measured. \
                         Give the project a validation split to keep the best model.",
                );
            }
            if first {
                ui.label("No model yet: a U-Net++ is trained from scratch.");
            }
            start = ui.button("Start").clicked();
        });
        if start {
            self.intents.push(Intent::Finetune);
            open = false;
        }
        self.training.dialog_open = open;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_model_and_a_fine_tune_use_the_rate_the_dialog_shows_for_each() {
        let mut t = Training {
            lr: 2e-4,
            lr_first: 5e-3,
            ..Training::default()
        };
        let first = t.job("p".into(), None);
        assert_eq!(first.cfg.lr, 5e-3);
        let tune = t.job("p".into(), Some("m.safetensors".into()));
        assert_eq!(tune.cfg.lr, 2e-4);
        // the defaults: a larger step from scratch than for fine-tuning
        let d = Training::default();
        assert!(d.lr_first > 10. * d.lr);
    }
}
