//! The project store through its library API: import (and every bad input it must refuse),
//! schema versions, review state, edit history, relink, runs, export.
use std::path::{Path, PathBuf};

use medmine::data::{self, Mask};
use medmine::progress::EpochRecord;
use medmine::store::rle::{self, Rle};
use medmine::store::{
    schema, Actor, ExportFormat, ImportOptions, NewPseudoLabel, PointPrompt, Project, Prompts,
    ReviewState, Role, RunStatus, StoreError,
};

/// A mask with a filled rectangle.
fn rect_mask(w: usize, h: usize, x0: usize, y0: usize, x1: usize, y1: usize) -> Mask {
    let mut data = vec![0u8; w * h];
    for y in y0..y1 {
        for x in x0..x1 {
            data[y * w + x] = 1;
        }
    }
    Mask {
        width: w,
        height: h,
        data,
    }
}

/// `root/images/img_{i}.png` (`w x h` gray gradient, distinct per image), masks for the
/// first `labelled` of them.
fn make_dataset(root: &Path, n: usize, labelled: usize, w: usize, h: usize) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..n {
        let px: Vec<u8> = (0..w * h).map(|p| ((p * 7 + i * 31) % 256) as u8).collect();
        data::save_gray_png(&root.join(format!("images/img_{i}.png")), w, h, &px).unwrap();
        if i < labelled {
            let m = rect_mask(w, h, 1 + i % 3, 2, w - 2, h - 1);
            data::save_mask_png(&root.join(format!("masks/img_{i}.png")), &m).unwrap();
        }
    }
}

fn new_project(dir: &Path) -> (PathBuf, PathBuf, Project) {
    let data = dir.join("data");
    make_dataset(&data, 6, 4, 12, 10);
    let proj_dir = dir.join("proj");
    let mut p = Project::init(&proj_dir).unwrap();
    p.import(&ImportOptions::new(&data)).unwrap();
    (data, proj_dir, p)
}

fn import_error(data: &Path) -> (Vec<String>, Project) {
    let dir = data.parent().unwrap().join("proj-bad");
    let mut p = Project::init(&dir).unwrap();
    match p.import(&ImportOptions::new(data)) {
        Err(StoreError::Import { problems, .. }) => {
            assert!(p.images().unwrap().is_empty(), "nothing may be imported");
            (problems, p)
        }
        other => panic!("expected an import error, got {other:?}"),
    }
}

#[test]
fn import_assigns_roles_from_split_lists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 10, 10, 8, 8);
    let splits = dir.path().join("splits");
    std::fs::create_dir_all(&splits).unwrap();
    let list =
        |r: std::ops::Range<usize>| -> String { r.map(|i| format!("img_{i}.png\n")).collect() };
    std::fs::write(splits.join("train.txt"), list(0..6)).unwrap();
    std::fs::write(splits.join("val.txt"), list(6..8)).unwrap();
    std::fs::write(splits.join("test.txt"), list(8..10)).unwrap();
    let mut p = Project::init(&dir.path().join("proj")).unwrap();
    let mut opts = ImportOptions::new(&data);
    opts.split_dir = Some(splits);
    opts.labelled_fraction = 0.5;
    opts.seed = 3;
    let r = p.import(&opts).unwrap();
    assert_eq!(r.imported, 10);
    assert_eq!(r.by_role[&Role::Labelled], 3);
    assert_eq!(r.by_role[&Role::Unlabelled], 3);
    assert_eq!(r.by_role[&Role::Val], 2);
    assert_eq!(r.by_role[&Role::Test], 2);
    // the labelled subset is the data module's seeded protocol
    let train: Vec<String> = (0..6).map(|i| format!("img_{i}.png")).collect();
    let (labelled, _) = data::split_labelled(&train, 0.5, 3).unwrap();
    for name in &labelled {
        assert_eq!(p.image(name).unwrap().role, Role::Labelled, "{name}");
    }
    let rec = p.image("img_7").unwrap();
    assert_eq!((rec.role, rec.width, rec.height), (Role::Val, 8, 8));
    assert_eq!(rec.sha256, medmine::store::sha256_file(&rec.path).unwrap());
    let gt = p.ground_truth("img_7.png").unwrap().unwrap();
    assert_eq!(data::load_mask(&gt).unwrap(), rect_mask(8, 8, 2, 2, 6, 7));
    let status = p.status().unwrap();
    assert_eq!(status.total, 10);
    assert_eq!(status.review["pending"], 10);
}

