//! Fine-tuning rounds end to end: a tiny U-Net++ trained on the demo X-rays, a project with an
//! unlabelled pool, two pseudo-labels (one accepted, one left pending), `medmine finetune`.

use crate::common::{self, field, medmine, ok, root, s};
use crate::train::{cfg, run, weights};
use std::sync::atomic::AtomicBool;

use medmine::data::Mask;
use medmine::mining::finetune::{finetune_project, FinetuneConfig};
use medmine::progress::{Recorder, TrainEvent};
use medmine::store::{Actor, NewPseudoLabel, Project, Prompts, ReviewState, Role, RunStatus};
use medmine::train::checkpoint::load_model;
use medmine::train::TrainStatus;

fn pseudo_label(width: usize, height: usize) -> NewPseudoLabel {
    // the left half is foreground
    let data = (0..width * height)
        .map(|i| u8::from(i % width < width / 2))
        .collect();
    NewPseudoLabel {
        round: 0,
        mask: Mask {
            width,
            height,
            data,
        },
        prompts: Prompts::default(),
        sam_iou: Some(0.9),
        stability: Some(0.9),
        agreement: Some(0.9),
        unet_components: None,
        label_components: None,
        sam_checkpoint: None,
        unet_checkpoint: None,
        unet_hash: None,
        labeler: None,
    }
}

#[test]
fn finetune_a_project_end_to_end() {
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
        "1",
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

    // Two unlabelled images get pseudo-labels; the first is accepted, the second stays pending.
    let labelled;
    {
        let mut project = Project::open(&proj).unwrap();
        let images = project.images().unwrap();
        labelled = images
            .iter()
            .filter(|r| r.role == Role::Labelled)
            .filter(|r| project.ground_truth(&r.name).unwrap().is_some())
            .count();
        assert!(labelled > 0);
        let pool: Vec<_> = images
            .iter()
            .filter(|r| r.role == Role::Unlabelled)
            .take(2)
            .collect();
        assert_eq!(pool.len(), 2);
        for r in &pool {
            project
                .add_pseudo_label(&r.name, &pseudo_label(r.width, r.height))
                .unwrap();
        }
        project
            .set_review(&[&pool[0].name], ReviewState::Accepted, Actor::default())
            .unwrap();
        assert_eq!(
            project.review(&pool[1].name).unwrap().state,
            ReviewState::Pending
        );
    }

    // A negative pseudo-label weight is refused before anything runs.
    let out = medmine(&[
        "finetune",
        s(&proj),
        "--device",
        "cpu",
        "--checkpoint",
        s(&unet),
        "--pseudo-weight",
        "-0.5",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'-0.5' for '--pseudo-weight") && err.contains("not a number in [0, 1]"),
        "{err}"
    );
    assert!(Project::open(&proj).unwrap().runs().unwrap().is_empty());

    let out = ok(&[
        "finetune",
        s(&proj),
        "--device",
        "cpu",
        "--checkpoint",
        s(&unet),
        "--epochs",
        "2",
        "--batch",
        "4",
        "--pseudo-weight",
        "0.3",
    ]);
    assert_eq!(field(&out, "labelled"), labelled, "{out}");
    assert_eq!(field(&out, "pseudo"), 1, "{out}");
    assert!(field(&out, "validation") > 0, "{out}");
    assert!(
        out.contains("epoch   1") && out.contains("epoch   2"),
        "{out}"
    );

    let project = Project::open(&proj).unwrap();
    let runs = project.runs().unwrap();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!(r.status, RunStatus::Done);
    assert_eq!(r.name, "finetune-1");
    assert_eq!(r.dir, project.runs_dir().join("finetune-1"));
    assert_eq!(r.config["pseudo"], 1);
    assert_eq!(r.config["finetune"]["pseudo_weight"], 0.3f32 as f64);
    let epochs = project.run_epochs(r.id).unwrap();
    assert_eq!(epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
    assert!(epochs.iter().all(|e| e.val_dice.is_some()));
    let best = r.best_checkpoint.clone().expect("best checkpoint recorded");
    assert!(r.last_checkpoint.as_ref().is_some_and(|p| p.is_file()));
    let best_line = format!("best checkpoint     {}", best.display());
    assert!(out.contains(&best_line), "{out}");

    // The best checkpoint loads with the original model's size and width.
    let m = load_model(&best, &candle_core::Device::Cpu).unwrap();
    assert_eq!((m.meta.size, m.meta.model.base), (32, 2));
    // The output says whether an epoch beat the input model (epoch 0 in the sidecar: kept).
    let initial = m.meta.initial_dice.expect("the input model was validated");
    let verdict = if m.meta.epoch == 0 {
        format!("kept the input model: no epoch beat its validation Dice {initial:.4}")
    } else {
        format!(
            "improved: best epoch {} has validation Dice {:.4} (input model {initial:.4})",
            m.meta.epoch,
            m.meta.best_dice.unwrap()
        )
    };
    assert!(out.contains(&verdict), "{verdict}\n{out}");
    drop(project);

    // The library call with the cancel flag already set: recorded as cancelled, in a new folder,
    // through the same observer.
    let mut project = Project::open(&proj).unwrap();
    let mut rec = Recorder::default();
    let cancel = AtomicBool::new(true);
    let cfg = FinetuneConfig {
        epochs: 2,
        batch: 4,
        ..Default::default()
    };
    let o = finetune_project(
        &mut project,
        &best,
        &cfg,
        &candle_core::Device::Cpu,
        &mut rec,
        &cancel,
    )
    .unwrap();
    assert_eq!(o.status, TrainStatus::Cancelled);
    assert_eq!((o.labelled, o.pseudo), (labelled, 1));
    assert_eq!(o.dir, project.runs_dir().join("finetune-2"));
    assert!(rec
        .0
        .iter()
        .any(|e| matches!(e, TrainEvent::Message(m) if m.contains("cancelled"))));
    let runs = project.runs().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].status, RunStatus::Cancelled);
    assert!(runs[1].finished_at.is_some());
}

