//! Who wins: the machine's writes (pseudo-labels, auto-acceptance, batch acceptance by score)
//! are compare-and-set against the image's revision and state; a person's writes always apply
//! and bump the revision. Through the library API, one path at a time; the process-level
//! races are in `store_race`.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medmine::data::{self, Mask};
use medmine::store::{
    schema, Actor, ImportOptions, MachineWrite, NewPseudoLabel, Project, Prompts, ReviewState,
    StoreError, MACHINE_REVIEWER,
};

const W: usize = 12;
const H: usize = 10;

/// A mask whose content is unique to `seed` (so its file is new to the project).
fn mask(seed: usize) -> Mask {
    let data = (0..W * H)
        .map(|p| u8::from((p * 7 + seed * 13) % 5 < 2 || p == seed % (W * H)))
        .collect();
    Mask {
        width: W,
        height: H,
        data,
    }
}

fn label(seed: usize, iou: f64) -> NewPseudoLabel {
    NewPseudoLabel {
        round: 99, // ignored by add_pseudo_labels_if
        mask: mask(seed),
        prompts: Prompts::default(),
        sam_iou: Some(iou),
        stability: Some(1.0),
        agreement: None,
        unet_components: Some(1),
        label_components: Some(1),
        sam_checkpoint: Some("sam.pth".into()),
        unet_checkpoint: Some("unet.safetensors".into()),
        unet_hash: Some(format!("{seed:064x}")),
        labeler: Some("sam:abc".into()),
    }
}

/// Six `W x H` images, none labelled (all unlabelled).
fn project(dir: &Path) -> (PathBuf, Project) {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    for i in 0..6 {
        let px: Vec<u8> = (0..W * H).map(|p| ((p * 7 + i * 31) % 256) as u8).collect();
        data::save_gray_png(&data.join(format!("images/img_{i}.png")), W, H, &px).unwrap();
    }
    let root = dir.join("proj");
    let mut p = Project::init(&root).unwrap();
    p.import(&ImportOptions::new(&data)).unwrap();
    (root, p)
}

fn mask_files(p: &Project) -> BTreeSet<String> {
    std::fs::read_dir(p.masks_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn person(note: &str) -> Actor<'_> {
    Actor {
        reviewer: Some("ana"),
        note: Some(note),
    }
}

fn revision(p: &Project, image: &str) -> i64 {
    p.review(image).unwrap().revision
}

/// Nothing of a refused write is left: no row, no log entry, no revision change, no file.
fn assert_untouched(p: &Project, image: &str, before: (usize, usize, i64, BTreeSet<String>)) {
    let (labels, log, rev, files) = before;
    assert_eq!(p.pseudo_labels(image).unwrap().len(), labels, "{image}");
    assert_eq!(p.review_log().unwrap().len(), log, "{image}");
    assert_eq!(revision(p, image), rev, "{image}");
    assert_eq!(
        mask_files(p),
        files,
        "{image}: an orphan mask file was left"
    );
}

fn snapshot(p: &Project, image: &str) -> (usize, usize, i64, BTreeSet<String>) {
    (
        p.pseudo_labels(image).unwrap().len(),
        p.review_log().unwrap().len(),
        revision(p, image),
        mask_files(p),
    )
}

#[test]
fn every_human_write_bumps_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut p) = project(dir.path());
    assert_eq!(revision(&p, "img_0"), 0);
    // a pseudo-label to accept (accepting an image without one is refused)
    p.add_pseudo_label("img_0", &label(1, 0.9)).unwrap();
    let base = revision(&p, "img_0");
    let mut expect = base;
    let mut step = |p: &Project, what: &str| {
        expect += 1;
        assert_eq!(revision(p, "img_0"), expect, "after {what}");
    };
    p.set_review(&["img_0"], ReviewState::Accepted, person("a"))
        .unwrap();
    step(&p, "accept");
    p.set_review(&["img_0"], ReviewState::Rejected, person("r"))
        .unwrap();
    step(&p, "reject");
    p.set_review(&["img_0"], ReviewState::Pending, person("p"))
        .unwrap();
    step(&p, "pending");
    p.save_edit("img_0", &mask(1), person("e1")).unwrap();
    step(&p, "edit");
    p.save_edit("img_0", &mask(2), person("e2")).unwrap();
    step(&p, "second edit");
    p.undo_edit("img_0", person("u")).unwrap().unwrap();
    step(&p, "undo");
    p.redo_edit("img_0", person("re")).unwrap().unwrap();
    step(&p, "redo");
    // nothing to redo: nothing written, no bump
    assert!(p.redo_edit("img_0", person("x")).unwrap().is_none());
    assert_eq!(revision(&p, "img_0"), base + 7);
    // a batch bumps each of its images once; the others keep theirs
    p.set_review(&["img_1", "img_2"], ReviewState::Rejected, person("b"))
        .unwrap();
    assert_eq!(
        (
            revision(&p, "img_1"),
            revision(&p, "img_2"),
            revision(&p, "img_3")
        ),
        (1, 1, 0)
    );
    // every entry after the pseudo-label is a person's
    let log = p.review_log().unwrap();
    assert!(log[0].is_machine());
    assert!(log[1..].iter().all(|e| !e.is_machine()));
}

