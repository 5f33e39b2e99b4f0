//! The desktop app, headless (egui_kittest on wgpu; CI uses Mesa's software Vulkan driver):
//! keyboard review, brush + undo, a SAM click, fine-tuning with live plot and cancel, a
//! rendered snapshot of the canvas overlays.
#![cfg(feature = "gui")]
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{pos2, Key, Modifiers};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use medmine::data::{self, Mask};
use medmine::gui::canvas::{canvas_ui, CanvasInput, Pointer, Tool, View};
use medmine::gui::overlay::{self, CanvasData, OverlayUniform};
use medmine::gui::training::{FINETUNE, TRAIN_FIRST};
use medmine::gui::{App, Startup};
use medmine::store::{
    BoxPrompt, ImportOptions, NewPseudoLabel, Project, Prompts, ReviewState, Role,
};

/// A project of 8 lung X-rays from `../shared/data` (half labelled); each unlabelled image gets
/// a pseudo-label (its ground truth eroded by 3 px, as a stand-in for a mined mask).
pub(crate) fn lung_project(tmp: &Path) -> PathBuf {
    let src = common::shared_data().join("lung-cxr");
    let data = tmp.join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(src.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names.iter().take(8) {
        std::fs::copy(src.join("images").join(n), data.join("images").join(n)).unwrap();
        std::fs::copy(src.join("masks").join(n), data.join("masks").join(n)).unwrap();
    }
    let root = tmp.join("project");
    let mut p = Project::init(&root).unwrap();
    let mut opts = ImportOptions::new(&data);
    opts.labelled_fraction = 0.5;
    p.import(&opts).unwrap();
    for rec in p.images().unwrap() {
        if rec.role != Role::Unlabelled {
            continue;
        }
        let gt = data::load_mask(&data.join("masks").join(&rec.name)).unwrap();
        let mask = erode(&gt, 3);
        p.add_pseudo_label(
            &rec.name,
            &NewPseudoLabel {
                round: 0,
                mask,
                prompts: Prompts {
                    boxes_in_image: vec![BoxPrompt {
                        x0: 20.,
                        y0: 20.,
                        x1: 120.,
                        y1: 200.,
                    }],
                    ..Default::default()
                },
                sam_iou: Some(0.9),
                stability: Some(0.95),
                agreement: Some(0.8),
                unet_components: Some(2),
                label_components: Some(2),
                sam_checkpoint: None,
                unet_checkpoint: None,
                unet_hash: None,
                labeler: None,
            },
        )
        .unwrap();
    }
    root
}

fn erode(m: &Mask, r: usize) -> Mask {
    let mut out = m.clone();
    for y in 0..m.height {
        for x in 0..m.width {
            let inside = (y.saturating_sub(r)..(y + r + 1).min(m.height)).all(|yy| {
                (x.saturating_sub(r)..(x + r + 1).min(m.width))
                    .all(|xx| m.data[yy * m.width + xx] > 0)
            });
            out.data[y * m.width + x] = u8::from(inside);
        }
    }
    out
}

pub(crate) fn app_harness(project: &Path, sam: Option<PathBuf>) -> Harness<'static, App> {
    app_harness_sized(project, sam, [1200.0, 800.0])
}

pub(crate) fn app_harness_sized(
    project: &Path,
    sam: Option<PathBuf>,
    size: [f32; 2],
) -> Harness<'static, App> {
    harness(
        Startup {
            project: Some(project.to_path_buf()),
            demo: None,
            sam,
            device_name: "cpu".into(),
        },
        size,
    )
}

fn harness(startup: Startup, size: [f32; 2]) -> Harness<'static, App> {
    Harness::builder()
        .with_size(size)
        .wgpu()
        .build_eframe(move |cc| App::new(cc, startup, candle_core::Device::Cpu))
}

const TIMEOUT: u64 = 120;

