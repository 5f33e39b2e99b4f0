//! The bad-input corpus (issue 20): one case per kind of bad input, each through the `medmine`
//! binary. Every case asserts the exit code, that stderr names the file and the problem, and
//! that nothing already saved changed (a before/after snapshot of the folder at stake: file
//! names and bytes). Kept fast: tiny images made here, the tiny SAM fixture, a fresh U-Net++.
//! More cases of the same kinds live beside the code they test (`cli`, `store_cli`,
//! `sam_parity`, the checkpoint unit tests).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{ok, s, BIN};
use medmine::data;

/// Every file under `root` (relative name -> bytes); folders are implied by their files.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                // a file this user may not read: its size and time stand for its bytes
                let bytes = std::fs::read(&p).unwrap_or_else(|_| {
                    let m = std::fs::metadata(&p).unwrap();
                    format!("unreadable, {} bytes, {:?}", m.len(), m.modified().unwrap())
                        .into_bytes()
                });
                out.insert(rel, bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Runs medmine (as `nobody` when `as_nobody`), expects exit code 1 and returns stderr.
fn refused(args: &[&str], as_nobody: bool) -> String {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let out: Output = cmd.args(args).output().expect("run medmine");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "medmine {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Asserts that stderr names every one of `want`.
fn says(err: &str, want: &[&str]) {
    for w in want {
        assert!(err.contains(w), "stderr does not say {w:?}:\n{err}");
    }
}

fn is_root() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: geteuid has no preconditions.
    return unsafe { libc::geteuid() } == 0;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

fn sam_fixture() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sam"))
}

/// A copy of the safetensors file `from` at `to` with a NaN and an infinity written into the
/// tensor `name`; returns that name.
fn poison(from: &Path, to: &Path, pick: impl Fn(&str) -> bool) -> String {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let bad = names
        .iter()
        .find(|n| pick(n) && st.tensor(n).unwrap().dtype() == safetensors::Dtype::F32)
        .expect("a tensor to poison")
        .clone();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for n in &names {
        let t = st.tensor(n).unwrap();
        let mut data = t.data().to_vec();
        if *n == bad {
            data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            if data.len() >= 8 {
                data[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }
        }
        owned.push((n.clone(), t.dtype(), t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, sh, data)| (n.clone(), TensorView::new(*d, sh.clone(), data).unwrap()))
        .collect();
    std::fs::write(to, safetensors::serialize(views, None).unwrap()).unwrap();
    bad
}

/// `n` tiny grey images (no masks) in `dir/images`.
fn tiny_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for i in 0..n {
        let px: Vec<u8> = (0..16 * 16)
            .map(|p| ((p * 7 + i * 31) % 256) as u8)
            .collect();
        data::save_gray_png(&dir.join(format!("images/im{i}.png")), 16, 16, &px).unwrap();
    }
}

#[test]
fn accept_without_a_pseudo_label_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_images(&data, 3);
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    ok(&["project", "import", s(&proj), "--data", s(&data)]);
    let before = snapshot(&proj);
    let err = refused(&["review", s(&proj), "accept", "im1.png"], false);
    says(
        &err,
        &["im1.png", "no pseudo-label to accept", "mine", "edit"],
    );
    assert_eq!(
        snapshot(&proj),
        before,
        "a refused accept changed the project"
    );
}

#[test]
fn sam_checkpoint_with_nan_weights_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = sam_fixture();
    let ckpt = tmp.path().join("sam_nan.safetensors");
    let bad = poison(&fx.join("sam_tiny.safetensors"), &ckpt, |n| {
        n.starts_with("mask_decoder.")
    });
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("earlier.png"), b"an earlier result").unwrap();
    let before = snapshot(&out);
    let err = refused(
        &[
            "segment",
            "--sam",
            s(&ckpt),
            "--image",
            s(&fx.join("image.png")),
            "--box",
            "30,25,110,100",
            "--out",
            s(&out.join("new.png")),
        ],
        false,
    );
    says(&err, &["sam_nan.safetensors", &bad, "NaN or infinite"]);
    assert_eq!(snapshot(&out), before);
    // the library says the same, with the count
    let e = medmine::models::sam::load_sam(&ckpt, None, &candle_core::Device::Cpu)
        .err()
        .expect("NaN weights were loaded")
        .to_string();
    assert!(e.contains(&bad) && e.contains("2 NaN or infinite"), "{e}");
}