#[test]
fn machine_pseudo_labels_are_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let (root, mut p) = project(dir.path());

    // pending, revision as read: written, rounds 0.. with the last label newest
    let r0 = revision(&p, "img_0");
    let w = p
        .add_pseudo_labels_if("img_0", r0, &[label(1, 0.5), label(2, 0.9)])
        .unwrap();
    assert_eq!(w, MachineWrite::Written { revision: r0 + 1 });
    let labels = p.pseudo_labels("img_0").unwrap();
    assert_eq!(
        labels.iter().map(|l| l.round).collect::<Vec<_>>(),
        [0, 1],
        "the round field is ignored"
    );
    let newest = p.latest_pseudo_label("img_0").unwrap().unwrap();
    assert_eq!(newest.sam_iou, Some(0.9));
    assert_eq!(newest.unet_hash.as_deref(), Some(&*format!("{:064x}", 2)));
    assert_eq!(newest.labeler.as_deref(), Some("sam:abc"));
    let file = p.masks_dir().join(&newest.mask_file);
    assert_eq!(data::load_mask(&file).unwrap(), mask(2));
    let log = p.review_log().unwrap();
    assert_eq!(log.len(), 1, "one log entry for the whole write");
    assert_eq!(
        (
            log[0].action.as_str(),
            log[0].state,
            log[0].reviewer.as_deref()
        ),
        ("pseudo_label", ReviewState::Pending, Some(MACHINE_REVIEWER))
    );
    assert!(log[0].is_machine());
    assert_eq!(log[0].pseudo_label_id, Some(newest.id));

    // a second pass appends after the stored rounds
    let r1 = revision(&p, "img_0");
    assert!(p
        .add_pseudo_labels_if("img_0", r1, &[label(3, 0.7)])
        .unwrap()
        .is_written());
    let rounds: Vec<i64> = p
        .pseudo_labels("img_0")
        .unwrap()
        .iter()
        .map(|l| l.round)
        .collect();
    assert_eq!(rounds, [0, 1, 2]);

    // the revision moved since the machine read it (a person set it back to pending)
    let stale = revision(&p, "img_1");
    p.set_review(&["img_1"], ReviewState::Pending, person("looked"))
        .unwrap();
    let before = snapshot(&p, "img_1");
    let w = p
        .add_pseudo_labels_if("img_1", stale, &[label(10, 0.9), label(11, 0.9)])
        .unwrap();
    assert_eq!(
        w,
        MachineWrite::Skipped {
            state: ReviewState::Pending,
            revision: stale + 1
        }
    );
    assert_untouched(&p, "img_1", before);

    // accepted or edited, even with the current revision: left alone
    p.add_pseudo_label("img_2", &label(25, 0.9)).unwrap();
    p.set_review(&["img_2"], ReviewState::Accepted, person("ok"))
        .unwrap();
    p.save_edit("img_3", &mask(20), person("fixed")).unwrap();
    for (image, state, seed) in [
        ("img_2", ReviewState::Accepted, 30),
        ("img_3", ReviewState::Edited, 40),
    ] {
        let before = snapshot(&p, image);
        let rev = revision(&p, image);
        let w = p
            .add_pseudo_labels_if(image, rev, &[label(seed, 0.9)])
            .unwrap();
        assert_eq!(
            w,
            MachineWrite::Skipped {
                state,
                revision: rev
            }
        );
        assert_untouched(&p, image, before);
        assert_eq!(p.review(image).unwrap().state, state);
    }

    // rejected with the current revision: written, back to pending
    p.set_review(&["img_4"], ReviewState::Rejected, person("no"))
        .unwrap();
    let rev = revision(&p, "img_4");
    assert_eq!(
        p.add_pseudo_labels_if("img_4", rev, &[label(50, 0.9)])
            .unwrap(),
        MachineWrite::Written { revision: rev + 1 }
    );
    assert_eq!(p.review("img_4").unwrap().state, ReviewState::Pending);

    // a refused write never removes a file another row uses (content-addressed masks)
    let used = p.latest_pseudo_label("img_0").unwrap().unwrap();
    let rev = revision(&p, "img_2");
    assert!(!p
        .add_pseudo_labels_if("img_2", rev, &[label(3, 0.7)])
        .unwrap()
        .is_written());
    assert!(p.masks_dir().join(&used.mask_file).is_file());
    assert!(p.verify(false).unwrap().is_empty());
    // an empty write or an unknown image is an error naming it
    let e = p.add_pseudo_labels_if("img_5", 0, &[]).unwrap_err();
    assert!(e.to_string().contains("img_5.png"), "{e}");
    assert!(p
        .add_pseudo_labels_if("nope", 0, &[label(60, 0.9)])
        .is_err());
    drop(p);
    let p = Project::open(&root).unwrap();
    assert_eq!(p.integrity_check().unwrap(), "ok");
}

