//! Nothing a person decided is ever changed by the machine, at the process level: a `medmine
//! mine --auto-accept 0` pass (tiny SAM fixture, a quickly trained U-Net++), or a `review
//! accept --min-score` batch, runs while several `project stress-review` processes accept,
//! reject and edit random unlabelled images; in some interleavings either side is killed with
//! SIGKILL at a random moment. Afterwards: the database is sound, every acknowledged human
//! action is in the log, no machine entry of an image comes after a person's entry of that
//! image, and every image's state is the state of its last human entry.
use crate::common::{ok, root, s, BIN};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use medmine::data::{self, Mask};
use medmine::store::{NewPseudoLabel, Project, Prompts, ReviewEvent, ReviewState, Role};

/// A running process whose stdout lines are collected by a thread (and, optionally, sent
/// one by one on a channel as they arrive).
struct Running {
    child: Child,
    lines: JoinHandle<Vec<String>>,
}

fn spawn(args: &[&str], live: Option<mpsc::Sender<String>>) -> Running {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run medmine");
    let stdout = child.stdout.take().expect("piped stdout");
    let lines = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(tx) = &live {
                let _ = tx.send(line.clone());
            }
            all.push(line);
        }
        all
    });
    Running { child, lines }
}

impl Running {
    /// Waits for the end; returns (finished normally, stdout lines).
    fn finish(mut self) -> (bool, Vec<String>) {
        let status = self.child.wait().expect("wait");
        (status.success(), self.lines.join().expect("reader"))
    }
}

/// An acknowledged human action: note `TAG:N`, image, state.
#[derive(Debug)]
struct Ack {
    note: String,
    image: String,
    state: ReviewState,
}

fn acks(tag: &str, lines: &[String]) -> Vec<Ack> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[0] == "ack").then(|| Ack {
                note: format!("{tag}:{}", f[1]),
                image: f[2].to_string(),
                state: f[3].parse().expect("ack state"),
            })
        })
        .collect()
}

/// A reviewer process doing `count` actions on unlabelled images.
fn reviewer(
    proj: &Path,
    tag: &str,
    seed: u64,
    actions: &str,
    pause_ms: u64,
    count: usize,
) -> Running {
    spawn(
        &[
            "project",
            "stress-review",
            s(proj),
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
            "--tag",
            tag,
            "--role",
            "unlabelled",
            "--actions",
            actions,
            "--max-pause-ms",
            &pause_ms.to_string(),
        ],
        None,
    )
}

/// A machine's entry: by action, or (for entries written before machine actions had their own
/// names) by a `medmine …` reviewer.
fn is_machine(e: &ReviewEvent) -> bool {
    e.is_machine()
        || e.reviewer
            .as_deref()
            .is_some_and(|r| r.starts_with("medmine"))
}

/// What one interleaving left, checked; returns (machine entries, human entries, images with
/// a human entry after a machine entry: the two sides overlapped on them).
fn check(proj: &Path, acked: &[Ack], what: &str) -> (usize, usize, usize) {
    let p = Project::open(proj).unwrap();
    assert_eq!(p.integrity_check().unwrap(), "ok", "{what}");
    let problems = p.verify(false).unwrap();
    assert!(problems.is_empty(), "{what}: {problems:?}");
    let log = p.review_log().unwrap();
    for a in acked {
        let e = log
            .iter()
            .find(|e| e.note.as_deref() == Some(a.note.as_str()))
            .unwrap_or_else(|| panic!("{what}: acknowledged action {a:?} is lost"));
        assert_eq!((e.image.as_str(), e.state), (a.image.as_str(), a.state));
        assert!(!is_machine(e), "{what}: {e:?}");
    }
    let mut by_image: HashMap<&str, Vec<&ReviewEvent>> = HashMap::new();
    for e in &log {
        by_image.entry(e.image.as_str()).or_default().push(e);
    }
    let (mut machine, mut human, mut overlapped) = (0, 0, 0);
    for rec in p.images().unwrap() {
        let events = by_image.remove(rec.name.as_str()).unwrap_or_default();
        let state = p.review(&rec.name).unwrap().state;
        let first_human = events.iter().position(|e| !is_machine(e));
        if let Some(first) = first_human {
            if let Some(late) = events[first..].iter().find(|e| is_machine(e)) {
                panic!(
                    "{what}: {}: the machine wrote after a person: {late:?}\nlog of the image: {events:#?}",
                    rec.name
                );
            }
            let last_human = events.iter().rev().find(|e| !is_machine(e)).unwrap();
            assert_eq!(
                state, last_human.state,
                "{what}: {}: state is not the last person's decision",
                rec.name
            );
            overlapped += usize::from(first > 0);
        } else {
            let last = events.last().map_or(ReviewState::Pending, |e| e.state);
            assert_eq!(state, last, "{what}: {}", rec.name);
        }
        machine += events.iter().filter(|e| is_machine(e)).count();
        human += events.iter().filter(|e| !is_machine(e)).count();
    }
    (machine, human, overlapped)
}

