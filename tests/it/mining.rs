//! Knowledge mining end to end: a tiny U-Net++ trained on the demo X-rays, a project with an
//! unlabelled pool, `medmine mine` with the tiny random-weight SAM fixture (its masks mean
//! nothing; the shapes, the flow and the store are real).
use crate::common;

use crate::common::{field, medmine, ok, root, s};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medmine::data;
use medmine::mining::{mine_image, quality, MiningConfig};
use medmine::models::sam::{load_sam, SamPredictor};
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

#[test]
fn mine_a_project_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = root().join("assets/demo");
    let run = tmp.path().join("run");
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
        s(&run),
    ]);
    let unet = run.join("best.safetensors");
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    ok(&[
        "project",
        "import",
        s(&proj),
        "--data",
        s(&demo),
        "--split-dir",
        s(&demo),
        "--labelled-fraction",
        "0.5",
    ]);
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
    // No --sam at all: the same advice.
    let err = common::fails(&[
        "mine",
        s(&proj),
        "--device",
        "cpu",
        "--checkpoint",
        s(&unet),
    ]);
    assert!(
        err.contains("needs a SAM checkpoint") && err.contains("medmine weights download vit_b"),
        "{err}"
    );
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
    assert_eq!(unlabelled.len(), 9, "half of the 18 training images");
    let mined = field(&out, "mined");
    assert!(mined > 0, "nothing mined:\n{out}");
    assert_eq!(
        mined + field(&out, "no component"),
        unlabelled.len(),
        "{out}"
    );
    assert!(field(&out, "components") >= mined);
    let rounds = field(&out, "sam rounds");
    assert!((mined..=3 * mined).contains(&rounds), "{out}");

    let mut with_label = 0;
    for rec in &unlabelled {
        let labels = project.pseudo_labels(&rec.name).unwrap();
        if labels.is_empty() {
            continue;
        }
        with_label += 1;
        assert!(labels.len() <= 3);
        for (k, p) in labels.iter().enumerate() {
            assert_eq!(p.round, k as i64, "{}", rec.name);
            let file = project.masks_dir().join(&p.mask_file);
            let mask = data::load_mask(&file).unwrap();
            assert_eq!((mask.width, mask.height), (rec.width, rec.height));
            for q in [p.sam_iou, p.stability, p.agreement] {
                let q = q.expect("quality recorded");
                assert!((0.0..=1.0).contains(&q), "{} {q}", rec.name);
            }
            assert!(p.quality().is_some());
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
            if k == 0 {
                assert_eq!(p.prompts.strategy.as_deref(), Some("box+points"));
                assert!(!p.prompts.mask_prompt);
            } else {
                assert_eq!(p.prompts.strategy.clone(), Some(format!("refine {k}")));
                assert!(p.prompts.mask_prompt, "refinement uses SAM's logits");
            }
        }
        assert_eq!(
            project.review(&rec.name).unwrap().state,
            ReviewState::Pending
        );
    }
    assert_eq!(with_label, mined);
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
    // SAM embeddings are cached on disk in the project (one per mined image).
    let cached = std::fs::read_dir(project.cache_dir().join("sam-embeddings"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension().is_some_and(|x| x == "safetensors")
        })
        .count();
    assert_eq!(cached, mined);
    drop(project);

    // Rerun: everything already mined, nothing changes.
    let out = mine("3", &[]);
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(field(&out, "already mined"), mined, "{out}");
    assert_eq!(snapshot(&proj), after);

    // Re-mine with one round and auto-accept 0: a new pass after the old rows, all accepted.
    let out = mine("1", &["--remine", "--auto-accept", "0"]);
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
    // Accepted images are never re-mined.
    let out = mine("3", &["--remine"]);
    assert_eq!(field(&out, "mined"), 0, "{out}");
    assert_eq!(snapshot(&proj), remined);
    let project = Project::open(&proj).unwrap();
    assert_eq!(project.integrity_check().unwrap(), "ok");
    // `project status` still reads the project.
    ok(&["project", "status", s(&proj)]);
}

/// `mine_image` on a synthetic U-Net++ map: two discs, two components, refinement rounds with
/// SAM's logits as mask input, a union mask at the image's size.
#[test]
fn mine_image_rounds_on_two_components() {
    let device = candle_core::Device::Cpu;
    let sam = SamPredictor::new(load_sam(&sam_fixture(), None, &device).unwrap());
    let (w, h) = (64usize, 48usize);
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let emb = sam.set_image(&img).unwrap();
    let disc = |cx: f32, cy: f32, r: f32, x: usize, y: usize| {
        (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r
    };
    let probs: Vec<f32> = (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            if disc(16.0, 20.0, 8.0, x, y) || disc(46.0, 26.0, 10.0, x, y) {
                0.9
            } else {
                0.05
            }
        })
        .collect();
    let cfg = MiningConfig {
        rounds: 3,
        stop_iou: 1.0,
        ..MiningConfig::default()
    };
    let mined = mine_image("synthetic", &sam, &emb, &probs, w, h, &cfg)
        .unwrap()
        .expect("two components");
    assert_eq!(mined.components, 2);
    assert!(!mined.rounds.is_empty() && mined.rounds.len() <= 3);
    for (k, r) in mined.rounds.iter().enumerate() {
        assert_eq!((r.mask.width, r.mask.height), (w, h));
        assert_eq!(r.prompts.boxes_in_image.len(), 2, "one box per component");
        assert_eq!(r.prompts.mask_prompt, k > 0);
        assert_eq!(r.iou_with_previous.is_some(), k > 0);
        for q in [r.sam_iou, r.stability, r.agreement] {
            assert!((0.0..=1.0).contains(&q), "round {k}: {q}");
        }
        assert_eq!(r.unet_components, 2, "two discs");
        let fg: Vec<bool> = r.mask.data.iter().map(|&v| v != 0).collect();
        let min_area = cfg.prompt.min_area;
        assert_eq!(
            r.label_components,
            quality::component_count(&fg, w, h, min_area)
        );
    }
    // No component: nothing to mine.
    let empty = vec![0.1f32; w * h];
    assert!(mine_image("empty", &sam, &emb, &empty, w, h, &cfg)
        .unwrap()
        .is_none());
    // A prediction of another size than the embedding is refused, naming the image.
    let e = mine_image("odd.png", &sam, &emb, &probs[..w * (h - 1)], w, h - 1, &cfg).unwrap_err();
    assert!(e.to_string().contains("odd.png"), "{e}");
}