#[test]
fn unconditional_pseudo_label_never_overwrites_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut p) = project(dir.path());
    p.add_pseudo_label("img_0", &label(65, 0.9)).unwrap();
    p.set_review(&["img_0"], ReviewState::Accepted, person("ok"))
        .unwrap();
    p.save_edit("img_1", &mask(5), person("fixed")).unwrap();
    for (image, state) in [
        ("img_0", ReviewState::Accepted),
        ("img_1", ReviewState::Edited),
    ] {
        let before = snapshot(&p, image);
        let e = p.add_pseudo_label(image, &label(70, 0.9)).unwrap_err();
        assert!(
            matches!(&e, StoreError::Decided { name, state: s } if name == &format!("{image}.png") && *s == state),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{image}.png")) && msg.contains(state.as_str()),
            "{msg}"
        );
        assert_untouched(&p, image, before);
    }
    // rejected and pending images take a new label (with its own round) and become pending
    p.set_review(&["img_2"], ReviewState::Rejected, person("no"))
        .unwrap();
    for image in ["img_2", "img_3"] {
        let mut l = label(80, 0.9);
        l.round = 4;
        let stored = p.add_pseudo_label(image, &l).unwrap();
        assert_eq!(stored.round, 4);
        let review = p.review(image).unwrap();
        assert_eq!(review.state, ReviewState::Pending);
        assert_eq!(review.revision, if image == "img_2" { 2 } else { 1 });
    }
}

