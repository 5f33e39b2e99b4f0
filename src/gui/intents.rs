//! Intents (what the panels, the canvas and the keyboard asked for), applied after the frame.
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use egui::{Key, KeyboardShortcut, Modifiers};

use super::app::{App, Intent, WindowIntent};
use super::canvas::{CanvasIntent, Tool};
use super::edit;
use super::sam_edit::SamObject;
use super::worker::{ModelCommand, StoreCommand};
use crate::store::ReviewState;

impl App {
    pub(super) fn apply_intents(&mut self, ctx: &egui::Context) {
        let intents = std::mem::take(&mut self.intents);
        for i in intents {
            self.apply(ctx, i);
        }
    }

    pub(super) fn apply(&mut self, ctx: &egui::Context, intent: Intent) {
        let name = self.current.as_ref().map(|c| c.image.name.clone());
        match intent {
            Intent::Select(n) => self.select(n),
            Intent::Step(d) => self.step(d),
            Intent::NextPending => self.next_pending(),
            Intent::Review(state) => {
                if let Some(n) = name {
                    self.send_store(StoreCommand::Review { image: n, state });
                    if self.prefs.advance_after_review {
                        // to the next pseudo-label waiting for review, not the next row (a
                        // labelled or validation image has nothing to review)
                        self.next_pending();
                    }
                }
            }
            Intent::Undo => {
                self.new_sam_object();
                if let Some(n) = name {
                    self.send_store(StoreCommand::Undo(n));
                }
            }
            Intent::Redo => {
                self.new_sam_object();
                if let Some(n) = name {
                    self.send_store(StoreCommand::Redo(n));
                }
            }
            Intent::ResetToProposal => {
                if let Some(n) = name {
                    self.new_sam_object();
                    self.send_store(StoreCommand::ResetToProposal(n));
                }
            }
            Intent::FillHoles => {
                if let Some(cur) = self.current.as_mut() {
                    let filled = edit::fill_holes(Self::ensure_draft(cur));
                    if filled > 0 {
                        Self::refresh_draft_layer(cur);
                        let mask = cur.draft.clone().expect("draft");
                        let image = cur.image.name.clone();
                        self.send_store(StoreCommand::SaveEdit { image, mask });
                    } else {
                        self.toast(ctx, "no holes to fill", false);
                    }
                }
            }
            Intent::SetTool(t) => {
                self.tool = t;
                if t == Tool::Sam && self.sam.is_none() {
                    self.toast(ctx, "load a SAM checkpoint first (Model panel)", true);
                }
            }
            Intent::BrushSize(d) => {
                self.prefs.brush_radius = (self.prefs.brush_radius * d).clamp(1.0, 200.0)
            }
            Intent::ToggleLayer(i) => {
                if i < 4 {
                    self.prefs.layers[i].visible ^= true;
                } else {
                    self.prefs.prompts_visible ^= true;
                }
            }
            Intent::Opacity(d) => {
                for l in &mut self.prefs.layers {
                    l.opacity = (l.opacity + d).clamp(0.05, 1.0);
                }
            }
            Intent::Canvas(c) => self.canvas_intent(ctx, c),
            Intent::ClearClicks => self.new_sam_object(),
            Intent::Open(p) => {
                self.flush_window();
                self.send_store(StoreCommand::Open(p));
            }
            Intent::PickProject => self.choose(super::worker::Pick::Project),
            Intent::PickNewProject => self.choose(super::worker::Pick::Dataset),
            Intent::PickSam => self.choose(super::worker::Pick::Sam),
            Intent::PickUnet => self.choose(super::worker::Pick::Unet),
            Intent::LoadSam(p) => {
                let v = self.asked_sam_variant();
                self.send_model(ModelCommand::LoadSam(p, v))
            }
            Intent::LoadUnet(p) => self.send_model(ModelCommand::LoadUnet(p)),
            Intent::Finetune => {
                if let Some(project) = self.project.clone() {
                    let job = self.training.job(project, self.model.clone());
                    self.send_model(ModelCommand::Finetune(job));
                }
            }
            Intent::Mine => self.mine(ctx),
            Intent::Precompute => {
                if let (Some(project), true) = (self.project.clone(), self.sam.is_some()) {
                    let paths = self.rows.iter().map(|r| r.path.clone()).collect();
                    self.send_model(ModelCommand::Precompute { project, paths });
                }
            }
            Intent::CancelJob => self.workers.cancel.store(true, Ordering::Relaxed),
            Intent::Window(w) => self.window_intent(ctx, w),
            Intent::ScoreAll => {
                if let (Some(project), Some(model)) = (self.project.clone(), self.model.clone()) {
                    let job = super::scoring::score_job(project, model, self.device.clone());
                    self.send_model(ModelCommand::Job(job));
                }
            }
            Intent::Fit => self.view.fitted = true,
            Intent::OneToOne => self.view.one_to_one(ctx.pixels_per_point()),
        }
    }