/// A U-Net++ trained for one epoch on the demo (its predictions mean little; a threshold of 0
/// makes every image one component, so every image is mined).
fn quick_unet(dir: &Path) -> PathBuf {
    let demo = root().join("assets/demo");
    let run = dir.join("run");
    ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        s(&demo),
        "--train-list",
        s(&demo.join("train.txt")),
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
    ]);
    run.join("best.safetensors")
}

/// The demo's 24 images, all but one unlabelled.
fn demo_project(dir: &Path) -> PathBuf {
    let proj = dir.join("template");
    ok(&["project", "init", s(&proj)]);
    let demo = root().join("assets/demo");
    ok(&[
        "project",
        "import",
        s(&proj),
        "--data",
        s(&demo),
        "--labelled-fraction",
        "0.01",
    ]);
    proj
}

fn mine_args<'a>(proj: &'a Path, unet: &'a Path, sam: &'a Path) -> Vec<&'a str> {
    vec![
        "mine",
        s(proj),
        "--device",
        "cpu",
        "--sam",
        s(sam),
        "--checkpoint",
        s(unet),
        "--rounds",
        "3",
        "--stop-iou",
        "1.0",
        "--threshold",
        "0",
        "--min-area",
        "1",
        "--auto-accept",
        "0",
    ]
}

fn summary_field(lines: &[String], name: &str) -> Option<usize> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// What the people did during one mining pass.
#[derive(Default)]
struct People {
    acked: Vec<Ack>,
    spawned: usize,
}

/// At most this many reviewers per pass (so that most images are still the machine's to mine).
const MAX_REVIEWERS: usize = 8;

