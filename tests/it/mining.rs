//! Knowledge mining end to end: a tiny U-Net++ trained on the demo X-rays, a project with an
//! unlabelled pool, `medmine mine` with the tiny random-weight SAM fixture (its masks mean
//! nothing; the shapes, the flow and the store are real), and the loop run round after round
//! with the self-training labeler (`--labeler unet`, no SAM): round 1, review, fine-tune,
//! round 2 with the new checkpoint.
use crate::common;

use crate::common::{field, medmine, ok, root, s};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medmine::data;
use medmine::mining::{best_round, mine_image, quality, MiningConfig};
use medmine::models::sam::{load_sam, SamPredictor};
use medmine::prompts::Strategy;
use medmine::store::{Project, PseudoLabel, ReviewState, Role};

fn sam_fixture() -> PathBuf {
    root().join("tests/fixtures/sam/sam_tiny.pth")
}

/// Every image's pseudo-labels and review state.
fn snapshot(p: &Path) -> BTreeMap<String, (Vec<PseudoLabel>, ReviewState)> {
    let project = Project::open(p).unwrap();
    project
        .images()
        .unwrap()
        .into_iter()
        .map(|r| {
            let labels = project.pseudo_labels(&r.name).unwrap();
            let state = project.review(&r.name).unwrap().state;
            (r.name, (labels, state))
        })
        .collect()
}

/// A barely trained U-Net++ on half the demo's training images: `RUN/best.safetensors`.
pub(crate) fn tiny_unet(run: &Path) -> PathBuf {
    let demo = root().join("assets/demo");
    ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        s(&demo),
        "--train-list",
        s(&demo.join("train.txt")),
        "--val-list",
        s(&demo.join("val.txt")),
        "--size",
        "32",
        "--base",
        "2",
        "--epochs",
        "2",
        "--batch",
        "4",
        "--labelled-fraction",
        "0.5",
        "--out",
        s(run),
    ]);
    run.join("best.safetensors")
}

/// The demo as a project: half of the 18 training images unlabelled.
pub(crate) fn demo_project(proj: &Path) {
    let demo = root().join("assets/demo");
    ok(&["project", "init", s(proj)]);
    ok(&[
        "project",
        "import",
        s(proj),
        "--data",
        s(&demo),
        "--split-dir",
        s(&demo),
        "--labelled-fraction",
        "0.5",
    ]);
}

fn unlabelled(proj: &Path) -> Vec<String> {
    let project = Project::open(proj).unwrap();
    let names: Vec<String> = project
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .map(|r| r.name)
        .collect();
    assert_eq!(names.len(), 9, "half of the 18 training images");
    names
}

/// The `selected N images` line printed once the images are chosen.
fn selected(out: &str) -> usize {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("selected ")?
                .strip_suffix(" images")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `selected N images` line in:\n{out}"))
}

