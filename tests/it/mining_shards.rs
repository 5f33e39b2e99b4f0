//! Mining on a cluster without a cluster: `mine --shard K/N --shard-out DIR` jobs (one of
//! them stopped and started again) on a project they never write, a person's edit made while
//! they ran, and `project merge`: the merged project equals one made by a single `mine`, the
//! edit survives, a missing shard is named, a second merge changes nothing.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::{fails, field, ok, s};
use crate::mining::{demo_project, tiny_unet};
use medmine::mining::shard::mine_shard;
use medmine::mining::{open_labeler, LabelerKind, MiningConfig};
use medmine::prompts::PromptConfig;
use medmine::store::{Actor, Project, ReviewState, Role, ShardSpec};

/// What a pseudo-label is, without where and when it was stored.
type Label = (
    i64,
    String,
    String,
    [Option<String>; 4],
    Option<i64>,
    Option<i64>,
);

/// Every unlabelled image's review state and pseudo-labels.
fn labels(p: &Path) -> BTreeMap<String, (ReviewState, Vec<Label>)> {
    let project = Project::open(p).unwrap();
    let f = |v: Option<f64>| v.map(|v| format!("{v:.6}"));
    project
        .images()
        .unwrap()
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .map(|r| {
            let rows = project
                .pseudo_labels(&r.name)
                .unwrap()
                .into_iter()
                .map(|l| {
                    (
                        l.round,
                        l.mask_file,
                        serde_json::to_string(&l.prompts).unwrap(),
                        [f(l.sam_iou), f(l.stability), f(l.agreement), l.unet_hash],
                        l.unet_components,
                        l.label_components,
                    )
                })
                .collect();
            (
                r.name.clone(),
                (project.review(&r.name).unwrap().state, rows),
            )
        })
        .collect()
}

/// The project database's bytes (with its WAL): a shard job must not change them.
fn db_bytes(p: &Path) -> Vec<Vec<u8>> {
    ["medmine.db", "medmine.db-wal"]
        .iter()
        .map(|f| std::fs::read(p.join(f)).unwrap_or_default())
        .collect()
}

