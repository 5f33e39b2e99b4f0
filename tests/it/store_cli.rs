//! The project store through the `medmine` binary: the project and review commands, crash
//! safety under `kill -9`, concurrent writers, a read-only folder, a full disk.

use crate::common::{fails, ok, s, BIN};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use medmine::data::{self, Mask};
use medmine::store::{Project, ReviewState};

fn demo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

/// A dataset of `n` `w x h` images, all with masks.
fn make_dataset(root: &Path, n: usize, w: usize, h: usize) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..n {
        let px: Vec<u8> = (0..w * h)
            .map(|p| ((p * 13 + i * 37) % 256) as u8)
            .collect();
        data::save_gray_png(&root.join(format!("images/im{i}.png")), w, h, &px).unwrap();
        let m: Vec<u8> = (0..w * h).map(|p| u8::from(p % w < w / 2)).collect();
        let mask = Mask {
            width: w,
            height: h,
            data: m,
        };
        data::save_mask_png(&root.join(format!("masks/im{i}.png")), &mask).unwrap();
    }
}

/// A project with `n` small images imported through the CLI.
fn project(dir: &Path, n: usize, size: usize) -> PathBuf {
    let data = dir.join("data");
    make_dataset(&data, n, size, size);
    let proj = dir.join("proj");
    ok(&["project", "init", s(&proj)]);
    ok(&["project", "import", s(&proj), "--data", s(&data)]);
    proj
}

/// Gives every image of a [`project`] a round-0 pseudo-label (its own ground-truth mask), so
/// that any of them can be accepted.
fn with_pseudo_labels(proj: &Path) {
    let data = proj.parent().unwrap().join("data");
    ok(&[
        "project",
        "add-pseudo",
        s(proj),
        "--masks",
        s(&data.join("masks")),
        "--round",
        "0",
    ]);
}

fn status_json(proj: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["project", "status", s(proj), "--json"])).unwrap()
}