#[test]
fn machine_acceptance_is_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut p) = project(dir.path());
    let machine = Actor {
        reviewer: Some("medmine mine"),
        note: Some("auto-accepted: quality >= 0"),
    };
    let mut written = Vec::new();
    for (i, image) in ["img_0", "img_1", "img_2", "img_3"].iter().enumerate() {
        let rev = revision(&p, image);
        match p
            .add_pseudo_labels_if(image, rev, &[label(90 + i, 0.9)])
            .unwrap()
        {
            MachineWrite::Written { revision } => written.push(revision),
            other => panic!("{image}: {other:?}"),
        }
    }
    // pending, same revision: accepted, logged as the machine's
    let w = p.accept_if("img_0", written[0], machine).unwrap();
    assert_eq!(
        w,
        MachineWrite::Written {
            revision: written[0] + 1
        }
    );
    let log = p.review_log().unwrap();
    let last = log.last().unwrap();
    assert_eq!(
        (last.image.as_str(), last.action.as_str(), last.state),
        ("img_0.png", "auto_accept", ReviewState::Accepted)
    );
    assert!(last.is_machine());
    // a person rejected it meanwhile: stays rejected
    p.set_review(&["img_1"], ReviewState::Rejected, person("no"))
        .unwrap();
    // a person looked and left it pending: the revision moved, so it stays pending
    p.set_review(&["img_2"], ReviewState::Pending, person("later"))
        .unwrap();
    // a person edited it
    p.save_edit("img_3", &mask(100), person("fixed")).unwrap();
    for (k, state) in [
        (1, ReviewState::Rejected),
        (2, ReviewState::Pending),
        (3, ReviewState::Edited),
    ] {
        let image = format!("img_{k}");
        let n = p.review_log().unwrap().len();
        let w = p.accept_if(&image, written[k], machine).unwrap();
        assert_eq!(
            w,
            MachineWrite::Skipped {
                state,
                revision: written[k] + 1
            },
            "{image}"
        );
        assert_eq!(p.review(&image).unwrap().state, state);
        assert_eq!(p.review_log().unwrap().len(), n);
    }
}

#[test]
fn batch_accept_takes_pending_images_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut p) = project(dir.path());
    for (i, iou) in [0.9, 0.9, 0.9, 0.9, 0.2].iter().enumerate() {
        p.add_pseudo_label(&format!("img_{i}"), &label(110 + i, *iou))
            .unwrap();
    }
    p.set_review(&["img_1"], ReviewState::Rejected, person("no"))
        .unwrap();
    p.save_edit("img_2", &mask(120), person("fixed")).unwrap();
    p.set_review(&["img_3"], ReviewState::Accepted, person("ok"))
        .unwrap();
    let who = Actor {
        reviewer: Some("bo"),
        note: Some("batch"),
    };
    let r = p.accept_by_quality(0.8, who).unwrap();
    let accepted: Vec<&str> = r.accepted.iter().map(|e| e.image.as_str()).collect();
    assert_eq!(accepted, ["img_0.png"]);
    assert!(r.accepted.iter().all(|e| e.is_machine()));
    assert_eq!(r.accepted[0].reviewer.as_deref(), Some("bo"));
    assert_eq!(
        r.skipped,
        vec![
            ("img_1.png".to_string(), ReviewState::Rejected),
            ("img_2.png".to_string(), ReviewState::Edited),
            ("img_3.png".to_string(), ReviewState::Accepted),
        ]
    );
    assert_eq!(r.below, 1, "img_4 (0.2)");
    assert_eq!(p.review("img_2").unwrap().state, ReviewState::Edited);
    assert_eq!(p.review("img_1").unwrap().state, ReviewState::Rejected);
    // nothing left to accept; a non-number threshold is refused
    assert!(p.accept_by_quality(0.8, who).unwrap().accepted.is_empty());
    assert!(p.accept_by_quality(f64::NAN, who).is_err());
}