/// Steps frames until `cond` holds (the workers answer asynchronously).
pub(crate) fn wait_for(h: &mut Harness<'static, App>, what: &str, cond: impl Fn(&App) -> bool) {
    let t0 = Instant::now();
    while !cond(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(TIMEOUT),
            "timed out waiting for {what}; errors: {:?}",
            h.state().errors()
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
}

/// Starts training from the inspector ("Train a first model…" without a model, else "Start
/// fine-tuning…"; then "Start") with the settings already on the training state, and waits
/// for its result.
pub(crate) fn run_training(h: &mut Harness<'static, App>, what: &str) {
    let label = match h.state().model() {
        None => TRAIN_FIRST,
        Some(_) => FINETUNE,
    };
    h.get_by_label(label).click();
    h.step();
    h.step();
    h.get_by_label("Start").click();
    h.step();
    wait_for(h, what, |a| {
        a.training().result.is_some() && !a.training().running()
    });
}

pub(crate) fn loaded(h: &mut Harness<'static, App>) -> String {
    wait_for(h, "the selected image on the canvas", |a| {
        a.current_image().is_some()
            && a.current_image() == a.selected_image()
            && a.ui_from_image(pos2(0., 0.)).is_some()
    });
    h.state().current_image().unwrap().to_string()
}

#[test]
fn accept_of_an_image_without_a_pseudo_label_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = app_harness(&root, None);
    loaded(&mut h);
    let store = Project::open(&root).unwrap();
    let gt_only = store
        .images()
        .unwrap()
        .into_iter()
        .find(|r| store.latest_pseudo_label(&r.name).unwrap().is_none())
        .expect("an image without a pseudo-label")
        .name;
    h.get_by_label(&gt_only).click();
    wait_for(
        &mut h,
        "the image without a pseudo-label on the canvas",
        |a| a.current_image() == Some(gt_only.as_str()),
    );
    h.key_press(Key::A);
    wait_for(&mut h, "the refusal", |a| {
        a.saving() == 0
            && a.errors()
                .iter()
                .any(|e| e.contains("no pseudo-label to accept"))
    });
    let err = h.state().errors().last().unwrap().clone();
    assert!(err.contains(&gt_only) && err.contains("mine"), "{err}");
    assert_ne!(h.state().badge(&gt_only), Some(ReviewState::Accepted));
    assert_eq!(store.review(&gt_only).unwrap().state, ReviewState::Pending);
}

#[test]
fn about_box_shows_what_medmine_version_prints() {
    // the CLI binary's own answer, not the constant both are built from
    let cli = common::ok(&["--version"]);
    let version = cli.lines().next().unwrap_or_default().trim().to_string();
    assert!(version.contains("(commit "), "{version}");
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = app_harness(&root, None);
    loaded(&mut h);
    assert!(h.query_by_label(&version).is_none(), "About starts closed");

    h.get_by_label("About").click();
    h.step();
    h.step();
    h.get_by_label(&version);
    assert_eq!(medmine::gui::panels::about_version(), version);
}

#[test]
fn the_window_icon_is_the_desktop_entrys_icon() {
    let icon = medmine::gui::window_icon();
    let file = image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/medmine.png"))
        .unwrap()
        .into_rgba8();
    assert_eq!((icon.width, icon.height), (256, 256));
    assert_eq!(icon.rgba, file.into_raw());
    assert!(icon.rgba.chunks(4).any(|p| p[3] == 255), "not blank");
    let desktop = include_str!("../../assets/medmine.desktop");
    assert!(desktop.lines().any(|l| l == "Icon=medmine"));
}

