//! The app's model thread, driven through its channels (no window): every job ends with one
//! terminal event (also when it fails or panics), a click between two commands drops neither,
//! a click runs between two images of "Encode all", opening a project drops the previous
//! project's U-Net++, and mining with the self-training labeler (no SAM) re-mines pending and
//! rejected images with a new model on the next round.
#![cfg(feature = "gui")]
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use medmine::gui::worker::{
    ClickPrompt, CustomJob, Event, FinetuneJob, JobOutcome, ModelCommand, Workers,
};
use medmine::mining::finetune::FinetuneConfig;
use medmine::mining::{LabelerKind, MiningConfig, MiningSummary};
use medmine::store::{Actor, Project, ReviewState, Role};

fn workers() -> Workers {
    Workers::spawn(&egui::Context::default(), candle_core::Device::Cpu)
}

/// Collects events until `stop` holds for one of them (which is the last one returned).
fn until(w: &Workers, what: &str, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = Duration::from_secs(300).saturating_sub(t0.elapsed());
        let e = w
            .events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:#?}"));
        let last = stop(&e);
        seen.push(e);
        if last {
            return seen;
        }
    }
}

fn job(what: &str, run: impl FnOnce() -> anyhow::Result<String> + Send + 'static) -> ModelCommand {
    ModelCommand::Job(CustomJob {
        what: what.into(),
        run: Box::new(move |_| run()),
    })
}

