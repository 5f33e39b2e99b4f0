//! The canvas: view transform (zoom to cursor, pan, fit, 1:1), pointer input for the tools,
//! and the prompt markers drawn on top of the wgpu overlay. Input becomes [`CanvasIntent`]s
//! that the app applies after the frame.
use egui::{pos2, vec2, Color32, Pos2, Rect, Sense, Stroke, Vec2};

use super::overlay::{CanvasData, OverlayCallback, OverlayUniform};
use crate::store::PseudoLabel;

/// What the left mouse button does on the canvas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tool {
    Navigate,
    Brush,
    Eraser,
    Sam,
}

impl Tool {
    pub fn label(self) -> &'static str {
        match self {
            Tool::Navigate => "Pan/zoom",
            Tool::Brush => "Brush (B)",
            Tool::Eraser => "Eraser (E)",
            Tool::Sam => "SAM (S)",
        }
    }

    pub fn tooltip(self) -> &'static str {
        match self {
            Tool::Navigate => "Drag to pan, wheel to zoom at the cursor, F to fit",
            Tool::Brush => "Paint the mask; [ and ] change the size; each stroke is saved",
            Tool::Eraser => "Erase from the mask; [ and ] change the size; each stroke is saved",
            Tool::Sam => {
                "Click = positive point, right click or Alt+click = negative point, drag = box; \
                 the mask updates from the cached SAM embedding"
            }
        }
    }
}

/// Where the image is on the canvas: `zoom` UI points per image pixel and the image point
/// at the canvas centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub zoom: f32,
    pub center_in_image: Pos2,
    /// Fit again when the canvas size changes (until the user zooms or pans).
    pub fitted: bool,
}

impl Default for View {
    fn default() -> Self {
        Self {
            zoom: 1.0,
            center_in_image: Pos2::ZERO,
            fitted: true,
        }
    }
}

impl View {
    pub fn ui_from_image(&self, rect: Rect, point_in_image: Pos2) -> Pos2 {
        rect.center() + (point_in_image - self.center_in_image) * self.zoom
    }

    pub fn image_from_ui(&self, rect: Rect, point_in_ui: Pos2) -> Pos2 {
        self.center_in_image + (point_in_ui - rect.center()) / self.zoom
    }

    pub fn fit(&mut self, rect: Rect, image: [usize; 2]) {
        let (w, h) = (image[0].max(1) as f32, image[1].max(1) as f32);
        self.zoom = (rect.width() / w).min(rect.height() / h).max(1e-3);
        self.center_in_image = pos2(w / 2., h / 2.);
        self.fitted = true;
    }

    /// One image pixel per physical screen pixel.
    pub fn one_to_one(&mut self, pixels_per_point: f32) {
        self.zoom = 1.0 / pixels_per_point;
        self.fitted = false;
    }

    /// Zooms by `factor` keeping the image point under `cursor` where it is.
    pub fn zoom_at(&mut self, rect: Rect, cursor: Pos2, factor: f32) {
        let anchor = self.image_from_ui(rect, cursor);
        self.zoom = (self.zoom * factor).clamp(0.01, 64.0);
        self.center_in_image = anchor - (cursor - rect.center()) / self.zoom;
        self.fitted = false;
    }

    pub fn pan(&mut self, delta_ui: Vec2) {
        self.center_in_image -= delta_ui / self.zoom;
        self.fitted = false;
    }

    /// `image = uv * xy + zw` for the shader, `uv` in [0, 1] over `rect`.
    pub fn image_from_uv(&self, rect: Rect) -> [f32; 4] {
        let scale = rect.size() / self.zoom;
        let offset = self.center_in_image - scale / 2.;
        [scale.x, scale.y, offset.x, offset.y]
    }
}

/// What happened on the canvas this frame.
#[derive(Clone, Debug, PartialEq)]
pub enum CanvasIntent {
    /// A brush/eraser segment in image pixels.
    Paint {
        from: Pos2,
        to: Pos2,
        erase: bool,
    },
    /// The stroke ended: save the mask.
    StrokeEnd,
    SamPoint {
        point_in_image: Pos2,
        positive: bool,
    },
    SamBox {
        box_in_image: [f32; 4],
    },
    /// Window/level change (right-drag on a grayscale image), in intensity units.
    WindowLevel {
        dlevel: f32,
        dwidth: f32,
    },
}

/// Input state kept between frames.
#[derive(Default)]
pub struct Pointer {
    last_paint: Option<Pos2>,
    box_start: Option<Pos2>,
}

