//! `medmine experiment` end to end on the demo X-rays with the oracle labeler, and its refusal
//! without SAM weights.

use crate::common::{demo, fails, ok, s};

/// A split folder: the demo's train.txt; its val.txt halved into val.txt and test.txt (an
/// image may be in one list only).
fn split_dir(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(demo().join("train.txt"), dir.join("train.txt")).unwrap();
    let val = std::fs::read_to_string(demo().join("val.txt")).unwrap();
    let names: Vec<&str> = val.lines().filter(|l| !l.trim().is_empty()).collect();
    let (v, t) = names.split_at(names.len() / 2);
    std::fs::write(dir.join("val.txt"), v.join("\n")).unwrap();
    std::fs::write(dir.join("test.txt"), t.join("\n")).unwrap();
}

#[test]
fn oracle_experiment_writes_table_and_results() {
    let tmp = tempfile::tempdir().unwrap();
    let splits = tmp.path().join("splits");
    split_dir(&splits);
    let out = tmp.path().join("out");
    let stdout = ok(&[
        "experiment",
        "--device",
        "cpu",
        "--data",
        s(&demo()),
        "--split-dir",
        s(&splits),
        "--labeler",
        "oracle",
        "--fractions",
        "0.5,1.0",
        "--seeds",
        "1",
        "--size",
        "32",
        "--base",
        "2",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--batch",
        "4",
        "--out",
        s(&out),
    ]);
    assert!(stdout.contains("| labelled |"), "{stdout}");
    assert!(
        stdout.contains("control Dice") && stdout.contains("mined−control"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 50% |") && stdout.contains("| 100% |"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let arr = json.as_array().expect("an array");
    assert_eq!(arr.len(), 2);
    for (r, f) in arr.iter().zip([0.5, 1.0]) {
        assert_eq!(r["fraction"].as_f64(), Some(f));
        for k in [
            "baseline_dice",
            "control_dice",
            "mined_dice",
            "baseline_iou",
            "control_iou",
            "mined_iou",
        ] {
            let v = r[k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        }
        for k in [
            "baseline_dice_per_seed",
            "control_dice_per_seed",
            "mined_dice_per_seed",
        ] {
            let v = r[k].as_array().expect(k);
            assert_eq!(v.len(), 1, "{k}");
            assert!((0.0..=1.0).contains(&v[0].as_f64().unwrap()));
        }
        let num = |k: &str| r[k].as_f64().unwrap();
        let diff = |a: &str, b: &str| num(a) - num(b);
        assert!((num("delta_dice_vs_control") - diff("mined_dice", "control_dice")).abs() < 1e-12);
        assert!((num("delta_dice") - diff("mined_dice", "baseline_dice")).abs() < 1e-12);
        let seed = &r["seeds"][0];
        assert_eq!(r["seeds"].as_array().unwrap().len(), 1);
        assert_eq!(seed["control"]["dice"].as_f64(), Some(num("control_dice")));
        // three different checkpoints: baseline, control, mined
        let ckpt = |k: &str| std::path::PathBuf::from(seed[k].as_str().unwrap());
        let (b, c, m) = (
            ckpt("baseline_checkpoint"),
            ckpt("control_checkpoint"),
            ckpt("mined_checkpoint"),
        );
        assert!(b.is_file() && c.is_file() && m.is_file());
        assert!(b != c && c != m && b != m);
        // the control's run saw no pseudo-label, the mined run the accepted ones
        let project =
            medmine::store::Project::open(&out.join(format!("fraction-{f}-seed-0/project")))
                .unwrap();
        let runs = project.runs().unwrap();
        assert_eq!(runs.len(), 2, "control and mined fine-tuning runs");
        assert_eq!(runs[0].config["pseudo"].as_u64(), Some(0));
        assert_eq!(runs[1].config["pseudo"].as_u64(), seed["accepted"].as_u64());
        assert_eq!(runs[0].config["finetune"], runs[1].config["finetune"]);
        assert_eq!(runs[0].best_checkpoint.as_deref(), Some(c.as_path()));
    }
    // 50% of 18 training images labelled: the rest is the unlabelled pool.
    assert!(arr[0]["seeds"][0]["unlabelled"].as_u64().unwrap() > 0);
    assert_eq!(arr[1]["seeds"][0]["unlabelled"].as_u64(), Some(0));
}

#[test]
fn sam_labeler_without_weights_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let splits = tmp.path().join("splits");
    split_dir(&splits);
    let missing = tmp.path().join("no_such_sam.pth");
    let err = fails(&[
        "experiment",
        "--device",
        "cpu",
        "--data",
        s(&demo()),
        "--split-dir",
        s(&splits),
        "--sam",
        s(&missing),
        "--labeler",
        "sam",
        "--fractions",
        "0.5",
        "--seeds",
        "1",
        "--out",
        s(&tmp.path().join("out")),
    ]);
    assert!(err.contains("no_such_sam.pth: no SAM checkpoint"), "{err}");
    for hint in ["medmine weights download vit_b", "weights/", "--sam"] {
        assert!(err.contains(hint), "{hint}: {err}");
    }
    assert!(!tmp.path().join("out").exists(), "nothing written");
    // --labeler sam (the default) without --sam: the same advice.
    let err = fails(&[
        "experiment",
        "--device",
        "cpu",
        "--data",
        s(&demo()),
        "--split-dir",
        s(&splits),
        "--fractions",
        "0.5",
        "--out",
        s(&tmp.path().join("out")),
    ]);
    assert!(
        err.contains("--labeler sam needs --sam FILE")
            && err.contains("medmine weights download vit_b"),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists(), "nothing written");
}