fn done_of<'a>(events: &'a [Event], job: &str) -> Vec<(JobOutcome, &'a str)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::JobDone {
                what,
                outcome,
                message,
            } if what == job => Some((*outcome, message.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn every_job_ends_with_one_terminal_event_even_when_it_fails_or_panics() {
    let w = workers();
    w.model
        .send(job("fails", || anyhow::bail!("no luck")))
        .unwrap();
    w.model
        .send(job("panics", || panic!("boom in a job")))
        .unwrap();
    // a real job that fails after it started: mining with a checkpoint that is not there
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    Project::init(&project).unwrap();
    w.model
        .send(ModelCommand::Mine {
            project,
            labeler: LabelerKind::Unet,
            sam: None,
            unet: tmp.path().join("missing.safetensors"),
            cfg: Box::default(),
        })
        .unwrap();
    w.model.send(job("works", || Ok("fine".into()))).unwrap();
    let events = until(
        &w,
        "the last job",
        |e| matches!(e, Event::JobDone { what, .. } if what == "works"),
    );
    let fails = done_of(&events, "fails");
    assert_eq!(fails.len(), 1, "{events:#?}");
    assert_eq!(fails[0].0, JobOutcome::Failed);
    assert!(fails[0].1.contains("no luck"), "{}", fails[0].1);
    let panics = done_of(&events, "panics");
    assert_eq!(panics.len(), 1, "{events:#?}");
    assert_eq!(panics[0].0, JobOutcome::Failed);
    assert!(panics[0].1.contains("boom in a job"), "{}", panics[0].1);
    let mining = done_of(&events, "mining");
    assert_eq!(mining.len(), 1, "{events:#?}");
    assert_eq!(mining[0].0, JobOutcome::Failed);
    assert!(
        mining[0].1.contains("missing.safetensors"),
        "{}",
        mining[0].1
    );
    assert_eq!(done_of(&events, "works"), vec![(JobOutcome::Done, "fine")]);
    // each job started once, and ended before the next one started
    let mut open = None;
    for e in &events {
        match e {
            Event::JobStarted { what } => {
                assert!(open.is_none(), "{what} started inside {open:?}");
                open = Some(what.clone());
            }
            Event::JobDone { what, .. } => assert_eq!(open.take().as_ref(), Some(what)),
            _ => {}
        }
    }
}

/// A lung X-ray project folder (for the embedding cache) and `n` of its image files.
fn lung_images(tmp: &Path, n: usize) -> (PathBuf, Vec<PathBuf>) {
    let dir = common::shared_data().join("lung-cxr/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.truncate(n);
    let project = tmp.join("project");
    std::fs::create_dir_all(&project).unwrap();
    (project, files)
}

fn click(project: &Path, image: &Path, seq: u64) -> ModelCommand {
    ModelCommand::Sam {
        project: project.to_path_buf(),
        image: image.file_name().unwrap().to_string_lossy().into_owned(),
        path: image.to_path_buf(),
        prompt: ClickPrompt {
            points_in_image: vec![(80., 120., true)],
            box_in_image: None,
            mask_input: None,
        },
        seq,
    }
}

#[test]
fn clicks_go_first_and_nothing_between_them_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (project, files) = lung_images(tmp.path(), 40);
    let w = workers();
    let sam = common::root().join("tests/fixtures/sam/sam_tiny.pth");
    w.model.send(ModelCommand::LoadSam(sam, None)).unwrap();
    until(&w, "SAM to load", |e| matches!(e, Event::SamLoaded { .. }));

    // a click, a job, a newer click, queued behind a running job: the job in between runs,
    // the newer click runs before it, the older click is superseded
    let (release, wait) = channel::<()>();
    w.model
        .send(job("blocker", move || {
            wait.recv_timeout(Duration::from_secs(60)).ok();
            Ok("released".into())
        }))
        .unwrap();
    until(&w, "the blocker to start", |e| {
        matches!(e, Event::JobStarted { .. })
    });
    w.model.send(click(&project, &files[0], 1)).unwrap();
    w.model.send(job("between", || Ok("ran".into()))).unwrap();
    w.model.send(click(&project, &files[0], 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    release.send(()).unwrap();
    let events = until(
        &w,
        "the job between the clicks",
        |e| matches!(e, Event::JobDone { what, .. } if what == "between"),
    );
    let answers: Vec<(usize, u64)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Event::SamMask { seq, .. } => Some((i, *seq)),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 1, "{events:#?}");
    assert_eq!(answers[0].1, 2, "the newest click is answered");
    let between_started = events
        .iter()
        .position(|e| matches!(e, Event::JobStarted { what } if what == "between"))
        .expect("the job between the clicks ran");
    assert!(answers[0].0 < between_started, "the click went first");
    assert!(!events.iter().any(|e| matches!(e, Event::Error { .. })));

    // "Encode all" yields between images: a click sent while it runs is answered before the
    // job ends, with images still to encode
    w.model
        .send(ModelCommand::Precompute {
            project: project.clone(),
            paths: files.clone(),
        })
        .unwrap();
    until(
        &w,
        "the first image encoded",
        |e| matches!(e, Event::JobProgress { done, .. } if *done >= 1),
    );
    w.model.send(click(&project, &files[0], 3)).unwrap();
    let events = until(&w, "the click during encoding", |e| {
        matches!(e, Event::SamMask { .. } | Event::JobDone { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::SamMask { seq: 3, .. })),
        "{events:#?}"
    );
    let done_before = events
        .iter()
        .filter_map(|e| match e {
            Event::JobProgress { done, .. } => Some(*done),
            _ => None,
        })
        .max()
        .unwrap_or(1);
    assert!(done_before < files.len(), "answered with images left");
    w.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let events = until(&w, "the encoding to stop", |e| {
        matches!(e, Event::JobDone { .. })
    });
    assert!(
        matches!(
            events.last(),
            Some(Event::JobDone {
                outcome: JobOutcome::Cancelled,
                ..
            })
        ),
        "{events:#?}"
    );
}

#[test]
fn opening_a_project_drops_the_previous_projects_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, files) = lung_images(tmp.path(), 1);
    let b = tmp.path().join("other");
    let ckpt = medmine::train::checkpoint::fresh_checkpoint(
        &a.join("runs/init"),
        2,
        32,
        1,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let w = workers();
    let probability = || ModelCommand::Probability {
        image: "x".into(),
        path: files[0].clone(),
    };
    w.model
        .send(ModelCommand::SetProject {
            root: a.clone(),
            model: Some(ckpt.clone()),
        })
        .unwrap();
    let events = until(&w, "project A's model", |e| {
        matches!(e, Event::UnetLoaded { .. } | Event::Error { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::UnetLoaded { project, path, .. })
            if project.as_deref() == Some(a.as_path()) && path == &ckpt),
        "{events:#?}"
    );
    w.model.send(probability()).unwrap();
    until(&w, "a probability map", |e| {
        matches!(e, Event::Probability { .. })
    });

    w.model
        .send(ModelCommand::SetProject {
            root: b,
            model: None,
        })
        .unwrap();
    w.model.send(probability()).unwrap();
    let events = until(&w, "the answer in project B", |e| {
        matches!(e, Event::Probability { .. } | Event::Error { .. })
    });
    match events.last() {
        Some(Event::Error { message, .. }) => {
            assert!(message.contains("no U-Net++ is loaded"), "{message}")
        }
        other => panic!("project B predicted with project A's model: {other:?}"),
    }
}

fn mine(w: &Workers, project: &Path, unet: &Path) -> MiningSummary {
    w.model
        .send(ModelCommand::Mine {
            project: project.to_path_buf(),
            labeler: LabelerKind::Unet,
            sam: None,
            unet: unet.to_path_buf(),
            cfg: Box::new(MiningConfig::default()),
        })
        .unwrap();
    let events = until(w, "the mining pass", |e| matches!(e, Event::JobDone { .. }));
    assert!(
        matches!(
            events.last(),
            Some(Event::JobDone {
                outcome: JobOutcome::Done,
                ..
            })
        ),
        "{events:#?}"
    );
    events
        .into_iter()
        .find_map(|e| match e {
            Event::Mined { summary, .. } => Some(*summary),
            _ => None,
        })
        .expect("a summary before the end")
}

#[test]
fn next_round_remines_pending_and_rejected_images_with_the_new_model() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    crate::mining::demo_project(&project);
    let unet = crate::mining::tiny_unet(&tmp.path().join("run"));
    let w = workers();

    // round 1: self-training, no SAM checkpoint anywhere
    let first = mine(&w, &project, &unet);
    let mut p = Project::open(&project).unwrap();
    let unlabelled: Vec<String> = p
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .map(|r| r.name)
        .collect();
    assert_eq!(first.mined.len(), unlabelled.len(), "{first:?}");
    let (accepted, rejected) = (&first.mined[0], &first.mined[1]);
    let actor = Actor {
        reviewer: Some("test"),
        note: None,
    };
    p.set_review(&[accepted], ReviewState::Accepted, actor)
        .unwrap();
    p.set_review(&[rejected], ReviewState::Rejected, actor)
        .unwrap();
    let accepted_rounds = p.pseudo_labels(accepted).unwrap();

    // the same model again: nothing changed, nothing re-mined
    let same = mine(&w, &project, &unet);
    assert!(same.mined.is_empty(), "{same:?}");
    assert_eq!(same.unchanged.len(), unlabelled.len() - 1, "{same:?}");

    // fine-tuning in the app makes the next model (its last epoch: surely new weights)
    w.model
        .send(ModelCommand::Finetune(FinetuneJob {
            project: project.clone(),
            checkpoint: Some(unet.clone()),
            size: 32,
            base: 2,
            cfg: FinetuneConfig {
                epochs: 1,
                batch: 4,
                ..FinetuneConfig::default()
            },
        }))
        .unwrap();
    let events = until(&w, "fine-tuning", |e| matches!(e, Event::JobDone { .. }));
    let best = events
        .iter()
        .find_map(|e| match e {
            Event::FinetuneDone(r) => Some(r.best.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no result: {events:#?}"));
    let unet2 = best.with_file_name("last.safetensors");
    assert_ne!(
        medmine::fsutil::sha256_file(&unet).unwrap(),
        medmine::fsutil::sha256_file(&unet2).unwrap()
    );

    // round 2 with the new model: pending and rejected images again, accepted kept
    let second = mine(&w, &project, &unet2);
    assert_eq!(second.kept, vec![accepted.clone()]);
    assert_eq!(second.mined.len(), unlabelled.len() - 1, "{second:?}");
    assert!(second.mined.contains(rejected));
    let p = Project::open(&project).unwrap();
    assert_eq!(p.pseudo_labels(accepted).unwrap(), accepted_rounds);
    let hash2 = medmine::fsutil::sha256_file(&unet2).unwrap();
    for name in &second.mined {
        let newest = p.latest_pseudo_label(name).unwrap().unwrap();
        assert_eq!(newest.unet_hash.as_deref(), Some(hash2.as_str()), "{name}");
        assert_eq!(p.review(name).unwrap().state, ReviewState::Pending);
    }
}
