//! The device-generic op path (what CUDA and Metal tensors take) run on the CPU against the
//! fast path: U-Net++ inference, a training run's loss curve, and the device line. CI also
//! runs the gradient check, the overfit test and both SAM parity suites with
//! `MEDMINE_OPS=generic` (see `.ci/run`).
use crate::common;
use crate::common::sam_fixture::max_abs_diff;
use crate::train::{cfg, run};

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medmine::models::unetpp::{Config, InferenceMode, SeededInit};
use medmine::ops;
use medmine::progress::Recorder;
use medmine::train;

#[test]
fn unetpp_inference_generic_matches_fast() {
    let map = VarMap::new();
    let model = SeededInit {
        seed: 3,
        batch_norm_jitter: 0.1,
    }
    .model(&Config::with_base(4), &map, DType::F32, &Device::Cpu)
    .unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 48, 32), &Device::Cpu).unwrap();
    for mode in [InferenceMode::Accurate, InferenceMode::Fast(2)] {
        let fast = model.infer(&x, mode).unwrap();
        let generic = {
            let _g = ops::force_generic();
            model.infer(&x, mode).unwrap()
        };
        // measured on the 2-core CI machine: 1.3e-6 (accurate), 6.9e-7 (fast 2); f32 sums in
        // another order, logits are O(1)
        let d = max_abs_diff(&fast, &generic);
        assert!(d < 1e-4, "{mode:?}: generic vs fast logits differ by {d}");
    }
    // training-mode forward (batch statistics) too; measured: up to 3.2e-5 over the heads
    let fast = model.forward_t(&x, true).unwrap();
    let generic = {
        let _g = ops::force_generic();
        model.forward_t(&x, true).unwrap()
    };
    for (a, b) in fast.iter().zip(&generic) {
        let d = max_abs_diff(a, b);
        assert!(d < 3e-4, "train-mode head differs by {d}");
    }
}

#[test]
fn training_loss_curve_generic_matches_fast() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let mut curves = Vec::new();
    for generic in [false, true] {
        let _g = generic.then(ops::force_generic);
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(32, 4, 3);
        c.seed = 2;
        let mut rec = Recorder::default();
        train::train(
            &run(c, &set, &val, dir.path()),
            &mut rec,
            &AtomicBool::new(false),
        )
        .unwrap();
        curves.push(
            rec.epochs()
                .iter()
                .map(|e| (e.train_loss, e.val_dice.unwrap()))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(curves[0].len(), 3);
    for (e, (f, g)) in curves[0].iter().zip(&curves[1]).enumerate() {
        // measured: relative difference of the losses below 1e-5 after 15 steps
        let rel = (f.0 - g.0).abs() / f.0.abs().max(1e-6);
        assert!(
            rel < 1e-3,
            "epoch {}: loss {} (fast) vs {} (generic)",
            e + 1,
            f.0,
            g.0
        );
        assert!(
            (f.1 - g.1).abs() < 1e-2,
            "epoch {}: Dice {} vs {}",
            e + 1,
            f.1,
            g.1
        );
    }
}

#[test]
fn the_device_line_names_the_op_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.safetensors");
    for (env, want) in [("generic", "ops: generic"), ("fast", "ops: fast")] {
        // the device line comes first; the missing checkpoint then ends the command
        let out = std::process::Command::new(common::BIN)
            .env(ops::path::OPS_ENV, env)
            .args(["--device", "cpu", "predict", "--checkpoint"])
            .arg(&missing)
            .arg("--images")
            .arg(tmp.path())
            .arg("--out")
            .arg(tmp.path().join("out"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().next().unwrap_or_default();
        assert!(
            line.starts_with("device: cpu (") && line.ends_with(want),
            "{line}"
        );
    }
}

/// The suites that prove the generic path, run again in a child process with
/// `MEDMINE_OPS=generic` (so that `cargo test` alone covers both paths): the whole-model
/// finite-difference gradient check, the overfit test and both SAM parity suites.
#[test]
fn gradient_check_overfit_and_sam_parity_pass_on_the_generic_path() {
    if ops::generic_forced() {
        return; // this process is the generic run already
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .env(ops::path::OPS_ENV, "generic")
        .args([
            "gradcheck::",
            "train::overfits_sixteen_kvasir_images",
            "sam_parity",
            "--test-threads",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "generic path:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the filters matched the suites (a renamed test must not silently drop out)
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    for name in [
        "gradcheck::",
        "overfits_sixteen_kvasir_images",
        "sam_parity::",
        "sam_parity_vit_t::",
    ] {
        assert!(stdout.contains(name), "{name} did not run:\n{stdout}");
    }
    assert!(passed >= 6, "only {passed} tests ran:\n{stdout}");
}

#[test]
fn check_command_reports_every_check_and_fails_when_one_does() {
    // 1 overfit step cannot reach Dice 0.8: that row fails, the command says so and exits 1
    let fixtures = common::root().join("tests/fixtures");
    let out = common::medmine(&[
        "--device",
        "cpu",
        "check",
        "--fixtures",
        common::s(&fixtures),
        "--overfit-steps",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("tested: the CPU's device-generic op path"),
        "{stdout}"
    );
    for row in [
        "| U-Net++ gradients vs finite differences (f64) | max rel. error |",
        "| SAM vit_b-style embedding vs official |",
        "| SAM vit_t masks vs official | 1 - min IoU |",
        "| MedSAM masks vs official | 1 - min IoU |",
        "| LiteMedSAM low-res logits vs official (one box per image) |",
    ] {
        let line = stdout.lines().find(|l| l.starts_with(row));
        assert!(
            line.is_some_and(|l| l.ends_with("| pass |")),
            "{row}: {stdout}"
        );
    }
    let overfit = stdout
        .lines()
        .find(|l| l.starts_with("| U-Net++ overfits 4 images (1 steps) |"));
    assert!(overfit.is_some_and(|l| l.ends_with("| FAIL |")), "{stdout}");
    assert!(stdout.contains("16 of 17 checks passed"), "{stdout}");
    assert!(
        stderr.contains("1 of 17 checks failed on this device"),
        "{stderr}"
    );
}