/// A project on the demo X-rays (half of train.txt labelled) with a U-Net++ (size 32, base 4,
/// one epoch) and `accepted` unlabelled images carrying an accepted pseudo-label.
fn project_with_accepted_pseudo_labels(
    tmp: &std::path::Path,
    accepted: usize,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<String>) {
    let demo = root().join("assets/demo");
    let run = tmp.join("run");
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
        "4",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--out",
        s(&run),
    ]);
    let proj = tmp.join("proj");
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
    let mut project = Project::open(&proj).unwrap();
    let pool: Vec<_> = project
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .take(accepted)
        .collect();
    assert_eq!(pool.len(), accepted);
    for r in &pool {
        project
            .add_pseudo_label(&r.name, &pseudo_label(r.width, r.height))
            .unwrap();
    }
    let names: Vec<String> = pool.iter().map(|r| r.name.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    project
        .set_review(&refs, ReviewState::Accepted, Actor::default())
        .unwrap();
    (proj, run.join("best.safetensors"), names)
}

fn tensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = medmine::train::checkpoint::load_tensors(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn pseudo_weight_zero_equals_training_on_the_labelled_images_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (proj, unet, names) = project_with_accepted_pseudo_labels(tmp.path(), 3);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut project = Project::open(&proj).unwrap();
    let dev = candle_core::Device::Cpu;
    let finetune = |project: &mut Project, pseudo_weight: f32| {
        let cfg = FinetuneConfig {
            epochs: 2,
            batch: 4,
            lr: 1e-3,
            pseudo_weight,
            patience: 0,
            seed: 3,
            ..Default::default()
        };
        let never = AtomicBool::new(false);
        finetune_project(project, &unet, &cfg, &dev, &mut Recorder::default(), &never).unwrap()
    };
    // W = 0 with three accepted pseudo-labels: they are left out
    let zero = finetune(&mut project, 0.0);
    assert_eq!(zero.pseudo, 0);
    // the same round on the project without them (rejected: not training data)
    project
        .set_review(&refs, ReviewState::Rejected, Actor::default())
        .unwrap();
    let without = finetune(&mut project, 0.5);
    assert_eq!((without.pseudo, without.labelled), (0, zero.labelled));
    // Measured: bitwise equal (the same batches, the same BatchNorm statistics).
    assert_eq!(tensors(&zero.last), tensors(&without.last));
    assert_eq!(tensors(&zero.best), tensors(&without.best));
    assert_eq!(zero.best_dice, without.best_dice);
    // and the pseudo-labels do pull when they weigh something
    project
        .set_review(&refs, ReviewState::Accepted, Actor::default())
        .unwrap();
    let with = finetune(&mut project, 0.5);
    assert_eq!(with.pseudo, 3);
    assert_ne!(tensors(&with.last), tensors(&without.last));
}