#[test]
fn installed_binary_finds_the_packaged_demo() {
    // each package's layout: (the executable, where the package puts the demo)
    for (exe, demo) in [
        ("usr/bin/medmine", "usr/lib/medmine/demo"), // .deb, AppImage (cargo-packager)
        ("usr/bin/medmine", "usr/share/medmine/demo"), // distribution packages
        (
            "medmine.app/Contents/MacOS/medmine",
            "medmine.app/Contents/Resources/demo",
        ),
        ("medmine/medmine.exe", "medmine/demo"), // Windows installers
        ("checkout/target/release/medmine", "checkout/assets/demo"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join(exe);
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        assert_eq!(medmine::gui::demo_assets_beside(&exe), None, "{demo}");
        let demo = tmp.path().join(demo);
        std::fs::create_dir_all(&demo).unwrap();
        std::fs::write(demo.join("train.txt"), "x\n").unwrap();
        assert_eq!(
            medmine::gui::demo_assets_beside(&exe),
            Some(demo.canonicalize().unwrap()),
            "{demo:?}"
        );
    }
}

#[test]
fn keyboard_review_brush_and_undo_reach_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = app_harness(&root, None);

    // the app opens on the first pending pseudo-label
    let first = loaded(&mut h);
    let store = Project::open(&root).unwrap();
    assert!(store.latest_pseudo_label(&first).unwrap().is_some());
    assert_eq!(store.review(&first).unwrap().state, ReviewState::Pending);

    h.key_press(Key::A);
    wait_for(&mut h, "accept to be saved", |a| {
        a.badge(&first) == Some(ReviewState::Accepted) && a.saving() == 0
    });
    assert_eq!(store.review(&first).unwrap().state, ReviewState::Accepted);

    // the app moved to the next pseudo-label waiting for review (past labelled rows); reject it
    let second = loaded(&mut h);
    assert_ne!(second, first);
    assert!(store.latest_pseudo_label(&second).unwrap().is_some());
    assert_eq!(store.review(&second).unwrap().state, ReviewState::Pending);
    h.key_press(Key::R);
    wait_for(&mut h, "reject to be saved", |a| {
        a.badge(&second) == Some(ReviewState::Rejected) && a.saving() == 0
    });
    assert_eq!(store.review(&second).unwrap().state, ReviewState::Rejected);

    // next pending image: paint a stroke with the brush
    let here = loaded(&mut h);
    h.key_press(Key::N);
    h.step();
    let third = loaded(&mut h);
    assert!(third != here && third != first && third != second);
    assert_eq!(store.review(&third).unwrap().state, ReviewState::Pending);
    let pseudo_file = store.current_mask(&third).unwrap().unwrap().0;
    let pseudo = data::load_mask(&pseudo_file).unwrap();
    h.key_press(Key::B);
    h.step();
    assert_eq!(h.state().tool(), Tool::Brush);
    // a stroke through the image's top-left corner region (outside the lungs)
    let a = h.state().ui_from_image(pos2(10., 10.)).unwrap();
    let b = h.state().ui_from_image(pos2(60., 12.)).unwrap();
    h.hover_at(a);
    h.step();
    h.drag_at(a);
    h.step();
    for k in 1..=5 {
        h.hover_at(a + (b - a) * (k as f32 / 5.));
        h.step();
    }
    h.drop_at(b);
    h.step();
    wait_for(&mut h, "the stroke to be saved", |a| {
        a.badge(&third) == Some(ReviewState::Edited) && a.saving() == 0
    });
    let (edited_file, kind) = store.current_mask(&third).unwrap().unwrap();
    assert_eq!(kind, "edited");
    let edited = data::load_mask(&edited_file).unwrap();
    assert_eq!(pseudo.data[12 * pseudo.width + 30], 0);
    assert_eq!(
        edited.data[12 * edited.width + 30],
        1,
        "the stroke painted the mask"
    );
    let changed = pseudo
        .data
        .iter()
        .zip(&edited.data)
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 100, "only {changed} pixels changed");

    // undo restores the SAM proposal, in the store and on the canvas
    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    wait_for(&mut h, "undo to be saved", |a| {
        a.badge(&third) == Some(ReviewState::Pending) && a.saving() == 0
    });
    let (file, kind) = store.current_mask(&third).unwrap().unwrap();
    assert_eq!(kind, "pseudo_label");
    assert_eq!(data::load_mask(&file).unwrap(), pseudo);
    assert!(h.state().draft().is_none());
    // and redo brings the stroke back
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    wait_for(&mut h, "redo to be saved", |a| {
        a.badge(&third) == Some(ReviewState::Edited) && a.saving() == 0
    });
    assert_eq!(h.state().draft(), Some(&edited));
}

#[test]
fn the_fine_tuning_dialog_says_what_it_trains_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = app_harness(&root, None);
    let first = loaded(&mut h);
    let status = Project::open(&root).unwrap().status().unwrap();
    let (labelled, val) = (status.roles["labelled"], status.roles["val"]);
    h.key_press(Key::A);
    wait_for(&mut h, "accept to be saved", |a| {
        a.badge(&first) == Some(ReviewState::Accepted) && a.saving() == 0
    });
    // no model yet: the button and the dialog say a first model is trained
    assert!(h.query_by_label(FINETUNE).is_none());
    h.get_by_label(TRAIN_FIRST).click();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label("Train a first model");
    h.get_by_label("No model yet: a U-Net++ is trained from scratch.");
    h.get_by_label_contains(&format!(
        "Trains on {labelled} labelled images + 1 accepted pseudo-labels (weight 0.50); \
         validates on {val} images."
    ));
    // imported without split lists: no validation images, and the dialog says what it keeps
    assert_eq!(val, 0);
    h.get_by_label_contains(
        "No validation images: the epoch with the lowest training loss is kept",
    );
}

