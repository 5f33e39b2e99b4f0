//! The app's dialogs, headless (egui_kittest): "New project from dataset" with a typed path
//! (every mask labelled by default, the skipped files listed with their reasons), the
//! typed-path chooser, and the SAM weights manager against a server on 127.0.0.1 (download,
//! cancel, resume, SHA-256, use).
#![cfg(feature = "gui")]
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use medmine::data::{self, Mask};
use medmine::gui::{App, Startup};
use medmine::store::{Project, Role};

const TIMEOUT: Duration = Duration::from_secs(120);

fn empty_app() -> Harness<'static, App> {
    Harness::builder()
        .with_size([1200.0, 900.0])
        .wgpu()
        .build_eframe(|cc| {
            App::new(
                cc,
                Startup {
                    project: None,
                    demo: None,
                    sam: None,
                    device_name: "cpu".into(),
                },
                candle_core::Device::Cpu,
            )
        })
}

/// Steps frames until `cond` holds (the import and the downloads answer asynchronously).
pub(crate) fn wait_until<S>(h: &mut Harness<'static, S>, what: &str, cond: impl Fn(&S) -> bool) {
    let t0 = Instant::now();
    while !cond(h.state()) {
        assert!(t0.elapsed() < TIMEOUT, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
}

/// `images/` with three 16x12 images and their masks, one corrupt PNG and a text file.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("my data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let (w, h) = (16, 12);
    for i in 0..3 {
        let px: Vec<u8> = (0..w * h).map(|p| ((p * 5 + i * 40) % 256) as u8).collect();
        data::save_gray_png(&data.join(format!("images/case{i}.png")), w, h, &px).unwrap();
        let mut m = vec![0u8; w * h];
        m[(3 + i) * w + 4..(3 + i) * w + 10].fill(1);
        let mask = Mask {
            width: w,
            height: h,
            data: m,
        };
        data::save_mask_png(&data.join(format!("masks/case{i}.png")), &mask).unwrap();
    }
    std::fs::write(data.join("images/broken.png"), b"\x89PNG but not really").unwrap();
    std::fs::write(data.join("images/readme.txt"), b"notes").unwrap();
    data
}

/// Focuses the text field labelled `label`, replaces its text and lets the app see it.
pub(crate) fn type_into<S>(h: &mut Harness<'static, S>, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label(label).type_text(text);
    h.step();
    h.step();
}

#[test]
fn new_project_keeps_every_mask_labelled_and_lists_what_it_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut h = empty_app();
    h.run_steps(4);
    // Project > New project from dataset… opens the dialog with an empty, typed path field
    h.get_by_label("Project").click();
    h.run_steps(4);
    h.get_by_label("New project from dataset…").click();
    h.run_steps(4);
    assert!(h.state().dialogs().new_project.is_some());
    type_into(&mut h, "dataset folder", &data.display().to_string());

    // the scan (on its own thread) says what the folder holds and what it will skip
    wait_until(&mut h, "the scan", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .is_some_and(|n| n.scan_summary().is_some())
    });
    h.get_by_label("found 4 images, 3 with a mask");
    h.get_by_label_contains("readme.txt: unsupported file type");
    let n = h.state().dialogs().new_project.as_ref().unwrap();
    assert_eq!(
        n.fraction(),
        1.0,
        "every mask is labelled unless the user chooses"
    );
    let created = tmp.path().join("my data.medmine");
    assert_eq!(n.project, created.display().to_string());

    h.get_by_label("Create").click();
    h.step();
    wait_until(&mut h, "the new project to open", |a| {
        a.project() == Some(created.as_path()) && a.image_count() == 3
    });
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    // the report: counts by role, and every skipped file with the reason
    h.get_by_label_contains("Imported 3 images (3 with ground truth)");
    h.get_by_label("labelled 3 · unlabelled 0 · val 0 · test 0");
    h.get_by_label("2 files skipped");
    h.get_by_label_contains("broken.png: cannot decode image");
    h.get_by_label_contains("readme.txt: unsupported file type");

    let p = Project::open(&created).unwrap();
    let images = p.images().unwrap();
    assert_eq!(images.len(), 3);
    assert!(
        images.iter().all(|r| r.role == Role::Labelled),
        "{images:?}"
    );
    for r in &images {
        assert!(p.ground_truth(&r.name).unwrap().is_some(), "{}", r.name);
    }
}

#[test]
fn a_chosen_fraction_and_a_failed_import_leave_no_half_project() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut h = empty_app();
    h.state_mut().start_new_project(data.clone());
    h.run_steps(4);
    // the scan's report moves the checkbox when it arrives: click once it is there
    wait_until(&mut h, "the first scan", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .unwrap()
            .scan_summary()
            .is_some()
    });
    h.get_by_label("keep only a fraction of the masks as labelled (the rest is mined)")
        .click();
    h.run_steps(4);
    {
        let n = h.state_mut().dialogs_mut().new_project.as_mut().unwrap();
        assert!(n.subsample);
        n.labelled_fraction = 0.34;
        // a train.txt naming a file that is not there: the import is refused
        std::fs::write(data.join("train.txt"), "case0.png\nmissing.png\n").unwrap();
        n.set_data(&format!("{}/", data.display()));
    }
    wait_until(&mut h, "the scan", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .unwrap()
            .scan_summary()
            .is_some()
    });
    h.get_by_label_contains("use the split lists in");
    h.get_by_label("Create").click();
    h.step();
    wait_until(&mut h, "the import to fail", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .unwrap()
            .import_result()
            .is_some()
    });
    h.get_by_label_contains("The project was not created");
    h.get_by_label_contains("missing.png");
    let created = tmp.path().join("my data.medmine");
    assert!(
        !created.exists(),
        "a failed import leaves no project folder"
    );

    // without the split lists, a third of the masks stays labelled
    std::fs::remove_file(data.join("train.txt")).unwrap();
    h.state_mut()
        .dialogs_mut()
        .new_project
        .as_mut()
        .unwrap()
        .use_splits = false;
    h.get_by_label("Create").click();
    h.step();
    wait_until(&mut h, "the new project to open", |a| {
        a.project() == Some(created.as_path()) && a.image_count() == 3
    });
    let p = Project::open(&created).unwrap();
    let labelled = p
        .images()
        .unwrap()
        .iter()
        .filter(|r| r.role == Role::Labelled)
        .count();
    assert_eq!(labelled, 1, "a third of 3 masks");
}

#[test]
fn a_typed_path_opens_a_project_where_no_file_dialog_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let root = tmp.path().join("proj");
    let mut p = Project::init(&root).unwrap();
    let mut opts = medmine::store::ImportOptions::new(&data);
    opts.skip_unusable = true;
    p.import(&opts).unwrap();
    drop(p);
    let mut h = empty_app();
    h.run_steps(4);
    h.get_by_label("Project").click();
    h.run_steps(4);
    h.get_by_label("Open…").click();
    h.run_steps(4);
    // a folder that is not a project: the message says what to do
    type_into(&mut h, "folder", &data.display().to_string());
    h.get_by_label("Open").click();
    h.run_steps(4);
    h.get_by_label_contains("is not a medmine project");
    assert!(h.state().project().is_none());
    type_into(&mut h, "folder", &root.display().to_string());
    h.key_press(egui::Key::Enter);
    wait_until(&mut h, "the project to open", |a| {
        a.project() == Some(root.as_path()) && a.image_count() == 3
    });
    assert!(h.state().dialogs().prompt.is_none(), "the chooser closed");
}
