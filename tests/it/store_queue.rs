//! The review queue: pending pseudo-labels, least confident first (a changed component count
//! lowers the score), through the library and `medmine review PROJECT queue`; and a project of
//! the schema before component counts migrating with its pseudo-labels.

use crate::common::{medmine, ok};
use std::path::{Path, PathBuf};

use medmine::data::Mask;
use medmine::store::{
    schema, Actor, ImportOptions, NewPseudoLabel, Project, Prompts, QueueEntry, ReviewState, Role,
};

fn demo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

/// `comps`: the U-Net++ and pseudo-label component counts.
fn label(
    w: usize,
    h: usize,
    round: i64,
    scores: [Option<f64>; 3],
    comps: Option<(i64, i64)>,
) -> NewPseudoLabel {
    let data = (0..w * h).map(|p| u8::from(p % w < w / 2)).collect();
    NewPseudoLabel {
        round,
        mask: Mask {
            width: w,
            height: h,
            data,
        },
        prompts: Prompts::default(),
        sam_iou: scores[0],
        stability: scores[1],
        agreement: scores[2],
        unet_components: comps.map(|c| c.0),
        label_components: comps.map(|c| c.1),
        sam_checkpoint: None,
        unet_checkpoint: None,
        unet_hash: None,
        labeler: None,
    }
}

/// The demo imported with half of train.txt labelled; pseudo-labels on seven unlabelled
/// images (one accepted afterwards), another unlabelled image left without one.
/// Returns the project folder and the expected queue order.
fn project(dir: &Path) -> (PathBuf, Vec<String>) {
    let proj = dir.join("proj");
    let mut p = Project::init(&proj).unwrap();
    let mut opts = ImportOptions::new(&demo());
    opts.split_dir = Some(demo());
    opts.labelled_fraction = 0.5;
    p.import(&opts).unwrap();
    let pool: Vec<_> = p
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .collect();
    assert!(pool.len() >= 8, "demo has too few unlabelled images");
    let n = |i: usize| pool[i].name.clone();
    let mut add = |i: usize, round: i64, s: [Option<f64>; 3], c: Option<(i64, i64)>| {
        let (w, h) = (pool[i].width, pool[i].height);
        p.add_pseudo_label(&pool[i].name, &label(w, h, round, s, c))
            .unwrap();
    };
    let high = [Some(0.9), Some(0.9), Some(0.9)];
    add(0, 0, high, Some((1, 1))); // 0.729, same component count
    add(1, 0, [Some(0.5), None, None], None); // 0.5
    add(2, 0, [None, None, None], None); // unknown: first
    add(3, 0, [Some(0.99), Some(0.99), Some(0.99)], None); // accepted below: absent
    add(4, 0, [Some(0.1), Some(1.0), Some(1.0)], None); // superseded by round 1
    add(4, 1, [Some(0.6), Some(1.0), Some(1.0)], None); // 0.6
    add(5, 0, [None, Some(0.5), None], None); // 0.5, ties with pool[1] by name
    add(7, 0, high, Some((2, 1))); // as confident as pool[0], but merged two: 0.3645
    let who = Actor {
        reviewer: Some("ana"),
        note: None,
    };
    p.set_review(&[&n(3)], ReviewState::Accepted, who).unwrap();
    let mut tie = [n(1), n(5)];
    tie.sort();
    let expected = vec![n(2), n(7), tie[0].clone(), tie[1].clone(), n(4), n(0)];
    (proj, expected)
}

#[test]
fn library_queue_is_least_confident_first() {
    let dir = tempfile::tempdir().unwrap();
    let (proj, expected) = project(dir.path());
    let p = Project::open(&proj).unwrap();
    let q: Vec<QueueEntry> = p.review_queue().unwrap();
    let names: Vec<&str> = q.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, expected);
    assert_eq!(q[0].quality, None);
    assert_eq!(
        (q[0].sam_iou, q[0].stability, q[0].agreement),
        (None, None, None)
    );
    // the same three scores as the last entry, but one object fewer than the U-Net++ saw
    let merged = &q[1];
    assert_eq!(
        (merged.unet_components, merged.label_components),
        (Some(2), Some(1))
    );
    assert_eq!(merged.component_change, Some(-1));
    assert_eq!(
        (merged.sam_iou, merged.stability, merged.agreement),
        (Some(0.9), Some(0.9), Some(0.9))
    );
    assert!((merged.quality.unwrap() - 0.729 / 2.0).abs() < 1e-12);
    assert_eq!(q[2].quality, Some(0.5));
    assert_eq!(q[3].quality, Some(0.5));
    assert_eq!(q[2].component_change, None);
    let e4 = &q[4];
    assert_eq!(e4.round, 1, "the newest round's scores count");
    assert_eq!(e4.sam_iou, Some(0.6));
    assert!((e4.quality.unwrap() - 0.6).abs() < 1e-12);
    assert!((q[5].quality.unwrap() - 0.729).abs() < 1e-12);
    assert_eq!(q[5].component_change, Some(0));
    for w in q.windows(2) {
        assert!(w[0].quality.unwrap_or(f64::NEG_INFINITY) <= w[1].quality.unwrap_or(0.0));
    }
    // every entry is pending
    for e in &q {
        assert_eq!(p.review(&e.name).unwrap().state, ReviewState::Pending);
    }
    // status: the queue's length awaits review (not the accepted one, nor the undecided
    // images without a pseudo-label that "pending" also counts)
    let st = p.status().unwrap();
    assert_eq!((st.pseudo_labels, st.awaiting_review), (7, q.len()));
    assert!(st.review["pending"] > q.len());
}

