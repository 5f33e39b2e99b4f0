//! Fine-tuning rounds end to end: a tiny U-Net++ trained on the demo X-rays, a project with an
//! unlabelled pool, two pseudo-labels (one accepted, one left pending), `medmine finetune`.

use crate::common::{field, medmine, ok, root, s};
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
        err.contains("pseudo-label weight -0.5 is not in [0, 1]"),
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