#[test]
fn fine_tuning_without_training_data_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // a dataset without masks: every image is unlabelled
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    let demo = root().join("assets/demo/images");
    for name in ["covid_1015.png", "covid_1028.png", "covid_1030.png"] {
        std::fs::copy(demo.join(name), data.join("images").join(name)).unwrap();
    }
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    ok(&["project", "import", s(&proj), "--data", s(&data)]);
    let unet = medmine::train::checkpoint::fresh_checkpoint(
        &tmp.path().join("init"),
        2,
        32,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let finetune = |weight: &str| {
        medmine(&[
            "finetune",
            s(&proj),
            "--device",
            "cpu",
            "--checkpoint",
            s(&unet),
            "--epochs",
            "1",
            "--pseudo-weight",
            weight,
        ])
    };
    let out = finetune("0.5");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "nothing to fine-tune on: no labelled image with ground truth and no accepted"
        ),
        "{err}"
    );

    // one accepted pseudo-label, but weight 0 leaves it out
    {
        let mut project = Project::open(&proj).unwrap();
        project
            .add_pseudo_label("covid_1015.png", &pseudo_label(256, 256))
            .unwrap();
        project
            .set_review(&["covid_1015.png"], ReviewState::Accepted, Actor::default())
            .unwrap();
    }
    let out = finetune("0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a pseudo-label weight of 0 leaves out the 1 accepted"),
        "{err}"
    );
    assert!(Project::open(&proj).unwrap().runs().unwrap().is_empty());
}

/// The rule under `finetune`, through the library's `train` with `init`: the input model is
/// validated first and stays the best unless an epoch beats it.
#[test]
fn fine_tuning_never_returns_a_model_worse_than_its_input() {
    let set = common::demo_set(32, "train.txt");
    let val = common::demo_set(32, "val.txt");
    let dev = candle_core::Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    // the input: a model trained for a few epochs
    let input_dir = tmp.path().join("input");
    let input = medmine::train::train(
        &run(cfg(32, 4, 6), &set, &val, &input_dir),
        &mut medmine::progress::NoProgress,
        &AtomicBool::new(false),
    )
    .unwrap()
    .best;
    let input_dice = {
        let m = medmine::train::checkpoint::load_model(&input, &dev).unwrap();
        medmine::train::validate(&m.model, &val, 32, 4, &dev)
            .unwrap()
            .dice
    };

    // a learning rate that wrecks it: no epoch beats the input, which stays the best
    let mut c = cfg(32, 4, 2);
    c.lr = 0.5;
    let dir = tmp.path().join("wrecked");
    let mut r = run(c, &set, &val, &dir);
    r.init = Some(input.clone());
    let mut rec = Recorder::default();
    let out = medmine::train::train(&r, &mut rec, &AtomicBool::new(false)).unwrap();
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
    let meta = medmine::train::checkpoint::load_meta(&out.best).unwrap();
    assert_eq!((meta.epoch, meta.best_dice), (0, Some(input_dice)));

    // from a fresh model, the first good epoch beats the input and becomes the best
    let fresh =
        medmine::train::checkpoint::fresh_checkpoint(&tmp.path().join("fresh"), 4, 32, 0, &dev)
            .unwrap();
    let mut r = run(cfg(32, 4, 2), &set, &val, &tmp.path().join("improved"));
    r.init = Some(fresh);
    let out = medmine::train::train(
        &r,
        &mut medmine::progress::NoProgress,
        &AtomicBool::new(false),
    )
    .unwrap();
    let initial = out.initial_dice.unwrap();
    assert!(out.improved && out.best_epoch > 0, "{out:?}");
    assert!(
        out.best_dice.unwrap() > initial + medmine::train::MIN_DELTA,
        "{out:?}"
    );
}
