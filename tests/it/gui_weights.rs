//! The SAM weights manager, headless (egui_kittest), against the test server of
//! `weights.rs` on 127.0.0.1 (never the network): download with progress, cancel and resume
//! of the `.part` file, SHA-256 verification (a corrupt download writes nothing, a damaged file
//! is reported), and "Use" loading the checkpoint as the active SAM, remembered in the prefs.
#![cfg(feature = "gui")]
use std::path::Path;

use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use medmine::gui::weights_panel::{RowState, WeightsManager};
use medmine::gui::{App, Startup};
use medmine::weights::{self, Checkpoint};

use crate::gui_project::wait_until;
use crate::weights::{file_bytes, serve, sha, Mode, Server};

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A registry entry for `body` served by `srv` as `file`.
fn entry(srv: &Server, name: &'static str, file: &'static str, body: &[u8]) -> Checkpoint {
    Checkpoint {
        name,
        file,
        url: leak(srv.url(file)),
        size: Some(body.len() as u64),
        sha256: Some(leak(sha(body))),
    }
}

fn manager_harness(m: WeightsManager) -> Harness<'static, WeightsManager> {
    Harness::builder().with_size([900.0, 500.0]).build_ui_state(
        |ui, m: &mut WeightsManager| {
            m.window_ui(ui.ctx(), None);
        },
        m,
    )
}

#[test]
fn the_official_checkpoints_are_listed_and_nothing_is_fetched_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = WeightsManager::new(dir.path());
    m.base_url = None;
    m.show = true;
    let names: Vec<&str> = m.entries().iter().map(|c| c.name).collect();
    assert_eq!(names, ["vit_b", "vit_l", "vit_h", "vit_t"]);
    assert_eq!(m.entries(), weights::REGISTRY);
    let mut h = manager_harness(m);
    h.run_steps(3);
    for c in weights::REGISTRY {
        h.get_by_label(&format!("Download {}", c.name));
        assert!(!h.state().busy(0));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn download_cancel_resume_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let body = file_bytes(1_500_000);
    let srv = serve(
        body.clone(),
        Mode::Slow {
            chunk: 16 * 1024,
            pause_ms: 15,
        },
    );
    let c = entry(&srv, "tiny", "tiny.pth", &body);
    let mut m = WeightsManager::with_entries(dir.path(), vec![c]);
    m.base_url = None;
    m.show = true;
    let mut h = manager_harness(m);
    h.run_steps(4);

    h.get_by_label("Download tiny").click();

    h.step();
    wait_until(
        &mut h,
        "progress",
        |m| matches!(m.state(0), RowState::Downloading { done, total: Some(t) } if done > 100_000 && t == 1_500_000),
    );
    h.get_by_label("Cancel tiny").click();
    h.step();
    wait_until(&mut h, "the cancel", |m| !m.busy(0));
    let (msg, error) = h.state().message(0).unwrap();
    assert!(
        error && msg.contains("download cancelled") && msg.contains("kept"),
        "{msg}"
    );
    let RowState::Partial { bytes: kept } = h.state().state(0) else {
        panic!("expected a partial file, got {:?}", h.state().state(0));
    };
    assert!(kept > 100_000 && kept < body.len() as u64, "{kept}");
    let dest = dir.path().join("tiny.pth");
    assert!(!dest.exists());
    h.get_by_label_contains("partial:");

    h.get_by_label("Resume tiny").click();

    h.step();
    wait_until(&mut h, "the resumed download", |m| !m.busy(0));
    let (msg, error) = h.state().message(0).unwrap();
    assert!(
        !error && msg.contains("resumed at") && msg.contains("SHA-256 verified"),
        "{msg}"
    );
    assert_eq!(
        h.state().state(0),
        RowState::Present {
            bytes: body.len() as u64,
            verified: true
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!weights::part_path(&dest).exists());
    let ranges = srv.ranges();
    assert_eq!(ranges.first(), Some(&None));
    // the resume asked for the rest of what was kept (or more: bytes written after the flag)
    let resumed: u64 = ranges
        .last()
        .unwrap()
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .expect("a Range request");
    assert_eq!(resumed, kept);

    // a damaged file is reported by Verify, with what to do
    let mut bytes = body.clone();
    bytes[1000] ^= 1;
    std::fs::write(&dest, &bytes).unwrap();
    h.get_by_label("Verify tiny").click();
    h.step();
    wait_until(&mut h, "the verification", |m| !m.busy(0));
    let (msg, error) = h.state().message(0).unwrap();
    assert!(
        error && msg.contains("SHA-256 mismatch") && msg.contains("download again"),
        "{msg}"
    );
    std::fs::write(&dest, &body).unwrap();
    h.get_by_label("Verify tiny").click();
    h.step();
    wait_until(&mut h, "the verification", |m| !m.busy(0));
    assert_eq!(h.state().message(0), Some(("SHA-256 verified", false)));
}

#[test]
fn a_corrupt_download_writes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let body = file_bytes(200_000);
    let srv = serve(body.clone(), Mode::Corrupt);
    let c = entry(&srv, "tiny", "tiny.pth", &body);
    let mut m = WeightsManager::with_entries(dir.path(), vec![c]);
    m.base_url = None;
    m.show = true;
    let mut h = manager_harness(m);
    h.run_steps(4);
    h.get_by_label("Download tiny").click();
    h.step();
    wait_until(&mut h, "the download", |m| !m.busy(0));
    let (msg, error) = h.state().message(0).unwrap();
    assert!(
        error && msg.contains("SHA-256 mismatch") && msg.contains("no file was written"),
        "{msg}"
    );
    assert_eq!(h.state().state(0), RowState::Absent);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    h.get_by_label("Download tiny");
}

