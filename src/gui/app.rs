//! The app: state, layout, keyboard shortcuts, and the intents that the panels return and
//! that are applied after the frame. Pipeline work goes to the worker threads.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::canvas::{CanvasIntent, Pointer, Tool, View};
use super::overlay::{self, CanvasData, LAYER_EDIT};
use super::sam_edit::SamObject;
use super::training::Training;
use super::worker::{ClickPrompt, ImageRow, LoadedImage, ModelCommand, StoreCommand, Workers};
use crate::data::Mask;
use crate::store::{ReviewState, Role};

/// How one mask layer is drawn (persisted).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStyle {
    pub visible: bool,
    pub color: [u8; 3],
    pub opacity: f32,
    pub outline: bool,
}

/// Preferences kept between sessions (eframe storage); runtime state is not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Prefs {
    pub recent: Vec<PathBuf>,
    pub layers: [LayerStyle; 4],
    pub prompts_visible: bool,
    pub brush_radius: f32,
    pub sam_checkpoint: Option<PathBuf>,
    /// The SAM variant asked for (`medsam`, …); `None`: from the file (its tensors, and a
    /// name like MedSAM's).
    pub sam_variant: Option<String>,
    pub advance_after_review: bool,
    /// The SAM weights manager's folder.
    pub weights_dir: Option<PathBuf>,
}

impl Default for Prefs {
    fn default() -> Self {
        let l = |color, opacity, outline| LayerStyle {
            visible: true,
            color,
            opacity,
            outline,
        };
        Self {
            recent: Vec::new(),
            layers: [
                l([60, 140, 255], 0.9, true),
                LayerStyle {
                    visible: false,
                    ..l([255, 255, 255], 0.45, false)
                },
                l([255, 200, 0], 0.35, false),
                l([230, 60, 230], 0.45, false),
            ],
            prompts_visible: true,
            brush_radius: 8.0,
            sam_checkpoint: None,
            sam_variant: None,
            advance_after_review: true,
            weights_dir: None,
        }
    }
}

/// Radiologist compare modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    Off,
    /// Ground truth left of the swipe line, the current mask right of it.
    Swipe,
    /// Ground truth, probability and pseudo-label side by side.
    SideBySide,
    /// False positives red, false negatives blue (current mask vs ground truth).
    ErrorMap,
}

pub use super::image_list::SortBy;
pub use super::view_ui::{ErrorSource, WindowIntent, WindowState};

/// An action from the UI, applied after the frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Intent {
    Select(String),
    Step(i32),
    NextPending,
    Review(ReviewState),
    Undo,
    Redo,
    ResetToProposal,
    FillHoles,
    SetTool(Tool),
    BrushSize(f32),
    ToggleLayer(usize),
    Opacity(f32),
    Canvas(CanvasIntent),
    ClearClicks,
    Open(PathBuf),
    PickProject,
    PickNewProject,
    PickSam,
    PickUnet,
    LoadSam(PathBuf),
    LoadUnet(PathBuf),
    Finetune,
    Mine,
    /// Encode every image of the project with SAM ahead of the clicks.
    Precompute,
    CancelJob,
    Fit,
    OneToOne,
    /// Window/level: presets, typed values, drags, reset, the project's window.
    Window(WindowIntent),
    /// Predict every image with the U-Net++ and cache its Dice and uncertainty for the list.
    ScoreAll,
}

/// A message shown for a while in the corner.
pub struct Toast {
    pub text: String,
    pub error: bool,
    pub until: f64,
}

/// The image on the canvas.
pub struct Current {
    pub image: LoadedImage,
    pub data: CanvasData,
    /// The mask being edited (saved to the store after each stroke / SAM answer).
    pub draft: Option<Mask>,
    pub probs: Option<Vec<u8>>,
    pub sam_iou: Option<f32>,
}

/// Where the app starts.
#[derive(Clone, Debug, Default)]
pub struct Startup {
    pub project: Option<PathBuf>,
    /// Fallback when no project is given and none is recent (`None`: start empty).
    pub demo: Option<(PathBuf, PathBuf)>,
    pub sam: Option<PathBuf>,
    pub device_name: String,
}

