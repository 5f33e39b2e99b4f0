//! Training end to end through the library: overfitting real images, checkpoints, resume,
//! cancellation and the NaN guard.
use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use medmine::data::{self, AugmentConfig, Dataset};
use medmine::models::unetpp::{Config, InferenceMode, UNetPlusPlus};
use medmine::progress::{NoProgress, Progress, Recorder, TrainEvent};
use medmine::train::checkpoint::{self, CheckpointError, CheckpointMeta};
use medmine::train::{self, TrainConfig, TrainError, TrainRun, TrainStatus};

fn cfg(size: usize, base: usize, epochs: usize) -> TrainConfig {
    TrainConfig {
        size,
        base,
        epochs,
        batch: 4,
        lr: 3e-3,
        warmup_epochs: 0.,
        patience: 0,
        augment: AugmentConfig::none(),
        ..TrainConfig::default()
    }
}

fn run<'a>(
    cfg: TrainConfig,
    train: &'a [data::Prepared],
    val: &'a [data::Prepared],
    dir: &Path,
) -> TrainRun<'a> {
    TrainRun {
        cfg,
        train,
        val,
        out_dir: dir.to_path_buf(),
        device: Device::Cpu,
        init: None,
        resume: false,
        data_fingerprint: "test".into(),
    }
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = checkpoint::load_tensors(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn overfits_sixteen_kvasir_images() {
    let root = common::shared_data().join("kvasir-seg");
    let ds = Dataset::scan(&root).unwrap();
    let list = common::shared_data().join("splits/kvasir-seg/official-train.txt");
    let names = data::read_split_list(&list).unwrap();
    let samples = ds.select(&names[..16], &list).unwrap();
    let set = data::prepare(&samples, 64).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(64, 8, 30);
    let mut rec = Recorder::default();
    let out = train::train(
        &run(c, &set, &set, dir.path()),
        &mut rec,
        &AtomicBool::new(false),
    )
    .unwrap();
    let epochs = rec.epochs();
    assert_eq!(out.status, TrainStatus::Finished);
    assert_eq!(epochs.len(), 30);
    let first = epochs[0].train_loss;
    let last = epochs.last().unwrap().train_loss;
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
    let best = out.best_dice.unwrap();
    assert!(best > 0.8, "train Dice {best} after 30 epochs");
    // the best checkpoint reproduces that Dice
    let loaded = checkpoint::load_model(&out.best, &Device::Cpu).unwrap();
    let s = train::validate(&loaded.model, &set, 64, 8, &Device::Cpu).unwrap();
    assert!((s.dice - best).abs() < 1e-9, "{} vs {best}", s.dice);
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs() {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let model = UNetPlusPlus::new(
        &Config::with_base(4),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::rand(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
    // a train-mode pass moves the BatchNorm running statistics away from their defaults
    model.forward_t(&x, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    checkpoint::save(&map, &CheckpointMeta::new(Config::with_base(4), 32), &path).unwrap();
    let loaded = checkpoint::load_model(&path, &dev).unwrap();
    for mode in [InferenceMode::Accurate, InferenceMode::Fast(2)] {
        let a = model
            .infer(&x, mode)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = loaded
            .model
            .infer(&x, mode)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(loaded.meta.size, 32);

    // a checkpoint of another shape: the sidecar says base 8, the weights are base 4
    let mut meta = CheckpointMeta::new(Config::with_base(8), 32);
    meta.epoch = 1;
    std::fs::write(
        checkpoint::sidecar_path(&path),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    let err = checkpoint::load_model(&path, &dev).err().unwrap();
    assert!(matches!(err, CheckpointError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("m.safetensors") && msg.contains("shape"),
        "{msg}"
    );

    // a truncated weights file
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    checkpoint::save(
        &VarMap::new(),
        &CheckpointMeta::new(Config::with_base(4), 32),
        &dir.path().join("x.safetensors"),
    )
    .unwrap();
    std::fs::write(
        checkpoint::sidecar_path(&path),
        serde_json::to_vec(&CheckpointMeta::new(Config::with_base(4), 32)).unwrap(),
    )
    .unwrap();
    let err = checkpoint::load_model(&path, &dev).err().unwrap();
    assert!(matches!(err, CheckpointError::Weights { .. }), "{err}");
    assert!(err.to_string().contains("m.safetensors"));

    // a sidecar of something else
    std::fs::write(checkpoint::sidecar_path(&path), br#"{"format": "sam"}"#).unwrap();
    let err = checkpoint::load_model(&path, &dev).err().unwrap();
    assert!(err.to_string().contains("m.json"), "{err}");
}

struct CancelAfter<'a> {
    steps: usize,
    flag: &'a AtomicBool,
}

impl Progress for CancelAfter<'_> {
    fn event(&mut self, e: &TrainEvent) {
        if let TrainEvent::Step { .. } = e {
            self.steps -= 1;
            if self.steps == 0 {
                self.flag.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[test]
fn cancel_leaves_a_usable_checkpoint() {
    let set = common::demo_set(32, "train.txt");
    let dir = tempfile::tempdir().unwrap();
    let flag = AtomicBool::new(false);
    let out = train::train(
        &run(cfg(32, 2, 5), &set, &set[..4], dir.path()),
        &mut CancelAfter {
            steps: 2,
            flag: &flag,
        },
        &flag,
    )
    .unwrap();
    assert_eq!(out.status, TrainStatus::Cancelled);
    assert_eq!(out.epochs_done, 0);
    for f in [
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.optim.safetensors",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let loaded =
        checkpoint::load_model(&dir.path().join("last.safetensors"), &Device::Cpu).unwrap();
    let s = train::validate(&loaded.model, &set[..4], 32, 4, &Device::Cpu).unwrap();
    assert!(s.dice.is_finite());
}

#[test]
fn resume_continues_exactly_and_nan_keeps_the_last_good_checkpoint() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let mut c = cfg(32, 2, 2);
    c.min_lr_ratio = 1.0; // constant learning rate: one 2-epoch run == 1 epoch + resume
    c.augment = AugmentConfig::default();
    let init_dir = tempfile::tempdir().unwrap();
    let init = init_dir.path().join("init.safetensors");
    {
        let map = VarMap::new();
        UNetPlusPlus::new(
            &Config::with_base(2),
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        )
        .unwrap();
        checkpoint::save(&map, &CheckpointMeta::new(Config::with_base(2), 32), &init).unwrap();
    }
    let straight = tempfile::tempdir().unwrap();
    let mut r = run(c.clone(), &set, &val, straight.path());
    r.init = Some(init.clone());
    train::train(&r, &mut NoProgress, &AtomicBool::new(false)).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut c1 = c.clone();
    c1.epochs = 1;
    let mut r = run(c1, &set, &val, split.path());
    r.init = Some(init);
    train::train(&r, &mut NoProgress, &AtomicBool::new(false)).unwrap();
    let mut r = run(c.clone(), &set, &val, split.path());
    r.resume = true;
    let out = train::train(&r, &mut NoProgress, &AtomicBool::new(false)).unwrap();
    assert_eq!(out.epochs_done, 2);
    assert_eq!(
        weights(&straight.path().join("last.safetensors")),
        weights(&split.path().join("last.safetensors"))
    );
    let lines = std::fs::read_to_string(split.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);

    // resuming with another model size is refused
    let mut other = c.clone();
    other.base = 4;
    let mut r = run(other, &set, &val, split.path());
    r.resume = true;
    assert!(matches!(
        train::train(&r, &mut NoProgress, &AtomicBool::new(false)),
        Err(TrainError::Config(_))
    ));

    // a NaN loss stops the run with a clear error; the checkpoints stay as they were
    let before_best = std::fs::read(split.path().join("best.safetensors")).unwrap();
    let before_last = std::fs::read(split.path().join("last.safetensors")).unwrap();
    let mut bad = set.clone();
    for p in &mut bad {
        p.weight = f32::NAN;
    }
    let mut more = c.clone();
    more.epochs = 3;
    let mut r = run(more, &bad, &val, split.path());
    r.resume = true;
    let err = train::train(&r, &mut NoProgress, &AtomicBool::new(false))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            TrainError::NonFinite {
                epoch: 3,
                step: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("last good checkpoint"));
    assert_eq!(
        std::fs::read(split.path().join("best.safetensors")).unwrap(),
        before_best
    );
    assert_eq!(
        std::fs::read(split.path().join("last.safetensors")).unwrap(),
        before_last
    );
}

#[test]
fn early_stopping_ends_a_run_that_stopped_improving() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(32, 2, 40);
    c.lr = 1e-12; // nothing is learnt: validation Dice stalls at once
    c.patience = 2;
    let mut rec = Recorder::default();
    let out = train::train(
        &run(c, &set, &val, dir.path()),
        &mut rec,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(out.status, TrainStatus::EarlyStopped);
    assert!(out.epochs_done < 40, "{}", out.epochs_done);
    assert_eq!(out.epochs_done - out.best_epoch, 2);
    assert!(rec
        .0
        .iter()
        .any(|e| matches!(e, TrainEvent::Message(m) if m.contains("early stop"))));
}

/// The largest absolute difference between two checkpoints' tensors (same names required).
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

#[test]
fn the_same_seed_gives_the_same_checkpoint() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let mut c = cfg(32, 4, 2);
    c.augment = AugmentConfig::default();
    c.warmup_epochs = 0.5;
    c.seed = 5;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = c.clone();
        if i == 2 {
            c.seed = 6;
        }
        train::train(
            &run(c, &set, &val, dir.path()),
            &mut NoProgress,
            &AtomicBool::new(false),
        )
        .unwrap();
    }
    let file = |i: usize, f: &str| dirs[i].path().join(f);
    // Measured on the 2-core CI machine (candle's gemm and our ops on rayon): max |diff| 0,
    // bitwise equal. The tolerance leaves room for another thread count's reduction order
    // (1 vs 2 threads: 7.2e-7 after these 10 steps).
    for f in ["last.safetensors", "best.safetensors"] {
        let d = max_abs_diff(&file(0, f), &file(1, f));
        assert!(d <= 1e-5, "{f}: two runs with one seed differ by {d}");
    }
    assert_eq!(
        std::fs::read_to_string(file(0, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].clone())
            .collect::<Vec<_>>(),
        std::fs::read_to_string(file(1, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].clone())
            .collect::<Vec<_>>(),
    );
    // another seed: other initial weights, other batches
    let d = max_abs_diff(&file(0, "last.safetensors"), &file(2, "last.safetensors"));
    assert!(d > 1e-2, "seeds 5 and 6 gave nearly the same weights ({d})");
}

#[test]
fn fresh_checkpoints_are_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let a = checkpoint::fresh_checkpoint(&dir.path().join("a"), 2, 32, 3, &dev).unwrap();
    let b = checkpoint::fresh_checkpoint(&dir.path().join("b"), 2, 32, 3, &dev).unwrap();
    let c = checkpoint::fresh_checkpoint(&dir.path().join("c"), 2, 32, 4, &dev).unwrap();
    assert_eq!(weights(&a), weights(&b));
    assert_ne!(weights(&a), weights(&c));
}

/// Trains on the demo X-rays; with `cancel_after`, cancels after that many steps (counted
/// from this call), so the run stops mid-epoch.
fn train_or_cancel(c: &TrainConfig, dir: &Path, resume: bool, cancel_after: Option<usize>) {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let mut r = run(c.clone(), &set, &val, dir);
    r.resume = resume;
    let flag = AtomicBool::new(false);
    let out = match cancel_after {
        Some(steps) => train::train(&r, &mut CancelAfter { steps, flag: &flag }, &flag),
        None => train::train(&r, &mut NoProgress, &flag),
    }
    .unwrap();
    let expected = if cancel_after.is_some() {
        TrainStatus::Cancelled
    } else {
        TrainStatus::Finished
    };
    assert_eq!(out.status, expected);
}

#[test]
fn resume_after_a_mid_epoch_cancel_matches_an_uninterrupted_run() {
    // 18 images, batch 4: 5 steps per epoch; warm-up then cosine, so the step count matters
    let mut c = cfg(32, 2, 2);
    c.augment = AugmentConfig::default();
    c.warmup_epochs = 0.5;
    c.seed = 9;
    let straight = tempfile::tempdir().unwrap();
    train_or_cancel(&c, straight.path(), false, None);

    let split = tempfile::tempdir().unwrap();
    // cancelled at step 3 of epoch 1, then at step 2 of epoch 2, then resumed to the end
    train_or_cancel(&c, split.path(), false, Some(3));
    let meta = checkpoint::load_meta(&split.path().join("last.safetensors")).unwrap();
    let p = meta.partial_epoch.clone().expect("a mid-epoch position");
    assert_eq!((meta.epoch, p.steps, p.seen, p.batch), (0, 3, 12, 4));
    assert_eq!(meta.optimizer_steps, Some(3));
    train_or_cancel(&c, split.path(), true, Some(4));
    let meta = checkpoint::load_meta(&split.path().join("last.safetensors")).unwrap();
    let p = meta.partial_epoch.clone().expect("a mid-epoch position");
    assert_eq!((meta.epoch, p.steps, meta.optimizer_steps), (1, 2, Some(7)));
    train_or_cancel(&c, split.path(), true, None);
    let meta = checkpoint::load_meta(&split.path().join("last.safetensors")).unwrap();
    assert_eq!(
        (meta.epoch, meta.partial_epoch, meta.optimizer_steps),
        (2, None, Some(10))
    );

    // Measured: 0 (bitwise equal), the same as two uninterrupted runs.
    for f in [
        "last.safetensors",
        "best.safetensors",
        "last.optim.safetensors",
    ] {
        let d = max_abs_diff(&straight.path().join(f), &split.path().join(f));
        assert!(d <= 1e-6, "{f}: resumed run differs by {d}");
    }
    let records = |dir: &Path| -> Vec<(f64, Option<f64>)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let r: medmine::progress::EpochRecord = serde_json::from_str(l).unwrap();
                (r.train_loss, r.val_dice)
            })
            .collect()
    };
    let (a, b) = (records(straight.path()), records(split.path()));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.0 - y.0).abs() < 1e-9, "training loss {} vs {}", x.0, y.0);
        assert_eq!(x.1, y.1);
    }
}

#[test]
fn without_validation_no_dice_is_reported() {
    let set = common::demo_set(32, "train.txt");
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(32, 2, 3);
    c.patience = 1;
    let mut rec = Recorder::default();
    let out = train::train(
        &run(c, &set, &[], dir.path()),
        &mut rec,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(out.best_dice, None);
    let epochs = rec.epochs();
    assert!(epochs.iter().all(|e| e.val_dice.is_none()));
    let best = epochs.iter().find(|e| e.epoch == out.best_epoch).unwrap();
    assert_eq!(out.best_train_loss, Some(best.train_loss));
    for f in ["best.json", "last.json"] {
        let meta: CheckpointMeta =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(f)).unwrap()).unwrap();
        assert_eq!(meta.best_dice, None, "{f}");
        assert_eq!(meta.best_train_loss, Some(best.train_loss), "{f}");
    }
    let messages: Vec<_> = rec
        .0
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Message(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    assert!(messages.iter().all(|m| !m.contains("Dice")), "{messages:?}");

    // the CLI says so too
    let demo = common::root().join("assets/demo");
    let out_dir = dir.path().join("cli");
    let out = common::ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        common::s(&demo),
        "--train-list",
        common::s(&demo.join("train.txt")),
        "--size",
        "32",
        "--base",
        "2",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--out",
        common::s(&out_dir),
    ]);
    assert!(
        out.contains("no validation set: best epoch by training loss 1"),
        "{out}"
    );
    assert!(!out.contains("Dice"), "{out}");
}