#[test]
fn sam_kind_loads_a_vit_file_as_medsam() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let sam = common::root().join("tests/fixtures/sam/sam_tiny.pth");
    // tall enough that the Model section is on screen
    let mut h = app_harness_sized(&root, Some(sam), [1200.0, 1500.0]);
    loaded(&mut h);
    wait_for(&mut h, "SAM to load", |a| a.sam_loaded());
    assert_eq!(h.state().sam_variant(), Some("custom"), "auto: SAM's rules");
    // MedSAM has SAM vit_b's tensors: only the user can say; choosing it reloads the file
    h.get_by_label("SAM kind").click();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label("medsam").click();
    h.step();
    wait_for(&mut h, "SAM to load as MedSAM", |a| {
        a.sam_variant() == Some("custom (MedSam rules)")
    });
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
}

#[test]
fn sam_click_produces_a_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let sam = common::root().join("tests/fixtures/sam/sam_tiny.pth");
    let mut h = app_harness(&root, Some(sam));
    let name = loaded(&mut h);
    wait_for(&mut h, "SAM to load", |a| a.sam_loaded());
    h.key_press(Key::S);
    h.step();
    assert_eq!(h.state().tool(), Tool::Sam);
    let before = Project::open(&root)
        .unwrap()
        .mask_history(&name)
        .unwrap()
        .len();
    let (file, _) = Project::open(&root)
        .unwrap()
        .current_mask(&name)
        .unwrap()
        .unwrap();
    let proposal = data::load_mask(&file).unwrap();
    assert!(proposal.data.contains(&1));
    let p = h.state().ui_from_image(pos2(80., 120.)).unwrap();
    h.hover_at(p);
    h.step();
    h.drag_at(p);
    h.step();
    h.drop_at(p);
    h.step();
    assert!(h.state().sam_pending(), "the spinner shows while SAM works");
    wait_for(&mut h, "SAM's mask to be saved", |a| {
        a.badge(&name) == Some(ReviewState::Edited) && a.saving() == 0 && !a.sam_pending()
    });
    let draft = h.state().draft().expect("SAM's mask is the edit").clone();
    assert_eq!((draft.width, draft.height), (256, 256));
    // a positive click adds SAM's object to the pseudo-label: the rest of it survives
    let covers = |big: &data::Mask, small: &data::Mask| {
        big.data.iter().zip(&small.data).all(|(&b, &s)| b >= s)
    };
    assert!(
        covers(&draft, &proposal),
        "the click kept the pseudo-label's pixels"
    );
    let store = Project::open(&root).unwrap();
    assert_eq!(store.mask_history(&name).unwrap().len(), before + 1);
    let (file, kind) = store.current_mask(&name).unwrap().unwrap();
    assert_eq!(kind, "edited");
    assert_eq!(data::load_mask(&file).unwrap(), draft);

    // a follow-up click on the same object (with the last logits as mask input) still adds
    let q = h.state().ui_from_image(pos2(60., 100.)).unwrap();
    h.hover_at(q);
    h.step();
    h.drag_at(q);
    h.step();
    h.drop_at(q);
    h.step();
    wait_for(&mut h, "the second answer", |a| {
        !a.sam_pending() && a.saving() == 0
    });
    let second = h.state().draft().unwrap().clone();
    assert!(
        covers(&second, &proposal),
        "the follow-up kept the pseudo-label"
    );

    // Esc, then a right click: a new object whose region is removed, nothing added
    h.key_press(Key::Escape);
    h.step();
    let r = h.state().ui_from_image(pos2(170., 120.)).unwrap();
    h.hover_at(r);
    h.step();
    for pressed in [true, false] {
        h.event(egui::Event::PointerButton {
            pos: r,
            button: egui::PointerButton::Secondary,
            pressed,
            modifiers: egui::Modifiers::NONE,
        });
        h.step();
    }
    assert!(h.state().sam_pending());
    wait_for(&mut h, "the removal", |a| {
        !a.sam_pending() && a.saving() == 0
    });
    let third = h.state().draft().unwrap().clone();
    assert!(
        covers(&second, &third),
        "a negative first click only removes"
    );
    let (file, _) = Project::open(&root)
        .unwrap()
        .current_mask(&name)
        .unwrap()
        .unwrap();
    assert_eq!(
        data::load_mask(&file).unwrap(),
        third,
        "the store has what is shown"
    );

    // encode every image in the background: the project's cache holds all 8 embeddings
    h.get_by_label("Encode all with SAM").click();
    h.step();
    wait_for(&mut h, "the encoding job to start", |a| {
        a.training().running()
    });
    wait_for(&mut h, "the encoding job to end", |a| {
        !a.training().running()
    });
    let cached = std::fs::read_dir(root.join("cache/sam-embeddings"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension().is_some_and(|x| x == "safetensors")
        })
        .count();
    assert_eq!(cached, 8, "{:?}", h.state().training().last_message);
}