pub struct App {
    pub(super) workers: Workers,
    pub prefs: Prefs,
    pub(super) project: Option<PathBuf>,
    pub(super) rows: Vec<ImageRow>,
    pub(super) thumbs: HashMap<String, egui::TextureHandle>,
    pub(super) thumbs_requested: HashSet<String>,
    pub(super) filter_state: Option<ReviewState>,
    pub(super) filter_role: Option<Role>,
    pub(super) sort: SortBy,
    pub(super) current: Option<Current>,
    pub(super) selected: Option<String>,
    pub(super) view: View,
    pub(super) pointer: Pointer,
    pub(super) tool: Tool,
    /// The clicks of the object being corrected with SAM (as the user made them).
    pub(super) clicks: ClickPrompt,
    /// That object: the draft before its first click, add or remove, the last logits.
    pub(super) sam_object: Option<SamObject>,
    /// A SAM click is on its way (the image may be being encoded): the spinner.
    pub(super) sam_pending: bool,
    /// The demo project's folder (its first open trains and mines, see `first_run`).
    pub(super) demo_root: Option<PathBuf>,
    /// The compute device (a copy of the model thread's, for jobs built here).
    pub(super) device: candle_core::Device,
    /// Show the first-steps hint.
    pub(super) first_steps: bool,
    pub(super) sam_seq: u64,
    pub(super) compare: Compare,
    pub(super) swipe: f32,
    /// Window/level of the image on the canvas (one for every compare pane).
    pub(super) wl: WindowState,
    pub(super) error_source: ErrorSource,
    pub(super) toasts: Vec<Toast>,
    /// Store commands sent and not yet confirmed (the badge waits for the store).
    pub(super) saving: usize,
    pub(super) training: Training,
    pub(super) mining: super::mining_panel::MiningSettings,
    pub(super) model: Option<PathBuf>,
    pub(super) model_dice: Option<f64>,
    pub(super) sam: Option<(PathBuf, String)>,
    pub(super) device_name: String,
    pub(super) show_help: bool,
    pub(super) show_about: bool,
    pub(super) wgpu: bool,
    pub(super) intents: Vec<Intent>,
    /// Every error shown as a toast this session (toasts expire; this does not).
    pub(super) errors: Vec<String>,
    pub(super) dialogs: super::dialogs::Dialogs,
    /// Where the main canvas was drawn last frame.
    pub(super) canvas_rect: Option<egui::Rect>,
}

const PREFS_KEY: &str = "medmine-prefs";

