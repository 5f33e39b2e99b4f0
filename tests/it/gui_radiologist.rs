//! The radiologist's view, headless (egui_kittest): a window set on an image and the
//! project's window come back when the project is reopened (and "reset to project window"
//! forgets the image's own); the image list sorts by pseudo-label Dice; the compare panes pan
//! together; the error map compares the ground truth with the pseudo-label or the U-Net++
//! prediction.
#![cfg(feature = "gui")]
use std::path::Path;
use std::time::{Duration, Instant};

use egui::{pos2, vec2, Key};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use medmine::data;
use medmine::gui::app::{ErrorSource, SortBy};
use medmine::gui::window::{Preset, WindowSource};
use medmine::gui::App;
use medmine::metrics::Confusion;
use medmine::store::{ImportOptions, Project, RunStatus, ScoreSource};

use super::gui::{app_harness_sized, loaded, lung_project, wait_for};

fn harness(root: &Path) -> Harness<'static, App> {
    app_harness_sized(root, None, [1400.0, 1500.0])
}

/// Waits until the store (read through its own connection) satisfies `cond`.
fn store_until(root: &Path, what: &str, cond: impl Fn(&Project) -> bool) {
    let t0 = Instant::now();
    loop {
        if cond(&Project::open(root).unwrap()) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn windows_come_back_when_the_project_is_reopened() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let range = data::ValueRange::GRAY8;
    let (bone, lung) = (Preset::Bone.window(&range), Preset::Lung.window(&range));
    let (first, second);
    {
        let mut h = harness(&root);
        first = loaded(&mut h);
        // an 8-bit PNG without a stored window starts at its full range
        assert_eq!(h.state().window().source, WindowSource::FullRange);
        h.get_by_label("bone").click();
        h.step();
        assert_eq!(h.state().window().window, bone);
        assert_eq!(h.state().window().source, WindowSource::Image);
        // the next image has no window of its own: "lung" becomes the project's window
        h.key_press(Key::J);
        h.step();
        second = loaded(&mut h);
        assert_ne!(first, second);
        assert_eq!(h.state().window().source, WindowSource::FullRange);
        h.get_by_label("lung").click();
        h.step();
        h.get_by_label("use for project").click();
        h.step();
        assert_eq!(h.state().window().source, WindowSource::Project);
        let f = first.clone();
        store_until(&root, "both windows saved", |p| {
            p.image_window(&f).unwrap().is_some() && p.project_window().unwrap().is_some()
        });
    }
    let p = Project::open(&root).unwrap();
    assert_eq!(p.image_window(&first).unwrap().unwrap().center, bone.center);
    assert_eq!(p.project_window().unwrap().unwrap().width, lung.width);
    assert_eq!(p.image_window(&second).unwrap(), None);
    drop(p);

    // reopened: the first image shows its own window, the others the project's
    let mut h = harness(&root);
    assert_eq!(loaded(&mut h), first);
    assert_eq!(h.state().window().window, bone);
    assert_eq!(h.state().window().source, WindowSource::Image);
    h.key_press(Key::J);
    h.step();
    assert_eq!(loaded(&mut h), second);
    assert_eq!(h.state().window().window, lung);
    assert_eq!(h.state().window().source, WindowSource::Project);
    // back on the first image, "reset to project window" forgets its own
    h.key_press(Key::K);
    h.step();
    assert_eq!(loaded(&mut h), first);
    h.get_by_label("reset to project window").click();
    h.step();
    assert_eq!(h.state().window().window, lung);
    assert_eq!(h.state().window().source, WindowSource::Project);
    store_until(&root, "the image's window removed", |p| {
        p.image_window(&first).unwrap().is_none()
    });
}

#[test]
fn the_list_sorts_by_pseudo_label_dice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    // the Dice of each pseudo-label against its ground truth, computed here
    let p = Project::open(&root).unwrap();
    let mut expected: Vec<(String, f64)> = Vec::new();
    for rec in p.images().unwrap() {
        let (Some(gt), Some(label)) = (
            p.ground_truth(&rec.name).unwrap(),
            p.latest_pseudo_label(&rec.name).unwrap(),
        ) else {
            continue;
        };
        let gt = data::load_mask(&gt).unwrap();
        let m = data::load_mask(&p.masks_dir().join(&label.mask_file)).unwrap();
        let dice = Confusion::from_masks(&m.data, &gt.data).scores().dice;
        expected.push((rec.name, dice));
    }
    drop(p);
    assert!(expected.len() >= 3, "{expected:?}");
    expected.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));

    let mut h = harness(&root);
    loaded(&mut h);
    wait_for(&mut h, "the pseudo-label Dice in the list", |a| {
        a.visible_rows()
            .iter()
            .filter(|r| r.pseudo_dice.is_some())
            .count()
            == expected.len()
    });
    h.get_by_label(SortBy::PseudoDice.label()).click();
    h.step();
    assert_eq!(h.state().sort(), SortBy::PseudoDice);
    let rows = h.state().visible_rows();
    let shown: Vec<(&str, f64)> = rows
        .iter()
        .take(expected.len())
        .map(|r| (r.name.as_str(), r.pseudo_dice.unwrap()))
        .collect();
    for ((name, dice), (want, want_dice)) in shown.iter().zip(&expected) {
        assert_eq!(name, want, "order: {shown:?} vs {expected:?}");
        assert!((dice - want_dice).abs() < 1e-9);
    }
    // images without a pseudo-label come after
    assert!(rows[expected.len()..]
        .iter()
        .all(|r| r.pseudo_dice.is_none()));
    // and back to names
    h.get_by_label(SortBy::Name.label()).click();
    h.step();
    let names: Vec<String> = h
        .state()
        .visible_rows()
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