#[test]
fn import_without_splits_labels_images_with_masks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, p) = new_project(dir.path());
    let s = p.status().unwrap();
    assert_eq!((s.roles["labelled"], s.roles["unlabelled"]), (4, 2));
    assert!(p.ground_truth("img_5.png").unwrap().is_none());
}

#[test]
fn corrupt_image_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 3, 3, 16, 16);
    let bad = data.join("images/img_1.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let (problems, _) = import_error(&data);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("img_1.png"), "{problems:?}");
}

#[test]
fn garbage_with_image_extension_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 2, 2, 8, 8);
    std::fs::write(data.join("images/fake.jpg"), b"this is not a JPEG").unwrap();
    let (problems, _) = import_error(&data);
    assert!(
        problems.iter().any(|p| p.contains("fake.jpg")),
        "{problems:?}"
    );
}

#[test]
fn non_image_file_is_refused_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 2, 2, 8, 8);
    std::fs::write(data.join("images/notes.txt"), b"hello").unwrap();
    let (problems, mut p) = import_error(&data);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("notes.txt") && p.contains("unsupported")),
        "{problems:?}"
    );
    let mut opts = ImportOptions::new(&data);
    opts.skip_unusable = true;
    let r = p.import(&opts).unwrap();
    assert_eq!(r.imported, 2);
    assert!(r.notes.iter().any(|n| n.contains("notes.txt")), "{r:?}");
}

#[test]
fn unusable_files_are_skipped_with_their_reasons_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 3, 3, 8, 8);
    std::fs::write(data.join("images/fake.png"), b"this is not a PNG").unwrap();
    std::fs::write(data.join("images/notes.txt"), b"hello").unwrap();
    data::save_mask_png(&data.join("masks/img_2.png"), &rect_mask(9, 8, 0, 0, 2, 2)).unwrap();
    let (problems, mut p) = import_error(&data);
    assert_eq!(problems.len(), 3, "{problems:?}");
    let mut opts = ImportOptions::new(&data);
    opts.skip_unusable = true;
    let r = p.import(&opts).unwrap();
    assert_eq!(r.imported, 2, "{r:?}");
    assert_eq!(
        r.by_role.get(&Role::Labelled),
        Some(&2),
        "every mask is labelled"
    );
    let skipped: Vec<(String, &str)> = r
        .skipped
        .iter()
        .map(|k| {
            let name = k.path.strip_prefix(&data).unwrap().display().to_string();
            (name, k.reason.as_str())
        })
        .collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert_eq!(skipped[0].0, "images/fake.png");
    assert!(
        skipped[0].1.starts_with("cannot decode image"),
        "{skipped:?}"
    );
    assert_eq!(skipped[1].0, "images/notes.txt");
    assert!(
        skipped[1].1.contains("unsupported file type"),
        "{skipped:?}"
    );
    assert_eq!(skipped[2].0, "masks/img_2.png");
    assert!(skipped[2].1.contains("9x8"), "{skipped:?}");
    assert_eq!(r.notes.len(), 3, "{r:?}");
}

#[test]
fn mask_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 3, 3, 8, 8);
    data::save_mask_png(&data.join("masks/img_2.png"), &rect_mask(9, 8, 0, 0, 2, 2)).unwrap();
    let (problems, _) = import_error(&data);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("masks/img_2.png") && problems[0].contains("9x8"),
        "{problems:?}"
    );
}