/// A fresh U-Net++ checkpoint (base 2, 32 px) in `dir/init`.
fn fresh_unet(dir: &Path) -> PathBuf {
    medmine::train::checkpoint::fresh_checkpoint(
        &dir.join("init"),
        2,
        32,
        1,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// A fresh U-Net++ checkpoint (base 2, 32 px) in `dir/init`, and a copy with every weight
/// poisoned (`init/nan.safetensors`, with its `.json`) and what `poison` returns.
fn nan_unet(dir: &Path) -> (PathBuf, PathBuf, String) {
    let fresh = fresh_unet(dir);
    let ckpt = dir.join("init").join("nan.safetensors");
    let bad = poison(&fresh, &ckpt, |_| true);
    std::fs::copy(fresh.with_extension("json"), ckpt.with_extension("json")).unwrap();
    (fresh, ckpt, bad)
}

#[test]
fn unet_checkpoint_with_nan_weights_is_refused_by_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, ckpt, bad) = nan_unet(tmp.path());
    let data = tmp.path().join("data");
    tiny_images(&data, 2);
    let before = snapshot(tmp.path());
    let err = refused(
        &[
            "predict",
            "--checkpoint",
            s(&ckpt),
            "--images",
            s(&data.join("images")),
            "--out",
            s(&tmp.path().join("pred")),
        ],
        false,
    );
    says(&err, &["nan.safetensors", &bad, "NaN or infinite"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn unreadable_checkpoints_say_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // root ignores permission bits: the commands run as `nobody` then, who must reach the files
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = is_root();
    let fresh = fresh_unet(tmp.path());
    let data = tmp.path().join("data");
    tiny_images(&data, 2);
    let sam = tmp.path().join("sam.safetensors");
    std::fs::copy(sam_fixture().join("sam_tiny.safetensors"), &sam).unwrap();
    let image = tmp.path().join("image.png");
    std::fs::copy(sam_fixture().join("image.png"), &image).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    for p in [&out, &data, &data.join("images"), &tmp.path().join("init")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    for p in [&fresh, &sam] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    for p in [&fresh.with_extension("json"), &image] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let before = snapshot(tmp.path());
    let err = refused(
        &[
            "predict",
            "--checkpoint",
            s(&fresh),
            "--images",
            s(&data.join("images")),
            "--out",
            s(&out.join("pred")),
        ],
        root,
    );
    says(&err, &["init.safetensors", "Permission denied"]);
    assert!(!err.contains("damaged"), "{err}");
    let err = refused(
        &[
            "segment",
            "--sam",
            s(&sam),
            "--image",
            s(&image),
            "--box",
            "30,25,110,100",
            "--out",
            s(&out.join("m.png")),
        ],
        root,
    );
    says(&err, &["sam.safetensors", "Permission denied"]);
    assert!(!err.contains("complete download"), "{err}");
    assert_eq!(snapshot(tmp.path()), before);

    // a project database the user may not read
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    std::fs::set_permissions(&proj, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        proj.join("medmine.db"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let before = snapshot(&proj);
    let err = refused(&["project", "status", s(&proj)], root);
    says(&err, &["medmine.db", "Permission denied"]);
    assert!(!err.contains("not a medmine"), "{err}");
    assert_eq!(snapshot(&proj), before);
}

#[test]
fn an_existing_run_is_never_trained_over() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    for f in [
        "best.safetensors",
        "best.json",
        "metrics.jsonl",
        "last.json",
    ] {
        std::fs::write(run.join(f), format!("earlier {f}")).unwrap();
    }
    let before = snapshot(&run);
    let demo = crate::common::demo();
    let err = refused(
        &[
            "train",
            "--data",
            s(&demo),
            "--size",
            "32",
            "--base",
            "2",
            "--epochs",
            "1",
            "--out",
            s(&run),
        ],
        false,
    );
    says(&err, &[s(&run), "already holds a training run", "--resume"]);
    assert_eq!(snapshot(&run), before);
}

#[test]
fn an_empty_project_database_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let proj = tmp.path().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("medmine.db"), b"").unwrap();
    let before = snapshot(&proj);
    let err = refused(&["project", "status", s(&proj)], false);
    says(&err, &["medmine.db", "0 bytes", "nothing was changed"]);
    assert_eq!(snapshot(&proj), before);
}

#[test]
fn a_truncated_jpeg_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let jpg = tmp.path().join("cut.jpg");
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    std::fs::write(&jpg, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = tmp.path().join("m.png");
    let before = snapshot(tmp.path());
    let err = refused(
        &[
            "segment",
            "--sam",
            s(&sam_fixture().join("sam_tiny.safetensors")),
            "--image",
            s(&jpg),
            "--box",
            "5,5,40,40",
            "--out",
            s(&out),
        ],
        false,
    );
    says(&err, &["cut.jpg", "truncated"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn import_names_each_suspicious_mask_in_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_images(&data, 4);
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let (w, h) = (16, 16);
    let masks: [(&str, Vec<u8>); 4] = [
        // a clean 0/255 mask and a clean 0/1 mask: no warning
        (
            "im0",
            (0..w * h)
                .map(|p| if p % w < 8 { 255 } else { 0 })
                .collect(),
        ),
        ("im1", (0..w * h).map(|p| u8::from(p % w < 8)).collect()),
        // one grey value everywhere: the whole mask becomes foreground
        ("im2", vec![200; w * h]),
        // an image given as a mask
        ("im3", (0..w * h).map(|p| (p * 7 % 256) as u8).collect()),
    ];
    for (stem, px) in &masks {
        data::save_gray_png(&data.join(format!("masks/{stem}.png")), w, h, px).unwrap();
    }
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    let out = ok(&["project", "import", s(&proj), "--data", s(&data)]);
    assert!(out.contains("imported 4 images"), "{out}");
    assert!(
        out.contains("2 mask files imported but worth a look"),
        "{out}"
    );
    let warning = |stem: &str| {
        out.lines()
            .find(|l| l.contains("warning:") && l.contains(&format!("{stem}.png")))
            .map(str::to_string)
    };
    assert!(
        warning("im0").is_none() && warning("im1").is_none(),
        "{out}"
    );
    let im2 = warning("im2").expect("no warning for the one-value mask");
    assert!(
        im2.contains("every pixel is 200") && im2.contains("foreground"),
        "{im2}"
    );
    let im3 = warning("im3").expect("no warning for an image given as a mask");
    assert!(im3.contains("grey levels"), "{im3}");
    // the demo's masks are clean
    let demo = tmp.path().join("demo");
    ok(&["project", "init", s(&demo)]);
    let out = ok(&[
        "project",
        "import",
        s(&demo),
        "--data",
        s(&crate::common::demo()),
    ]);
    assert!(!out.contains("warning"), "{out}");
}

/// The kinds fixed earlier in issue 20, one case each through the binary: each refused with
/// exit code 1, a message naming the file (or option) and the problem, and the folder at
/// stake unchanged.
#[test]
fn earlier_kinds_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = sam_fixture();
    let demo = crate::common::demo();
    let unet = fresh_unet(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("earlier.png"), b"an earlier result").unwrap();
    // two inputs whose masks would have one name
    let imgs = tmp.path().join("imgs");
    tiny_images(&imgs, 1);
    let im0 = imgs.join("images/im0.png");
    std::fs::copy(&im0, imgs.join("images/im0.jpg")).unwrap();
    // a SAM checkpoint given where a U-Net++ one is needed
    let sam_copy = tmp.path().join("sam_tiny.safetensors");
    std::fs::copy(fx.join("sam_tiny.safetensors"), &sam_copy).unwrap();
    // an image over the pixel limit (6400 x 6400 = 41 megapixels)
    let huge = tmp.path().join("huge.png");
    data::save_gray_png(&huge, 6400, 6400, &vec![0; 6400 * 6400]).unwrap();
    let (sam, image) = (fx.join("sam_tiny.safetensors"), fx.join("image.png"));
    let seg = |img: &Path, out_file: &str, prompt: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["segment", "--sam", s(&sam), "--image", s(img), "--out"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.push(s(&out.join(out_file)).to_string());
        v.extend(prompt.iter().map(|x| x.to_string()));
        v
    };
    let predict = |ckpt: &Path, images: &Path| -> Vec<String> {
        [
            "predict",
            "--checkpoint",
            s(ckpt),
            "--images",
            s(images),
            "--out",
            s(&out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let train = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--data",
            s(&demo),
            "--epochs",
            "1",
            "--out",
            s(&out.join("run")),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let train_list = demo.join("train.txt");
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "colliding output names",
            predict(&unet, &imgs.join("images")),
            vec!["im0.png", "im0.jpg", "would both be written"],
        ),
        (
            "a SAM checkpoint as the U-Net++",
            predict(&sam_copy, &imgs.join("images")),
            vec!["sam_tiny.safetensors", "this is a SAM checkpoint"],
        ),
        (
            "overlapping training and validation lists",
            train(&["--train-list", s(&train_list), "--val-list", s(&train_list)]),
            vec!["also in the training list"],
        ),
        (
            "a size that would abort on allocation",
            train(&["--size", "1048576"]),
            vec!["--size 1048576", "must be a multiple of 16"],
        ),
        (
            "a lossy mask file",
            seg(&image, "mask.jpg", &["--box", "10,10,60,60"]),
            vec!["mask.jpg", "give a .png file name"],
        ),
        (
            "a box outside the image",
            seg(&image, "m.png", &["--box", "10,10,400,60"]),
            vec!["lies outside the 160x136 image"],
        ),
        (
            "an image over the pixel limit",
            seg(&huge, "m.png", &["--box", "10,10,60,60"]),
            vec!["huge.png", "megapixels"],
        ),
        (
            "a missing weights folder",
            ["weights", "verify", "--dir", s(&tmp.path().join("nowhere"))]
                .iter()
                .map(|x| x.to_string())
                .collect(),
            vec!["nowhere", "no such folder"],
        ),
    ];
    for (what, args, want) in cases {
        let before = snapshot(&out);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = refused(&refs, false);
        for w in want {
            assert!(err.contains(w), "{what}: stderr does not say {w:?}:\n{err}");
        }
        assert_eq!(snapshot(&out), before, "{what}: the output folder changed");
    }
}

#[test]
fn mine_with_nan_weights_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_images(&data, 3);
    let proj = tmp.path().join("proj");
    ok(&["project", "init", s(&proj)]);
    ok(&["project", "import", s(&proj), "--data", s(&data)]);
    let (unet, nan_unet, bad_unet) = nan_unet(tmp.path());
    let nan_sam = tmp.path().join("sam_nan.safetensors");
    let bad_sam = poison(&sam_fixture().join("sam_tiny.safetensors"), &nan_sam, |n| {
        n.starts_with("image_encoder.")
    });
    let mine = |sam: &Path, checkpoint: &Path| {
        refused(
            &[
                "mine",
                s(&proj),
                "--device",
                "cpu",
                "--sam",
                s(sam),
                "--checkpoint",
                s(checkpoint),
            ],
            false,
        )
    };
    // Both refused at load. Before the loads, mine refreshes its caches (the checkpoint hash
    // cache in `cache/`), so the check here is the saved work: no pseudo-label, review or log
    // entry is written.
    let unchanged = || {
        let p = medmine::store::Project::open(&proj).unwrap();
        assert!(p.review_log().unwrap().is_empty());
        for rec in p.images().unwrap() {
            assert!(
                p.pseudo_labels(&rec.name).unwrap().is_empty(),
                "{}",
                rec.name
            );
            assert_eq!(
                p.review(&rec.name).unwrap().state,
                medmine::store::ReviewState::Pending
            );
        }
    };
    let err = mine(&sam_fixture().join("sam_tiny.safetensors"), &nan_unet);
    says(&err, &["nan.safetensors", &bad_unet, "NaN or infinite"]);
    unchanged();
    let err = mine(&nan_sam, &unet);
    says(&err, &["sam_nan.safetensors", &bad_sam, "NaN or infinite"]);
    unchanged();
}
