//! The radiologist's view: the canvas area (one canvas, or compare panes that zoom, pan and
//! window together), window/level with presets kept in the project, and the error map's
//! source (the pseudo-label / edit, or the U-Net++ prediction).
use bytemuck::Zeroable as _;

use super::app::{App, Compare, Intent};
use super::canvas::{canvas_ui, CanvasInput, Pointer, Tool};
use super::overlay::{OverlayUniform, LAYER_EDIT, LAYER_GT, LAYER_PROB, LAYER_PSEUDO};
use super::window::{self, Preset, Window, WindowSource};
use super::worker::StoreCommand;
use crate::data::ValueRange;

/// The window/level of the image on the canvas, in the image's own values.
#[derive(Clone, Copy, Debug)]
pub struct WindowState {
    pub range: ValueRange,
    pub window: Window,
    pub source: WindowSource,
    /// A drag changed the window at this time and it is not saved yet.
    pub unsaved_since: Option<f64>,
}

impl Default for WindowState {
    fn default() -> Self {
        let range = ValueRange::GRAY8;
        Self {
            range,
            window: window::full_range(&range),
            source: WindowSource::FullRange,
            unsaved_since: None,
        }
    }
}

/// A dragged or typed window is saved this long after the last change (not every frame).
const SAVE_AFTER_S: f64 = 0.5;

/// What the error map compares the ground truth with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorSource {
    /// The edit if there is one, else the newest pseudo-label.
    #[default]
    PseudoLabel,
    /// The U-Net++ prediction (probability >= 0.5).
    Prediction,
}

impl ErrorSource {
    pub fn label(self) -> &'static str {
        match self {
            ErrorSource::PseudoLabel => "vs pseudo-label / edit",
            ErrorSource::Prediction => "vs U-Net++ prediction",
        }
    }
}

/// A window change from the panel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WindowIntent {
    /// A preset, kept for this image.
    Preset(Preset),
    /// Typed or dragged values in the panel, kept for this image once they rest.
    Set(Window),
    /// A right-drag step (fractions of the display range), kept for this image once the
    /// drag rests.
    Drag { dlevel: f32, dwidth: f32 },
    /// Forget this image's window: the project's (else the file's, else full range) again.
    ResetToProject,
    /// This image's window becomes the project's window.
    UseForProject,
}

impl App {
    /// The shader uniform for the main canvas (the canvas fills in the transform).
    pub(super) fn uniform(&self, only: Option<usize>) -> OverlayUniform {
        let mut u = OverlayUniform::zeroed();
        if let Some(c) = &self.current {
            u.image_size = [c.image.width as f32, c.image.height as f32];
            u.flags[0] = u32::from(c.image.grayscale);
        }
        u.window = self.wl.window.to_shader(&self.wl.range);
        for (i, l) in self.prefs.layers.iter().enumerate() {
            let [r, g, b] = l.color;
            u.colors[i] = [r as f32 / 255., g as f32 / 255., b as f32 / 255., l.opacity];
            u.modes[i] = if !l.visible {
                0
            } else if i == LAYER_PROB {
                3
            } else if l.outline {
                2
            } else {
                1
            };
            if let Some(o) = only {
                u.modes[i] = if i == o {
                    if i == LAYER_PROB {
                        3
                    } else {
                        2
                    }
                } else {
                    0
                };
            }
        }
        match self.compare {
            Compare::Swipe if only.is_none() => {
                u.flags[2] = 1;
                u.params[0] = self.swipe;
                u.sides = [1, 0, 2, 2];
                u.modes[LAYER_GT] = 2;
                u.modes[self.current_mask_layer()] = 2;
            }
            // the error map compares the ground truth with the chosen source
            Compare::ErrorMap if only.is_none() => u.flags[1] = self.error_layer() as u32 + 1,
            _ => {}
        }
        u
    }

    /// Where the main canvas (in compare panes: the first pane) was drawn last frame.
    pub fn canvas_rect(&self) -> Option<egui::Rect> {
        self.canvas_rect
    }

    /// The window on the canvas.
    pub fn window(&self) -> &WindowState {
        &self.wl
    }

    /// What the error map compares with the ground truth.
    pub fn error_source(&self) -> ErrorSource {
        self.error_source
    }

    /// The layer the error map compares with the ground truth (the shader's flag - 1).
    pub(super) fn error_layer(&self) -> usize {
        match self.error_source {
            ErrorSource::Prediction => LAYER_PROB,
            ErrorSource::PseudoLabel => self.current_mask_layer(),
        }
    }

    /// The edit's layer if there is an edit, else the pseudo-label's.
    pub(super) fn current_mask_layer(&self) -> usize {
        let has_edit = self
            .current
            .as_ref()
            .is_some_and(|c| c.draft.is_some() || c.image.edit.is_some());
        if has_edit {
            LAYER_EDIT
        } else {
            LAYER_PSEUDO
        }
    }