#[test]
fn use_loads_the_checkpoint_as_the_active_sam_and_remembers_it() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = crate::common::root().join("tests/fixtures/sam/sam_tiny.pth");
    let body = std::fs::read(&fixture).unwrap();
    let srv = serve(body.clone(), Mode::Normal);
    let c = entry(&srv, "sam_tiny", "sam_tiny.pth", &body);
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
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
        });
    let mut m = WeightsManager::with_entries(dir.path(), vec![c]);
    m.base_url = None;
    h.state_mut().dialogs_mut().weights = m;
    h.run_steps(4);
    h.get_by_label("SAM weights…").click();
    h.run_steps(4);
    h.get_by_label("Download sam_tiny").click();
    h.step();
    wait_until(&mut h, "the download", |a| !a.dialogs().weights.busy(0));
    h.get_by_label("Use sam_tiny").click();
    h.step();
    wait_until(&mut h, "SAM to load", App::sam_loaded);
    let path = dir.path().join("sam_tiny.pth");
    assert_eq!(
        h.state().prefs.sam_checkpoint.as_deref(),
        Some(path.as_path())
    );
    assert_eq!(h.state().prefs.weights_dir.as_deref(), Some(dir.path()));
    h.run_steps(4);
    h.get_by_label("active");
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    assert!(Path::new(&path).is_file());
}

#[test]
fn load_sam_takes_a_typed_path_and_says_what_is_wrong_with_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, b"not a checkpoint").unwrap();
    let fixture = crate::common::root().join("tests/fixtures/sam/sam_tiny.pth");
    let mut h = Harness::builder()
        .with_size([1400.0, 900.0])
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
        });
    h.run_steps(4);
    h.get_by_label("Load SAM…").click();
    h.run_steps(4);
    crate::gui_project::type_into(&mut h, "file", &notes.display().to_string());
    h.get_by_label("Open").click();
    h.run_steps(2);
    h.get_by_label_contains("is not a SAM checkpoint");
    crate::gui_project::type_into(&mut h, "file", &fixture.display().to_string());
    h.get_by_label("Open").click();
    h.step();
    wait_until(&mut h, "SAM to load", App::sam_loaded);
    assert_eq!(
        h.state().prefs.sam_checkpoint.as_deref(),
        Some(fixture.as_path())
    );
    assert!(h.state().dialogs().prompt.is_none());
}