#[test]
fn max_steps_sets_the_number_of_optimiser_steps() {
    let set = common::demo_set(32, "train.txt"); // 18 images: 5 steps per epoch at batch 4
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(32, 2, 1);
    c.max_steps = Some(7);
    c.min_lr_ratio = 0.1;
    let mut rec = Recorder::default();
    let out = train::train(
        &run(c.clone(), &set, &[], dir.path()),
        &mut rec,
        &AtomicBool::new(false),
    )
    .unwrap();
    let lrs: Vec<f64> = rec
        .0
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { lr, .. } => Some(*lr),
            _ => None,
        })
        .collect();
    assert_eq!(lrs.len(), 7);
    assert_eq!((out.optimizer_steps, out.epochs_done), (7, 2));
    assert_eq!(rec.epochs().len(), 2);
    // the schedule spans the 7 steps: it ends at its minimum
    let s = train::schedule::Schedule {
        lr: c.lr,
        warmup_steps: 0,
        total_steps: 7,
        min_ratio: 0.1,
    };
    assert!((lrs[6] - s.lr_at(6)).abs() < 1e-15);
    assert!(lrs.windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
    assert!((s.lr_at(7) - 0.1 * c.lr).abs() < 1e-15);
    let meta = checkpoint::load_meta(&dir.path().join("last.safetensors")).unwrap();
    assert_eq!(meta.optimizer_steps, Some(7));
}

