//! The whole loop in the app, headless (egui_kittest), on a copy of the demo dataset with the
//! tiny SAM fixture: a new project from a folder, a first model, mining, keyboard review
//! (accept, reject), a SAM correction that keeps the other lung, a brush stroke, undo and redo,
//! fine-tuning, the next round (pending and rejected images mined again, the accepted and the
//! edited one kept), then quit and reopen. Every stage is checked in the store.
#![cfg(feature = "gui")]
use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use egui::{pos2, Key, Modifiers};
use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use medmine::data::{self, Mask};
use medmine::gui::canvas::Tool;
use medmine::gui::{App, Startup};
use medmine::mining::LabelerKind;
use medmine::store::{
    MaskVersion, Project, PseudoLabel, Review, ReviewState, Role, RunStatus, TrainingRun,
};

use super::gui::{loaded, run_training, wait_for};
use super::gui_project::type_into;

fn harness(project: Option<PathBuf>, sam: &Path) -> Harness<'static, App> {
    let startup = Startup {
        project,
        demo: None,
        sam: Some(sam.to_path_buf()),
        device_name: "cpu".into(),
    };
    // tall enough that the inspector shows the training result's buttons
    Harness::builder()
        .with_size([1200.0, 1500.0])
        .wgpu()
        .build_eframe(move |cc| App::new(cc, startup, candle_core::Device::Cpu))
}

/// The 4-connected components of a mask with at least `min_area` pixels (pixel indices),
/// largest first.
fn components(m: &Mask, min_area: usize) -> Vec<Vec<usize>> {
    let (w, h) = (m.width, m.height);
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        if m.data[start] == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut comp = vec![start];
        let mut i = 0;
        while i < comp.len() {
            let p = comp[i];
            i += 1;
            let (x, y) = (p % w, p / w);
            let mut near = Vec::with_capacity(4);
            if x > 0 {
                near.push(p - 1);
            }
            if x + 1 < w {
                near.push(p + 1);
            }
            if y > 0 {
                near.push(p - w);
            }
            if y + 1 < h {
                near.push(p + w);
            }
            for q in near {
                if m.data[q] != 0 && !seen[q] {
                    seen[q] = true;
                    comp.push(q);
                }
            }
        }
        if comp.len() >= min_area {
            out.push(comp);
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.len()));
    out
}

/// Whether every foreground pixel of `small` is foreground in `big`.
fn covers(big: &Mask, small: &Mask) -> bool {
    big.data.iter().zip(&small.data).all(|(&b, &s)| b >= s)
}

fn set(m: &Mask, pixels: &[usize]) -> bool {
    pixels.iter().all(|&p| m.data[p] != 0)
}

fn store(root: &Path) -> Project {
    Project::open(root).unwrap()
}

fn current_mask(root: &Path, image: &str) -> (Mask, &'static str) {
    let (file, kind) = store(root).current_mask(image).unwrap().unwrap();
    (data::load_mask(&file).unwrap(), kind)
}

/// Everything the store knows about the review work, image by image, and the runs.
#[derive(Debug, PartialEq)]
struct Snapshot {
    images: Vec<(Review, Vec<PseudoLabel>, Vec<MaskVersion>)>,
    runs: Vec<TrainingRun>,
}

fn snapshot(root: &Path) -> Snapshot {
    let p = store(root);
    let images = p
        .images()
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                p.review(&r.name).unwrap(),
                p.pseudo_labels(&r.name).unwrap(),
                p.mask_history(&r.name).unwrap(),
            )
        })
        .collect();
    Snapshot {
        images,
        runs: p.runs().unwrap(),
    }
}

/// Clicks a point of the image with the SAM tool (left button: a positive click).
fn sam_click(h: &mut Harness<'static, App>, at: egui::Pos2) {
    let p = h.state().ui_from_image(at).unwrap();
    h.hover_at(p);
    h.step();
    h.drag_at(p);
    h.step();
    h.drop_at(p);
    h.step();
}

/// A brush stroke from `a` to `b` (image pixels).
fn stroke(h: &mut Harness<'static, App>, a: egui::Pos2, b: egui::Pos2) {
    let a = h.state().ui_from_image(a).unwrap();
    let b = h.state().ui_from_image(b).unwrap();
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
}