/// While the pass runs, keeps up to three reviewers at work (at most [`MAX_REVIEWERS`]), each a new process doing one to
/// three actions at a person's pace on random unlabelled images; with `kill_one`, one more
/// reviewer that is killed with SIGKILL at a random moment (at the latest when the pass
/// ends). The pass itself is killed at `kill_mine_at`, if given. Returns when the pass ended.
fn review_while_mining(
    proj: &Path,
    mine: &mut Running,
    it: u64,
    rng: &mut rand_chacha::ChaCha8Rng,
    kill_one: bool,
    kill_mine_at: Option<Instant>,
) -> People {
    let actions = "accept,reject,edit,pending";
    let mut people = People::default();
    let mut busy: Vec<(String, Running)> = Vec::new();
    let mut doomed = kill_one.then(|| {
        let tag = format!("m{it}x");
        let r = reviewer(proj, &tag, it * 100 + 99, actions, 400, 1000);
        let at = Instant::now() + Duration::from_millis(rng.gen_range(200..3000));
        (tag, r, at)
    });
    let mut next = Instant::now();
    while mine.child.try_wait().expect("try_wait").is_none() {
        if kill_mine_at.is_some_and(|at| Instant::now() >= at) {
            let _ = mine.child.kill(); // SIGKILL
        }
        if let Some((tag, mut r, at)) = doomed.take() {
            if Instant::now() >= at {
                let _ = r.child.kill();
                people.acked.extend(acks(&tag, &r.finish().1));
            } else {
                doomed = Some((tag, r, at));
            }
        }
        let mut still = Vec::new();
        for (tag, mut r) in busy {
            if r.child.try_wait().expect("try_wait").is_some() {
                people.acked.extend(acks(&tag, &r.finish().1));
            } else {
                still.push((tag, r));
            }
        }
        busy = still;
        if Instant::now() >= next && busy.len() < 3 && people.spawned < MAX_REVIEWERS {
            let tag = format!("m{it}r{}", people.spawned);
            let seed = it * 100 + people.spawned as u64;
            let count = rng.gen_range(1..=3);
            let r = reviewer(proj, &tag, seed, actions, 300, count);
            busy.push((tag, r));
            people.spawned += 1;
            next = Instant::now() + Duration::from_millis(rng.gen_range(200..1500));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((tag, mut r, _)) = doomed {
        let _ = r.child.kill();
        people.acked.extend(acks(&tag, &r.finish().1));
    }
    for (tag, r) in busy {
        people.acked.extend(acks(&tag, &r.finish().1));
    }
    people
}

#[test]
fn mining_never_overwrites_a_reviewer() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = quick_unet(tmp.path());
    let template = demo_project(tmp.path());
    let sam = root().join("tests/fixtures/sam/sam_tiny.pth");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let (mut skipped, mut machine, mut overlapped, mut kills) = (0, 0, 0, 0);
    let mut accepted = 0;
    let mut pass_time = Duration::from_secs(5);
    for it in 0..5u64 {
        let proj = tmp.path().join(format!("p{it}"));
        crate::common::copy_dir(&template, &proj);
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let mut mine = spawn(&mine_args(&proj, &unet, &sam), Some(tx));
        let selected = loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(l) if l.starts_with("selected ") => break l,
                Ok(_) => continue,
                Err(e) => panic!("interleaving {it}: no `selected N images` line: {e}"),
            }
        };
        assert_eq!(selected, "selected 23 images", "interleaving {it}");
        let selected_at = Instant::now();
        // kill -9 the pass at a random moment (it 2, 4), or a reviewer (it 1, 3)
        let kill_mine_at =
            (it == 2 || it == 4).then(|| selected_at + pass_time.mul_f64(rng.gen_range(0.1..0.7)));
        let people = review_while_mining(&proj, &mut mine, it, &mut rng, it % 2 == 1, kill_mine_at);
        let (mine_ok, mine_out) = mine.finish();
        if it == 1 {
            // a pass with the SAM embeddings cached, as the later ones
            pass_time = selected_at.elapsed();
        }
        kills += usize::from(!mine_ok) + usize::from(it % 2 == 1);
        if mine_ok {
            skipped += summary_field(&mine_out, "skipped: reviewed meanwhile")
                .unwrap_or_else(|| panic!("no skipped count in {mine_out:#?}"));
            accepted += summary_field(&mine_out, "auto-accepted").unwrap_or(0);
        }
        let what = format!("interleaving {it}");
        let (m, h, o) = check(&proj, &people.acked, &what);
        eprintln!(
            "{what}: {:.1} s, mine finished {mine_ok}, {} reviewers, {} acked, {m} machine / \
             {h} human entries, {o} images reviewed after the machine wrote",
            started.elapsed().as_secs_f64(),
            people.spawned,
            people.acked.len()
        );
        machine += m;
        overlapped += o;
        if it == 0 {
            // later passes find the SAM embeddings cached, as a second pass would
            crate::common::copy_dir(&proj.join("cache"), &template.join("cache"));
        }
        std::fs::remove_dir_all(&proj).unwrap();
    }
    assert!(kills >= 3, "{kills} kills");
    assert!(machine > 0, "the machine wrote nothing: nothing was tested");
    assert!(accepted > 0, "nothing was auto-accepted");
    assert!(overlapped > 0, "mining and reviewing never overlapped");
    assert!(
        skipped > 0,
        "no image was reviewed while being mined: the race was not exercised"
    );
}