    /// A newly loaded image: its window from the store (see [`window::initial`]).
    pub(super) fn window_for_loaded(&mut self) {
        let Some(cur) = &self.current else {
            return;
        };
        let img = &cur.image;
        let (w, source) = window::initial(
            &img.range,
            img.window_image.as_ref(),
            img.window_project.as_ref(),
        );
        self.wl = WindowState {
            range: img.range,
            window: w,
            source,
            unsaved_since: None,
        };
    }

    /// Saves a dragged window once the drag has rested (called every frame).
    pub(super) fn window_tick(&mut self, now: f64) {
        if self
            .wl
            .unsaved_since
            .is_some_and(|t| now - t >= SAVE_AFTER_S)
        {
            self.flush_window();
        }
    }

    /// Saves a dragged window now (before another image or project replaces it).
    pub(super) fn flush_window(&mut self) {
        if self.wl.unsaved_since.take().is_some() {
            self.save_image_window();
        }
    }

    fn save_image_window(&mut self) {
        let Some(image) = self.current.as_ref().map(|c| c.image.name.clone()) else {
            return;
        };
        let stored = self.wl.window.stored(&self.wl.range);
        if let Some(cur) = self.current.as_mut() {
            cur.image.window_image = Some(stored.clone());
        }
        self.send_store(StoreCommand::SetWindow {
            image: Some(image),
            window: Some(stored),
        });
    }

    pub(super) fn window_intent(&mut self, ctx: &egui::Context, i: WindowIntent) {
        if self.current.is_none() {
            return;
        }
        let range = self.wl.range;
        match i {
            WindowIntent::Preset(p) => self.set_image_window(p.window(&range)),
            WindowIntent::Set(w) if w.width > 0.0 && w.center.is_finite() => {
                self.wl.window = w;
                self.wl.source = WindowSource::Image;
                self.wl.unsaved_since = Some(ctx.input(|i| i.time));
            }
            WindowIntent::Set(_) => {}
            WindowIntent::Drag { dlevel, dwidth } => {
                self.wl.window = self.wl.window.dragged(&range, dlevel, dwidth);
                self.wl.source = WindowSource::Image;
                self.wl.unsaved_since = Some(ctx.input(|i| i.time));
            }
            WindowIntent::ResetToProject => {
                self.wl.unsaved_since = None;
                let (name, project) = match self.current.as_mut() {
                    Some(cur) => {
                        cur.image.window_image = None;
                        (cur.image.name.clone(), cur.image.window_project.clone())
                    }
                    None => return,
                };
                let (w, source) = window::initial(&range, None, project.as_ref());
                self.wl.window = w;
                self.wl.source = source;
                self.send_store(StoreCommand::SetWindow {
                    image: Some(name),
                    window: None,
                });
            }
            WindowIntent::UseForProject => {
                self.wl.unsaved_since = None;
                let stored = self.wl.window.stored(&range);
                let name = match self.current.as_mut() {
                    Some(cur) => {
                        cur.image.window_project = Some(stored.clone());
                        cur.image.window_image = None;
                        cur.image.name.clone()
                    }
                    None => return,
                };
                self.wl.source = WindowSource::Project;
                self.send_store(StoreCommand::SetWindow {
                    image: None,
                    window: Some(stored),
                });
                // this image follows the project's window from now on
                self.send_store(StoreCommand::SetWindow {
                    image: Some(name),
                    window: None,
                });
                self.toast(ctx, "window kept as the project's window", false);
            }
        }
    }

    fn set_image_window(&mut self, w: Window) {
        self.wl.window = w;
        self.wl.source = WindowSource::Image;
        self.wl.unsaved_since = None;
        self.save_image_window();
    }

    /// Window/level controls (grayscale images), above the canvas.
    pub(super) fn window_ui(&mut self, ui: &mut egui::Ui) {
        if !self.current.as_ref().is_some_and(|c| c.image.grayscale) {
            return;
        }
        let range = self.wl.range;
        let unit = match window::unit(&range) {
            "hu" => "HU",
            "modality" => "DICOM values",
            _ => "gray levels 0–255",
        };
        ui.horizontal_wrapped(|ui| {
            ui.label("window/level")
                .on_hover_text(format!("In {unit}. Right-drag on the image changes it too"));
            let mut w = self.wl.window;
            let s = (range.hi - range.lo).max(1.0);
            let c = ui
                .add(
                    egui::DragValue::new(&mut w.center)
                        .speed(s / 500.0)
                        .max_decimals(1)
                        .prefix("C "),
                )
                .on_hover_text("Window centre (level)");
            let wd = ui
                .add(
                    egui::DragValue::new(&mut w.width)
                        .range(s / 1000.0..=4.0 * s)
                        .speed(s / 500.0)
                        .max_decimals(1)
                        .prefix("W "),
                )
                .on_hover_text("Window width");
            if (c.changed() || wd.changed()) && w != self.wl.window {
                self.intents.push(Intent::Window(WindowIntent::Set(w)));
            }
            for p in Preset::ALL {
                if ui
                    .small_button(p.label())
                    .on_hover_text(preset_tip(p, &range))
                    .clicked()
                {
                    self.intents.push(Intent::Window(WindowIntent::Preset(p)));
                }
            }
            ui.separator();
            ui.label(egui::RichText::new(format!("from {}", self.wl.source.describe())).small());
            if ui
                .small_button("reset to project window")
                .on_hover_text(
                    "Forget this image's window: the project's window (else the DICOM file's, \
                     else the full range)",
                )
                .clicked()
            {
                self.intents
                    .push(Intent::Window(WindowIntent::ResetToProject));
            }
            if ui
                .small_button("use for project")
                .on_hover_text("Every image without its own window shows this window")
                .clicked()
            {
                self.intents
                    .push(Intent::Window(WindowIntent::UseForProject));
            }
        });
    }