/// The mean colour of a few screen pixels around `at` (logical points; the harness draws at
/// one pixel per point).
fn colour_at(h: &mut Harness<'static, App>, at: egui::Pos2) -> [f32; 3] {
    let img = h.render().expect("render");
    let mut sum = [0.0; 3];
    let mut n = 0.0;
    for dy in -2..=2 {
        for dx in -2..=2 {
            let px = img.get_pixel((at.x as i32 + dx) as u32, (at.y as i32 + dy) as u32);
            for (acc, v) in sum.iter_mut().zip(px.0) {
                *acc += f32::from(v);
            }
            n += 1.0;
        }
    }
    sum.map(|v| v / n)
}

#[test]
fn error_map_source_switches_between_pseudo_label_and_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = harness(&root);
    let name = loaded(&mut h);
    // a pixel inside the pseudo-label (and so inside the ground truth): the mask's centroid
    // row, its middle foreground pixel
    let p = Project::open(&root).unwrap();
    let label = p.latest_pseudo_label(&name).unwrap().unwrap();
    let m = data::load_mask(&p.masks_dir().join(&label.mask_file)).unwrap();
    let inside: Vec<(usize, usize)> = (0..m.height)
        .flat_map(|y| (0..m.width).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            (y.saturating_sub(4)..(y + 5).min(m.height)).all(|yy| {
                (x.saturating_sub(4)..(x + 5).min(m.width)).all(|xx| m.data[yy * m.width + xx] == 1)
            })
        })
        .collect();
    let (x, y) = inside[inside.len() / 2];
    drop(p);

    h.get_by_label("error map").click();
    h.step();
    assert_eq!(h.state().error_source(), ErrorSource::PseudoLabel);
    let at = h
        .state()
        .ui_from_image(pos2(x as f32 + 0.5, y as f32 + 0.5))
        .unwrap();
    let agree = colour_at(&mut h, at);
    // agreement is tinted green
    assert!(agree[1] > agree[2] + 10.0, "{agree:?}");

    // no U-Net++ is loaded: every ground-truth pixel is a false negative (blue)
    h.get_by_label(ErrorSource::Prediction.label()).click();
    h.step();
    assert_eq!(h.state().error_source(), ErrorSource::Prediction);
    let missed = colour_at(&mut h, at);
    assert!(missed[2] > missed[1] + 30.0, "{missed:?}");
    assert!(missed[2] > missed[0] + 60.0, "{missed:?}");
    assert!(h
        .query_by_label("No U-Net++ is loaded: nothing to compare.")
        .is_some());

    h.get_by_label(ErrorSource::PseudoLabel.label()).click();
    h.step();
    let again = colour_at(&mut h, at);
    assert!((again[2] - agree[2]).abs() < 2.0, "{again:?} vs {agree:?}");
}

