//! Mining from the app: the settings dialog (the CLI's `medmine mine` options, with its
//! defaults), the request to the model thread, and the counts of the last pass.
use super::app::{App, Intent};
use super::worker::{ModelCommand, StoreCommand};
use crate::mining::{LabelerKind, MiningConfig, MiningSummary, Remine};
use crate::prompts::Strategy;

/// The mining settings (defaults: `medmine mine`'s) and the last pass's counts.
#[derive(Clone, Debug, PartialEq)]
pub struct MiningSettings {
    pub dialog_open: bool,
    /// SAM or self-training (the U-Net++'s own prediction; needs no SAM checkpoint).
    pub labeler: LabelerKind,
    pub strategy: Strategy,
    /// SAM rounds per image (1: no refinement).
    pub rounds: usize,
    /// Accept the images mined now whose quality is at least this.
    pub auto_accept: Option<f64>,
    pub remine: Remine,
    /// The counts of the last pass of this project.
    pub last: Option<MiningSummary>,
}

impl Default for MiningSettings {
    fn default() -> Self {
        let cfg = MiningConfig::default();
        Self {
            dialog_open: false,
            labeler: LabelerKind::default(),
            strategy: cfg.prompt.strategy,
            rounds: cfg.rounds,
            auto_accept: cfg.auto_accept,
            remine: cfg.remine,
            last: None,
        }
    }
}

impl MiningSettings {
    /// The pass these settings describe (everything else as the CLI's defaults).
    pub fn config(&self) -> MiningConfig {
        let mut cfg = MiningConfig::default();
        cfg.prompt.strategy = self.strategy;
        cfg.rounds = self.rounds.max(1);
        cfg.auto_accept = self.auto_accept;
        cfg.remine = self.remine;
        cfg
    }
}

impl App {
    /// The mining settings (public for tests and scripted use).
    pub fn mining(&self) -> &MiningSettings {
        &self.mining
    }

    pub fn mining_mut(&mut self) -> &mut MiningSettings {
        &mut self.mining
    }

    /// The newest pseudo-label of the image on the canvas (as last loaded from the store).
    pub fn pseudo_label(&self) -> Option<&crate::data::Mask> {
        self.current.as_ref().and_then(|c| c.image.pseudo.as_ref())
    }

    /// Sends one mining pass with the current settings to the model thread.
    pub(super) fn mine(&mut self, ctx: &egui::Context) {
        let (Some(project), Some(unet)) = (self.project.clone(), self.model.clone()) else {
            self.toast(
                ctx,
                "mining needs a U-Net++ model: train one (Train a first model…) or load one",
                true,
            );
            return;
        };
        let sam = self.sam.as_ref().map(|(p, _)| p.clone());
        let labeler = self.mining_labeler();
        if labeler == LabelerKind::Sam && sam.is_none() {
            self.toast(
                ctx,
                "the SAM labeler needs a SAM checkpoint: load one, or mine with self-training \
                 (Mine… > labeler)",
                true,
            );
            return;
        }
        self.mining.last = None;
        self.send_model(ModelCommand::Mine {
            project,
            labeler,
            sam,
            unet,
            cfg: Box::new(self.mining.config()),
        });
    }

    /// A pass ended: keep its counts, refresh the list and reload the image on the canvas.
    pub(super) fn mined(&mut self, project: &std::path::Path, summary: MiningSummary) {
        if self.project.as_deref() != Some(project) {
            return;
        }
        self.mining.last = Some(summary);
        self.send_store(StoreCommand::Refresh);
        if let Some(name) = self.selected.clone() {
            self.send_store(StoreCommand::Load(name));
        }
    }