/// 120 tiny unlabelled images, each with a pseudo-label; every other one scores 0.9, the
/// others 0.3.
fn scored_project(dir: &Path) -> PathBuf {
    let (w, h) = (8, 8);
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    for i in 0..120 {
        let px: Vec<u8> = (0..w * h).map(|p| ((p * 5 + i * 29) % 256) as u8).collect();
        data::save_gray_png(&data.join(format!("images/im{i:03}.png")), w, h, &px).unwrap();
    }
    let proj = dir.join("template");
    ok(&["project", "init", s(&proj)]);
    ok(&["project", "import", s(&proj), "--data", s(&data)]);
    let mut p = Project::open(&proj).unwrap();
    for (i, rec) in p.images().unwrap().into_iter().enumerate() {
        assert_eq!(rec.role, Role::Unlabelled);
        let label = NewPseudoLabel {
            round: 0,
            mask: Mask {
                width: w,
                height: h,
                data: (0..w * h).map(|p| u8::from((p + i) % 3 == 0)).collect(),
            },
            prompts: Prompts::default(),
            sam_iou: Some(if i % 2 == 0 { 0.9 } else { 0.3 }),
            stability: None,
            agreement: None,
            unet_components: None,
            label_components: None,
            sam_checkpoint: None,
            unet_checkpoint: None,
            unet_hash: None,
            labeler: Some("test".into()),
        };
        p.add_pseudo_label(&rec.name, &label).unwrap();
    }
    proj
}

/// Whether people acted both before and after the batch's acceptances (so it ran while they
/// reviewed).
fn straddles(proj: &Path) -> bool {
    let log = Project::open(proj).unwrap().review_log().unwrap();
    let batch: Vec<i64> = log
        .iter()
        .filter(|e| e.action != "pseudo_label" && is_machine(e))
        .map(|e| e.id)
        .collect();
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return false;
    };
    let human = || log.iter().filter(|e| !is_machine(e)).map(|e| e.id);
    human().any(|id| id < *first) && human().any(|id| id > *last)
}

#[test]
fn batch_accept_never_overwrites_a_reviewer() {
    let tmp = tempfile::tempdir().unwrap();
    let template = scored_project(tmp.path());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let (mut accepted, mut overlapped) = (0, 0);
    for it in 0..6u64 {
        let proj = tmp.path().join(format!("b{it}"));
        crate::common::copy_dir(&template, &proj);
        // A person leaving an image pending is no decision: the batch may accept it after.
        let actions = "accept,reject,edit";
        let reviewers: Vec<(String, Running)> = (0..2)
            .map(|k| {
                let tag = format!("b{it}r{k}");
                (
                    tag.clone(),
                    reviewer(&proj, &tag, it * 10 + k, actions, 0, 150),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        let mut batch = spawn(
            &[
                "review",
                s(&proj),
                "accept",
                "--min-score",
                "0.5",
                "--reviewer",
                "medmine-batch",
            ],
            None,
        );
        let mut reviewers = reviewers;
        match it % 3 {
            1 => {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
                let _ = batch.child.kill();
            }
            2 => {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
                let _ = reviewers[1].1.child.kill();
            }
            _ => {}
        }
        let (batch_ok, batch_out) = batch.finish();
        let mut acked = Vec::new();
        for (tag, r) in reviewers.drain(..) {
            let (_, lines) = r.finish();
            acked.extend(acks(&tag, &lines));
        }
        let what = format!("batch interleaving {it}");
        let (m, h, _) = check(&proj, &acked, &what);
        let o = usize::from(straddles(&proj));
        eprintln!(
            "{what}: batch finished {batch_ok}, {} acked, {m} machine entries \
             (120 pseudo-labels), {h} human, human entries before and after the batch: {o}",
            acked.len()
        );
        if batch_ok {
            let line = batch_out
                .iter()
                .find(|l| l.starts_with("accepted "))
                .unwrap_or_else(|| panic!("{what}: {batch_out:#?}"));
            let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert_eq!(m, 120 + n, "{what}: {line}");
            accepted += n;
        }
        overlapped += o;
        std::fs::remove_dir_all(&proj).unwrap();
    }
    assert!(accepted > 0, "the batch never accepted anything");
    assert!(
        overlapped > 0,
        "the batch and the reviewers never overlapped"
    );
}