    pub(super) fn canvas_intent(&mut self, ctx: &egui::Context, c: CanvasIntent) {
        if let CanvasIntent::WindowLevel { dlevel, dwidth } = c {
            self.window_intent(ctx, WindowIntent::Drag { dlevel, dwidth });
            return;
        }
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        match c {
            CanvasIntent::Paint { from, to, erase } => {
                let r = self.prefs.brush_radius;
                let mask = Self::ensure_draft(cur);
                if edit::paint_segment(mask, (from.x, from.y), (to.x, to.y), r, u8::from(!erase)) {
                    Self::refresh_draft_layer(cur);
                }
            }
            CanvasIntent::StrokeEnd => {
                if let Some(mask) = cur.draft.clone() {
                    if cur.image.edit.as_ref() != Some(&mask) {
                        let image = cur.image.name.clone();
                        self.send_store(StoreCommand::SaveEdit { image, mask });
                    }
                }
            }
            CanvasIntent::SamPoint {
                point_in_image,
                positive,
            } => {
                self.begin_sam_object(positive);
                self.clicks
                    .points_in_image
                    .push((point_in_image.x, point_in_image.y, positive));
                self.ask_sam();
            }
            CanvasIntent::SamBox { box_in_image } => {
                // a second box is a second object
                if self.clicks.box_in_image.is_some() {
                    self.new_sam_object();
                }
                self.begin_sam_object(true);
                self.clicks.box_in_image = Some(box_in_image);
                self.ask_sam();
            }
            CanvasIntent::WindowLevel { .. } => unreachable!("handled above"),
        }
    }

    /// Starts an object at its first click: the draft now is what its answers edit.
    fn begin_sam_object(&mut self, positive: bool) {
        if self.sam_object.is_some() {
            return;
        }
        if let Some(cur) = self.current.as_mut() {
            let base = Self::ensure_draft(cur).clone();
            self.sam_object = Some(SamObject::new(base, positive));
        }
    }

    pub(super) fn ask_sam(&mut self) {
        let (Some(cur), Some(project), Some(obj)) =
            (&self.current, &self.project, &self.sam_object)
        else {
            return;
        };
        self.sam_seq += 1;
        let prompt = obj.prompt(&self.clicks);
        let sent = self.workers.model.send(ModelCommand::Sam {
            project: project.clone(),
            image: cur.image.name.clone(),
            path: cur.image.path.clone(),
            prompt,
            seq: self.sam_seq,
        });
        self.sam_pending = sent.is_ok();
    }

    pub(super) fn picked(&mut self, purpose: super::worker::Pick, path: PathBuf) {
        use super::worker::Pick;
        match purpose {
            Pick::Project => self.intents.push(Intent::Open(path)),
            Pick::Dataset => self.start_new_project(path),
            Pick::Sam => self.intents.push(Intent::LoadSam(path)),
            Pick::Unet => self.intents.push(Intent::LoadUnet(path)),
        }
    }

    // ----- keyboard -----

    pub(super) fn shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let ctrl_shift_z = KeyboardShortcut::new(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
        let ctrl_z = KeyboardShortcut::new(Modifiers::COMMAND, Key::Z);
        let mut out = Vec::new();
        ctx.input_mut(|i| {
            if i.consume_shortcut(&ctrl_shift_z) {
                out.push(Intent::Redo);
            }
            if i.consume_shortcut(&ctrl_z) {
                out.push(Intent::Undo);
            }
            let plain = [
                (Key::A, Intent::Review(ReviewState::Accepted)),
                (Key::R, Intent::Review(ReviewState::Rejected)),
                (Key::ArrowRight, Intent::Step(1)),
                (Key::J, Intent::Step(1)),
                (Key::ArrowLeft, Intent::Step(-1)),
                (Key::K, Intent::Step(-1)),
                (Key::N, Intent::NextPending),
                (Key::B, Intent::SetTool(Tool::Brush)),
                (Key::E, Intent::SetTool(Tool::Eraser)),
                (Key::S, Intent::SetTool(Tool::Sam)),
                (Key::V, Intent::SetTool(Tool::Navigate)),
                (Key::H, Intent::FillHoles),
                (Key::F, Intent::Fit),
                (Key::Num0, Intent::OneToOne),
                (Key::OpenBracket, Intent::BrushSize(1.0 / 1.25)),
                (Key::CloseBracket, Intent::BrushSize(1.25)),
                (Key::Plus, Intent::Opacity(0.1)),
                (Key::Equals, Intent::Opacity(0.1)),
                (Key::Minus, Intent::Opacity(-0.1)),
                (Key::Escape, Intent::ClearClicks),
                (Key::Num1, Intent::ToggleLayer(0)),
                (Key::Num2, Intent::ToggleLayer(1)),
                (Key::Num3, Intent::ToggleLayer(2)),
                (Key::Num4, Intent::ToggleLayer(3)),
                (Key::Num5, Intent::ToggleLayer(4)),
            ];
            for (key, intent) in plain {
                if i.consume_key(Modifiers::NONE, key) {
                    out.push(intent);
                }
            }
            if i.consume_key(Modifiers::NONE, Key::Questionmark)
                || i.consume_key(Modifiers::SHIFT, Key::Questionmark)
                || i.consume_key(Modifiers::SHIFT, Key::Slash)
            {
                self.show_help ^= true;
            }
        });
        self.intents.extend(out);
    }
}