#[test]
fn cli_queue_json_text_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (proj, expected) = project(dir.path());
    let proj = proj.to_str().unwrap();

    let out = ok(&["review", proj, "queue", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is pure JSON");
    let arr = v.as_array().unwrap();
    let names: Vec<&str> = arr.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, expected);
    assert!(arr[0]["quality"].is_null());
    assert_eq!(arr[4]["round"], 1);
    assert_eq!(arr[1]["component_change"], -1);
    assert_eq!(arr[1]["unet_components"], 2);
    assert_eq!(arr[1]["label_components"], 1);
    for key in [
        "name",
        "round",
        "sam_iou",
        "stability",
        "agreement",
        "unet_components",
        "label_components",
        "component_change",
        "quality",
    ] {
        assert!(arr[0].get(key).is_some(), "missing {key}: {}", arr[0]);
    }

    let out = ok(&["review", proj, "queue", "--json", "--limit", "2"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, expected[..2]);

    let text = ok(&["review", proj, "queue"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{text}");
    for (line, name) in lines.iter().zip(&expected) {
        let cols: Vec<&str> = line.split("  ").collect();
        assert_eq!(cols.len(), 7, "{line}");
        assert_eq!(cols[0], name);
    }
    assert_eq!(lines[0], format!("{}  -  -  -  -  0  -", expected[0]));
    assert_eq!(
        lines[1],
        format!("{}  0.3645  0.9000  0.9000  0.9000  0  -1", expected[1])
    );
    assert_eq!(
        lines[5],
        format!("{}  0.7290  0.9000  0.9000  0.9000  0  0", expected[5])
    );
    let text = ok(&["review", proj, "queue", "--limit", "1"]);
    assert_eq!(text.lines().count(), 1);

    // misuse is refused
    let out = medmine(&["review", proj, "queue", &expected[0]]);
    assert!(!out.status.success());
    let out = medmine(&["review", proj, "accept", &expected[0], "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("queue"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the refused accept changed nothing
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["review", proj, "queue", "--json"])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), expected.len());
}

#[test]
fn status_shows_component_count_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (proj, expected) = project(dir.path());
    let proj = proj.to_str().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["project", "status", proj, "--json"])).unwrap();
    assert_eq!(v["component_count_changed"], 1, "only the merged label");
    let image = |name: &str| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in status"))
            .clone()
    };
    let merged = image(&expected[1]);
    assert_eq!(merged["component_change"], -1);
    assert!((merged["quality"].as_f64().unwrap() - 0.3645).abs() < 1e-12);
    assert_eq!(image(&expected[5])["component_change"], 0);
    assert!(image(&expected[0])["component_change"].is_null());
    let text = ok(&["project", "status", proj]);
    assert!(text.contains("component count changed 1"), "{text}");
}

/// A project of schema v2 (before component counts) with a pseudo-label: opening it backs it
/// up, migrates it, keeps the label (no counts, same score) and stores counts from then on.
#[test]
fn v2_project_with_pseudo_labels_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("medmine.db");
    schema::create_with_version(&db, 2).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "INSERT INTO images (id, name, path, sha256, width, height, role, added_at)
             VALUES (1, 'a.png', '/nowhere/a.png', 'ab', 4, 3, 'unlabelled', 'then'),
                    (2, 'b.png', '/nowhere/b.png', 'cd', 4, 3, 'unlabelled', 'then');
             INSERT INTO pseudo_labels (image_id, round, mask_file, prompts, sam_iou, stability,
               agreement, created_at)
             VALUES (1, 0, 'old.png', '{}', 0.8, 0.5, NULL, 'then');",
        )
        .unwrap();
    }
    let mut p = Project::open(dir.path()).unwrap();
    assert_eq!(p.schema_version().unwrap(), schema::LATEST);
    const { assert!(schema::LATEST >= 3) };
    let old = p.latest_pseudo_label("a.png").unwrap().unwrap();
    assert_eq!((old.sam_iou, old.stability), (Some(0.8), Some(0.5)));
    assert_eq!((old.unet_components, old.label_components), (None, None));
    assert_eq!(old.component_change(), None);
    assert!(
        (old.quality().unwrap() - 0.4).abs() < 1e-12,
        "score unchanged"
    );
    let q = p.review_queue().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].component_change, None);
    let st = p.status().unwrap();
    assert_eq!((st.pseudo_labels, st.component_count_changed), (1, 0));

    // the backup is the v2 database with the label
    let backup = dir.path().join("medmine.db.bak-v2");
    let conn = rusqlite::Connection::open(&backup).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 2);
    let n: i64 = conn
        .query_row("SELECT count(*) FROM pseudo_labels", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);

    // new labels carry their counts; a changed count ranks the label first
    p.add_pseudo_label(
        "b.png",
        &label(4, 3, 0, [Some(0.8), Some(0.5), None], Some((1, 2))),
    )
    .unwrap();
    let new = p.latest_pseudo_label("b.png").unwrap().unwrap();
    assert_eq!(
        (new.unet_components, new.label_components),
        (Some(1), Some(2))
    );
    assert!((new.quality().unwrap() - 0.2).abs() < 1e-12);
    let q = p.review_queue().unwrap();
    let names: Vec<&str> = q.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["b.png", "a.png"]);
    // a negative count is refused before anything is stored
    let err = p
        .add_pseudo_label(
            "a.png",
            &label(4, 3, 1, [Some(0.9), None, None], Some((-1, 1))),
        )
        .unwrap_err();
    assert!(err.to_string().contains("a.png") && err.to_string().contains("negative"));
    assert_eq!(p.pseudo_labels("a.png").unwrap().len(), 1);
    drop(p);
    // opening again neither migrates nor backs up again
    Project::open(dir.path()).unwrap();
    assert!(!dir.path().join("medmine.db.bak-v3").exists());
    assert!(!dir.path().join("medmine.db.bak-v2.2").exists());
}