#[test]
fn duplicate_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 2, 2, 8, 8);
    // same stem as img_0.png: masks could not tell them apart
    std::fs::copy(data.join("images/img_1.png"), data.join("images/img_0.jpg")).unwrap();
    let (problems, mut p) = import_error(&data);
    assert!(
        problems.iter().any(|p| p.contains("img_0.jpg")),
        "{problems:?}"
    );
    // importing the same dataset twice: the names are already in the project
    std::fs::remove_file(data.join("images/img_0.jpg")).unwrap();
    p.import(&ImportOptions::new(&data)).unwrap();
    match p.import(&ImportOptions::new(&data)) {
        Err(StoreError::Import { problems, .. }) => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert!(
                problems[0].contains("already in the project"),
                "{problems:?}"
            );
        }
        other => panic!("expected an import error, got {other:?}"),
    }
    assert_eq!(p.images().unwrap().len(), 2);
}

#[test]
fn future_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("medmine.db");
    schema::create_with_version(&db, schema::LATEST + 5).unwrap();
    let before = std::fs::read(&db).unwrap();
    let err = Project::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::FutureSchema { .. }), "{msg}");
    assert!(msg.contains("medmine.db"), "{msg}");
    assert!(
        msg.contains(&format!("version {}", schema::LATEST + 5))
            && msg.contains(&format!("version {}", schema::LATEST)),
        "{msg}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before, "database changed");
}

#[test]
fn old_schema_is_migrated_after_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("medmine.db");
    schema::create_with_version(&db, 1).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "INSERT INTO images (name, path, sha256, width, height, role, added_at)
             VALUES ('a.png', '/nowhere/a.png', 'ab', 4, 3, 'unlabelled', 'then')",
            [],
        )
        .unwrap();
    }
    let mut p = Project::open(dir.path()).unwrap();
    assert_eq!(p.schema_version().unwrap(), schema::LATEST);
    assert_eq!(p.image("a.png").unwrap().width, 4, "data kept");
    // the v2 tables work
    let run = p
        .start_run("r", &serde_json::json!({}), Path::new("runs/r"))
        .unwrap();
    assert!(run > 0);
    let backup = dir.path().join("medmine.db.bak-v1");
    let conn = rusqlite::Connection::open(&backup).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 1);
    let n: i64 = conn
        .query_row("SELECT count(*) FROM images", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "backup holds the data");
    // opening again neither migrates nor backs up again
    drop(p);
    Project::open(dir.path()).unwrap();
    assert!(!dir.path().join("medmine.db.bak-v2").exists());
}

fn label(mask: Mask, round: i64, iou: f64, stab: f64) -> NewPseudoLabel {
    NewPseudoLabel {
        round,
        mask,
        prompts: Prompts {
            points_in_image: vec![PointPrompt {
                x: 3.0,
                y: 4.0,
                positive: true,
            }],
            mask_prompt: true,
            ..Default::default()
        },
        sam_iou: Some(iou),
        stability: Some(stab),
        agreement: None,
        unet_components: Some(1),
        label_components: Some(1),
        sam_checkpoint: Some("sam-vit-b".into()),
        unet_checkpoint: Some("unet-round0".into()),
        unet_hash: None,
        labeler: None,
    }
}