fn review_of(status: &serde_json::Value, name: &str) -> String {
    status["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status"))["review"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn cli_import_status_review_export() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("p");
    ok(&["project", "init", s(&proj)]);
    let out = ok(&[
        "project",
        "import",
        s(&proj),
        "--data",
        s(&demo()),
        "--split-dir",
        s(&demo()),
        "--labelled-fraction",
        "0.5",
        "--seed",
        "1",
    ]);
    assert!(out.contains("imported 24 images"), "{out}");
    let st = status_json(&proj);
    assert_eq!(st["total"], 24);
    assert_eq!(st["roles"]["labelled"], 9);
    assert_eq!(st["roles"]["unlabelled"], 9);
    assert_eq!(st["roles"]["val"], 6);
    let images = st["images"].as_array().unwrap();
    assert_eq!(images.len(), 24);
    for i in images {
        assert!(i["name"].is_string() && i["role"].is_string());
        assert_eq!(i["review"], "pending");
    }
    let unl: Vec<String> = images
        .iter()
        .filter(|i| i["role"] == "unlabelled")
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    // nothing mined yet: accept has nothing to accept and says what to do
    let err = fails(&["review", s(&proj), "accept", &unl[0]]);
    assert!(
        err.contains(unl[0].as_str()) && err.contains("no pseudo-label to accept"),
        "{err}"
    );
    assert_eq!(review_of(&status_json(&proj), &unl[0]), "pending");
    // pseudo-labels (low scores: the batch accept below leaves them) for the first four
    let first = dir.path().join("pl0");
    std::fs::create_dir_all(&first).unwrap();
    let mut csv = String::from("image,sam_iou,stability,agreement\n");
    for name in &unl[..4] {
        std::fs::copy(demo().join("masks").join(name), first.join(name)).unwrap();
        csv.push_str(&format!("{name},0.1,0.9,\n"));
    }
    std::fs::write(dir.path().join("scores0.csv"), csv).unwrap();
    ok(&[
        "project",
        "add-pseudo",
        s(&proj),
        "--masks",
        s(&first),
        "--round",
        "0",
        "--scores",
        s(&dir.path().join("scores0.csv")),
    ]);
    ok(&[
        "review",
        s(&proj),
        "accept",
        &unl[0],
        &unl[1],
        "--reviewer",
        "ana",
        "--note",
        "ok",
    ]);
    ok(&["review", s(&proj), "reject", &unl[2], "--reviewer", "bo"]);
    ok(&["review", s(&proj), "accept", &unl[3]]);
    ok(&["review", s(&proj), "pending", &unl[3]]);
    let st = status_json(&proj);
    assert_eq!(review_of(&st, &unl[0]), "accepted");
    assert_eq!(review_of(&st, &unl[2]), "rejected");
    assert_eq!(review_of(&st, &unl[3]), "pending");
    assert_eq!(st["review"]["accepted"], 2);
    let text = ok(&["project", "status", s(&proj)]);
    assert!(
        text.contains("accepted   2") && text.contains("unlabelled 9"),
        "{text}"
    );
    // unknown image: clear error, nothing changed
    let err = fails(&["review", s(&proj), "accept", &unl[4], "no_such.png"]);
    assert!(err.contains("no_such.png"), "{err}");
    assert_eq!(review_of(&status_json(&proj), &unl[4]), "pending");

    // pseudo-labels with scores, then batch accept by quality
    let masks = dir.path().join("pl");
    std::fs::create_dir_all(&masks).unwrap();
    let mut csv = String::from("image,sam_iou,stability,agreement\n");
    for (k, name) in unl[4..8].iter().enumerate() {
        let stem = name.trim_end_matches(".png");
        std::fs::copy(
            demo().join("masks").join(name),
            masks.join(format!("{stem}.png")),
        )
        .unwrap();
        csv.push_str(&format!("{name},{},0.9,\n", 0.6 + 0.1 * k as f64));
    }
    std::fs::write(dir.path().join("scores.csv"), csv).unwrap();
    ok(&[
        "project",
        "add-pseudo",
        s(&proj),
        "--masks",
        s(&masks),
        "--round",
        "0",
        "--scores",
        s(&dir.path().join("scores.csv")),
    ]);
    let out = ok(&[
        "review",
        s(&proj),
        "accept",
        "--min-score",
        "0.7",
        "--reviewer",
        "auto",
    ]);
    // quality 0.54, 0.63, 0.72, 0.81: two pass
    assert!(out.contains("accepted 2 pending images"), "{out}");
    let st = status_json(&proj);
    assert_eq!(review_of(&st, &unl[6]), "accepted");
    assert_eq!(review_of(&st, &unl[5]), "pending");

    let out_dir = dir.path().join("export");
    let out = ok(&[
        "project",
        "export",
        s(&proj),
        "--format",
        "png",
        "--out",
        s(&out_dir),
    ]);
    assert!(
        out.contains("15 ground-truth masks and 4 accepted pseudo-labels"),
        "{out}"
    );
    let manifest = std::fs::read_to_string(out_dir.join("manifest.csv")).unwrap();
    assert_eq!(manifest.lines().count(), 20);
    let coco = dir.path().join("coco");
    ok(&[
        "project",
        "export",
        s(&proj),
        "--format",
        "coco",
        "--out",
        s(&coco),
    ]);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(coco.join("annotations.json")).unwrap())
            .unwrap();
    assert_eq!(doc["images"].as_array().unwrap().len(), 19);
    let report = ok(&["project", "report", s(&proj)]);
    assert!(report.starts_with("time,image,action,state,reviewer,note"));
    assert!(
        report.contains(&format!("{},review,accepted,ana,ok", unl[0])),
        "{report}"
    );
    assert!(
        report.contains(&format!("{},auto_accept,accepted,auto,", unl[6])),
        "{report}"
    );
}

#[test]
fn cli_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, 3, 8, 8);
    std::fs::write(data.join("images/im1.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    let proj = dir.path().join("p");
    ok(&["project", "init", s(&proj)]);
    let err = fails(&["project", "import", s(&proj), "--data", s(&data)]);
    assert!(
        err.contains("im1.png") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(status_json(&proj)["total"], 0);
    // not a project
    let err = fails(&["project", "status", s(&data)]);
    assert!(err.contains("not a medmine project"), "{err}");
    // future schema
    let future = dir.path().join("future");
    std::fs::create_dir_all(&future).unwrap();
    medmine::store::schema::create_with_version(&future.join("medmine.db"), 99).unwrap();
    let err = fails(&["project", "status", s(&future)]);
    assert!(
        err.contains("medmine.db") && err.contains("version 99"),
        "{err}"
    );
    // a 0-byte database, and an SQLite file of another program: refused, never replaced
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("medmine.db"), b"").unwrap();
    let err = fails(&["project", "status", s(&empty)]);
    assert!(
        err.contains("medmine.db")
            && err.contains("0 bytes")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(empty.join("medmine.db")).unwrap().len(),
        0
    );
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    {
        let c = rusqlite::Connection::open(foreign.join("medmine.db")).unwrap();
        c.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');")
            .unwrap();
    }
    let before = std::fs::read(foreign.join("medmine.db")).unwrap();
    let err = fails(&["project", "status", s(&foreign)]);
    assert!(err.contains("without medmine's tables"), "{err}");
    assert_eq!(std::fs::read(foreign.join("medmine.db")).unwrap(), before);
}

#[test]
fn cli_vanished_image_and_relink() {
    let dir = tempfile::tempdir().unwrap();
    let proj = project(dir.path(), 4, 8);
    let data = dir.path().join("data");
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&data, &moved).unwrap();
    let err = fails(&["project", "verify", s(&proj)]);
    assert!(err.contains("im0.png") && err.contains("missing"), "{err}");
    let err = fails(&[
        "project",
        "export",
        s(&proj),
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert!(err.contains("im0.png") && err.contains("relink"), "{err}");
    let out = ok(&["project", "relink", s(&proj), "--data", s(&moved)]);
    assert!(out.contains("relinked 4"), "{out}");
    ok(&["project", "verify", s(&proj), "--hashes"]);
}

#[derive(Debug)]
struct Ack {
    n: usize,
    image: String,
    state: String,
}

/// Runs `stress-review`, kills it with SIGKILL after `kill_after` (if still running) and
/// returns the acknowledged actions.
fn stress(
    proj: &Path,
    count: usize,
    seed: u64,
    tag: &str,
    kill_after: Option<Duration>,
) -> (Vec<Ack>, bool) {
    let mut child = Command::new(BIN)
        .args([
            "project",
            "stress-review",
            s(proj),
            "--count",
            &count.to_string(),
        ])
        .args(["--seed", &seed.to_string(), "--tag", tag])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 4 && f[0] == "ack").then(|| Ack {
                    n: f[1].parse().unwrap(),
                    image: f[2].to_string(),
                    state: f[3].to_string(),
                })
            })
            .collect::<Vec<_>>()
    });
    if let Some(d) = kill_after {
        std::thread::sleep(d);
        let _ = child.kill(); // SIGKILL on Unix
    }
    let status = child.wait().unwrap();
    let acks = reader.join().unwrap();
    if kill_after.is_none() {
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "stress-review failed: {err}");
    }
    (acks, status.success())
}

