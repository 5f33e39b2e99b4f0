//! The `medmine` command line as outside scripts use it: train -> predict -> evaluate on the
//! demo data, the benchmark's output contract, and clear errors for bad input.
use crate::common;

use std::path::Path;
use std::process::{Command, Output};

fn medmine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medmine"))
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .expect("run medmine")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_predict_evaluate_on_the_demo() {
    let demo = common::demo();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = medmine(&[
        "train",
        "--data",
        s(&demo),
        "--train-list",
        s(&demo.join("train.txt")),
        "--val-list",
        s(&demo.join("val.txt")),
        "--size",
        "32",
        "--base",
        "4",
        "--epochs",
        "2",
        "--batch",
        "6",
        "--labelled-fraction",
        "0.5",
        "--seed",
        "3",
        "--out",
        s(&run),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("device: cpu ("), "{out}");
    assert!(
        out.contains(", ops: "),
        "the device line names the op path: {out}"
    );
    assert!(out.contains("labelled: 9 of 18"), "{out}");
    for f in [
        "best.safetensors",
        "best.json",
        "metrics.jsonl",
        "labelled.txt",
        "unlabelled.txt",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(first["val_dice"].as_f64().is_some());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best.json")).unwrap()).unwrap();
    assert_eq!(meta["model"]["base"], 4);
    assert_eq!(meta["size"], 32);
    assert_eq!(meta["medmine_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["data_fingerprint"].as_str().unwrap().len(), 64);
    let labelled = std::fs::read_to_string(run.join("labelled.txt")).unwrap();
    let pool = std::fs::read_to_string(run.join("unlabelled.txt")).unwrap();
    assert_eq!((labelled.lines().count(), pool.lines().count()), (9, 9));

    let pred = tmp.path().join("pred");
    let probs = tmp.path().join("probs");
    let o = medmine(&[
        "predict",
        "--checkpoint",
        s(&run.join("best.safetensors")),
        "--images",
        s(&demo),
        "--list",
        s(&demo.join("val.txt")),
        "--out",
        s(&pred),
        "--probs",
        s(&probs),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let masks: Vec<_> = std::fs::read_dir(&pred).unwrap().flatten().collect();
    assert_eq!(masks.len(), 6);
    for m in &masks {
        let img = image::open(m.path()).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (256, 256), "original size");
        assert!(img.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    }
    assert_eq!(std::fs::read_dir(&probs).unwrap().count(), 6);

    let json = tmp.path().join("eval.json");
    let o = medmine(&[
        "evaluate",
        "--pred",
        s(&pred),
        "--gt",
        s(&demo.join("masks")),
        "--list",
        s(&demo.join("val.txt")),
        "--json",
        s(&json),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let dice_line = out
        .lines()
        .find(|l| l.starts_with("dice"))
        .expect("dice line");
    let dice: f64 = dice_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&dice));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["images"].as_array().unwrap().len(), 6);
    assert!((report["mean"]["dice"].as_f64().unwrap() - dice).abs() < 1e-4);

    // evaluating ground truth against itself is perfect
    let o = medmine(&[
        "evaluate",
        "--pred",
        s(&demo.join("masks")),
        "--gt",
        s(&demo.join("masks")),
    ]);
    let (out, _) = text(&o);
    assert!(
        out.contains("dice       1.0000") && out.contains("images     24"),
        "{out}"
    );

    // fast mode works from the same checkpoint
    let o = medmine(&[
        "predict",
        "--checkpoint",
        s(&run.join("best.safetensors")),
        "--images",
        s(&demo.join("images")),
        "--out",
        s(&tmp.path().join("fast")),
        "--mode",
        "fast:2",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("fast")).unwrap().count(),
        24
    );
}

#[test]
fn bench_train_prints_images_per_second_last() {
    let o = medmine(&[
        "bench", "train", "--size", "32", "--batch", "2", "--base", "2", "--steps", "1",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let last = out.lines().last().unwrap();
    let (key, value) = last.split_once(' ').unwrap();
    assert_eq!(key, "images_per_s");
    assert!(value.parse::<f64>().unwrap() > 0.);
    // which kernels ran: the ISA of the matrix products, the op path and the threads
    let kernels = out
        .lines()
        .find(|l| l.starts_with("kernels: "))
        .unwrap_or_else(|| panic!("no kernels line in {out}"));
    assert!(
        kernels.starts_with("kernels: cpu: gemm ") && kernels.contains(" threads (rayon)"),
        "{kernels}"
    );
}

#[test]
fn bad_input_gives_errors_that_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // a dataset folder that does not exist
    let missing = tmp.path().join("nope");
    let o = medmine(&[
        "train",
        "--data",
        s(&missing),
        "--out",
        s(&tmp.path().join("r")),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains(s(&missing)), "{}", text(&o).1);

    // a damaged checkpoint
    let ckpt = tmp.path().join("broken.safetensors");
    std::fs::write(&ckpt, b"not a checkpoint").unwrap();
    std::fs::write(
        tmp.path().join("broken.json"),
        br#"{"format":"medmine-unetpp","medmine_version":"0.1.0","model":{"in_channels":3,"base":4},"size":32,"epoch":1,"metrics":null,"data_fingerprint":""}"#,
    )
    .unwrap();
    let o = medmine(&[
        "predict",
        "--checkpoint",
        s(&ckpt),
        "--images",
        s(&common::demo()),
        "--out",
        s(&tmp.path().join("p")),
    ]);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("broken.safetensors") && err.contains("damaged"),
        "{err}"
    );

    // a prediction of the wrong size
    let pred = tmp.path().join("pred");
    let gt = tmp.path().join("gt");
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    image::GrayImage::new(8, 8)
        .save(pred.join("a.png"))
        .unwrap();
    image::GrayImage::new(9, 8).save(gt.join("a.png")).unwrap();
    let o = medmine(&["evaluate", "--pred", s(&pred), "--gt", s(&gt)]);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("a.png") && err.contains("8x8") && err.contains("9x8"),
        "{err}"
    );
}

#[test]
fn segment_with_sam_matches_the_official_predictor() {
    let fx = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sam"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mask.png");
    let logits = tmp.path().join("logits.npy");
    let o = medmine(&[
        "segment",
        "--sam",
        s(&fx.join("sam_tiny.pth")),
        "--image",
        s(&fx.join("image.png")),
        "--box",
        "30,25,110,100",
        "--point",
        "70,60,1",
        "--point",
        "140,20,0",
        "--out",
        s(&out),
        "--logits",
        s(&logits),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{stdout}\n{err}");
    let iou_line = stdout.lines().last().unwrap();
    assert!(iou_line.starts_with("predicted_iou "), "{stdout}");
    let ours = image::open(&out).unwrap().to_luma8();
    let official = image::open(fx.join("box_points_single_mask0.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(ours.dimensions(), (160, 136));
    let (mut inter, mut union) = (0u32, 0u32);
    for (a, b) in ours.pixels().zip(official.pixels()) {
        let (a, b) = (a.0[0] > 127, b.0[0] > 127);
        inter += u32::from(a && b);
        union += u32::from(a || b);
    }
    assert!(
        union > 0 && inter as f64 / union as f64 >= 0.99,
        "{inter}/{union}"
    );
    let l = candle_core::Tensor::read_npy(&logits).unwrap();
    assert_eq!(l.dims(), &[136, 160]);

    // a label other than 0/1 is refused with the flag named
    let o = medmine(&[
        "segment",
        "--sam",
        s(&fx.join("sam_tiny.pth")),
        "--image",
        s(&fx.join("image.png")),
        "--point",
        "70,60,2",
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--point"), "{}", text(&o).1);
}

#[test]
fn train_never_replaces_a_run_unasked_and_checks_its_options() {
    use std::os::unix::process::ExitStatusExt;
    let demo = common::demo();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (train_list, val_list) = (demo.join("train.txt"), demo.join("val.txt"));
    let args = |extra: &[&'static str], list: &Path| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--data",
            s(&demo),
            "--train-list",
            s(list),
            "--val-list",
            s(&val_list),
            "--size",
            "32",
            "--base",
            "2",
            "--epochs",
            "1",
            "--batch",
            "6",
            "--out",
            s(&run),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let call = |v: Vec<String>| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        medmine(&refs)
    };
    let o = call(args(&[], &train_list));
    assert!(o.status.success(), "{:?}", text(&o));
    let snapshot = || {
        ["best.safetensors", "metrics.jsonl", "last.json"]
            .map(|f| std::fs::read(run.join(f)).unwrap())
    };
    let before = snapshot();

    // the same command again: refused, the run untouched
    let o = call(args(&[], &train_list));
    let (_, err) = text(&o);
    assert!(!o.status.success());
    for want in [
        "already holds a training run",
        "best.safetensors",
        "--resume",
        "--force",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(before == snapshot(), "a refused run changed the folder");

    // numeric options in their own words, before anything is allocated (no abort)
    for (extra, want) in [
        (
            &["--size", "1048576"][..],
            "--size 1048576: must be a multiple of 16",
        ),
        (&["--size", "40"][..], "--size 40: must be a multiple of 16"),
        (&["--base", "0"][..], "--base 0: must be from 1 to 256"),
        (&["--lr", "NaN"][..], "--lr NaN: must be a positive number"),
        (
            &["--labelled-fraction", "0"][..],
            "--labelled-fraction 0: must be in (0, 1]",
        ),
    ] {
        let mut v = args(&[], &train_list);
        // the bad value in place of the good one
        for pair in extra.chunks(2) {
            if let Some(i) = v.iter().position(|a| a == pair[0]) {
                v[i + 1] = pair[1].to_string();
            } else {
                v.extend(pair.iter().map(|x| x.to_string()));
            }
        }
        let o = call(v);
        let (_, err) = text(&o);
        assert_eq!(o.status.signal(), None, "{extra:?} killed the process");
        assert!(
            !o.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
    }
    assert!(before == snapshot());

    // --resume on a folder without a run
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut v = args(&["--resume"], &train_list);
    let i = v.iter().position(|a| a == "--out").unwrap();
    v[i + 1] = s(&empty).to_string();
    let (_, err) = text(&call(v));
    assert!(
        err.contains("no run to resume") && err.contains("without --resume"),
        "{err}"
    );

    // overlapping lists are refused as import refuses them
    let (_, err) = text(&call(args(&["--force"], &val_list)));
    assert!(err.contains("also in the training list"), "{err}");
    assert!(before == snapshot());

    // --force replaces the run
    let o = call(args(&["--force"], &train_list));
    assert!(o.status.success(), "{:?}", text(&o));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        1,
        "one epoch, the old metrics replaced"
    );

    // predict: two inputs with one stem are refused before anything is written; a name that
    // is not UTF-8 keeps its bytes
    use std::os::unix::ffi::OsStrExt;
    let first = std::fs::read_dir(demo.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::copy(&first, imgs.join("a.png")).unwrap();
    std::fs::copy(&first, imgs.join("a.jpg")).unwrap();
    let out = tmp.path().join("pred");
    let ckpt = run.join("best.safetensors");
    let predict = |images: &Path| {
        Command::new(env!("CARGO_BIN_EXE_medmine"))
            .args(["--device", "cpu", "predict", "--checkpoint"])
            .arg(&ckpt)
            .arg("--images")
            .arg(images)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = predict(&imgs);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("a.jpg") && err.contains("a.png") && err.contains("would both be written"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"scan-\xff.png");
    std::fs::copy(&first, odd.join(name)).unwrap();
    std::fs::copy(&first, odd.join("plain.png")).unwrap();
    let o = predict(&odd);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        out.join(name).is_file(),
        "the non-UTF-8 name kept its bytes"
    );
    assert!(out.join("plain.png").is_file());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
}

#[test]
fn segment_refuses_a_lossy_mask_file() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::root().join("tests/fixtures/sam");
    let out = tmp.path().join("mask.jpg");
    let o = medmine(&[
        "segment",
        "--sam",
        s(&fx.join("sam_tiny.pth")),
        "--image",
        s(&fx.join("image.png")),
        "--box",
        "10,10,60,60",
        "--out",
        s(&out),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("mask.jpg") && err.contains("give a .png file name"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn numbers_and_prompts_are_checked_in_the_options_words() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::root().join("tests/fixtures/sam");
    let fails_with = |args: &[&str], want: &str| {
        let o = medmine(args);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    fails_with(
        &["review", s(tmp.path()), "accept", "--min-score", "NaN"],
        "not a number in [0, 1]",
    );
    fails_with(
        &[
            "mine",
            s(tmp.path()),
            "--labeler",
            "unet",
            "--threshold",
            "1.5",
        ],
        "not a number in [0, 1]",
    );
    let out = tmp.path().join("m.png");
    let (sam, image) = (fx.join("sam_tiny.pth"), fx.join("image.png"));
    let seg = |prompt: &[&str]| {
        let mut v = vec![
            "segment",
            "--sam",
            s(&sam),
            "--image",
            s(&image),
            "--out",
            s(&out),
        ];
        v.extend_from_slice(prompt);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let call = |v: Vec<String>, want: &str| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        fails_with(&refs, want);
    };
    // the fixture image is 160 x 136
    call(
        seg(&["--box", "10,10,400,60"]),
        "lies outside the 160x136 image",
    );
    call(
        seg(&["--point", "-5,20,1"]),
        "lies outside the 160x136 image",
    );
    call(seg(&["--point", "NaN,20,1"]), "not a finite number");
    assert!(!out.exists());
    fails_with(
        &["weights", "verify", "--dir", s(&tmp.path().join("nowhere"))],
        "nowhere: no such folder",
    );
}

#[test]
fn version_names_commit_and_features() {
    let out = common::ok(&["--version"]);
    let line = out.lines().next().unwrap_or_default();
    let rest = line
        .strip_prefix(concat!("medmine ", env!("CARGO_PKG_VERSION"), " (commit "))
        .unwrap_or_else(|| panic!("{line}"));
    let (commit, features) = rest.split_once("; features: ").expect("features");
    assert!(
        commit == "unknown"
            || (commit.len() == 10 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    // the tests build the default features: the app, no GPU backend
    assert_eq!(features, "gui)", "{line}");
}