#[test]
fn pseudo_labels_reviews_and_edit_history_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (_, proj_dir, mut p) = new_project(dir.path());
    let m = rect_mask(12, 10, 0, 0, 5, 5);
    let pl = p
        .add_pseudo_label("img_4", &label(m.clone(), 0, 0.9, 0.9))
        .unwrap();
    assert_eq!(pl.image, "img_4.png");
    assert!(pl.prompts.mask_prompt && pl.prompts.points_in_image[0].positive);
    assert_eq!(
        (pl.unet_components, pl.component_change()),
        (Some(1), Some(0))
    );
    assert!((pl.quality().unwrap() - 0.81).abs() < 1e-12);
    p.add_pseudo_label("img_5", &label(m.clone(), 0, 0.5, 0.9))
        .unwrap();
    // wrong size: refused, naming the image
    let err = p
        .add_pseudo_label("img_5", &label(rect_mask(3, 3, 0, 0, 1, 1), 1, 1.0, 1.0))
        .unwrap_err();
    assert!(err.to_string().contains("img_5.png"), "{err}");
    // batch accept by quality: only img_4 (0.81 >= 0.8; img_5 has 0.45)
    let who = Actor {
        reviewer: Some("ana"),
        note: None,
    };
    let batch = p.accept_by_quality(0.8, who).unwrap();
    assert_eq!((batch.below, batch.skipped.len()), (1, 0));
    let ev = batch.accepted;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].image, "img_4.png");
    // edits, undo, redo
    let e1 = rect_mask(12, 10, 1, 1, 6, 6);
    let e2 = rect_mask(12, 10, 2, 2, 7, 7);
    p.save_edit("img_5", &e1, who).unwrap();
    let v2 = p.save_edit("img_5", &e2, who).unwrap();
    assert_eq!(v2.seq, 2);
    p.undo_edit("img_5", who).unwrap().unwrap();
    drop(p);

    let mut p = Project::open(&proj_dir).unwrap();
    assert_eq!(p.review("img_4").unwrap().state, ReviewState::Accepted);
    assert_eq!(p.review("img_4").unwrap().reviewer.as_deref(), Some("ana"));
    assert_eq!(p.review("img_5").unwrap().state, ReviewState::Edited);
    let (cur, source) = p.current_mask("img_5").unwrap().unwrap();
    assert_eq!(source, "edited");
    assert_eq!(
        data::load_mask(&cur).unwrap(),
        e1,
        "undo survived the restart"
    );
    p.redo_edit("img_5", who).unwrap().unwrap();
    let (cur, _) = p.current_mask("img_5").unwrap().unwrap();
    assert_eq!(data::load_mask(&cur).unwrap(), e2);
    p.undo_edit("img_5", who).unwrap();
    p.undo_edit("img_5", who).unwrap();
    assert_eq!(p.review("img_5").unwrap().state, ReviewState::Pending);
    let (cur, source) = p.current_mask("img_5").unwrap().unwrap();
    assert_eq!(
        (data::load_mask(&cur).unwrap(), source),
        (m, "pseudo_label")
    );
    assert!(p.undo_edit("img_5", who).unwrap().is_none());
    assert_eq!(p.mask_history("img_5").unwrap().len(), 2);
    let log = p.review_log().unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "pseudo_label",
            "pseudo_label",
            "auto_accept",
            "edit",
            "edit",
            "undo",
            "redo",
            "undo",
            "undo"
        ]
    );
    let csv = p.review_report_csv().unwrap();
    assert!(
        csv.lines()
            .nth(3)
            .unwrap()
            .contains(",img_4.png,auto_accept,accepted,ana,"),
        "{csv}"
    );
    assert_eq!(p.integrity_check().unwrap(), "ok");
    assert!(p.verify(true).unwrap().is_empty());
}

#[test]
fn vanished_image_is_named_and_relink_repairs_a_moved_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _, mut p) = new_project(dir.path());
    std::fs::remove_file(data.join("images/img_2.png")).unwrap();
    let err = p.load_image("img_2.png").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::MissingImageFile { .. }), "{msg}");
    assert!(msg.contains("img_2.png") && msg.contains("relink"), "{msg}");
    let problems = p.verify(false).unwrap();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("img_2.png"));
    let err = p
        .export(ExportFormat::Png, &dir.path().join("out"))
        .unwrap_err();
    assert!(err.to_string().contains("img_2.png"), "{err}");
    assert!(!dir.path().join("out").exists(), "nothing half-exported");

    // move the dataset (recreating the vanished file) and relink by content
    let moved = dir.path().join("moved");
    make_dataset(&moved, 6, 4, 12, 10);
    std::fs::rename(
        moved.join("images/img_3.png"),
        moved.join("images/renamed.png"),
    )
    .unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    assert_eq!(p.missing_images().unwrap().len(), 6);
    let r = p.relink(&moved).unwrap();
    assert_eq!((r.relinked, r.not_found.len()), (6, 0), "{r:?}");
    assert!(p.missing_images().unwrap().is_empty());
    assert!(p.image("img_3").unwrap().path.ends_with("renamed.png"));
    assert!(p.load_image("img_2.png").is_ok());
}