impl App {
    /// Builds the app: registers the overlay pipeline, restores preferences, starts the
    /// workers and opens the start project.
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        startup: Startup,
        device: candle_core::Device,
    ) -> Self {
        let wgpu = match &cc.wgpu_render_state {
            Some(rs) => {
                overlay::install(rs);
                true
            }
            None => false,
        };
        let prefs: Prefs = cc
            .storage
            .and_then(|s| eframe::get_value(s, PREFS_KEY))
            .unwrap_or_default();
        let workers = Workers::spawn(&cc.egui_ctx, device.clone());
        let dialogs = super::dialogs::Dialogs::new(prefs.weights_dir.as_deref());
        let mut app = App {
            workers,
            prefs,
            project: None,
            rows: Vec::new(),
            thumbs: HashMap::new(),
            thumbs_requested: HashSet::new(),
            filter_state: None,
            filter_role: None,
            sort: SortBy::Name,
            current: None,
            selected: None,
            view: View::default(),
            pointer: Pointer::default(),
            tool: Tool::Navigate,
            clicks: ClickPrompt::default(),
            sam_object: None,
            sam_pending: false,
            demo_root: startup.demo.as_ref().map(|(p, _)| p.clone()),
            device,
            first_steps: false,
            sam_seq: 0,
            compare: Compare::Off,
            swipe: 0.5,
            wl: WindowState::default(),
            error_source: ErrorSource::default(),
            toasts: Vec::new(),
            saving: 0,
            training: Training::default(),
            mining: Default::default(),
            model: None,
            model_dice: None,
            sam: None,
            device_name: startup.device_name.clone(),
            show_help: false,
            show_about: false,
            wgpu,
            intents: Vec::new(),
            canvas_rect: None,
            dialogs,
            errors: Vec::new(),
        };
        let recent = app
            .prefs
            .recent
            .iter()
            .find(|p| p.join(crate::store::DB_FILE).is_file())
            .cloned();
        match (startup.project, recent, startup.demo) {
            (Some(p), _, _) | (None, Some(p), _) => app.intents.push(Intent::Open(p)),
            (None, None, Some((project, assets))) => app.send_store(StoreCommand::OpenOrCreate {
                project,
                data: assets.clone(),
                split_dir: Some(assets),
                labelled_fraction: 0.5,
            }),
            (None, None, None) => {}
        }
        if let Some(sam) = startup.sam.or_else(|| app.prefs.sam_checkpoint.clone()) {
            if sam.is_file() {
                app.intents.push(Intent::LoadSam(sam));
            }
        }
        app
    }

    // ----- read-only views for tests and panels -----

    /// The image on the canvas.
    pub fn current_image(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.image.name.as_str())
    }

    /// What the canvas uploads: the image's pixels, its layers and their versions.
    pub fn canvas_data(&self) -> Option<&super::overlay::CanvasData> {
        self.current.as_ref().map(|c| &c.data)
    }

    /// The image chosen in the list (it is on the canvas once loaded).
    pub fn selected_image(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// The review state shown for an image (what the store confirmed).
    pub fn badge(&self, image: &str) -> Option<ReviewState> {
        self.rows.iter().find(|r| r.name == image).map(|r| r.state)
    }

    /// Whether a SAM click is waiting for its answer (the spinner shows).
    pub fn sam_pending(&self) -> bool {
        self.sam_pending
    }

    /// The current edit mask of the canvas.
    pub fn draft(&self) -> Option<&Mask> {
        self.current.as_ref().and_then(|c| c.draft.as_ref())
    }

    pub fn training(&self) -> &Training {
        &self.training
    }

    pub fn training_mut(&mut self) -> &mut Training {
        &mut self.training
    }

    pub fn toasts(&self) -> impl Iterator<Item = &str> {
        self.toasts.iter().map(|t| t.text.as_str())
    }

    /// Every error reported this session, oldest first.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    pub fn sam_loaded(&self) -> bool {
        self.sam.is_some()
    }

    /// The loaded SAM's variant name (`vit_b`, `medsam`, …).
    pub fn sam_variant(&self) -> Option<&str> {
        self.sam.as_ref().map(|(_, v)| v.as_str())
    }

    /// The SAM variant the next load asks for (the Model panel's "SAM kind").
    pub(super) fn asked_sam_variant(&self) -> Option<crate::models::sam::Variant> {
        let name = self.prefs.sam_variant.as_deref()?;
        crate::models::sam::Variant::parse(name).ok().flatten()
    }

    /// Images with a pseudo-label, as the list shows them.
    pub fn pseudo_labelled(&self) -> usize {
        self.rows.iter().filter(|r| r.pseudo_label).count()
    }

    /// Whether the first-steps hint is shown.
    pub fn first_steps_shown(&self) -> bool {
        self.first_steps
    }

    pub fn model(&self) -> Option<&PathBuf> {
        self.model.as_ref()
    }

    pub fn tool(&self) -> Tool {
        self.tool
    }

    /// Where an image pixel is on the screen (main canvas, last frame).
    pub fn ui_from_image(&self, point_in_image: egui::Pos2) -> Option<egui::Pos2> {
        Some(self.view.ui_from_image(self.canvas_rect?, point_in_image))
    }

    /// Opens the "New project from dataset" dialog for the dataset folder `data` (what the
    /// folder dialog does; public for tests and scripted use).
    pub fn start_new_project(&mut self, data: PathBuf) {
        let data = data.display().to_string();
        match &mut self.dialogs.new_project {
            Some(n) => n.set_data(&data),
            None => self.dialogs.new_project = Some(super::new_project::NewProject::new(&data)),
        }
    }

    /// The open project's folder.
    pub fn project(&self) -> Option<&std::path::Path> {
        self.project.as_deref()
    }

    /// Images in the list (unfiltered).
    pub fn image_count(&self) -> usize {
        self.rows.len()
    }

    /// Store commands not yet confirmed.
    pub fn saving(&self) -> usize {
        self.saving
    }

    // ----- helpers -----

    pub(super) fn send_store(&mut self, cmd: StoreCommand) {
        if matches!(
            cmd,
            StoreCommand::Review { .. }
                | StoreCommand::SaveEdit { .. }
                | StoreCommand::Undo(_)
                | StoreCommand::Redo(_)
                | StoreCommand::ResetToProposal(_)
        ) {
            self.saving += 1;
        }
        let _ = self.workers.store.send(cmd);
    }

    pub(super) fn send_model(&self, cmd: ModelCommand) {
        let _ = self.workers.model.send(cmd);
    }

    pub(super) fn toast(&mut self, ctx: &egui::Context, text: impl Into<String>, error: bool) {
        let now = ctx.input(|i| i.time);
        let text = text.into();
        if error {
            self.errors.push(text.clone());
        }
        self.toasts.push(Toast {
            text,
            error,
            until: now + if error { 8.0 } else { 3.0 },
        });
    }

    pub(super) fn select(&mut self, name: String) {
        if self.selected.as_deref() == Some(&name) {
            return;
        }
        self.flush_window();
        self.selected = Some(name.clone());
        self.new_sam_object();
        self.send_store(StoreCommand::Load(name));
    }

    pub(super) fn step(&mut self, delta: i32) {
        let rows = self.visible_rows();
        if rows.is_empty() {
            return;
        }
        let at = self
            .selected
            .as_ref()
            .and_then(|s| rows.iter().position(|r| &r.name == s));
        let next = match at {
            Some(i) => (i as i32 + delta).clamp(0, rows.len() as i32 - 1) as usize,
            None => 0,
        };
        let name = rows[next].name.clone();
        self.select(name);
    }

    pub(super) fn next_pending(&mut self) {
        let rows = self.visible_rows();
        let at = self
            .selected
            .as_ref()
            .and_then(|s| rows.iter().position(|r| &r.name == s))
            .map_or(0, |i| i + 1);
        let pick = rows
            .iter()
            .cycle()
            .skip(at)
            .take(rows.len())
            .find(|r| r.state == ReviewState::Pending && r.pseudo_label)
            .map(|r| r.name.clone());
        if let Some(n) = pick {
            self.select(n);
        }
    }

    /// The next SAM click starts a new object (its clicks and logits are dropped).
    pub(super) fn new_sam_object(&mut self) {
        self.clicks = ClickPrompt::default();
        self.sam_object = None;
        self.sam_pending = false;
    }

    /// The mask a new edit starts from: the current edit, else the pseudo-label, else empty.
    pub(super) fn ensure_draft(cur: &mut Current) -> &mut Mask {
        if cur.draft.is_none() {
            let (w, h) = (cur.image.width, cur.image.height);
            cur.draft = Some(
                cur.image
                    .edit
                    .clone()
                    .or_else(|| cur.image.pseudo.clone())
                    .unwrap_or(Mask {
                        width: w,
                        height: h,
                        data: vec![0; w * h],
                    }),
            );
        }
        cur.draft.as_mut().expect("draft just set")
    }

    pub(super) fn set_layer(cur: &mut Current, slot: usize, mask: Option<&Mask>) {
        cur.data.layers[slot] =
            mask.map(|m| std::sync::Arc::new(m.data.iter().map(|&v| v * 255).collect()));
        cur.data.versions[slot + 1] = super::overlay::next_version();
    }

    pub(super) fn refresh_draft_layer(cur: &mut Current) {
        let mask = cur.draft.clone();
        Self::set_layer(cur, LAYER_EDIT, mask.as_ref());
    }

    pub(super) fn request_thumbnails(&mut self) {
        for r in &self.rows {
            if self.thumbs_requested.insert(r.name.clone()) {
                let _ = self.workers.thumbs.send((r.name.clone(), r.path.clone()));
            }
        }
    }

    /// One frame: events in, panels, intents out.
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.handle_events(&ctx);
        self.shortcuts(&ctx);
        self.request_thumbnails();
        let now = ctx.input(|i| i.time);
        self.toasts.retain(|t| t.until > now);
        self.window_tick(now);

        egui::Panel::bottom("status").show(ui, |ui| self.status_bar_ui(ui));
        if self.first_steps {
            egui::Panel::bottom("first steps").show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.label(super::first_run::FIRST_STEPS);
                    if ui.button("Hide").clicked() {
                        self.first_steps = false;
                    }
                });
            });
        }
        egui::Panel::left("images")
            .resizable(true)
            .default_size(230.0)
            .show(ui, |ui| self.image_list_ui(ui));
        egui::Panel::right("inspector")
            .resizable(true)
            .default_size(290.0)
            .show(ui, |ui| self.inspector_ui(ui));
        let canvas = egui::CentralPanel::default()
            .show(ui, |ui| self.canvas_area_ui(ui))
            .response
            .rect;
        self.training_window_ui(&ctx);
        self.mining_window_ui(&ctx);
        self.help_ui(&ctx);
        self.about_ui(&ctx);
        self.dialogs_ui(&ctx);
        self.toasts_ui(&ctx, canvas);
        self.apply_intents(&ctx);
        if self.training.running() || self.saving > 0 {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame_ui(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, PREFS_KEY, &self.prefs);
    }
}