/// A v3 project (before revisions and model hashes) with a label, a review and log entries:
/// opening it backs it up and migrates it; everything is kept, revisions start at 0 and the
/// machine writes work against them.
#[test]
fn v3_project_migrates_to_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("medmine.db");
    schema::create_with_version(&db, 3).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "INSERT INTO images (id, name, path, sha256, width, height, role, added_at)
             VALUES (1, 'a.png', '/nowhere/a.png', 'ab', 12, 10, 'unlabelled', 'then'),
                    (2, 'b.png', '/nowhere/b.png', 'cd', 12, 10, 'unlabelled', 'then');
             INSERT INTO pseudo_labels (id, image_id, round, mask_file, prompts, sam_iou,
               stability, agreement, created_at, unet_components, label_components)
             VALUES (7, 1, 0, 'old.png', '{}', 0.8, 0.5, NULL, 'then', 1, 1);
             INSERT INTO reviews (image_id, state, reviewer, at) VALUES
               (1, 'rejected', 'ana', 'then'), (2, 'pending', NULL, NULL);
             INSERT INTO review_log (image_id, action, state, reviewer, at, pseudo_label_id)
             VALUES (1, 'pseudo_label', 'pending', NULL, 'then', 7),
                    (1, 'review', 'rejected', 'ana', 'then', 7);",
        )
        .unwrap();
    }
    let mut p = Project::open(dir.path()).unwrap();
    assert_eq!(p.schema_version().unwrap(), schema::LATEST);
    const { assert!(schema::LATEST >= 4) };
    assert!(dir.path().join("medmine.db.bak-v3").is_file());
    let old = p.latest_pseudo_label("a.png").unwrap().unwrap();
    assert_eq!(
        (old.id, old.mask_file.as_str(), old.sam_iou),
        (7, "old.png", Some(0.8))
    );
    assert_eq!((old.unet_hash, old.labeler), (None, None));
    let review = p.review("a.png").unwrap();
    assert_eq!(
        (review.state, review.reviewer.as_deref(), review.revision),
        (ReviewState::Rejected, Some("ana"), 0)
    );
    let log = p.review_log().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[1].action.as_str(), log[1].state),
        ("review", ReviewState::Rejected)
    );
    // a stale revision is refused, the current one written (a rejected image is re-labelled)
    assert!(!p
        .add_pseudo_labels_if("a.png", 1, &[label(1, 0.9)])
        .unwrap()
        .is_written());
    assert_eq!(
        p.add_pseudo_labels_if("a.png", 0, &[label(1, 0.9)])
            .unwrap(),
        MachineWrite::Written { revision: 1 }
    );
    assert_eq!(p.pseudo_labels("a.png").unwrap().len(), 2);
    assert_eq!(p.integrity_check().unwrap(), "ok");
}

#[test]
fn accept_without_a_pseudo_label_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut p) = project(dir.path());
    let before = (revision(&p, "img_0"), p.review_log().unwrap().len());
    // one bad name refuses the whole batch, the good one included
    p.add_pseudo_label("img_1", &label(3, 0.9)).unwrap();
    let log = p.review_log().unwrap().len();
    let e = p
        .set_review(&["img_1", "img_0"], ReviewState::Accepted, person("a"))
        .unwrap_err();
    assert!(matches!(&e, StoreError::NothingToAccept { name } if name == "img_0.png"));
    let msg = e.to_string();
    assert!(
        msg.contains("img_0.png") && msg.contains("no pseudo-label") && msg.contains("mine"),
        "{msg}"
    );
    assert_eq!(revision(&p, "img_0"), before.0);
    assert_eq!(p.review_log().unwrap().len(), log);
    assert_eq!(p.review("img_1").unwrap().state, ReviewState::Pending);
    // an edited mask is something to accept; rejecting needs nothing
    p.save_edit("img_0", &mask(4), person("e")).unwrap();
    p.set_review(&["img_0"], ReviewState::Accepted, person("a"))
        .unwrap();
    assert_eq!(p.review("img_0").unwrap().state, ReviewState::Accepted);
    p.set_review(&["img_2"], ReviewState::Rejected, person("r"))
        .unwrap();
}