#[test]
fn shard_jobs_merged_equal_one_mine_and_a_review_made_meanwhile_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tiny_unet(&tmp.path().join("run"));
    let proj = tmp.path().join("proj");
    demo_project(&proj);
    // a project opened once by this medmine (it has an id); its copy is mined in one go
    Project::open(&proj).unwrap();
    let single = tmp.path().join("single");
    crate::common::copy_dir(&proj, &single);
    // the oracle answers every prompt with the image's own mask (threshold 0: one component
    // per image whatever the barely trained U-Net++ predicts): real, distinct masks
    let common_args = [
        "--device",
        "cpu",
        "--labeler",
        "oracle",
        "--threshold",
        "0",
        "--checkpoint",
        s(&unet),
    ];
    let out = ok(&[&["mine", s(&single)][..], &common_args].concat());
    assert_eq!(field(&out, "mined"), 9, "{out}");
    let expected = labels(&single);

    // three shard jobs; the project is read, never written
    let before = db_bytes(&proj);
    let shard = |k: usize| tmp.path().join(format!("shard-{k}"));
    // `medmine project merge PROJECT shard-K...` through `run` (ok or fails)
    let merge = |run: fn(&[&str]) -> String, proj: &Path, ks: &[usize]| {
        let dirs: Vec<_> = ks.iter().map(|&k| shard(k)).collect();
        let mut args = vec!["project", "merge", s(proj)];
        args.extend(dirs.iter().map(|d| s(d)));
        run(&args)
    };
    for k in 0..2 {
        let spec = format!("{k}/3");
        let out = ok(&[
            &["mine", s(&proj)][..],
            &common_args,
            &["--shard", &spec, "--shard-out", s(&shard(k))],
        ]
        .concat());
        assert_eq!(field(&out, "mined"), 3, "{out}");
        assert!(out.contains("finished"), "{out}");
    }
    // shard 2: a job stopped after its first image (the cancel flag, as Ctrl-C or a
    // scheduler's SIGTERM would), then the same command again continues it
    {
        let project = Project::open_read_only(&proj).unwrap();
        let cfg = MiningConfig {
            prompt: PromptConfig {
                threshold: 0.0,
                ..PromptConfig::default()
            },
            ..MiningConfig::default()
        };
        let dev = candle_core::Device::Cpu;
        let mut labeler = open_labeler(
            "oracle".parse::<LabelerKind>().unwrap(),
            None,
            None,
            &dev,
            None,
        )
        .unwrap();
        let cancel = AtomicBool::new(false);
        let spec: ShardSpec = "2/3".parse().unwrap();
        let s1 = mine_shard(
            &project,
            &shard(2),
            spec,
            &unet,
            labeler.as_mut(),
            &cfg,
            &dev,
            &mut |done, _| {
                if done >= 1 {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            &cancel,
        )
        .unwrap();
        assert!(s1.cancelled && s1.mined == 1, "{s1:?}");
    }
    let err = merge(fails, &proj, &[0, 1, 2]);
    assert!(
        err.contains("shard-2") && err.contains("not finished"),
        "{err}"
    );
    // a person edits one of shard 1's images while its result waits to be merged
    let edited = labels(&proj).into_keys().nth(1).unwrap();
    {
        let mut p = Project::open(&proj).unwrap();
        let img = p.load_image(&edited).unwrap();
        let mut mask = medmine::data::Mask {
            width: img.width,
            height: img.height,
            data: vec![0; img.width * img.height],
        };
        mask.data[..img.width * 10].fill(1);
        p.save_edit(&edited, &mask, Actor::default()).unwrap();
    }
    let after_edit = db_bytes(&proj);
    assert_ne!(before, after_edit);
    let out = ok(&[
        &["mine", s(&proj)][..],
        &common_args,
        &["--shard", "2/3", "--shard-out", s(&shard(2))],
    ]
    .concat());
    assert_eq!(field(&out, "done by an earlier job"), 1, "{out}");
    assert_eq!(field(&out, "mined"), 3, "{out}");
    assert_eq!(db_bytes(&proj), after_edit, "a shard job wrote the project");

    // a shard folder is one run's: other settings (or models) are refused
    let err = fails(&[
        "mine",
        s(&proj),
        "--device",
        "cpu",
        "--labeler",
        "oracle",
        "--threshold",
        "0.1",
        "--checkpoint",
        s(&unet),
        "--shard",
        "2/3",
        "--shard-out",
        s(&shard(2)),
    ]);
    assert!(
        err.contains("another run") && err.contains("threshold 0.1"),
        "{err}"
    );

    // a missing shard is named, nothing is merged
    let snap = labels(&proj);
    let err = merge(fails, &proj, &[0, 2]);
    assert!(err.contains("missing shards: 1/3"), "{err}");
    assert_eq!(labels(&proj), snap);
    // shards of another project are refused
    let stranger = tmp.path().join("stranger");
    demo_project(&stranger);
    let err = merge(fails, &stranger, &[0, 1, 2]);
    assert!(err.contains("not of"), "{err}");

    let out = merge(ok, &proj, &[0, 1, 2]);
    assert_eq!(field(&out, "merged"), 8, "{out}");
    assert_eq!(field(&out, "skipped: reviewed meanwhile"), 1, "{out}");
    let merged = labels(&proj);
    for (name, got) in &merged {
        if *name == edited {
            assert_eq!(got.0, ReviewState::Edited, "the person's edit stands");
            assert!(got.1.is_empty(), "no pseudo-label written under the edit");
        } else {
            assert_eq!(
                Some(got),
                expected.get(name),
                "{name}: as one `mine` made it"
            );
        }
    }
    let p = Project::open(&proj).unwrap();
    assert_eq!(p.current_mask(&edited).unwrap().unwrap().1, "edited");
    assert_eq!(p.integrity_check().unwrap(), "ok");
    drop(p);

    // merging again changes nothing; status says what came from which shard
    let out = merge(ok, &proj, &[2, 0, 1]);
    assert_eq!(field(&out, "merged"), 0, "{out}");
    assert_eq!(field(&out, "already merged"), 9, "{out}");
    assert_eq!(labels(&proj), merged);
    let status = ok(&["project", "status", s(&proj)]);
    for line in ["shard 0/3", "shard 1/3", "shard 2/3", "skipped_reviewed 1"] {
        assert!(status.contains(line), "{line}: {status}");
    }
}

#[test]
fn a_shard_job_mines_a_project_it_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let unet = tiny_unet(&tmp.path().join("run"));
    crate::store_cli::chmod_tree(&tmp.path().join("run"), 0o755, 0o644);
    let proj = tmp.path().join("proj");
    demo_project(&proj);
    Project::open(&proj).unwrap();
    let out_dir = tmp.path().join("shards");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // a read-only project folder (as a read-only mount of a network share): no WAL index
    // can be made beside the database, so SQLite cannot open it in place
    crate::store_cli::chmod_tree(&proj, 0o555, 0o444);
    let before = db_bytes(&proj);
    let mut cmd = if crate::store_cli::is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.arg(env!("CARGO_BIN_EXE_medmine"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_medmine"))
    };
    let shard = out_dir.join("shard-0");
    let out = cmd
        .args(["mine", s(&proj), "--device", "cpu", "--labeler", "oracle"])
        .args(["--threshold", "0", "--checkpoint", s(&unet)])
        .args(["--shard", "0/1", "--shard-out", s(&shard)])
        .output()
        .unwrap();
    crate::store_cli::chmod_tree(&proj, 0o755, 0o644);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&text, "mined"), 9, "{text}");
    assert_eq!(db_bytes(&proj), before);
    let merged = ok(&["project", "merge", s(&proj), s(&shard)]);
    assert_eq!(field(&merged, "merged"), 9, "{merged}");
}