#[test]
fn finetune_button_plots_progress_and_cancel_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = app_harness(&root, None);
    loaded(&mut h);
    {
        let t = h.state_mut().training_mut();
        t.epochs = 400; // long enough that cancel, not the end, stops it
        t.size = 32;
        t.base = 4;
    }
    h.get_by_label(TRAIN_FIRST).click();
    h.step();
    h.step();
    h.get_by_label("Start").click();
    h.step();
    wait_for(&mut h, "a loss point on the plot", |a| {
        a.training().loss.len() >= 2
    });
    assert!(h.state().training().running());
    h.get_by_label("Cancel").click();
    h.step();
    wait_for(&mut h, "the job to stop", |a| !a.training().running());
    let r = h.state().training().result.clone().expect("a result");
    assert_eq!(r.status, medmine::train::TrainStatus::Cancelled);
    assert!(r.epochs_done < 400);
    assert!(r.best.is_file());
    let runs = Project::open(&root).unwrap().runs().unwrap();
    assert_eq!(
        runs.last().unwrap().status,
        medmine::store::RunStatus::Cancelled
    );
}

/// A fixed scene: a gradient image, a disc as ground truth (outline) and a shifted disc as the
/// pseudo-label (fill), a probability ramp and prompt markers.
struct CanvasScene {
    data: CanvasData,
    view: View,
    /// Per layer: 0 hidden, 1 fill, 2 outline, 3 colour map.
    modes: [u32; 4],
}

impl eframe::App for CanvasScene {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let mut u = <OverlayUniform as bytemuck::Zeroable>::zeroed();
        u.image_size = [128., 128.];
        u.window = [0.5, 1.0];
        u.colors = [
            [0.2, 0.5, 1.0, 0.9],
            [1.0, 1.0, 1.0, 0.5],
            [1.0, 0.8, 0.0, 0.4],
            [0.9, 0.2, 0.9, 0.5],
        ];
        u.modes = self.modes;
        egui::CentralPanel::default().show(ui, |ui| {
            canvas_ui(
                ui,
                &mut self.view,
                &mut Pointer::default(),
                CanvasInput {
                    click_points: &[(40., 40., true), (100., 30., false)],
                    click_box: Some([20., 20., 90., 90.]),
                    ..CanvasInput::passive(1, &self.data, u)
                },
                &mut Vec::new(),
            );
        });
    }
}

