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

fn experiment_args<'a>(splits: &'a str, out: &'a str, size: &'a str) -> Vec<&'a str> {
    vec![
        "experiment",
        "--device",
        "cpu",
        "--data",
        demo_str(),
        "--split-dir",
        splits,
        "--labeler",
        "oracle",
        "--fractions",
        "0.5,1.0",
        "--seeds",
        "1",
        "--size",
        size,
        "--base",
        "2",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--batch",
        "4",
        "--out",
        out,
    ]
}

fn demo_str() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo")
}

fn results(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

#[test]
fn oracle_experiment_writes_table_and_results_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let splits = tmp.path().join("splits");
    split_dir(&splits);
    let out = tmp.path().join("out");
    let args = experiment_args(s(&splits), s(&out), "32");
    let stdout = ok(&args);
    assert!(stdout.contains("| labelled |"), "{stdout}");
    for col in [
        "control Dice",
        "selftrain Dice",
        "mined−control",
        "mined−selftrain",
    ] {
        assert!(stdout.contains(col), "{col}: {stdout}");
    }
    assert!(
        stdout.contains("| 50% |") && stdout.contains("| 100% |"),
        "{stdout}"
    );
    assert!(stdout.contains("arms finished: 8/8"), "{stdout}");
    let json = results(&out);
    let arr = json.as_array().expect("an array");
    assert_eq!(arr.len(), 2);
    for (r, f) in arr.iter().zip([0.5, 1.0]) {
        assert_eq!(r["fraction"].as_f64(), Some(f));
        for k in [
            "baseline_dice",
            "control_dice",
            "mined_dice",
            "selftrain_dice",
            "baseline_iou",
            "control_iou",
            "mined_iou",
            "selftrain_iou",
        ] {
            let v = r[k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        }
        for k in [
            "baseline_dice_per_seed",
            "control_dice_per_seed",
            "mined_dice_per_seed",
            "selftrain_dice_per_seed",
        ] {
            let v = r[k].as_array().expect(k);
            assert_eq!(v.len(), 1, "{k}");
            assert!((0.0..=1.0).contains(&v[0].as_f64().unwrap()));
        }
        let num = |k: &str| r[k].as_f64().unwrap();
        let diff = |a: &str, b: &str| num(a) - num(b);
        assert!((num("delta_dice_vs_control") - diff("mined_dice", "control_dice")).abs() < 1e-12);
        assert!(
            (num("delta_dice_vs_selftrain") - diff("mined_dice", "selftrain_dice")).abs() < 1e-12
        );
        assert!((num("delta_dice") - diff("mined_dice", "baseline_dice")).abs() < 1e-12);
        let seed = &r["seeds"][0];
        assert_eq!(r["seeds"].as_array().unwrap().len(), 1);
        assert_eq!(seed["control"]["dice"].as_f64(), Some(num("control_dice")));
        // the control took exactly the mined arm's optimiser steps
        let steps = seed["mined_steps"].as_u64().unwrap();
        assert!(steps > 0);
        assert_eq!(seed["control_steps"].as_u64(), Some(steps));
        // four different checkpoints
        let ckpt = |k: &str| std::path::PathBuf::from(seed[k].as_str().unwrap());
        let all = [
            ckpt("baseline_checkpoint"),
            ckpt("control_checkpoint"),
            ckpt("mined_checkpoint"),
            ckpt("selftrain_checkpoint"),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(a.is_file(), "{}", a.display());
            assert!(all[i + 1..].iter().all(|b| a != b), "{all:?}");
        }
        // the mined run saw the accepted pseudo-labels, the control none, for the same steps
        let run_dir = out.join(format!("fraction-{f}-seed-0"));
        let project = medmine::store::Project::open(&run_dir.join("project")).unwrap();
        let runs = project.runs().unwrap();
        assert_eq!(runs.len(), 2, "mined and control fine-tuning runs");
        assert_eq!(runs[0].config["pseudo"].as_u64(), seed["accepted"].as_u64());
        assert_eq!(runs[1].config["pseudo"].as_u64(), Some(0));
        assert_eq!(
            runs[1].config["finetune"]["max_steps"].as_u64(),
            Some(steps)
        );
        assert_eq!(runs[1].best_checkpoint.as_deref(), Some(all[1].as_path()));
        // the selftrain arm's pseudo-labels are the U-Net++'s own, in their own project
        let st = medmine::store::Project::open(&run_dir.join("project-selftrain")).unwrap();
        let mut labelers = std::collections::BTreeSet::new();
        for img in st.images().unwrap() {
            for p in st.pseudo_labels(&img.name).unwrap() {
                labelers.insert(p.labeler.unwrap_or_default());
            }
        }
        let made = seed["selftrain_mined"].as_u64().unwrap();
        if made > 0 {
            assert_eq!(labelers.into_iter().collect::<Vec<_>>(), vec!["unet"]);
        } else {
            assert!(labelers.is_empty());
        }
        assert!(seed["selftrain_accepted"].as_u64().unwrap() <= made);
    }
    // 50% of 18 training images labelled: the rest is the unlabelled pool.
    assert!(arr[0]["seeds"][0]["unlabelled"].as_u64().unwrap() > 0);
    assert_eq!(arr[1]["seeds"][0]["unlabelled"].as_u64(), Some(0));

    // The same command again: every arm is read back, nothing trains, the same results.
    let again = ok(&args);
    assert!(again.contains("8 of 8 arms finished earlier"), "{again}");
    assert!(!again.contains("training epochs"), "{again}");
    assert_eq!(results(&out), json);

    // One arm's record gone (as if killed during it): only that arm runs again.
    std::fs::remove_file(out.join("fraction-0.5-seed-0/selftrain.json")).unwrap();
    let third = ok(&args);
    assert!(third.contains("7 of 8 arms finished earlier"), "{third}");
    assert_eq!(third.matches("training epochs").count(), 1, "{third}");
    let r = results(&out);
    assert_eq!(r[0]["baseline_dice"], json[0]["baseline_dice"]);
    assert_eq!(r[0]["mined_dice"], json[0]["mined_dice"]);
    assert_eq!(r[1], json[1]);

    // A further labeler added to the same command: only its arms run (one per fraction and
    // seed), in their own projects, and the table gets a row per fraction for it.
    let both: Vec<&str> = args
        .iter()
        .map(|a| {
            if *a == "oracle" {
                "oracle,oracle-box"
            } else {
                a
            }
        })
        .collect();
    let fourth = ok(&both);
    assert!(fourth.contains("8 of 10 arms finished earlier"), "{fourth}");
    assert_eq!(fourth.matches("training epochs").count(), 2, "{fourth}");
    assert!(fourth.contains("arms finished: 10/10"), "{fourth}");
    for row in [
        "| 50% | oracle |",
        "| 50% | oracle-box |",
        "| 100% | oracle-box |",
    ] {
        assert!(fourth.contains(row), "{row}: {fourth}");
    }
    let r = results(&out);
    assert_eq!(r[0]["baseline_dice"], json[0]["baseline_dice"]);
    assert_eq!(r[0]["control_dice"], json[0]["control_dice"]);
    assert_eq!(r[0]["labeler"].as_str(), Some("oracle"));
    let summary = &r[0]["more_mined"][0];
    assert_eq!(summary["labeler"].as_str(), Some("oracle-box"));
    let d = summary["dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&d), "{d}");
    let delta = summary["delta_dice_vs_control"].as_f64().unwrap();
    assert!((delta - (d - r[0]["control_dice"].as_f64().unwrap())).abs() < 1e-12);
    let arm = &r[0]["seeds"][0]["more_mined"][0];
    let ckpt = std::path::PathBuf::from(arm["checkpoint"].as_str().unwrap());
    assert!(ckpt.is_file() && ckpt.starts_with(out.join("fraction-0.5-seed-0/project-oracle-box")));
    let pb =
        medmine::store::Project::open(&out.join("fraction-0.5-seed-0/project-oracle-box")).unwrap();
    let mut labelers = std::collections::BTreeSet::new();
    for img in pb.images().unwrap() {
        for p in pb.pseudo_labels(&img.name).unwrap() {
            labelers.insert(p.labeler.unwrap_or_default());
        }
    }
    assert_eq!(labelers.into_iter().collect::<Vec<_>>(), vec!["oracle-box"]);
    assert_eq!(
        arm["mined"].as_u64(),
        Some(
            pb.images()
                .unwrap()
                .iter()
                .filter(|i| i.role == medmine::store::Role::Unlabelled)
                .count() as u64
        )
    );
    // A labeler given twice, or unet as a further labeler, is refused before anything runs.
    for bad in ["oracle,oracle", "oracle,unet"] {
        let v: Vec<&str> = args
            .iter()
            .map(|a| if *a == "oracle" { bad } else { a })
            .collect();
        let err = fails(&v);
        assert!(err.contains("invalid experiment settings"), "{bad}: {err}");
    }

    // Other settings into the same folder are refused, naming what differs.
    let err = fails(&experiment_args(s(&splits), s(&out), "48"));
    assert!(
        err.contains("other settings") && err.contains("train"),
        "{err}"
    );
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

#[test]
fn a_relative_out_records_absolute_checkpoints() {
    // a rerun from another folder must find the finished arms' checkpoints
    let tmp = tempfile::tempdir().unwrap();
    let splits = tmp.path().join("splits");
    split_dir(&splits);
    let mut args = experiment_args(s(&splits), "rel-out", "32");
    let f = args.iter().position(|a| *a == "0.5,1.0").unwrap();
    args[f] = "1.0";
    let out = std::process::Command::new(crate::common::BIN)
        .args(&args)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("rel-out/fraction-1-seed-0/baseline.json"))
            .unwrap(),
    )
    .unwrap();
    let ckpt = std::path::PathBuf::from(rec["checkpoint"].as_str().unwrap());
    assert!(ckpt.is_absolute() && ckpt.is_file(), "{}", ckpt.display());
}

#[test]
fn first_seed_runs_a_later_seed_alone_and_a_full_run_picks_it_up() {
    // One experiment's seeds spread over sessions: seed 1 alone first, then seeds 0..2 into the
    // same folder runs only seed 0 and reports both.
    let tmp = tempfile::tempdir().unwrap();
    let splits = tmp.path().join("splits");
    split_dir(&splits);
    let out = tmp.path().join("out");
    let mut args = experiment_args(s(&splits), s(&out), "32");
    let f = args.iter().position(|a| *a == "0.5,1.0").unwrap();
    args[f] = "0.5";
    let mut later = args.clone();
    later.extend(["--first-seed", "1"]);
    let first = ok(&later);
    assert!(first.contains("arms finished: 4/4"), "{first}");
    assert!(out.join("fraction-0.5-seed-1/baseline.json").is_file());
    assert!(!out.join("fraction-0.5-seed-0").exists());
    let alone = results(&out);
    assert_eq!(alone[0]["seeds"].as_array().unwrap().len(), 1);
    assert_eq!(alone[0]["seeds"][0]["seed"].as_u64(), Some(1));

    let s_pos = args.iter().position(|a| *a == "--seeds").unwrap();
    args[s_pos + 1] = "2";
    let both = ok(&args);
    assert!(both.contains("4 of 8 arms finished earlier"), "{both}");
    assert_eq!(both.matches("training epochs").count(), 4, "{both}");
    let r = results(&out);
    let seeds = r[0]["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[0]["seed"].as_u64(), Some(0));
    assert_eq!(seeds[1], alone[0]["seeds"][0], "seed 1 read back as it was");
}