/// Everything one canvas needs to draw.
pub struct CanvasInput<'a> {
    pub id: u64,
    pub data: &'a CanvasData,
    pub uniform: OverlayUniform,
    pub tool: Tool,
    pub brush_radius: f32,
    pub grayscale: bool,
    /// Prompt markers (the "prompts" layer), `None` when hidden.
    pub rounds: Option<&'a [PseudoLabel]>,
    /// The SAM prompt being built (points with labels, box).
    pub click_points: &'a [(f32, f32, bool)],
    pub click_box: Option<[f32; 4]>,
    /// Whether the wgpu renderer is available (else a plain message is shown).
    pub wgpu: bool,
    /// Interactive (the main canvas) or a passive compare pane.
    pub interactive: bool,
}

impl<'a> CanvasInput<'a> {
    /// A canvas that only shows (compare panes, snapshots, benchmarks): no tool, no prompts.
    pub fn passive(id: u64, data: &'a CanvasData, uniform: OverlayUniform) -> Self {
        Self {
            id,
            data,
            uniform,
            tool: Tool::Navigate,
            brush_radius: 0.0,
            grayscale: false,
            rounds: None,
            click_points: &[],
            click_box: None,
            wgpu: true,
            interactive: false,
        }
    }
}

/// Draws one canvas (image + layers via the wgpu callback, prompts on top) and turns its input
/// into intents.
pub fn canvas_ui(
    ui: &mut egui::Ui,
    view: &mut View,
    pointer: &mut Pointer,
    input: CanvasInput<'_>,
    intents: &mut Vec<CanvasIntent>,
) -> egui::Response {
    let size = ui.available_size().max(vec2(64., 64.));
    let (rect, response) = ui.allocate_exact_size(size, Sense::click_and_drag());
    let image_size = [input.data.width as usize, input.data.height as usize];
    if view.fitted {
        view.fit(rect, image_size);
    }
    let ppp = ui.ctx().pixels_per_point();
    let mut uniform = input.uniform;
    uniform.image_from_uv = view.image_from_uv(rect);
    uniform.params[1] = 1.0 / (view.zoom * ppp);
    if input.wgpu && input.data.width > 0 {
        ui.painter().add(egui_wgpu::Callback::new_paint_callback(
            rect,
            OverlayCallback {
                canvas_id: input.id,
                uniform,
                data: input.data.clone(),
            },
        ));
    } else {
        ui.painter()
            .rect_filled(rect, 0.0, Color32::from_rgb(20, 20, 23));
        ui.painter().text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            if input.data.width == 0 {
                "no image"
            } else {
                "the canvas needs the wgpu renderer"
            },
            egui::FontId::proportional(14.),
            Color32::GRAY,
        );
    }
    let painter = ui.painter_at(rect);
    draw_prompts(&painter, view, rect, &input);

    if !input.interactive {
        return response;
    }
    // wheel zoom at the cursor, middle/space drag pan
    if let Some(hover) = response.hover_pos() {
        let scroll = ui.input(|i| i.smooth_scroll_delta.y);
        if scroll != 0.0 {
            view.zoom_at(rect, hover, (scroll / 200.0).exp());
        }
        if input.tool == Tool::Brush || input.tool == Tool::Eraser {
            let r = input.brush_radius * view.zoom;
            painter.circle_stroke(hover, r, Stroke::new(1.0, Color32::WHITE));
        }
    }
    let space = ui.input(|i| i.key_down(egui::Key::Space));
    let pan_drag = response.dragged_by(egui::PointerButton::Middle)
        || (response.dragged_by(egui::PointerButton::Primary)
            && (space || input.tool == Tool::Navigate));
    if pan_drag {
        view.pan(response.drag_delta());
        return response;
    }
    if response.dragged_by(egui::PointerButton::Secondary) && input.grayscale {
        let d = response.drag_delta();
        intents.push(CanvasIntent::WindowLevel {
            dlevel: -d.y / rect.height().max(1.),
            dwidth: d.x / rect.width().max(1.),
        });
    }
    let alt = ui.input(|i| i.modifiers.alt);
    match input.tool {
        Tool::Navigate => {}
        Tool::Brush | Tool::Eraser => {
            let erase = input.tool == Tool::Eraser;
            let primary = response.dragged_by(egui::PointerButton::Primary)
                || response.clicked_by(egui::PointerButton::Primary)
                || response.drag_started_by(egui::PointerButton::Primary);
            if primary {
                if let Some(p) = response.interact_pointer_pos() {
                    let here = view.image_from_ui(rect, p);
                    let from = pointer.last_paint.unwrap_or(here);
                    intents.push(CanvasIntent::Paint {
                        from,
                        to: here,
                        erase,
                    });
                    pointer.last_paint = Some(here);
                }
            }
            if (response.drag_stopped() || response.clicked()) && pointer.last_paint.is_some() {
                pointer.last_paint = None;
                intents.push(CanvasIntent::StrokeEnd);
            }
        }
        Tool::Sam => {
            if response.drag_started_by(egui::PointerButton::Primary) {
                pointer.box_start = response
                    .interact_pointer_pos()
                    .map(|p| view.image_from_ui(rect, p));
            }
            if let (Some(start), Some(p)) = (pointer.box_start, response.interact_pointer_pos()) {
                let end = view.image_from_ui(rect, p);
                let r = Rect::from_two_pos(start, end);
                let ui_rect = Rect::from_two_pos(
                    view.ui_from_image(rect, r.min),
                    view.ui_from_image(rect, r.max),
                );
                painter.rect_stroke(
                    ui_rect,
                    0.0,
                    Stroke::new(1.5, Color32::YELLOW),
                    egui::StrokeKind::Middle,
                );
                if response.drag_stopped() {
                    pointer.box_start = None;
                    if r.width() >= 2.0 && r.height() >= 2.0 {
                        intents.push(CanvasIntent::SamBox {
                            box_in_image: [r.min.x, r.min.y, r.max.x, r.max.y],
                        });
                    }
                }
            }
            if let Some(p) = response.interact_pointer_pos() {
                let point_in_image = view.image_from_ui(rect, p);
                if response.clicked_by(egui::PointerButton::Primary) {
                    intents.push(CanvasIntent::SamPoint {
                        point_in_image,
                        positive: !alt,
                    });
                } else if response.clicked_by(egui::PointerButton::Secondary) {
                    intents.push(CanvasIntent::SamPoint {
                        point_in_image,
                        positive: false,
                    });
                }
            }
        }
    }
    response
}