/// Every acknowledged action is in the log with its state; the database is sound; every
/// referenced mask file exists and decodes.
fn check_project(proj: &Path, tag: &str, acks: &[Ack]) {
    let p = Project::open(proj).unwrap();
    assert_eq!(p.integrity_check().unwrap(), "ok");
    let log = p.review_log().unwrap();
    for a in acks {
        let note = format!("{tag}:{}", a.n);
        let e = log
            .iter()
            .find(|e| e.note.as_deref() == Some(note.as_str()))
            .unwrap_or_else(|| panic!("acknowledged action {a:?} ({note}) is lost"));
        assert_eq!(
            (e.image.as_str(), e.state.as_str()),
            (a.image.as_str(), a.state.as_str())
        );
    }
    for (name, file) in p.referenced_masks().unwrap() {
        let path = p.masks_dir().join(&file);
        data::load_mask(&path)
            .unwrap_or_else(|e| panic!("mask of {name} is missing or damaged: {e}"));
    }
    // the current state of each image is the state of its last logged action
    for rec in p.images().unwrap() {
        let last = log.iter().rev().find(|e| e.image == rec.name);
        let state = p.review(&rec.name).unwrap().state;
        assert_eq!(
            state,
            last.map_or(ReviewState::Pending, |e| e.state),
            "{}",
            rec.name
        );
    }
}

#[test]
fn kill_9_never_loses_an_acknowledged_action() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let proj = project(dir.path(), 6, 24);
    with_pseudo_labels(&proj);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut total = 0;
    let mut killed = 0;
    for it in 0..24u64 {
        let tag = format!("k{it}");
        let wait = Duration::from_millis(rng.gen_range(30..400));
        let (acks, finished) = stress(&proj, 100_000, it, &tag, Some(wait));
        killed += usize::from(!finished);
        total += acks.len();
        check_project(&proj, &tag, &acks);
    }
    assert!(killed >= 20, "only {killed} runs were killed mid-way");
    assert!(
        total > 50,
        "too few acknowledged actions ({total}) to test anything"
    );
    eprintln!("{total} acknowledged actions over {killed} killed runs");
}

#[test]
fn two_writers_at_once_do_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let proj = project(dir.path(), 6, 16);
    with_pseudo_labels(&proj);
    let logged = Project::open(&proj).unwrap().review_log().unwrap().len();
    let a = {
        let proj = proj.clone();
        std::thread::spawn(move || stress(&proj, 60, 1, "a", None))
    };
    let (acks_b, _) = stress(&proj, 60, 2, "b", None);
    let (acks_a, _) = a.join().unwrap();
    assert_eq!((acks_a.len(), acks_b.len()), (60, 60));
    check_project(&proj, "a", &acks_a);
    check_project(&proj, "b", &acks_b);
    let p = Project::open(&proj).unwrap();
    assert_eq!(p.review_log().unwrap().len(), logged + 120);
}

pub(crate) fn is_root() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: geteuid has no preconditions.
    return unsafe { libc::geteuid() } == 0;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

pub(crate) fn chmod_tree(root: &Path, dir_mode: u32, file_mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(root).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            chmod_tree(&p, dir_mode, file_mode);
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(file_mode)).unwrap();
        }
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(dir_mode)).unwrap();
}

