//! Side panels: the image list (left), the inspector with layers, tools, image facts and the
//! model panel (right), the status bar (bottom) and the shortcut sheet.
use egui::{Color32, RichText};

use super::app::{App, Compare, Intent};
use super::canvas::Tool;
use super::overlay::{LAYER_NAMES, LAYER_PROB};
use crate::metrics::Confusion;
use crate::store::{ReviewState, Role};

/// Badge colour and text of an image in the list.
pub fn badge(role: Role, state: ReviewState, has_pseudo: bool) -> (&'static str, Color32) {
    match state {
        ReviewState::Accepted => ("accepted", Color32::from_rgb(60, 170, 80)),
        ReviewState::Rejected => ("rejected", Color32::from_rgb(200, 70, 60)),
        ReviewState::Edited => ("edited", Color32::from_rgb(190, 90, 200)),
        ReviewState::Pending if role == Role::Labelled => {
            ("labelled", Color32::from_rgb(70, 130, 220))
        }
        ReviewState::Pending if has_pseudo => ("pending", Color32::from_rgb(220, 170, 40)),
        ReviewState::Pending => (role.as_str(), Color32::GRAY),
    }
}

/// A spinner with an accessible name (screen readers, and the accessibility check of the UI
/// tests, which an unnamed spinner fails whenever it happens to be on screen).
pub fn spinner_ui(ui: &mut egui::Ui, size: Option<f32>, name: &str) -> egui::Response {
    let size = size.unwrap_or(ui.style().spacing.interact_size.y);
    let (rect, response) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::ProgressIndicator, true, name));
    egui::Spinner::new().paint_at(ui, rect);
    response
}

pub const SHORTCUTS: &[(&str, &str)] = &[
    ("A / R", "accept / reject (saved before the badge changes)"),
    ("Right J / Left K", "next / previous image"),
    ("N", "next pending pseudo-label"),
    (
        "1 … 5",
        "toggle ground truth, probability, pseudo-label, edit, prompts",
    ),
    ("+ / -", "layer opacity"),
    ("B / E", "brush / eraser; [ and ] change the size"),
    ("H", "fill holes in the mask"),
    (
        "S",
        "SAM: click + adds the object SAM finds, right/Alt+click - first removes it; drag a box",
    ),
    (
        "Esc",
        "done with this object: the next SAM click starts a new one",
    ),
    ("V", "pan/zoom tool"),
    (
        "Ctrl+Z / Ctrl+Shift+Z",
        "undo / redo (kept across restarts)",
    ),
    ("wheel, space+drag", "zoom at the cursor, pan"),
    ("F / 0", "fit / 1:1"),
    (
        "right-drag",
        "window/level on grayscale images (every compare pane); kept for the image",
    ),
    ("?", "this sheet"),
];

impl App {
    pub(super) fn inspector_ui(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical().show(ui, |ui| {
            self.review_ui(ui);
            ui.separator();
            self.tools_ui(ui);
            ui.separator();
            self.layers_ui(ui);
            ui.separator();
            // the model and training before the image's facts: their buttons stay at one
            // height whatever the facts of the image on the canvas
            self.model_ui(ui);
            ui.separator();
            self.facts_ui(ui);
        });
    }