const POSITIVE: Color32 = Color32::from_rgb(40, 220, 80);
const NEGATIVE: Color32 = Color32::from_rgb(240, 60, 50);

fn draw_point(painter: &egui::Painter, at: Pos2, positive: bool, label: Option<String>) {
    let c = if positive { POSITIVE } else { NEGATIVE };
    painter.circle(at, 5.0, c, Stroke::new(1.5, Color32::BLACK));
    if let Some(l) = label {
        painter.text(
            at + vec2(7., -7.),
            egui::Align2::LEFT_BOTTOM,
            l,
            egui::FontId::monospace(11.),
            Color32::WHITE,
        );
    }
}

fn draw_prompts(painter: &egui::Painter, view: &View, rect: Rect, input: &CanvasInput<'_>) {
    let to_ui = |x: f32, y: f32| view.ui_from_image(rect, pos2(x, y));
    if let Some(rounds) = input.rounds {
        for (k, label) in rounds.iter().enumerate() {
            let newest = k + 1 == rounds.len();
            let alpha = if newest { 255 } else { 110 };
            for b in &label.prompts.boxes_in_image {
                painter.rect_stroke(
                    Rect::from_min_max(to_ui(b.x0, b.y0), to_ui(b.x1, b.y1)),
                    0.0,
                    Stroke::new(1.5, Color32::from_rgba_unmultiplied(255, 210, 0, alpha)),
                    egui::StrokeKind::Middle,
                );
                painter.text(
                    to_ui(b.x0, b.y0) + vec2(2., -2.),
                    egui::Align2::LEFT_BOTTOM,
                    format!("r{}", label.round),
                    egui::FontId::monospace(11.),
                    Color32::from_rgba_unmultiplied(255, 210, 0, alpha),
                );
            }
            for p in &label.prompts.points_in_image {
                draw_point(
                    painter,
                    to_ui(p.x, p.y),
                    p.positive,
                    Some(label.round.to_string()),
                );
            }
        }
    }
    if let Some(b) = input.click_box {
        painter.rect_stroke(
            Rect::from_min_max(to_ui(b[0], b[1]), to_ui(b[2], b[3])),
            0.0,
            Stroke::new(2.0, Color32::YELLOW),
            egui::StrokeKind::Middle,
        );
    }
    for &(x, y, positive) in input.click_points {
        draw_point(painter, to_ui(x, y), positive, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_are_inverse_and_zoom_keeps_the_cursor_point() {
        let rect = Rect::from_min_size(pos2(10., 20.), vec2(400., 300.));
        let mut v = View::default();
        v.fit(rect, [800, 400]);
        assert!((v.zoom - 0.5).abs() < 1e-6);
        let p = pos2(123., 45.);
        let back = v.image_from_ui(rect, v.ui_from_image(rect, p));
        assert!((back - p).length() < 1e-3);
        let cursor = pos2(300., 100.);
        let under = v.image_from_ui(rect, cursor);
        v.zoom_at(rect, cursor, 3.0);
        assert!((v.image_from_ui(rect, cursor) - under).length() < 1e-3);
        assert!(!v.fitted);
        // the shader's uv transform agrees with image_from_ui at the corners
        let t = v.image_from_uv(rect);
        let corner = v.image_from_ui(rect, rect.max);
        assert!((t[0] + t[2] - corner.x).abs() < 1e-3 && (t[1] + t[3] - corner.y).abs() < 1e-3);
    }
}