#[test]
fn compare_panes_pan_together() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = harness(&root);
    loaded(&mut h);
    h.get_by_label("side by side").click();
    h.step();
    h.step();
    let first_pane = h.state().canvas_rect().unwrap();
    let probe = pos2(50.0, 60.0);
    let before = h.state().ui_from_image(probe).unwrap();
    // drag in the middle pane (right of the first one)
    let start = pos2(
        first_pane.right() + first_pane.width() / 2.0,
        first_pane.center().y,
    );
    let delta = vec2(40.0, 25.0);
    h.hover_at(start);
    h.step();
    h.drag_at(start);
    h.step();
    for k in 1..=4 {
        h.hover_at(start + delta * (k as f32 / 4.0));
        h.step();
    }
    h.drop_at(start + delta);
    h.step();
    h.step();
    // the first pane moved with it
    let after = h.state().ui_from_image(probe).unwrap();
    assert!(
        ((after - before) - delta).length() < 2.0,
        "before {before:?} after {after:?}"
    );
}

#[test]
fn a_dicom_image_starts_at_its_own_window_and_presets_are_in_hounsfield_units() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ct");
    std::fs::create_dir_all(data.join("images")).unwrap();
    for n in ["s1", "s2"] {
        crate::data_dicom::write_ct(&data.join(format!("images/{n}.dcm")), 48);
    }
    let root = tmp.path().join("project");
    let mut p = Project::init(&root).unwrap();
    p.import(&ImportOptions::new(&data)).unwrap();
    drop(p);

    let mut h = harness(&root);
    let name = loaded(&mut h);
    let w = h.state().window();
    assert_eq!(w.source, WindowSource::File);
    assert_eq!((w.window.center, w.window.width), (40.0, 400.0));
    assert!(w.range.rescaled && w.range.dicom);
    assert_eq!((w.range.lo, w.range.hi), (-1024.0, 3071.0));
    // the 400 HU window spreads ~225 of the slice's 12-bit steps over the gray scale: far
    // more gray levels on screen than an 8-bit texture (~25 levels in 400 of 4095 HU) could
    // give
    let rect = h.state().canvas_rect().unwrap();
    let shot = h.render().expect("render");
    let mut levels = std::collections::HashSet::new();
    for y in rect.top() as u32 + 2..rect.bottom() as u32 - 2 {
        for x in rect.left() as u32 + 2..rect.right() as u32 - 2 {
            let p = shot.get_pixel(x, y).0;
            if p[0] == p[1] && p[1] == p[2] {
                levels.insert(p[0]);
            }
        }
    }
    assert!(levels.len() > 60, "{} gray levels", levels.len());
    h.get_by_label("lung").click();
    h.step();
    assert_eq!(
        (
            h.state().window().window.center,
            h.state().window().window.width
        ),
        (-600.0, 1500.0)
    );
    store_until(&root, "the lung window saved in HU", |p| {
        p.image_window(&name)
            .unwrap()
            .is_some_and(|w| w.center == -600.0 && w.unit == "hu")
    });
}