    fn review_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Review");
        let Some(cur) = &self.current else {
            ui.label("No image.");
            return;
        };
        let (text, color) = badge(cur.image.role, cur.image.state, cur.image.pseudo.is_some());
        ui.horizontal(|ui| {
            ui.label(&cur.image.name);
            ui.label(RichText::new(text).color(color).strong());
            if self.saving > 0 {
                spinner_ui(ui, None, "saving").on_hover_text("saving to the project store");
            }
        });
        ui.horizontal_wrapped(|ui| {
            let mut b = |ui: &mut egui::Ui, label: &str, tip: &str, intent: Intent| {
                if ui.button(label).on_hover_text(tip).clicked() {
                    self.intents.push(intent);
                }
            };
            b(
                ui,
                "Accept (A)",
                "Accept this pseudo-label (or your edit) for training",
                Intent::Review(ReviewState::Accepted),
            );
            b(
                ui,
                "Reject (R)",
                "Reject: it will not be used for training",
                Intent::Review(ReviewState::Rejected),
            );
            b(
                ui,
                "Next pending (N)",
                "Jump to the next image waiting for review",
                Intent::NextPending,
            );
            b(ui, "Undo", "Undo the last edit (Ctrl+Z)", Intent::Undo);
            b(ui, "Redo", "Redo (Ctrl+Shift+Z)", Intent::Redo);
            b(
                ui,
                "Reset to SAM proposal",
                "Drop your edits: the pseudo-label is current again",
                Intent::ResetToProposal,
            );
        });
    }

    fn tools_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Tools");
        ui.horizontal_wrapped(|ui| {
            for t in [Tool::Navigate, Tool::Brush, Tool::Eraser, Tool::Sam] {
                if ui
                    .selectable_label(self.tool == t, t.label())
                    .on_hover_text(t.tooltip())
                    .clicked()
                {
                    self.intents.push(Intent::SetTool(t));
                }
            }
        });
        ui.add(
            egui::Slider::new(&mut self.prefs.brush_radius, 1.0..=200.0).text("brush radius (px)"),
        )
        .on_hover_text("[ and ] change it too");
        ui.horizontal(|ui| {
            if ui
                .button("Fill holes (H)")
                .on_hover_text("Fill background enclosed by the mask")
                .clicked()
            {
                self.intents.push(Intent::FillHoles);
            }
            if ui
                .button("New object (Esc)")
                .on_hover_text(
                    "The next SAM click starts a new object; the mask keeps what SAM added",
                )
                .clicked()
            {
                self.intents.push(Intent::ClearClicks);
            }
            if self.sam_pending {
                spinner_ui(ui, None, "SAM is working");
                ui.label("SAM…").on_hover_text(
                    "SAM is answering the click (the first click on an image also encodes it)",
                );
            }
        });
        ui.horizontal(|ui| {
            ui.label("Compare")
                .on_hover_text("Radiologist inspection modes");
            for (m, label, tip) in [
                (Compare::Off, "off", "Normal overlay"),
                (
                    Compare::Swipe,
                    "swipe",
                    "Ground truth left, current mask right",
                ),
                (
                    Compare::SideBySide,
                    "side by side",
                    "Ground truth | probability | pseudo-label: they zoom, pan and window together",
                ),
                (
                    Compare::ErrorMap,
                    "error map",
                    "Ground truth against the pseudo-label or the U-Net++ prediction: false \
                     positives red, false negatives blue",
                ),
            ] {
                if ui
                    .selectable_label(self.compare == m, label)
                    .on_hover_text(tip)
                    .clicked()
                {
                    self.compare = m;
                }
            }
        });
    }

    fn layers_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Layers");
        for (i, name) in LAYER_NAMES.iter().enumerate() {
            let l = &mut self.prefs.layers[i];
            ui.horizontal(|ui| {
                ui.checkbox(&mut l.visible, format!("{} {name}", i + 1))
                    .on_hover_text(format!("Show or hide ({})", i + 1));
                if i != LAYER_PROB {
                    let mut c = Color32::from_rgb(l.color[0], l.color[1], l.color[2]);
                    if ui
                        .color_edit_button_srgba(&mut c)
                        .on_hover_text("Colour")
                        .changed()
                    {
                        l.color = [c.r(), c.g(), c.b()];
                    }
                    ui.checkbox(&mut l.outline, "outline")
                        .on_hover_text("Outline instead of fill");
                }
                ui.add(egui::Slider::new(&mut l.opacity, 0.05..=1.0).show_value(false))
                    .on_hover_text("Opacity (+/-)");
            });
        }
        ui.checkbox(
            &mut self.prefs.prompts_visible,
            "5 Prompts (boxes, points by round)",
        )
        .on_hover_text("Show the SAM prompts of every mining round (5)");
    }

    fn facts_ui(&self, ui: &mut egui::Ui) {
        ui.heading("Image");
        let Some(cur) = &self.current else {
            return;
        };
        let img = &cur.image;
        egui::Grid::new("facts").num_columns(2).show(ui, |ui| {
            ui.label("size");
            ui.label(format!("{} × {}", img.width, img.height));
            ui.end_row();
            ui.label("role");
            ui.label(img.role.as_str());
            ui.end_row();
            if let Some(p) = img.rounds.last() {
                let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
                for (k, v) in [
                    ("SAM IoU", p.sam_iou),
                    ("stability", p.stability),
                    ("agreement", p.agreement),
                    ("quality", p.quality()),
                ] {
                    ui.label(k);
                    ui.label(f(v));
                    ui.end_row();
                }
                if let Some(c) = p.component_change() {
                    ui.label("components (SAM - U-Net++)");
                    ui.label(format!("{c:+}"));
                    ui.end_row();
                }
                ui.label("rounds");
                ui.label(img.rounds.len().to_string());
                ui.end_row();
            }
            if let Some(iou) = cur.sam_iou {
                ui.label("SAM click IoU");
                ui.label(format!("{iou:.3}"));
                ui.end_row();
            }
            if let Some(gt) = &img.ground_truth {
                let current = cur.draft.as_ref().or(img.pseudo.as_ref());
                if let Some(m) = current {
                    let c = Confusion::from_masks(&m.data, &gt.data).scores();
                    ui.label("Dice / IoU vs GT");
                    ui.label(format!("{:.3} / {:.3}", c.dice, c.iou));
                    ui.end_row();
                }
                if let Some(p) = &cur.probs {
                    let pred: Vec<u8> = p.iter().map(|&v| u8::from(v >= 128)).collect();
                    let c = Confusion::from_masks(&pred, &gt.data).scores();
                    ui.label("U-Net++ Dice / IoU");
                    ui.label(format!("{:.3} / {:.3}", c.dice, c.iou));
                    ui.end_row();
                }
            }
        });
    }

    fn model_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Model");
        let name = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        ui.label(match &self.model {
            Some(m) => format!(
                "U-Net++: {} (val Dice {})",
                m.parent().map(name).unwrap_or_default() + "/" + &name(m),
                self.model_dice.map_or("n/a".into(), |d| format!("{d:.3}"))
            ),
            None => "U-Net++: none yet".into(),
        });
        ui.label(match &self.sam {
            Some((p, v)) => format!("SAM: {v} ({})", name(p)),
            None => "SAM: not loaded (download one with SAM weights…)".into(),
        });
        self.sam_kind_ui(ui);
        ui.horizontal_wrapped(|ui| {
            if ui
                .button("Load U-Net++…")
                .on_hover_text("A medmine .safetensors checkpoint")
                .clicked()
            {
                self.intents.push(Intent::PickUnet);
            }
            if ui
                .button("Load SAM…")
                .on_hover_text("An official SAM or MobileSAM checkpoint (.pth / .safetensors)")
                .clicked()
            {
                self.intents.push(Intent::PickSam);
            }
            if ui
                .button("SAM weights…")
                .on_hover_text(
                    "Download the official SAM checkpoints (with resume and SHA-256 check) and choose the active one",
                )
                .clicked()
            {
                self.dialogs.weights.show = true;
            }
            if ui
                .add_enabled(
                    self.sam.is_some() && !self.training.running(),
                    egui::Button::new("Encode all with SAM"),
                )
                .on_hover_text("Compute every image's SAM embedding now, so clicks answer at once")
                .on_disabled_hover_text("Load a SAM checkpoint first")
                .clicked()
            {
                self.intents.push(Intent::Precompute);
            }
            let can_mine = self.model.is_some() && !self.training.running();
            if ui
                .add_enabled(can_mine, egui::Button::new("Mine…"))
                .on_hover_text(
                    "Predict the unlabelled images and store pseudo-labels for review \
                     (SAM or self-training)",
                )
                .on_disabled_hover_text("Needs a U-Net++ model")
                .clicked()
            {
                self.mining.dialog_open = true;
            }
        });
        self.mining_summary_ui(ui);
        self.training_panel_ui(ui);
    }

    pub(super) fn status_bar_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label(format!("device: {}", self.device_name));
            ui.separator();
            ui.label(format!(
                "models: U-Net++ {} · SAM {}",
                if self.model.is_some() {
                    "loaded"
                } else {
                    "—"
                },
                self.sam.as_ref().map_or("—", |(_, v)| v.as_str())
            ));
            ui.separator();
            if let Some(job) = &self.training.job {
                let t = &self.training;
                let frac = if t.total > 0 {
                    t.done as f32 / t.total as f32
                } else {
                    0.0
                };
                ui.add(
                    egui::ProgressBar::new(frac)
                        .desired_width(160.)
                        .text(job.as_str()),
                );
                if ui
                    .small_button("cancel")
                    .on_hover_text("Cancel the background job")
                    .clicked()
                {
                    self.intents.push(Intent::CancelJob);
                }
            } else {
                ui.label("no background job");
            }
            ui.separator();
            if let Some(p) = &self.project {
                ui.label(format!("project: {}", p.display()));
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui
                    .small_button("?")
                    .on_hover_text("Keyboard shortcuts")
                    .clicked()
                {
                    self.show_help ^= true;
                }
                if ui
                    .small_button("About")
                    .on_hover_text("Version, commit and compiled features")
                    .clicked()
                {
                    self.show_about ^= true;
                }
                ui.menu_button("Project", |ui| {
                    if ui.button("Open…").clicked() {
                        self.intents.push(Intent::PickProject);
                        ui.close();
                    }
                    if ui.button("New project from dataset…").clicked() {
                        self.intents.push(Intent::PickNewProject);
                        ui.close();
                    }
                    ui.separator();
                    for p in self.prefs.recent.clone() {
                        if ui.button(p.display().to_string()).clicked() {
                            self.intents.push(Intent::Open(p));
                            ui.close();
                        }
                    }
                });
            });
        });
    }

    pub(super) fn help_ui(&mut self, ctx: &egui::Context) {
        let mut open = self.show_help;
        egui::Window::new("Keyboard shortcuts")
            .open(&mut open)
            .collapsible(false)
            .show(ctx, |ui| {
                egui::Grid::new("shortcuts").striped(true).show(ui, |ui| {
                    for (k, what) in SHORTCUTS {
                        ui.label(RichText::new(*k).monospace().strong());
                        ui.label(*what);
                        ui.end_row();
                    }
                });
            });
        self.show_help = open;
    }

    /// The same version string as `medmine --version`, for bug reports from people who only
    /// have the app.
    pub(super) fn about_ui(&mut self, ctx: &egui::Context) {
        let mut open = self.show_about;
        egui::Window::new("About medmine")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .show(ctx, |ui| {
                ui.label(RichText::new("medmine").heading());
                ui.label(env!("CARGO_PKG_DESCRIPTION"));
                ui.label(RichText::new(about_version()).monospace());
                if ui
                    .button("Copy version")
                    .on_hover_text("For a bug report")
                    .clicked()
                {
                    ui.ctx().copy_text(about_version());
                }
                ui.label(format!("Licence: {}", env!("CARGO_PKG_LICENSE")));
            });
        self.show_about = open;
    }

    /// "SAM kind": which variant a checkpoint is loaded as. MedSAM has SAM vit_b's tensors but
    /// its own pre- and postprocessing, so only the user can say; the others are read from the
    /// file. Changing it reloads a loaded checkpoint.
    fn sam_kind_ui(&mut self, ui: &mut egui::Ui) {
        use crate::models::sam::Variant;
        let before = self.prefs.sam_variant.clone();
        let shown = before
            .as_deref()
            .unwrap_or("auto (from the file)")
            .to_string();
        egui::ComboBox::from_label("SAM kind")
            .selected_text(shown)
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.prefs.sam_variant, None, "auto (from the file)");
                for v in Variant::ALL {
                    ui.selectable_value(
                        &mut self.prefs.sam_variant,
                        Some(v.name().to_string()),
                        v.name(),
                    );
                }
            })
            .response
            .on_hover_text(
                "MedSAM checkpoints have SAM vit_b's tensors: choose medsam for them (a file \
                 named medsam* is taken as MedSAM on auto)",
            );
        if self.prefs.sam_variant != before {
            if let Some((path, _)) = self.sam.clone() {
                self.intents.push(Intent::LoadSam(path));
            }
        }
    }

    /// Toasts in the canvas's bottom-right corner: above the status bar and the first-steps
    /// hint, never over them.
    pub(super) fn toasts_ui(&self, ctx: &egui::Context, canvas: egui::Rect) {
        if self.toasts.is_empty() {
            return;
        }
        egui::Area::new(egui::Id::unique("toasts"))
            .pivot(egui::Align2::RIGHT_BOTTOM)
            .fixed_pos(canvas.right_bottom() - egui::vec2(12., 12.))
            .show(ctx, |ui| {
                for t in &self.toasts {
                    let color = if t.error {
                        egui::Color32::from_rgb(120, 30, 30)
                    } else {
                        egui::Color32::from_rgb(40, 60, 40)
                    };
                    egui::Frame::popup(ui.style()).fill(color).show(ui, |ui| {
                        ui.label(egui::RichText::new(&t.text).color(egui::Color32::WHITE));
                    });
                }
            });
    }
}

/// The About box's version line: `medmine --version`'s output.
pub fn about_version() -> String {
    format!("medmine {}", crate::cli::VERSION)
}