#[test]
fn read_only_project_is_a_clear_error_and_loses_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let proj = project(dir.path(), 3, 8);
    with_pseudo_labels(&proj);
    ok(&["review", s(&proj), "accept", "im0.png"]);
    chmod_tree(&proj, 0o555, 0o444);
    // root ignores permission bits: run the command as `nobody` then
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let out = cmd
        .args(["review", s(&proj), "accept", "im1.png"])
        .output()
        .expect("run medmine (as nobody when root: needs setpriv)");
    chmod_tree(&proj, 0o755, 0o644);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "writing a read-only project must fail"
    );
    assert!(err.contains("read-only") && err.contains(s(&proj)), "{err}");
    let p = Project::open(&proj).unwrap();
    assert_eq!(p.integrity_check().unwrap(), "ok");
    assert_eq!(p.review("im0").unwrap().state, ReviewState::Accepted);
    assert_eq!(p.review("im1").unwrap().state, ReviewState::Pending);
}

/// Runs medmine under `ulimit -f BLOCKS` (512-byte blocks).
fn with_size_limit(blocks: u32, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f {blocks} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn full_disk_is_a_clear_error_and_the_database_stays_intact() {
    const SIZE: usize = 700;
    let dir = tempfile::tempdir().unwrap();
    let proj = project(dir.path(), 3, SIZE);
    with_pseudo_labels(&proj);
    ok(&["review", s(&proj), "accept", "im0.png"]);
    // A noisy mask compresses badly: its PNG (> 60 kB) cannot be written under a 36 kB
    // limit, while opening the project (the 32 kB WAL index) still works.
    let noise = Mask {
        width: SIZE,
        height: SIZE,
        data: (0..(SIZE * SIZE) as u32)
            .map(|i| u8::from(i.wrapping_mul(2654435761) >> 31 == 1))
            .collect(),
    };
    let mask_file = dir.path().join("noise.png");
    data::save_mask_png(&mask_file, &noise).unwrap();
    assert!(std::fs::metadata(&mask_file).unwrap().len() > 40_000);
    let edit = [
        "review",
        s(&proj),
        "edit",
        "im1.png",
        "--mask",
        s(&mask_file),
    ];
    let out = with_size_limit(72, &edit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "edit under a 36 kB limit must fail");
    assert!(
        err.contains("disk full or file size limit") && err.contains("/masks/"),
        "{err}"
    );
    // any write at all: the database cannot even set up its WAL index
    let out = with_size_limit(1, &["review", s(&proj), "reject", "im2.png"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "reject under a 512-byte limit must fail"
    );
    assert!(
        err.contains("medmine.db") && err.contains("file size limit"),
        "{err}"
    );

    let p = Project::open(&proj).unwrap();
    assert_eq!(p.integrity_check().unwrap(), "ok");
    assert_eq!(p.review("im0").unwrap().state, ReviewState::Accepted);
    assert_eq!(p.review("im1").unwrap().state, ReviewState::Pending);
    assert_eq!(p.review("im2").unwrap().state, ReviewState::Pending);
    assert!(p.mask_history("im1").unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(p.masks_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    drop(p);
    // with room again, the same actions work
    ok(&edit);
    ok(&["review", s(&proj), "reject", "im2.png"]);
    let st = status_json(&proj);
    assert_eq!(review_of(&st, "im1.png"), "edited");
    assert_eq!(review_of(&st, "im2.png"), "rejected");
}

#[test]
fn cli_score_caches_dice_and_uncertainty_most_uncertain_first() {
    use medmine::store::ScoreSource;
    let tmp = tempfile::tempdir().unwrap();
    let proj = project(tmp.path(), 3, 24);
    let ckpt = medmine::train::checkpoint::fresh_checkpoint(
        &tmp.path().join("init"),
        2,
        32,
        1,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let out = ok(&["project", "score", s(&proj), "--model", s(&ckpt)]);
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    let u: Vec<f64> = lines.iter().map(|l| l[1].parse().unwrap()).collect();
    assert!(u.windows(2).all(|w| w[0] >= w[1]), "{out}");
    // every image has ground truth here: a Dice per line, and the store keeps them all
    let scores = Project::open(&proj)
        .unwrap()
        .scores(ScoreSource::Unet)
        .unwrap();
    for l in &lines {
        let stored = &scores[l[0]];
        let dice: f64 = l[2].parse().unwrap();
        assert!(
            (stored.dice.unwrap() - dice).abs() < 1e-4,
            "{l:?} {stored:?}"
        );
        assert!((stored.uncertainty.unwrap() - l[1].parse::<f64>().unwrap()).abs() < 1e-4);
        assert_eq!(stored.reference, ckpt.display().to_string());
    }
}