#[test]
fn scoring_with_the_unet_fills_the_list_and_sorts_by_uncertainty() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let dev = candle_core::Device::Cpu;
    let ckpt =
        medmine::train::checkpoint::fresh_checkpoint(&root.join("runs/init"), 2, 32, 1, &dev)
            .unwrap();
    let mut p = Project::open(&root).unwrap();
    let run = p
        .start_run("init", &serde_json::json!({}), &root.join("runs/init"))
        .unwrap();
    p.finish_run(run, RunStatus::Done, Some(&ckpt), Some(&ckpt), None)
        .unwrap();
    let images = p.images().unwrap();
    drop(p);

    let mut h = harness(&root);
    let shown = loaded(&mut h);
    wait_for(&mut h, "the project's U-Net++", |a| a.model().is_some());
    // the image on the canvas is scored from its probability map, the others not yet
    wait_for(&mut h, "the shown image's score in the list", |a| {
        a.visible_rows()
            .iter()
            .any(|r| r.name == shown && r.uncertainty.is_some())
    });
    assert!(h
        .state()
        .visible_rows()
        .iter()
        .any(|r| r.uncertainty.is_none()));
    h.get_by_label("Score images").click();
    wait_for(&mut h, "every image scored", |a| {
        a.visible_rows().iter().all(|r| r.uncertainty.is_some())
    });
    // what the list shows is what the store keeps, and is the model's own entropy
    let stored = Project::open(&root)
        .unwrap()
        .scores(ScoreSource::Unet)
        .unwrap();
    let predictor = medmine::predict::Predictor::load(
        &ckpt,
        &dev,
        medmine::models::unetpp::InferenceMode::Accurate,
    )
    .unwrap();
    let rec = &images[0];
    let img = data::load_image(&rec.path).unwrap();
    let prob = predictor.predict(&[&img]).unwrap().pop().unwrap();
    let h0 = medmine::metrics::mean_binary_entropy(&prob.data);
    let row = h
        .state()
        .visible_rows()
        .into_iter()
        .find(|r| r.name == rec.name)
        .cloned()
        .unwrap();
    assert!(
        (row.uncertainty.unwrap() - h0).abs() < 1e-9,
        "{row:?} vs {h0}"
    );
    assert_eq!(stored[&rec.name].uncertainty, row.uncertainty);
    for r in h.state().visible_rows() {
        assert_eq!(r.unet_dice.is_some(), r.ground_truth, "{r:?}");
        let u = r.uncertainty.unwrap();
        assert!((0.0..=1.0).contains(&u), "{r:?}");
    }
    h.get_by_label(SortBy::Uncertainty.label()).click();
    h.step();
    let order: Vec<f64> = h
        .state()
        .visible_rows()
        .iter()
        .map(|r| r.uncertainty.unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
    h.get_by_label(SortBy::UnetDice.label()).click();
    h.step();
    let order: Vec<f64> = h
        .state()
        .visible_rows()
        .iter()
        .filter_map(|r| r.unet_dice)
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
}

#[test]
fn a_right_drag_windows_the_image_and_is_kept_once_it_rests() {
    let tmp = tempfile::tempdir().unwrap();
    let root = lung_project(tmp.path());
    let mut h = harness(&root);
    let name = loaded(&mut h);
    let before = h.state().window().window;
    let c = h.state().canvas_rect().unwrap().center();
    let button = |pos, pressed| egui::Event::PointerButton {
        pos,
        button: egui::PointerButton::Secondary,
        pressed,
        modifiers: egui::Modifiers::NONE,
    };
    h.hover_at(c);
    h.step();
    h.event(button(c, true));
    h.step();
    for k in 1..=5 {
        h.hover_at(c + vec2(8.0 * k as f32, -10.0 * k as f32));
        h.step();
    }
    h.event(button(c + vec2(40.0, -50.0), false));
    h.step();
    let after = h.state().window().window;
    // up raises the level (the centre), right widens the window
    assert!(
        after.center > before.center + 1.0,
        "{before:?} -> {after:?}"
    );
    assert!(after.width > before.width + 1.0, "{before:?} -> {after:?}");
    assert_eq!(h.state().window().source, WindowSource::Image);
    // saved after the drag rests (the harness's clock advances one step per frame)
    for _ in 0..60 {
        h.step();
    }
    store_until(&root, "the dragged window saved", |p| {
        p.image_window(&name)
            .unwrap()
            .is_some_and(|w| (w.center - after.center).abs() < 1e-9)
    });
}