#[test]
fn canvas_overlays_render_like_the_snapshot() {
    let n = 128usize;
    let disc = |cx: f32, cy: f32, r: f32| -> Vec<u8> {
        (0..n * n)
            .map(|i| {
                let (x, y) = ((i % n) as f32, (i / n) as f32);
                if (x - cx).powi(2) + (y - cy).powi(2) <= r * r {
                    255
                } else {
                    0
                }
            })
            .collect()
    };
    let rgba: Vec<u8> = (0..n * n)
        .flat_map(|i| {
            let v = ((i % n) * 255 / n) as u8;
            [v, v / 2, 255 - v, 255]
        })
        .collect();
    let prob: Vec<u8> = (0..n * n).map(|i| ((i / n) * 255 / n) as u8).collect();
    let data = CanvasData {
        width: n as u32,
        height: n as u32,
        rgba: Arc::new(rgba),
        layers: [
            Some(Arc::new(disc(60., 60., 30.))),
            Some(Arc::new(prob)),
            Some(Arc::new(disc(70., 64., 28.))),
            None,
        ],
        versions: [1; 5],
    };
    let mut h = Harness::builder()
        .with_size([300.0, 300.0])
        .wgpu()
        .build_eframe(move |cc| {
            overlay::install(cc.wgpu_render_state.as_ref().expect("wgpu"));
            CanvasScene {
                data,
                view: View::default(),
                modes: [2, 3, 1, 0],
            }
        });
    let render = |h: &mut Harness<'static, CanvasScene>, modes: [u32; 4]| {
        h.state_mut().modes = modes;
        h.run_steps(2);
        h.render().expect("render")
    };
    let diff = |a: &image::RgbaImage, b: &image::RgbaImage| {
        a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count()
    };
    let all = render(&mut h, [2, 3, 1, 0]);
    let no_outline = render(&mut h, [0, 3, 1, 0]);
    let no_fill = render(&mut h, [2, 3, 0, 0]);
    let no_prob = render(&mut h, [2, 0, 1, 0]);
    // the image is fitted into ~280 px: 128 image px -> ~2.2 screen px each
    let outline = diff(&all, &no_outline);
    let fill = diff(&all, &no_fill);
    let prob = diff(&all, &no_prob);
    // a 1-image-pixel ring of radius 30 (~2.2 screen px wide, circumference ~415 px)
    assert!(
        (300..3000).contains(&outline),
        "outline changed {outline} pixels"
    );
    // a filled disc of radius 28 image px: ~ pi * (28 * 2.2)^2 ~ 12000 screen px
    assert!((8000..17000).contains(&fill), "fill changed {fill} pixels");
    // the probability ramp tints every row below the first few
    assert!(prob > 40000, "probability colour map changed {prob} pixels");
    render(&mut h, [2, 3, 1, 0]);
    h.snapshot("canvas_overlays");
}

#[test]
fn new_project_from_a_dataset_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = lung_project(tmp.path());
    let mut h = app_harness(&existing, None);
    loaded(&mut h);
    // what "New project from dataset…" does once the folder dialog answers
    h.state_mut().start_new_project(tmp.path().join("data"));
    {
        // the user chooses to keep half of the masks (the default keeps them all)
        let n = h.state_mut().dialogs_mut().new_project.as_mut().unwrap();
        n.subsample = true;
        n.labelled_fraction = 0.5;
    }
    wait_for(&mut h, "the scan of the dataset folder", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .is_some_and(|n| n.scan_summary().is_some())
    });
    h.get_by_label("Create").click();
    h.step();
    let created = tmp.path().join("data.medmine");
    wait_for(&mut h, "the new project to open", |a| {
        a.project() == Some(created.as_path()) && a.image_count() == 8
    });
    let p = Project::open(&created).unwrap();
    let status = p.status().unwrap();
    assert_eq!(status.total, 8);
    assert_eq!(
        status.roles["labelled"], 4,
        "half of the 8 images keep their labels, as chosen"
    );
}

#[test]
fn mine_next_round_from_the_app_with_self_training() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    // a laptop-sized window: the fine-tuning result's buttons are in view when the run ends
    let mut h = app_harness(&root, None);
    let shown = loaded(&mut h);
    {
        let t = h.state_mut().training_mut();
        t.epochs = 1;
        t.size = 32;
        t.base = 4;
    }
    run_training(&mut h, "a fine-tuned model");
    // the project's first model becomes the app's model without a click
    let first = h.state().training().result.clone().unwrap().best;
    wait_for(&mut h, "the first model loaded", |a| {
        a.model() == Some(&first)
    });
    // no SAM checkpoint: "Mine next round" mines with self-training without a visit to the
    // Mining dialog
    h.step();
    let best = h.state().training().result.clone().unwrap().best;
    h.get_by_label("Mine next round with this model").click();
    h.step();
    wait_for(&mut h, "the mining pass's counts", |a| {
        a.mining().last.is_some() && !a.training().running()
    });
    let s = h.state().mining().last.clone().unwrap();
    assert_eq!(h.state().model(), Some(&best));
    // the 4 unlabelled images had pseudo-labels from no recorded model: all mined again
    assert_eq!(s.mined.len() + s.no_component.len(), 4, "{s:?}");
    assert!(s.failed.is_empty(), "{s:?}");
    assert!(h.state().toasts().any(|t| t.starts_with("mining: mined")));
    let p = Project::open(&root).unwrap();
    let hash = medmine::fsutil::sha256_file(&best).unwrap();
    for name in &s.mined {
        let newest = p.latest_pseudo_label(name).unwrap().unwrap();
        assert_eq!(newest.unet_hash.as_deref(), Some(hash.as_str()), "{name}");
        assert_eq!(newest.labeler.as_deref(), Some("unet"));
    }
    // the canvas shows the image again, reloaded with its new pseudo-label
    wait_for(&mut h, "the canvas to reload", |a| {
        a.current_image() == Some(shown.as_str())
    });
    if s.mined.contains(&shown) {
        let newest = p.latest_pseudo_label(&shown).unwrap().unwrap();
        let mask = data::load_mask(&p.masks_dir().join(&newest.mask_file)).unwrap();
        wait_for(&mut h, "the new pseudo-label on the canvas", |a| {
            a.pseudo_label() == Some(&mask)
        });
    }
}