    /// The error map's source selector and legend (error map mode only).
    pub(super) fn error_map_ui(&mut self, ui: &mut egui::Ui) {
        if self.compare != Compare::ErrorMap {
            return;
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("error map:");
            for s in [ErrorSource::PseudoLabel, ErrorSource::Prediction] {
                if ui
                    .selectable_label(self.error_source == s, s.label())
                    .on_hover_text(
                        "What the ground truth is compared with: false positives red, false \
                         negatives blue, agreement green",
                    )
                    .clicked()
                {
                    self.error_source = s;
                }
            }
        });
        let cur = self.current.as_ref();
        if cur.is_some_and(|c| c.image.ground_truth.is_none()) {
            ui.label("This image has no ground truth.");
        } else if self.error_source == ErrorSource::Prediction
            && cur.is_some_and(|c| c.probs.is_none())
        {
            ui.label(if self.model.is_none() {
                "No U-Net++ is loaded: nothing to compare."
            } else {
                "Waiting for the U-Net++ prediction…"
            });
        }
    }

    /// Lays the canvas (or the three compare panes) into the central panel.
    pub(super) fn canvas_area_ui(&mut self, ui: &mut egui::Ui) {
        if self.current.is_none() {
            ui.centered_and_justified(|ui| {
                ui.label(if self.project.is_none() {
                    "Open a project (Project > Open…) or create one from a dataset folder."
                } else {
                    "Loading…"
                })
            });
            return;
        }
        // the radiologist's toolbar: window/level and the error map's source
        self.window_ui(ui);
        self.error_map_ui(ui);
        let Some(cur) = &self.current else {
            return;
        };
        let data = cur.data.clone();
        let grayscale = cur.image.grayscale;
        let rounds = cur.image.rounds.clone();
        let mut canvas_intents = Vec::new();
        let clicks = self.clicks.clone();
        if self.compare == Compare::SideBySide {
            let edit = if cur.draft.is_some() {
                LAYER_EDIT
            } else {
                LAYER_PSEUDO
            };
            let panes = [
                (LAYER_GT, "ground truth"),
                (LAYER_PROB, "U-Net++ probability"),
                (edit, "pseudo-label / edit"),
            ];
            // one view and one window for all panes: a zoom, pan or window drag in any pane
            // moves them all
            let uniforms = panes.map(|(layer, _)| self.uniform(Some(layer)));
            ui.columns(3, |cols| {
                for (k, (_, title)) in panes.into_iter().enumerate() {
                    cols[k].label(title);
                    let r = canvas_ui(
                        &mut cols[k],
                        &mut self.view,
                        &mut Pointer::default(),
                        CanvasInput {
                            grayscale,
                            wgpu: self.wgpu,
                            interactive: true,
                            tool: Tool::Navigate,
                            ..CanvasInput::passive(10 + k as u64, &data, uniforms[k])
                        },
                        &mut canvas_intents,
                    );
                    if k == 0 {
                        self.canvas_rect = Some(r.rect);
                    }
                }
            });
            self.intents
                .extend(canvas_intents.into_iter().map(Intent::Canvas));
            return;
        }
        if self.compare == Compare::Swipe {
            ui.add(
                egui::Slider::new(&mut self.swipe, 0.0..=1.0).text("swipe: ground truth | current"),
            );
        }
        let uniform = self.uniform(None);
        let response = canvas_ui(
            ui,
            &mut self.view,
            &mut self.pointer,
            CanvasInput {
                id: 1,
                data: &data,
                uniform,
                tool: self.tool,
                brush_radius: self.prefs.brush_radius,
                grayscale,
                rounds: self.prefs.prompts_visible.then_some(&rounds[..]),
                click_points: &clicks.points_in_image,
                click_box: clicks.box_in_image,
                wgpu: self.wgpu,
                interactive: true,
            },
            &mut canvas_intents,
        );
        self.canvas_rect = Some(response.rect);
        response.on_hover_text_at_pointer(self.tool.tooltip());
        self.intents
            .extend(canvas_intents.into_iter().map(Intent::Canvas));
    }
}

fn preset_tip(p: Preset, range: &ValueRange) -> String {
    let w = p.window(range);
    let unit = if range.dicom && range.rescaled {
        " HU"
    } else {
        ""
    };
    format!("centre {:.0}{unit}, width {:.0}{unit}", w.center, w.width)
}