#[test]
fn fine_tuning_never_returns_a_model_worse_than_its_input() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    // the input: a model trained for a few epochs
    let input_dir = tmp.path().join("input");
    let input = train::train(
        &run(cfg(32, 4, 6), &set, &val, &input_dir),
        &mut NoProgress,
        &AtomicBool::new(false),
    )
    .unwrap()
    .best;
    let input_dice = {
        let m = checkpoint::load_model(&input, &dev).unwrap();
        train::validate(&m.model, &val, 32, 4, &dev).unwrap().dice
    };

    // a learning rate that wrecks it: no epoch beats the input, which stays the best
    let mut c = cfg(32, 4, 2);
    c.lr = 0.5;
    let dir = tmp.path().join("wrecked");
    let mut r = run(c, &set, &val, &dir);
    r.init = Some(input.clone());
    let mut rec = Recorder::default();
    let out = train::train(&r, &mut rec, &AtomicBool::new(false)).unwrap();
    assert_eq!(out.initial_dice, Some(input_dice));
    let epochs = rec.epochs();
    assert_eq!(epochs.len(), 2);
    assert!(
        epochs
            .iter()
            .all(|e| e.val_dice.unwrap() < input_dice && !e.best),
        "input Dice {input_dice}, epochs {epochs:?}"
    );
    assert!(!out.improved);
    assert_eq!((out.best_epoch, out.best_dice), (0, Some(input_dice)));
    assert_eq!(weights(&out.best), weights(&input));
    let meta = checkpoint::load_meta(&out.best).unwrap();
    assert_eq!((meta.epoch, meta.best_dice), (0, Some(input_dice)));

    // from a fresh model, the first good epoch beats the input and becomes the best
    let fresh = checkpoint::fresh_checkpoint(&tmp.path().join("fresh"), 4, 32, 0, &dev).unwrap();
    let mut r = run(cfg(32, 4, 2), &set, &val, &tmp.path().join("improved"));
    r.init = Some(fresh);
    let out = train::train(&r, &mut NoProgress, &AtomicBool::new(false)).unwrap();
    let initial = out.initial_dice.unwrap();
    assert!(out.improved && out.best_epoch > 0, "{out:?}");
    assert!(
        out.best_dice.unwrap() > initial + train::MIN_DELTA,
        "{out:?}"
    );
}
