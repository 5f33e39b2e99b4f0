//! The review queue: pending pseudo-labels, least confident first, through the library and
//! `medmine review PROJECT queue`.
mod common;

use common::{medmine, ok};
use std::path::{Path, PathBuf};

use medmine::data::Mask;
use medmine::store::{
    Actor, ImportOptions, NewPseudoLabel, Project, Prompts, QueueEntry, ReviewState, Role,
};

fn demo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

fn label(w: usize, h: usize, round: i64, scores: [Option<f64>; 3]) -> NewPseudoLabel {
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
        sam_checkpoint: None,
        unet_checkpoint: None,
    }
}

/// The demo imported with half of train.txt labelled; pseudo-labels on six unlabelled
/// images (one accepted afterwards), a seventh unlabelled image left without one.
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
    assert!(pool.len() >= 7, "demo has too few unlabelled images");
    let n = |i: usize| pool[i].name.clone();
    let mut add = |i: usize, round: i64, s: [Option<f64>; 3]| {
        let (w, h) = (pool[i].width, pool[i].height);
        p.add_pseudo_label(&pool[i].name, &label(w, h, round, s))
            .unwrap();
    };
    add(0, 0, [Some(0.9), Some(0.9), Some(0.9)]); // 0.729
    add(1, 0, [Some(0.5), None, None]); // 0.5
    add(2, 0, [None, None, None]); // unknown: first
    add(3, 0, [Some(0.99), Some(0.99), Some(0.99)]); // accepted below: absent
    add(4, 0, [Some(0.1), Some(1.0), Some(1.0)]); // superseded by round 1
    add(4, 1, [Some(0.6), Some(1.0), Some(1.0)]); // 0.6
    add(5, 0, [None, Some(0.5), None]); // 0.5, ties with pool[1] by name
    let who = Actor {
        reviewer: Some("ana"),
        note: None,
    };
    p.set_review(&[&n(3)], ReviewState::Accepted, who).unwrap();
    let mut tie = [n(1), n(5)];
    tie.sort();
    let expected = vec![n(2), tie[0].clone(), tie[1].clone(), n(4), n(0)];
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
    assert_eq!(q[1].quality, Some(0.5));
    assert_eq!(q[2].quality, Some(0.5));
    let e4 = &q[3];
    assert_eq!(e4.round, 1, "the newest round's scores count");
    assert_eq!(e4.sam_iou, Some(0.6));
    assert!((e4.quality.unwrap() - 0.6).abs() < 1e-12);
    assert!((q[4].quality.unwrap() - 0.729).abs() < 1e-12);
    for w in q.windows(2) {
        assert!(w[0].quality.unwrap_or(f64::NEG_INFINITY) <= w[1].quality.unwrap_or(0.0));
    }
    // every entry is pending
    for e in &q {
        assert_eq!(p.review(&e.name).unwrap().state, ReviewState::Pending);
    }
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
    assert_eq!(arr[3]["round"], 1);
    for key in [
        "name",
        "round",
        "sam_iou",
        "stability",
        "agreement",
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
        assert_eq!(cols.len(), 6, "{line}");
        assert_eq!(cols[0], name);
    }
    assert_eq!(lines[0], format!("{}  -  -  -  -  0", expected[0]));
    assert!(lines[4].starts_with(&format!("{}  0.7290  0.9000", expected[4])));
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