#[test]
fn training_runs_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, mut p) = new_project(dir.path());
    let run_dir = p.runs_dir().join("r1");
    let cfg = serde_json::json!({"epochs": 2, "lr": 0.001});
    let id = p.start_run("r1", &cfg, &run_dir).unwrap();
    for epoch in 1..=2 {
        let e = EpochRecord {
            epoch,
            train_loss: 1.0 / epoch as f64,
            val_dice: Some(0.5),
            val_iou: None,
            lr: 1e-3,
            seconds: 2.0,
            images_per_s: 3.0,
            best: epoch == 2,
        };
        p.add_epoch(id, &e).unwrap();
    }
    let best = run_dir.join("best.safetensors");
    p.finish_run(id, RunStatus::Done, Some(&best), None, None)
        .unwrap();
    let runs = p.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Done);
    assert_eq!(runs[0].config, cfg);
    assert_eq!(runs[0].best_checkpoint.as_deref(), Some(best.as_path()));
    assert!(runs[0].finished_at.is_some());
    let epochs = p.run_epochs(id).unwrap();
    assert_eq!(epochs.len(), 2);
    assert!(epochs[1].best && epochs[0].val_iou.is_none());
    assert!(p
        .finish_run(99, RunStatus::Failed, None, None, None)
        .is_err());

    let m = rect_mask(12, 10, 0, 0, 3, 3);
    p.add_prediction("img_0", "unet-a", &m).unwrap();
    let pred = p.prediction("img_0", "unet-a").unwrap().unwrap();
    assert_eq!(
        data::load_mask(&p.masks_dir().join(&pred.mask_file)).unwrap(),
        m
    );
    assert!(p.prediction("img_0", "unet-b").unwrap().is_none());
}

/// pycocotools' decoding rule, written independently: runs alternate starting with 0 and
/// fill a column-major (Fortran-order) array of `h * w`.
fn reference_decode(size: [usize; 2], counts: &[u64]) -> Vec<Vec<u8>> {
    let [h, w] = size;
    let mut flat = Vec::new();
    for (i, &c) in counts.iter().enumerate() {
        flat.extend(std::iter::repeat_n((i % 2) as u8, c as usize));
    }
    assert_eq!(flat.len(), h * w, "counts must cover the mask");
    (0..h)
        .map(|y| (0..w).map(|x| flat[x * h + y]).collect())
        .collect()
}

#[test]
fn coco_rle_round_trip() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for (w, h) in [(1, 1), (5, 3), (3, 5), (17, 11)] {
        for p in [0.0, 0.2, 0.8, 1.0] {
            let data: Vec<u8> = (0..w * h).map(|_| u8::from(rng.gen_bool(p))).collect();
            let m = Mask {
                width: w,
                height: h,
                data,
            };
            let r = rle::encode(&m);
            assert_eq!(rle::decode(&r).unwrap(), m);
            let rows = reference_decode(r.size, &r.counts);
            assert_eq!(rows.len(), h);
            for (row, expect) in rows.iter().zip(m.data.chunks(w)) {
                assert_eq!(row.as_slice(), expect);
            }
            assert_eq!(rle::area(&r) as usize, m.foreground());
        }
    }
    // a known small example: rows [0 1] [1 1] [0 0] -> column-major 0 1 0 | 1 1 0
    let m = Mask {
        width: 2,
        height: 3,
        data: vec![0, 1, 1, 1, 0, 0],
    };
    assert_eq!(
        rle::encode(&m),
        Rle {
            size: [3, 2],
            counts: vec![1, 1, 1, 2, 1]
        }
    );
}