#[test]
fn mine_a_project_with_sam_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tiny_unet(&tmp.path().join("run"));
    let proj = tmp.path().join("proj");
    demo_project(&proj);
    let before = snapshot(&proj);

    // No SAM weights: refused with where to get them, nothing changed.
    let out = medmine(&[
        "mine",
        s(&proj),
        "--device",
        "cpu",
        "--sam",
        s(&tmp.path().join("sam_vit_b_01ec64.pth")),
        "--checkpoint",
        s(&unet),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sam_vit_b_01ec64.pth: no SAM checkpoint"),
        "{err}"
    );
    for hint in ["medmine weights download vit_b", "weights/", "--sam"] {
        assert!(err.contains(hint), "{hint}: {err}");
    }
    assert_eq!(snapshot(&proj), before);
    // No --sam at all (sam is the default labeler): the same advice, and the way without SAM.
    for labeler in [&[][..], &["--labeler", "sam"][..]] {
        let mut args = vec![
            "mine",
            s(&proj),
            "--device",
            "cpu",
            "--checkpoint",
            s(&unet),
        ];
        args.extend_from_slice(labeler);
        let err = common::fails(&args);
        assert!(
            err.contains("needs a SAM checkpoint")
                && err.contains("medmine weights download vit_b")
                && err.contains("--labeler unet"),
            "{err}"
        );
    }
    assert_eq!(snapshot(&proj), before);

    // A threshold of 0.3 so that the barely trained U-Net++ has components on most images.
    let sam = sam_fixture();
    let mine = |rounds: &str, extra: &[&str]| {
        let mut args = vec![
            "mine",
            s(&proj),
            "--device",
            "cpu",
            "--sam",
            s(&sam),
            "--checkpoint",
            s(&unet),
            "--rounds",
            rounds,
            "--threshold",
            "0.3",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let out = mine("3", &[]);
    println!("{out}");
    let project = Project::open(&proj).unwrap();
    let unlabelled: Vec<_> = project
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .collect();
    assert_eq!(field(&out, "unlabelled images"), unlabelled.len());
    assert_eq!(selected(&out), unlabelled.len());
    let mined = field(&out, "mined");
    assert!(mined > 0, "nothing mined:\n{out}");
    assert_eq!(
        mined + field(&out, "no component"),
        unlabelled.len(),
        "{out}"
    );
    assert!(field(&out, "components") >= mined);
    let rounds = field(&out, "rounds");
    assert!((mined..=3 * mined).contains(&rounds), "{out}");

    // every row records its models by content hash
    let unet_hash = medmine::fsutil::sha256_file(&unet).unwrap();
    let sam_id = format!("sam:{}", medmine::fsutil::sha256_file(&sam).unwrap());
    assert!(out.contains(&sam_id), "{out}");
    let mut with_label = 0;
    let mut earlier = 0;
    for rec in &unlabelled {
        let labels = project.pseudo_labels(&rec.name).unwrap();
        if labels.is_empty() {
            continue;
        }
        with_label += 1;
        assert!(labels.len() <= 3);
        let mut names = Vec::new();
        for (k, p) in labels.iter().enumerate() {
            assert_eq!(p.round, k as i64, "{}", rec.name);
            let file = project.masks_dir().join(&p.mask_file);
            let mask = data::load_mask(&file).unwrap();
            assert_eq!((mask.width, mask.height), (rec.width, rec.height));
            for q in [p.sam_iou, p.stability, p.agreement] {
                let q = q.expect("quality recorded");
                assert!((0.0..=1.0).contains(&q), "{} {q}", rec.name);
            }
            // component counts are recorded and their change lowers the score
            let (u, l) = (p.unet_components.unwrap(), p.label_components.unwrap());
            let fg: Vec<bool> = mask.data.iter().map(|&v| v != 0).collect();
            let counted = quality::component_count(&fg, mask.width, mask.height, 25);
            assert_eq!(l, counted as i64, "{}", rec.name);
            assert!(u >= 1, "a mined image has a prompted component");
            let q3 = p.sam_iou.unwrap() * p.stability.unwrap() * p.agreement.unwrap();
            let expected = q3 / (1.0 + (l - u).abs() as f64);
            assert!((p.quality().unwrap() - expected).abs() < 1e-12);
            assert!(!p.prompts.boxes_in_image.is_empty(), "{}", rec.name);
            assert!(p.prompts.points_in_image.iter().any(|q| q.positive));
            for b in &p.prompts.boxes_in_image {
                assert!(b.x0 <= b.x1 && b.y0 <= b.y1 && b.x1 <= rec.width as f32);
            }
            assert_eq!(p.unet_hash.as_deref(), Some(unet_hash.as_str()));
            assert_eq!(p.labeler.as_deref(), Some(sam_id.as_str()));
            let name = p.prompts.strategy.clone().expect("round name");
            // round 0 gets no mask prompt with box+points; refinements use SAM's logits
            assert_eq!(p.prompts.mask_prompt, name != "box+points", "{name}");
            names.push(name);
        }
        // every round is stored once, under its own name ...
        names.sort();
        let mut made: Vec<String> = (1..labels.len()).map(|k| format!("refine {k}")).collect();
        made.insert(0, "box+points".into());
        made.sort();
        assert_eq!(names, made, "{}", rec.name);
        // ... and the newest row, the one reviewed, is the best-quality round
        let best = labels.last().unwrap().quality().unwrap();
        assert!(
            labels.iter().all(|p| p.quality().unwrap() <= best),
            "{}",
            rec.name
        );
        let last_made = match labels.len() {
            1 => "box+points".to_string(),
            n => format!("refine {}", n - 1),
        };
        earlier += usize::from(labels.last().unwrap().prompts.strategy != Some(last_made));
        assert_eq!(
            project.review(&rec.name).unwrap().state,
            ReviewState::Pending
        );
    }
    assert_eq!(with_label, mined);
    assert_eq!(field(&out, "earlier round chosen"), earlier, "{out}");
    assert!(field(&out, "component count changed") <= mined, "{out}");
    // Labelled, validation images: untouched.
    let after = snapshot(&proj);
    for rec in project.images().unwrap() {
        if rec.role != Role::Unlabelled {
            assert_eq!(after[&rec.name], before[&rec.name], "{}", rec.name);
            assert!(after[&rec.name].0.is_empty());
        }
    }
    assert_eq!(project.integrity_check().unwrap(), "ok");
    // SAM embeddings are cached on disk in the project (one per mined image), and the
    // checkpoints' hashes beside them.
    let cached = std::fs::read_dir(project.cache_dir().join("sam-embeddings"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension().is_some_and(|x| x == "safetensors")
        })
        .count();
    assert_eq!(cached, mined);
    assert!(project.cache_dir().join("checkpoint-hashes.json").is_file());
    drop(project);

    // Rerun with the same models: nothing to mine, every pseudo-label unchanged.
    let out = mine("3", &[]);
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(
        selected(&out),
        unlabelled.len() - mined,
        "no component: tried again"
    );
    assert_eq!(field(&out, "unchanged"), mined, "{out}");
    assert_eq!(snapshot(&proj), after);

    // Re-mine all with one round and auto-accept 0: a new pass after the old rows, accepted.
    let out = mine("1", &["--remine", "all", "--auto-accept", "0"]);
    assert_eq!(field(&out, "mined"), mined, "{out}");
    assert_eq!(field(&out, "auto-accepted"), mined, "{out}");
    let remined = snapshot(&proj);
    for (name, (labels, state)) in &remined {
        let (old, old_state) = &after[name];
        if old.is_empty() {
            assert_eq!(labels, old);
            assert_eq!(state, old_state);
            continue;
        }
        assert_eq!(&labels[..old.len()], &old[..], "{name}: old pass kept");
        assert_eq!(labels.len(), old.len() + 1, "{name}");
        let newest = labels.last().unwrap();
        assert_eq!(newest.round, old.len() as i64);
        assert_eq!(newest.prompts.strategy.as_deref(), Some("box+points"));
        assert_eq!(*state, ReviewState::Accepted, "{name}");
    }
    // Accepted images are never re-mined, whatever the policy.
    let out = mine("3", &["--remine", "all"]);
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(field(&out, "kept: accepted/edited"), mined, "{out}");
    assert_eq!(snapshot(&proj), remined);
    let project = Project::open(&proj).unwrap();
    assert_eq!(project.integrity_check().unwrap(), "ok");
    // `project status` still reads the project.
    ok(&["project", "status", s(&proj)]);
}

/// `mine_image` on a synthetic U-Net++ map: two discs, two components, each with its own mask
/// prompt, refinement rounds with SAM's logits as mask input, a union mask at the image's
/// size, the pseudo-label the best-quality round.
#[test]
fn mine_image_rounds_on_two_components() {
    let device = candle_core::Device::Cpu;
    let sam = SamPredictor::new(load_sam(&sam_fixture(), None, &device).unwrap());
    let (w, h) = (64usize, 48usize);
    let (img, probs) = crate::common::two_discs();
    let emb = sam.set_image(&img).unwrap();
    for strategy in [Strategy::BoxPoints, Strategy::BoxPointsMask] {
        let mut cfg = MiningConfig {
            rounds: 3,
            stop_iou: 1.0,
            ..MiningConfig::default()
        };
        cfg.prompt.strategy = strategy;
        let mined = mine_image("synthetic", &sam, &emb, &probs, w, h, &cfg)
            .unwrap()
            .expect("two components");
        assert_eq!(mined.components, 2);
        assert!(!mined.rounds.is_empty() && mined.rounds.len() <= 3);
        for (k, r) in mined.rounds.iter().enumerate() {
            assert_eq!((r.mask.width, r.mask.height), (w, h));
            assert_eq!(r.prompts.boxes_in_image.len(), 2, "one box per component");
            assert_eq!(r.prompts.mask_prompt, k > 0 || strategy.uses_mask());
            assert_eq!(r.iou_with_previous.is_some(), k > 0);
            for q in [r.sam_iou, r.stability, r.agreement] {
                let q = q.expect("SAM measures all three");
                assert!((0.0..=1.0).contains(&q), "round {k}: {q}");
            }
            assert_eq!(r.unet_components, Some(2), "two discs");
            let fg: Vec<bool> = r.mask.data.iter().map(|&v| v != 0).collect();
            let min_area = cfg.prompt.min_area;
            assert_eq!(
                r.label_components,
                Some(quality::component_count(&fg, w, h, min_area))
            );
        }
        // the pseudo-label is the best-quality round, stored last
        let best = best_round(&mined.rounds);
        assert_eq!(mined.best(), best);
        let q = |r: &medmine::mining::RoundResult| r.quality().unwrap();
        assert!(mined.rounds.iter().all(|r| q(r) <= q(&mined.rounds[best])));
        let order = mined.store_order();
        assert_eq!(order.len(), mined.rounds.len());
        assert_eq!(q(order.last().unwrap()), q(&mined.rounds[best]));
    }
    let cfg = MiningConfig::default();
    // No component: nothing to mine.
    let empty = vec![0.1f32; w * h];
    assert!(mine_image("empty", &sam, &emb, &empty, w, h, &cfg)
        .unwrap()
        .is_none());
    // A prediction of another size than the embedding is refused, naming the image.
    let e = mine_image("odd.png", &sam, &emb, &probs[..w * (h - 1)], w, h - 1, &cfg).unwrap_err();
    assert!(e.to_string().contains("odd.png"), "{e}");
}

/// The loop round after round with the self-training labeler: round 1 mines every unlabelled
/// image; a person accepts one, rejects one, edits one; fine-tuning makes a new U-Net++;
/// round 2 with it mines exactly the pending and rejected images and leaves the accepted and
/// edited ones as they are; round 2 again with the same model mines nothing.
#[test]
fn every_round_mines_what_no_person_decided() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tiny_unet(&tmp.path().join("run"));
    let proj = tmp.path().join("proj");
    demo_project(&proj);
    let names = unlabelled(&proj);
    // threshold 0: every pixel is foreground, so every image has one component whatever the
    // barely trained model predicts (the loop is under test here, not the labels)
    let mine = |ckpt: &Path, extra: &[&str]| {
        let mut args = vec![
            "mine",
            s(&proj),
            "--device",
            "cpu",
            "--labeler",
            "unet",
            "--checkpoint",
            s(ckpt),
            "--threshold",
            "0",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    // Bad input: clear errors, nothing written.
    let before = snapshot(&proj);
    let base = [
        "mine",
        s(&proj),
        "--device",
        "cpu",
        "--checkpoint",
        s(&unet),
    ];
    let err = common::fails(&[&base[..], &["--labeler", "unet", "--remine", "sometimes"]].concat());
    assert!(
        err.contains("'sometimes'") && err.contains("changed, all or none"),
        "{err}"
    );
    let err = common::fails(&[&base[..], &["--labeler", "medsam"]].concat());
    assert!(
        err.contains("'medsam'") && err.contains("sam, unet, oracle or oracle-box"),
        "{err}"
    );
    assert_eq!(snapshot(&proj), before);

    // Round 1.
    let out = mine(&unet, &[]);
    assert_eq!(selected(&out), 9, "{out}");
    assert_eq!(field(&out, "mined"), 9, "{out}");
    for (what, n) in [
        ("unchanged", 0),
        ("kept: accepted/edited", 0),
        ("failed", 0),
    ] {
        assert_eq!(field(&out, what), n, "{what}: {out}");
    }
    let round1 = snapshot(&proj);
    for name in &names {
        let (labels, state) = &round1[name];
        assert_eq!((labels.len(), *state), (1, ReviewState::Pending), "{name}");
        let p = &labels[0];
        assert_eq!(p.prompts.strategy.as_deref(), Some("unet"));
        assert_eq!(p.sam_iou, None, "self-training has no SAM IoU");
        assert_eq!(p.agreement, Some(1.0));
        assert_eq!(p.quality(), p.stability, "the score is the map's stability");
        assert_eq!(p.unet_components, p.label_components);
        assert_eq!(p.labeler.as_deref(), Some("unet"));
    }

    // A person reviews: accept one, reject one, edit one, leave six pending.
    let (accepted, rejected, edited) = (&names[0], &names[1], &names[2]);
    ok(&["review", s(&proj), "accept", accepted]);
    ok(&["review", s(&proj), "reject", rejected]);
    let rec = Project::open(&proj).unwrap().image(edited).unwrap();
    let drawn = image::GrayImage::from_fn(rec.width as u32, rec.height as u32, |x, y| {
        image::Luma([if x < 10 && y < 10 { 255 } else { 0 }])
    });
    let mask_file = tmp.path().join("edited.png");
    drawn.save(&mask_file).unwrap();
    ok(&["review", s(&proj), "edit", edited, "--mask", s(&mask_file)]);
    let reviewed = snapshot(&proj);

    // Fine-tuning makes a new model (its last epoch's weights: surely not the input's).
    let out = ok(&[
        "finetune",
        s(&proj),
        "--device",
        "cpu",
        "--checkpoint",
        s(&unet),
        "--epochs",
        "1",
        "--batch",
        "4",
    ]);
    let best = out
        .lines()
        .find_map(|l| l.strip_prefix("best checkpoint"))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("no best checkpoint in:\n{out}"));
    let unet2 = best.with_file_name("last.safetensors");
    assert!(unet2.is_file(), "{}", unet2.display());
    let (h1, h2) = (
        medmine::fsutil::sha256_file(&unet).unwrap(),
        medmine::fsutil::sha256_file(&unet2).unwrap(),
    );
    assert_ne!(h1, h2, "fine-tuning changed the weights");
    for name in &names {
        let p = &round1[name].0[0];
        assert_eq!(p.unet_hash.as_deref(), Some(h1.as_str()), "{name}");
    }

    // Round 2 with the new model: the six pending and the rejected one, nothing else.
    let out = mine(&unet2, &[]);
    assert_eq!(selected(&out), 7, "{out}");
    assert_eq!(field(&out, "mined"), 7, "{out}");
    assert_eq!(field(&out, "kept: accepted/edited"), 2, "{out}");
    assert_eq!(field(&out, "unchanged"), 0, "{out}");
    let round2 = snapshot(&proj);
    for name in &names {
        if name == accepted || name == edited {
            assert_eq!(round2[name], reviewed[name], "{name}: a decision stands");
            continue;
        }
        let (labels, state) = &round2[name];
        assert_eq!(labels.len(), 2, "{name}: round 2 added one");
        assert_eq!(&labels[..1], &reviewed[name].0[..], "{name}: round 1 kept");
        assert_eq!(labels[1].round, 1);
        assert_eq!(
            labels[1].unet_hash.as_deref(),
            Some(h2.as_str()),
            "{name}: new model"
        );
        assert_eq!(labels[1].labeler.as_deref(), Some("unet"));
        assert_eq!(
            *state,
            ReviewState::Pending,
            "{name}: a new label to review"
        );
    }
    let project = Project::open(&proj).unwrap();
    let current = project.current_mask(edited).unwrap().expect("the edit");
    assert_eq!(
        current.1, "edited",
        "{edited}: the edit is still the current mask"
    );
    assert_eq!(project.integrity_check().unwrap(), "ok");
    drop(project);

    // Round 2 again with the same model: nothing changed, nothing mined.
    let out = mine(&unet2, &[]);
    assert_eq!(selected(&out), 0, "{out}");
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(field(&out, "unchanged"), 7, "{out}");
    assert_eq!(field(&out, "kept: accepted/edited"), 2, "{out}");
    assert_eq!(snapshot(&proj), round2);
    // --remine none mines nothing either; --remine all mines the seven again.
    let out = mine(&unet2, &["--remine", "none"]);
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(snapshot(&proj), round2);
    let out = mine(&unet2, &["--remine", "all"]);
    assert_eq!(field(&out, "mined"), 7, "{out}");
    let all = snapshot(&proj);
    assert_eq!(all[accepted], reviewed[accepted]);
    assert_eq!(all[edited], reviewed[edited]);
}

/// The oracle labelers through `mine`: the ground truth answers, quality 1, and an oracle
/// pass after a self-training pass re-mines (another labeler made the pseudo-labels).
#[test]
fn oracle_labelers_answer_with_the_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tiny_unet(&tmp.path().join("run"));
    let proj = tmp.path().join("proj");
    demo_project(&proj);
    let names = unlabelled(&proj);
    let mine = |labeler: &str, extra: &[&str]| {
        let mut args = vec![
            "mine",
            s(&proj),
            "--device",
            "cpu",
            "--labeler",
            labeler,
            "--checkpoint",
            s(&unet),
            "--threshold",
            "0",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    assert_eq!(field(&mine("unet", &[]), "mined"), 9);
    // the same U-Net++, another labeler: every pending image is mined again
    let out = mine("oracle-box", &["--auto-accept", "1"]);
    assert_eq!(field(&out, "mined"), 9, "{out}");
    assert_eq!(
        field(&out, "auto-accepted"),
        9,
        "quality 1 reaches 1: {out}"
    );
    let project = Project::open(&proj).unwrap();
    for name in &names {
        let labels = project.pseudo_labels(name).unwrap();
        assert_eq!(labels.len(), 2, "{name}: self-training, then the oracle");
        let p = labels.last().unwrap();
        assert_eq!(p.quality(), Some(1.0));
        assert_eq!(p.prompts.strategy.as_deref(), Some("oracle-box"));
        assert_eq!(p.labeler.as_deref(), Some("oracle-box"));
        // the box is the whole image (threshold 0): the answer is the ground truth
        let truth = data::load_mask(&project.ground_truth(name).unwrap().unwrap()).unwrap();
        let label = data::load_mask(&project.masks_dir().join(&p.mask_file)).unwrap();
        let fg = |m: &data::Mask| m.data.iter().map(|&v| v != 0).collect::<Vec<_>>();
        assert_eq!(fg(&label), fg(&truth), "{name}");
    }
}
