//! The desktop app: a view onto the same pipeline as the CLI (it adds no pipeline logic).
//! Layout and input in [`app`], [`panels`], [`canvas`] and [`training`]; rendering of the image
//! and mask layers in [`overlay`] (wgpu + `shaders/overlay.wgsl`); pipeline work on the threads
//! of [`worker`].
pub mod app;
pub mod canvas;
pub mod dialogs;
pub mod edit;
mod events;
pub mod first_run;
pub mod image_list;
mod intents;
pub mod mining_panel;
mod model_thread;
pub mod new_project;
pub mod overlay;
pub mod panels;
pub mod path_field;
pub mod sam_edit;
pub mod scheduler;
mod scoring;
mod store_thread;
pub mod training;
pub mod view_ui;
pub mod weights_panel;
pub mod window;
pub mod worker;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

pub use app::{App, Startup};

/// Where the demo project lives: `$XDG_DATA_HOME/medmine/demo` (or `~/.local/share/…`).
pub fn demo_project_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("medmine").join("demo"))
}

/// The demo images (`assets/demo`): beside the working directory, above the executable
/// (`target/release/medmine`), where a package put them ([`demo_assets_beside`]), or where the
/// crate was built.
pub fn demo_assets() -> Option<PathBuf> {
    let found = |p: PathBuf| {
        p.join("train.txt")
            .is_file()
            .then(|| p.canonicalize().ok())
            .flatten()
    };
    found(PathBuf::from("assets/demo"))
        .or_else(|| demo_assets_beside(&std::env::current_exe().ok()?))
        .or_else(|| found(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo")))
}

/// The demo images where a checkout or a package put them, found from the executable `exe`:
/// `assets/demo` above it (a checkout's `target/release/medmine`), `lib/medmine/demo` or
/// `share/medmine/demo` (a .deb's or AppImage's `usr/bin/medmine`), `../Resources/demo`
/// (a macOS `.app`'s `Contents/MacOS/medmine`) or `demo` beside it (a Windows install).
pub fn demo_assets_beside(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let packaged = [dir.join("demo"), dir.join("../Resources/demo")];
    let above = exe.ancestors().skip(1).flat_map(|d| {
        [
            d.join("assets/demo"),
            d.join("lib/medmine/demo"),
            d.join("share/medmine/demo"),
        ]
    });
    packaged
        .into_iter()
        .chain(above)
        .find(|p| p.join("train.txt").is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// The window's icon: `assets/medmine.png`, the desktop entry's icon, built into the binary.
pub fn window_icon() -> egui::IconData {
    const PNG: &[u8] = include_bytes!("../../assets/medmine.png");
    // built in and decoded by a test: a failure here is a broken build, not user data
    let rgba = image::load_from_memory(PNG)
        .expect("assets/medmine.png decodes")
        .into_rgba8();
    egui::IconData {
        width: rgba.width(),
        height: rgba.height(),
        rgba: rgba.into_raw(),
    }
}

/// Opens the window (blocks until it is closed).
pub fn run(
    project: Option<PathBuf>,
    sam: Option<PathBuf>,
    device: candle_core::Device,
) -> Result<()> {
    let startup = Startup {
        project,
        demo: demo_project_dir().zip(demo_assets()),
        sam,
        device_name: crate::device::describe(&device),
    };
    let options = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: egui::ViewportBuilder::default()
            .with_title("medmine")
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([800.0, 500.0])
            // the desktop entry's name (Wayland app id, X11 WM_CLASS) and its icon
            .with_app_id("medmine")
            .with_icon(window_icon()),
        ..Default::default()
    };
    eframe::run_native(
        "medmine",
        options,
        Box::new(move |cc| Ok(Box::new(App::new(cc, startup, device)))),
    )
    .map_err(|e| anyhow!("the window could not be opened: {e}"))
}
