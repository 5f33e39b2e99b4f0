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
