//! Frame time of the canvas: a 2048x2048 image with four mask layers through the wgpu overlay,
//! rendered headless with egui_kittest (on machines without a GPU wgpu falls back to a
//! software adapter such as Mesa's lavapipe; the adapter is printed).
//!
//! `cargo bench --bench canvas` prints ms per frame for: a static frame, pan/zoom every frame
//! (uniform only), and a brush stroke every frame (one 4 MiB layer re-uploaded). Each frame
//! includes egui's layout and the full-window read-back that `render()` does, so it overstates
//! what a window on screen costs.
use std::sync::Arc;
use std::time::Instant;

use egui_kittest::Harness;
use medmine::gui::canvas::{canvas_ui, CanvasInput, Pointer, View};
use medmine::gui::overlay::{self, CanvasData, OverlayUniform};

const N: usize = 2048;

struct Scene {
    data: CanvasData,
    view: View,
    mode: u8,
    frame: u64,
}

impl eframe::App for Scene {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame += 1;
        match self.mode {
            1 => {
                self.view.fitted = false;
                self.view.zoom = 0.4 + 0.05 * (self.frame % 10) as f32;
                self.view.center_in_image = egui::pos2(1024. + (self.frame % 7) as f32, 1024.);
            }
            2 => {
                // a brush dab: the edit layer changes and is re-uploaded
                let mut layer = (*self.data.layers[3].clone().unwrap()).clone();
                let y = (self.frame as usize * 13) % N;
                for v in &mut layer[y * N..(y + 1) * N] {
                    *v = 255;
                }
                self.data.layers[3] = Some(Arc::new(layer));
                self.data.versions[4] += 1;
            }
            _ => {}
        }
        let mut u = <OverlayUniform as bytemuck::Zeroable>::zeroed();
        u.image_size = [N as f32, N as f32];
        u.window = [0.5, 1.0];
        u.colors = [
            [0.2, 0.5, 1.0, 0.9],
            [1.0; 4],
            [1.0, 0.8, 0.0, 0.4],
            [0.9, 0.2, 0.9, 0.5],
        ];
        u.modes = [2, 3, 1, 2];
        u.flags[0] = 1;
        egui::CentralPanel::default().show(ui, |ui| {
            canvas_ui(
                ui,
                &mut self.view,
                &mut Pointer::default(),
                CanvasInput {
                    grayscale: true,
                    ..CanvasInput::passive(1, &self.data, u)
                },
                &mut Vec::new(),
            );
        });
        ui.ctx().request_repaint();
    }
}

fn scene_data() -> CanvasData {
    let disc = |cx: f32, cy: f32, r: f32| -> Arc<Vec<u8>> {
        Arc::new(
            (0..N * N)
                .map(|i| {
                    let (x, y) = ((i % N) as f32, (i / N) as f32);
                    u8::from((x - cx).powi(2) + (y - cy).powi(2) <= r * r) * 255
                })
                .collect(),
        )
    };
    let rgba = (0..N * N)
        .flat_map(|i| {
            let v = (((i % N) ^ (i / N)) & 255) as u8;
            [v, v, v, 255]
        })
        .collect();
    CanvasData {
        width: N as u32,
        height: N as u32,
        rgba: Arc::new(rgba),
        layers: [
            Some(disc(900., 1000., 500.)),
            Some(Arc::new((0..N * N).map(|i| ((i / N) / 8) as u8).collect())),
            Some(disc(1000., 1050., 480.)),
            Some(disc(1100., 900., 300.)),
        ],
        versions: [1; 5],
    }
}

fn main() {
    let frames = std::env::var("FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    for (mode, what) in [
        (0u8, "static"),
        (1, "pan/zoom every frame"),
        (2, "brush every frame"),
    ] {
        let data = scene_data();
        let mut h = Harness::builder()
            .with_size([1280.0, 800.0])
            .wgpu()
            .build_eframe(move |cc| {
                let rs = cc.wgpu_render_state.as_ref().expect("wgpu");
                if mode == 0 {
                    let info = rs.adapter.get_info();
                    println!(
                        "adapter: {} ({:?}, {:?})",
                        info.name, info.device_type, info.backend
                    );
                }
                overlay::install(rs);
                Scene {
                    data,
                    view: View::default(),
                    mode,
                    frame: 0,
                }
            });
        h.step();
        h.render().expect("render");
        let t0 = Instant::now();
        for _ in 0..frames {
            h.step();
            h.render().expect("render");
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0 / frames as f64;
        println!("canvas 2048x2048, 4 layers, 1280x800 window, {what}: {ms:.1} ms/frame");
    }
}