fn demo_harness(demo: &Path) -> Harness<'static, App> {
    harness(
        Startup {
            project: None,
            demo: Some((demo.to_path_buf(), common::demo())),
            sam: None,
            device_name: "cpu".into(),
        },
        [1200.0, 800.0],
    )
}

#[test]
fn first_run_of_the_demo_has_pseudo_labels_to_review_without_any_download() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let t0 = Instant::now();
    let mut h = demo_harness(&demo);
    // The canvas caches its textures across images and reopenings by version: a version seen
    // twice must carry the same pixels, or the canvas shows stale layers (the first run once
    // showed the image reloaded after mining without its pseudo-label).
    let seen = std::cell::RefCell::new(std::collections::HashMap::new());
    let same_version_same_pixels = |a: &App| {
        use std::hash::{Hash, Hasher};
        let Some(d) = a.canvas_data() else { return };
        let digest = |bytes: Option<&Vec<u8>>| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let mut slots = vec![(0, digest(Some(&d.rgba)))];
        for (i, l) in d.layers.iter().enumerate() {
            slots.push((i + 1, digest(l.as_deref())));
        }
        for (slot, pixels) in slots {
            let mut seen = seen.borrow_mut();
            let first = *seen.entry((slot, d.versions[slot])).or_insert(pixels);
            assert_eq!(
                first, pixels,
                "canvas slot {slot}: version {} reused for other pixels",
                d.versions[slot]
            );
        }
    };
    wait_for(&mut h, "the demo's first round", |a| {
        same_version_same_pixels(a);
        a.pseudo_labelled() > 0 && a.model().is_some()
    });
    wait_for(
        &mut h,
        "the first pending pseudo-label on the canvas",
        |a| {
            same_version_same_pixels(a);
            a.canvas_data()
                .is_some_and(|d| d.layers[medmine::gui::overlay::LAYER_PSEUDO].is_some())
        },
    );
    // the first run's toasts stay clear of the first-steps hint
    let toasts: Vec<String> = h.state().toasts().map(String::from).collect();
    assert!(!toasts.is_empty(), "the first run says it is done");
    let hint = h.get_by_label_contains("First steps").rect();
    for t in &toasts {
        for node in h.query_all_by_label(t) {
            assert!(!node.rect().intersects(hint), "toast {t:?} covers the hint");
        }
    }
    eprintln!(
        "first run: pseudo-labels after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(h.state().first_steps_shown());
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    let p = Project::open(&demo).unwrap();
    let runs = p.runs().unwrap();
    assert_eq!(runs.len(), 1, "one model trained");
    let mut labelers = std::collections::BTreeSet::new();
    for img in p.images().unwrap() {
        for l in p.pseudo_labels(&img.name).unwrap() {
            labelers.insert(l.labeler.unwrap_or_default());
        }
    }
    assert_eq!(labelers.into_iter().collect::<Vec<_>>(), ["unet"]);
    let pending = p
        .images()
        .unwrap()
        .iter()
        .filter(|i| {
            p.review(&i.name).unwrap().state == ReviewState::Pending
                && !p.pseudo_labels(&i.name).unwrap().is_empty()
        })
        .count();
    assert!(pending > 0, "pseudo-labels wait for review");
    drop(p);
    drop(h);
    // the next start finds the model and the pseudo-labels: no second first run
    let mut h = demo_harness(&demo);
    wait_for(&mut h, "the demo reopened with its model", |a| {
        a.pseudo_labelled() > 0 && a.model().is_some()
    });
    for _ in 0..20 {
        h.step();
    }
    assert!(!h.state().first_steps_shown());
    assert_eq!(Project::open(&demo).unwrap().runs().unwrap().len(), 1);
}