    /// The counts of the last pass (model panel).
    pub(super) fn mining_summary_ui(&self, ui: &mut egui::Ui) {
        let Some(s) = &self.mining.last else {
            return;
        };
        ui.label(if s.cancelled {
            "Last mining pass (cancelled):"
        } else {
            "Last mining pass:"
        });
        egui::Grid::new("mining-summary")
            .num_columns(2)
            .show(ui, |ui| {
                for (k, v, tip) in [
                    (
                        "mined",
                        s.mined.len(),
                        "Got a new pseudo-label, pending review",
                    ),
                    (
                        "unchanged",
                        s.unchanged.len(),
                        "Pending or rejected, already mined by these models",
                    ),
                    ("kept", s.kept.len(), "Accepted or edited: never re-mined"),
                    (
                        "skipped: reviewed meanwhile",
                        s.skipped_reviewed.len(),
                        "You reviewed them while the pass ran: your decision stands",
                    ),
                    (
                        "no component",
                        s.no_component.len(),
                        "The U-Net++ found nothing large enough to label",
                    ),
                    ("failed", s.failed.len(), "Could not be mined (see the log)"),
                    (
                        "auto-accepted",
                        s.auto_accepted.len(),
                        "Quality at least the auto-accept threshold",
                    ),
                ] {
                    ui.label(k).on_hover_text(tip);
                    ui.label(v.to_string());
                    ui.end_row();
                }
            });
    }

    /// The mining settings dialog.
    /// The labeler a pass uses: the chosen one, except SAM without a SAM checkpoint, which is
    /// self-training (as the Mining dialog shows it), for the dialog and "Mine next round" alike.
    pub(super) fn mining_labeler(&self) -> LabelerKind {
        match self.mining.labeler {
            LabelerKind::Sam if self.sam.is_none() => LabelerKind::Unet,
            l => l,
        }
    }

    pub(super) fn mining_window_ui(&mut self, ctx: &egui::Context) {
        if !self.mining.dialog_open {
            return;
        }
        let sam_loaded = self.sam.is_some();
        self.mining.labeler = self.mining_labeler();
        let mut open = true;
        let mut start = false;
        let can_start = self.model.is_some();
        egui::Window::new("Mining")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .show(ctx, |ui| {
                let m = &mut self.mining;
                egui::Grid::new("mining-settings").show(ui, |ui| {
                    ui.label("Labeler");
                    ui.horizontal(|ui| {
                        ui.add_enabled_ui(sam_loaded, |ui| {
                            ui.radio_value(&mut m.labeler, LabelerKind::Sam, "SAM")
                                .on_hover_text("SAM prompted with the U-Net++'s components")
                                .on_disabled_hover_text("Load a SAM checkpoint first");
                        });
                        ui.radio_value(&mut m.labeler, LabelerKind::Unet, "self-training")
                            .on_hover_text("The U-Net++'s own prediction; needs no SAM");
                    });
                    ui.end_row();
                    let sam = m.labeler == LabelerKind::Sam;
                    ui.label("Prompt strategy");
                    ui.add_enabled_ui(sam, |ui| {
                        egui::ComboBox::from_id_salt("mining-strategy")
                            .selected_text(m.strategy.to_string())
                            .show_ui(ui, |ui| {
                                for s in Strategy::ALL {
                                    ui.selectable_value(&mut m.strategy, s, s.to_string());
                                }
                            });
                    });
                    ui.end_row();
                    ui.label("Refinement rounds")
                        .on_hover_text("SAM rounds per image (1: no refinement)");
                    ui.add_enabled(sam, egui::DragValue::new(&mut m.rounds).range(1..=10));
                    ui.end_row();
                    ui.label("Auto-accept");
                    ui.horizontal(|ui| {
                        let mut on = m.auto_accept.is_some();
                        ui.checkbox(&mut on, "quality at least")
                            .on_hover_text("Accept the images mined now that score this well");
                        let mut v = m.auto_accept.unwrap_or(0.9);
                        ui.add_enabled(
                            on,
                            egui::DragValue::new(&mut v).range(0.0..=1.0).speed(0.01),
                        );
                        m.auto_accept = on.then_some(v);
                    });
                    ui.end_row();
                    ui.label("Re-mine").on_hover_text(
                        "Which pending or rejected images are mined again (accepted and edited \
                         ones never are)",
                    );
                    ui.horizontal(|ui| {
                        for (r, tip) in [
                            (Remine::Changed, "those made by another model"),
                            (Remine::All, "all of them"),
                            (Remine::None, "none: only images without a pseudo-label"),
                        ] {
                            ui.radio_value(&mut m.remine, r, r.to_string())
                                .on_hover_text(tip);
                        }
                    });
                    ui.end_row();
                });
                start = ui
                    .add_enabled(can_start, egui::Button::new("Start mining"))
                    .on_disabled_hover_text("Needs a U-Net++ model")
                    .clicked();
            });
        if start {
            self.intents.push(Intent::Mine);
            open = false;
        }
        self.mining.dialog_open = open;
    }
}