#[test]
fn export_png_and_coco() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, mut p) = new_project(dir.path());
    let m4 = rect_mask(12, 10, 0, 0, 5, 5);
    p.add_pseudo_label("img_4", &label(m4.clone(), 0, 0.9, 0.9))
        .unwrap();
    p.add_pseudo_label("img_5", &label(m4.clone(), 0, 0.9, 0.9))
        .unwrap();
    let who = Actor {
        reviewer: Some("bo"),
        note: Some("fine, thanks"),
    };
    p.set_review(&["img_4"], ReviewState::Accepted, who)
        .unwrap();
    p.set_review(&["img_5"], ReviewState::Rejected, who)
        .unwrap();

    let out = dir.path().join("png");
    let r = p.export(ExportFormat::Png, &out).unwrap();
    assert_eq!((r.ground_truth, r.pseudo_labels), (4, 1));
    let manifest = std::fs::read_to_string(out.join("manifest.csv")).unwrap();
    assert_eq!(manifest.lines().count(), 6, "{manifest}");
    assert!(manifest.contains("img_4.png,masks/img_4.png,unlabelled,pseudo_label,accepted,bo,"));
    assert!(manifest.contains("img_0.png,masks/img_0.png,labelled,ground_truth,"));
    assert!(
        !manifest.contains("img_5.png"),
        "rejected labels are not exported"
    );
    assert_eq!(data::load_mask(&out.join("masks/img_4.png")).unwrap(), m4);
    // the export is a dataset the data layer reads
    let ds = data::Dataset::scan(&out).unwrap();
    assert_eq!(ds.labelled().len(), 5);
    let report = std::fs::read_to_string(out.join("review_report.csv")).unwrap();
    assert!(
        report.contains("img_4.png,review,accepted,bo,\"fine, thanks\",0,"),
        "{report}"
    );
    // refuses to overwrite
    assert!(matches!(
        p.export(ExportFormat::Png, &out),
        Err(StoreError::ExportExists { .. })
    ));

    let json = dir.path().join("coco.json");
    p.export(ExportFormat::Coco, &json).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let images = doc["images"].as_array().unwrap();
    assert_eq!(images.len(), 5);
    let anns = doc["annotations"].as_array().unwrap();
    assert_eq!(anns.len(), 5);
    for a in anns {
        let img = images.iter().find(|i| i["id"] == a["image_id"]).unwrap();
        let name = img["file_name"].as_str().unwrap();
        let seg: Rle = serde_json::from_value(a["segmentation"].clone()).unwrap();
        assert_eq!(seg.size, [10, 12]);
        let rows = reference_decode(seg.size, &seg.counts);
        let expect = if name == "img_4.png" {
            m4.clone()
        } else {
            data::load_mask(&p.ground_truth(name).unwrap().unwrap()).unwrap()
        };
        for (y, row) in rows.iter().enumerate() {
            assert_eq!(row, &expect.data[y * 12..(y + 1) * 12], "{name} row {y}");
        }
        assert_eq!(a["area"].as_u64().unwrap() as usize, expect.foreground());
    }
    let a4 = anns
        .iter()
        .find(|a| a["medmine_source"] == "pseudo_label")
        .unwrap();
    assert_eq!(a4["bbox"], serde_json::json!([0, 0, 5, 5]));
}

#[test]
fn sixteen_bit_png_and_tiff_import() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(20, 12, |x, y| {
        image::Luma([(x * 3000 + y * 100) as u16])
    });
    img.save(data.join("images/a16.png")).unwrap();
    img.save(data.join("images/b16.tif")).unwrap();
    data::save_mask_png(&data.join("masks/a16.png"), &rect_mask(20, 12, 0, 0, 4, 4)).unwrap();
    let mut p = Project::init(&dir.path().join("proj")).unwrap();
    let r = p.import(&ImportOptions::new(&data)).unwrap();
    assert_eq!((r.imported, r.ground_truth), (2, 1));
    for name in ["a16.png", "b16.tif"] {
        let rec = p.image(name).unwrap();
        assert_eq!((rec.width, rec.height), (20, 12));
        let x = p.load_image(name).unwrap();
        // min-max stretched to [0, 1]
        let max = x.data.iter().cloned().fold(0.0f32, f32::max);
        assert!((max - 1.0).abs() < 1e-6 && x.data[0] == 0.0, "{name}");
    }
}