fn wait_idle(h: &mut Harness<'static, App>, what: &str) {
    wait_for(h, what, |a| !a.training().running() && a.saving() == 0);
}

#[test]
fn the_whole_loop_from_a_folder_to_the_next_round_survives_a_restart() {
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("e2e: {what} after {:.1} s", t0.elapsed().as_secs_f64());
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("demo data");
    crate::common::copy_dir(&common::demo(), &data_dir);
    let sam = common::root().join("tests/fixtures/sam/sam_tiny.pth");
    let mut h = harness(None, &sam);
    h.run_steps(4);

    // ---- 1. new project from the folder: Project > New project from dataset…
    h.get_by_label("Project").click();
    h.run_steps(4);
    h.get_by_label("New project from dataset…").click();
    h.run_steps(4);
    type_into(&mut h, "dataset folder", &data_dir.display().to_string());
    wait_for(&mut h, "the scan of the dataset folder", |a| {
        a.dialogs()
            .new_project
            .as_ref()
            .is_some_and(|n| n.scan_summary().is_some())
    });
    // half of the training list's masks are kept as labels, the rest is mined
    h.get_by_label("keep only a fraction of the masks as labelled (the rest is mined)")
        .click();
    h.run_steps(4);
    {
        let n = h.state_mut().dialogs_mut().new_project.as_mut().unwrap();
        assert!(n.subsample && n.use_splits);
        // the slider's value (dragging a slider to an exact value has no kittest handle)
        n.labelled_fraction = 0.5;
    }
    h.get_by_label("Create").click();
    h.step();
    let root = tmp.path().join("demo data.medmine");
    wait_for(&mut h, "the new project to open", |a| {
        a.project() == Some(root.as_path()) && a.image_count() == 24
    });
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    // what the dialog's close button does: the report window would cover the inspector
    h.state_mut().dialogs_mut().new_project = None;
    h.step();
    let unlabelled: BTreeSet<String> = {
        let p = store(&root);
        let images = p.images().unwrap();
        let count = |role| images.iter().filter(|r| r.role == role).count();
        assert_eq!(count(Role::Labelled), 9, "half of train.txt's 18 masks");
        assert_eq!(count(Role::Val), 6, "val.txt");
        assert!(p.runs().unwrap().is_empty());
        images
            .iter()
            .filter(|r| r.role == Role::Unlabelled)
            .map(|r| r.name.clone())
            .collect()
    };
    assert_eq!(unlabelled.len(), 9);
    loaded(&mut h);
    wait_for(&mut h, "SAM to load", |a| a.sam_loaded());
    lap("project created");

    // ---- 2. train a first model from scratch (small and short; the dialog's drag values are
    // set on the state, as the other GUI tests do)
    {
        let t = h.state_mut().training_mut();
        t.epochs = 4;
        t.size = 32;
        t.base = 4;
    }
    run_training(&mut h, "the first model");
    let first = h.state().training().result.clone().unwrap();
    assert!(first.best.is_file());
    h.get_by_label("Use this model").click();
    h.step();
    wait_for(&mut h, "the first model to load", |a| {
        a.model() == Some(&first.best)
    });
    {
        let runs = store(&root).runs().unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_ne!(runs[0].status, RunStatus::Cancelled);
    }
    let hash1 = medmine::fsutil::sha256_file(&first.best).unwrap();
    lap("first model trained");

    // ---- 3. mine: the Mining dialog, self-training labeler (SAM is loaded, so it is a choice)
    h.get_by_label("Mine…").click();
    h.step();
    h.step();
    assert_eq!(
        h.state().mining().labeler,
        LabelerKind::Sam,
        "SAM is loaded"
    );
    h.get_by_label("self-training").click();
    h.step();
    assert_eq!(h.state().mining().labeler, LabelerKind::Unet);
    h.get_by_label("Start mining").click();
    h.step();
    wait_for(&mut h, "the first mining pass", |a| {
        a.mining().last.is_some() && !a.training().running()
    });
    let round1 = h.state().mining().last.clone().unwrap();
    assert!(round1.failed.is_empty(), "{round1:?}");
    let mined1: BTreeSet<String> = round1.mined.iter().cloned().collect();
    assert!(mined1.len() >= 4, "{round1:?}");
    assert!(mined1.is_subset(&unlabelled));
    {
        let p = store(&root);
        for name in &unlabelled {
            let labels = p.pseudo_labels(name).unwrap();
            assert_eq!(labels.len(), usize::from(mined1.contains(name)), "{name}");
            assert_eq!(p.review(name).unwrap().state, ReviewState::Pending);
            if let Some(l) = labels.first() {
                assert_eq!(l.unet_hash.as_deref(), Some(hash1.as_str()));
                assert_eq!(l.labeler.as_deref(), Some("unet"));
            }
        }
    }
    wait_for(&mut h, "the list to show the pseudo-labels", |a| {
        a.pseudo_labelled() == mined1.len()
    });
    lap("first round mined");

    // ---- 4. review with the keyboard: N (next pending), A (accept), N, R (reject)
    h.key_press(Key::N);
    h.step();
    let accepted = loaded(&mut h);
    assert!(mined1.contains(&accepted));
    let accepted_labels = store(&root).pseudo_labels(&accepted).unwrap();
    h.key_press(Key::A);
    wait_for(&mut h, "accept to be saved", |a| {
        a.badge(&accepted) == Some(ReviewState::Accepted) && a.saving() == 0
    });
    let accepted_review = store(&root).review(&accepted).unwrap();
    assert_eq!(accepted_review.state, ReviewState::Accepted);

    h.key_press(Key::N);
    h.step();
    let rejected = loaded(&mut h);
    assert!(mined1.contains(&rejected) && rejected != accepted);
    h.key_press(Key::R);
    wait_for(&mut h, "reject to be saved", |a| {
        a.badge(&rejected) == Some(ReviewState::Rejected) && a.saving() == 0
    });
    assert_eq!(
        store(&root).review(&rejected).unwrap().state,
        ReviewState::Rejected
    );
    lap("reviewed");

    // ---- 5. correct a two-lung pseudo-label: N until the proposal has two objects
    let mut corrected = None;
    for _ in 0..mined1.len() {
        h.key_press(Key::N);
        h.step();
        let name = loaded(&mut h);
        let (mask, kind) = current_mask(&root, &name);
        assert_eq!(kind, "pseudo_label");
        if components(&mask, 100).len() >= 2 {
            corrected = Some((name, mask));
            break;
        }
    }
    let (corrected, proposal) =
        corrected.expect("a pending pseudo-label with two lungs (components of >= 100 px)");
    assert!(corrected != accepted && corrected != rejected);
    let objects = components(&proposal, 100);
    let (clicked, other) = (&objects[0], &objects[1]);
    // the click: the clicked lung's pixel nearest its centroid
    let w = proposal.width;
    let (cx, cy) = clicked.iter().fold((0., 0.), |(x, y), &p| {
        (x + (p % w) as f64, y + (p / w) as f64)
    });
    let n = clicked.len() as f64;
    let at = *clicked
        .iter()
        .min_by_key(|&&p| {
            let (dx, dy) = ((p % w) as f64 - cx / n, (p / w) as f64 - cy / n);
            ((dx * dx + dy * dy) * 100.) as u64
        })
        .unwrap();
    let at = pos2((at % w) as f32 + 0.5, (at / w) as f32 + 0.5);

    h.key_press(Key::S);
    h.step();
    assert_eq!(h.state().tool(), Tool::Sam);
    sam_click(&mut h, at);
    assert!(h.state().sam_pending(), "the spinner shows while SAM works");
    wait_for(&mut h, "SAM's correction to be saved", |a| {
        a.badge(&corrected) == Some(ReviewState::Edited) && a.saving() == 0 && !a.sam_pending()
    });
    let first_answer = h.state().draft().expect("SAM's answer is the edit").clone();
    assert!(
        covers(&first_answer, &proposal),
        "a positive click adds SAM's object: the proposal stays"
    );
    assert!(set(&first_answer, other), "the other lung survives");
    assert_eq!(current_mask(&root, &corrected), (first_answer, "edited"));
    assert_eq!(store(&root).mask_history(&corrected).unwrap().len(), 1);
    // a follow-up click on the same lung (the last answer's logits go back as mask input):
    // its answer again edits the proposal, and replaces the first answer
    let at2 = clicked[clicked.len() / 4];
    sam_click(&mut h, pos2((at2 % w) as f32 + 0.5, (at2 / w) as f32 + 0.5));
    assert!(h.state().sam_pending());
    wait_for(&mut h, "the follow-up answer to be saved", |a| {
        a.saving() == 0 && !a.sam_pending()
    });
    let after_sam = h.state().draft().unwrap().clone();
    assert!(covers(&after_sam, &proposal), "the proposal stays");
    assert!(set(&after_sam, other), "the other lung survives");
    assert!(set(&after_sam, clicked), "the clicked lung is in the edit");
    {
        let (mask, kind) = current_mask(&root, &corrected);
        assert_eq!(kind, "edited");
        assert_eq!(mask, after_sam, "the store has what is shown");
        let p = store(&root);
        assert_eq!(p.mask_history(&corrected).unwrap().len(), 2);
        assert_eq!(p.review(&corrected).unwrap().state, ReviewState::Edited);
    }
    let added = after_sam
        .data
        .iter()
        .zip(&proposal.data)
        .filter(|(a, p)| a > p)
        .count();
    eprintln!("e2e: SAM added {added} pixels to {corrected}");

    // the brush: a stroke outside the lungs, across a row that SAM's answer left partly empty
    // (the fixture's SAM has random weights: its answer is a texture, not an organ)
    let (x0, row) = (12..after_sam.height - 12)
        .step_by(4)
        .find_map(|y| {
            (0..after_sam.width - 80)
                .step_by(4)
                .find(|&x0| {
                    let outside = (y - 12..y + 12)
                        .all(|yy| (x0..x0 + 80).all(|x| proposal.data[yy * w + x] == 0));
                    let empty = (x0 + 12..x0 + 60)
                        .filter(|&x| after_sam.data[y * w + x] == 0)
                        .count();
                    outside && empty >= 10
                })
                .map(|x0| (x0, y))
        })
        .expect("a row outside the lungs that SAM's answer left partly empty");
    h.key_press(Key::B);
    h.step();
    assert_eq!(h.state().tool(), Tool::Brush);
    let y = row as f32 + 0.5;
    stroke(&mut h, pos2(x0 as f32 + 12., y), pos2(x0 as f32 + 60., y));
    wait_for(&mut h, "the stroke to be saved", |a| {
        a.draft() != Some(&after_sam) && a.saving() == 0
    });
    let after_brush = h.state().draft().unwrap().clone();
    assert!(covers(&after_brush, &after_sam), "the brush only adds");
    assert!(
        (x0 + 14..x0 + 58).all(|x| after_brush.data[row * w + x] == 1),
        "the stroke painted its line"
    );
    assert!(set(&after_brush, other) && set(&after_brush, clicked));
    {
        assert_eq!(
            current_mask(&root, &corrected),
            (after_brush.clone(), "edited")
        );
        assert_eq!(store(&root).mask_history(&corrected).unwrap().len(), 3);
    }

    // ---- 6. undo and redo restore exactly, in the app and in the store
    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    wait_for(&mut h, "undo to be saved", |a| {
        a.saving() == 0 && a.draft() == Some(&after_sam)
    });
    assert_eq!(
        current_mask(&root, &corrected),
        (after_sam.clone(), "edited")
    );
    assert_eq!(
        store(&root).review(&corrected).unwrap().state,
        ReviewState::Edited
    );
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    wait_for(&mut h, "redo to be saved", |a| {
        a.saving() == 0 && a.draft() == Some(&after_brush)
    });
    assert_eq!(
        current_mask(&root, &corrected),
        (after_brush.clone(), "edited")
    );
    assert_eq!(
        store(&root).mask_history(&corrected).unwrap().len(),
        3,
        "undo and redo move between versions, they add none"
    );
    lap("corrected");

    // ---- 7. fine-tune the first model on the labels, the accepted and the edited mask
    h.key_press(Key::V);
    h.step();
    {
        // the dialog's drag values; a large step so that an epoch beats the first model
        let t = h.state_mut().training_mut();
        t.epochs = 3;
        t.lr = 3e-3;
    }
    run_training(&mut h, "the fine-tuned model");
    let tuned = h.state().training().result.clone().unwrap();
    let hash2 = medmine::fsutil::sha256_file(&tuned.best).unwrap();
    assert_ne!(
        hash1, hash2,
        "fine-tuning beat the first model (Dice {:?} vs {:?}): a new model mines round 2",
        tuned.new_dice, tuned.old_dice
    );
    {
        let runs = store(&root).runs().unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_ne!(runs[1].status, RunStatus::Cancelled);
        assert_eq!(runs[1].best_checkpoint.as_ref(), Some(&tuned.best));
    }
    lap("fine-tuned");

    // ---- 8. the next round: pending and rejected mined again, accepted and edited kept
    h.get_by_label("Mine next round with this model").click();
    h.step();
    wait_for(&mut h, "the second mining pass", |a| {
        a.mining().last.is_some() && !a.training().running()
    });
    assert_eq!(h.state().model(), Some(&tuned.best));
    let round2 = h.state().mining().last.clone().unwrap();
    assert!(round2.failed.is_empty(), "{round2:?}");
    let kept: BTreeSet<String> = round2.kept.iter().cloned().collect();
    assert_eq!(
        kept,
        [accepted.clone(), corrected.clone()].into_iter().collect(),
        "{round2:?}"
    );
    assert!(round2.unchanged.is_empty(), "{round2:?}");
    assert!(round2.mined.contains(&rejected), "{round2:?}");
    let remined: BTreeSet<String> = round2
        .mined
        .iter()
        .chain(&round2.no_component)
        .cloned()
        .collect();
    let expected: BTreeSet<String> = unlabelled
        .iter()
        .filter(|n| **n != accepted && **n != corrected)
        .cloned()
        .collect();
    assert_eq!(
        remined, expected,
        "every pending and rejected image: {round2:?}"
    );
    {
        let p = store(&root);
        // the accepted image: untouched, same pseudo-label and the same revision
        assert_eq!(p.pseudo_labels(&accepted).unwrap(), accepted_labels);
        assert_eq!(p.review(&accepted).unwrap(), accepted_review);
        // the edited image: its edit is still current, no new pseudo-label
        assert_eq!(p.pseudo_labels(&corrected).unwrap().len(), 1);
        assert_eq!(p.review(&corrected).unwrap().state, ReviewState::Edited);
        for name in &round2.mined {
            let labels = p.pseudo_labels(name).unwrap();
            let newest = labels.last().unwrap();
            assert_eq!(newest.unet_hash.as_deref(), Some(hash2.as_str()), "{name}");
            assert_eq!(
                labels.len(),
                1 + usize::from(mined1.contains(name)),
                "{name}"
            );
            if labels.len() == 2 {
                assert!(newest.round > labels[0].round, "{name}: {labels:?}");
            }
            assert_eq!(
                p.review(name).unwrap().state,
                ReviewState::Pending,
                "{name}"
            );
        }
    }
    assert_eq!(
        current_mask(&root, &corrected),
        (after_brush.clone(), "edited")
    );
    wait_for(&mut h, "the list to show round 2", |a| {
        a.badge(&rejected) == Some(ReviewState::Pending)
            && a.badge(&accepted) == Some(ReviewState::Accepted)
    });
    wait_idle(&mut h, "the app to be idle before quitting");
    lap("second round mined");

    // ---- 9. quit, reopen: everything is still there
    let before = snapshot(&root);
    drop(h);
    let mut h = harness(Some(root.clone()), &sam);
    loaded(&mut h);
    wait_for(&mut h, "the project's newest model", |a| {
        a.model() == Some(&tuned.best)
    });
    assert_eq!(h.state().image_count(), 24);
    assert_eq!(snapshot(&root), before, "reopening changed the store");
    for (review, _, _) in &before.images {
        assert_eq!(
            h.state().badge(&review.image),
            Some(review.state),
            "{}",
            review.image
        );
    }
    assert_eq!(h.state().badge(&accepted), Some(ReviewState::Accepted));
    assert_eq!(h.state().badge(&corrected), Some(ReviewState::Edited));
    assert_eq!(h.state().badge(&rejected), Some(ReviewState::Pending));
    // the corrected image shows its edit again: back to the top of the list, then down to it
    for _ in 0..24 {
        h.key_press(Key::K);
        h.step();
    }
    for _ in 0..24 {
        if h.state().selected_image() == Some(corrected.as_str()) {
            break;
        }
        h.key_press(Key::J);
        h.step();
    }
    assert_eq!(loaded(&mut h), corrected);
    assert_eq!(h.state().draft(), Some(&after_brush));
    assert!(h.state().errors().is_empty(), "{:?}", h.state().errors());
    lap("reopened");
}
