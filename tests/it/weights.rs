//! `medmine weights list|verify|download` against a small HTTP server on 127.0.0.1 (no outside
//! network): download + SHA-256, resume with `Range:`, a server that ignores `Range`, a dropped
//! connection, a corrupt file, and the verify / list outputs.
use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::common::s;
use medmine::weights::{self, Download, DownloadEvent, Recorder, WeightsError};

/// How the test server answers.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    /// `Range: bytes=N-` gives 206 (or 416 past the end), otherwise 200.
    Normal,
    /// Always 200 with the whole file.
    IgnoreRange,
    /// As `Normal`, but the connection closes after this many body bytes.
    DropAfter(usize),
    /// As `Normal`, with one byte of the file changed.
    Corrupt,
    /// As `Normal`, the body in `chunk`-byte pieces with a pause of `pause_ms` after each
    /// (a slow network: the app's cancel test).
    Slow { chunk: usize, pause_ms: u64 },
}

pub(crate) struct Server {
    base: String,
    /// The `Range` header of every request (None: no Range), in order.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

impl Server {
    pub(crate) fn url(&self, file: &str) -> String {
        format!("{}/{file}", self.base)
    }

    pub(crate) fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }
}

/// Serves `body` under every path on an ephemeral port of 127.0.0.1 (one thread, one request
/// per connection).
pub(crate) fn serve(body: Vec<u8>, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let log = ranges.clone();
    let mut body = body;
    if let Mode::Corrupt = mode {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = answer(stream, &body, mode, &log);
        }
    });
    Server { base, ranges }
}

fn answer(
    mut stream: TcpStream,
    body: &[u8],
    mode: Mode,
    log: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(range.clone());
    let len = body.len();
    let start = match (mode, &range) {
        (Mode::IgnoreRange, _) | (_, None) => None,
        (_, Some(r)) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let head = match start {
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
        Some(n) if n >= len => {
            let h = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return stream.write_all(h.as_bytes());
        }
        Some(n) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{len}\r\nContent-Length: {}\r\n",
            len - 1,
            len - n
        ),
    };
    stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())?;
    let rest = &body[start.unwrap_or(0)..];
    let rest = match mode {
        Mode::DropAfter(k) => &rest[..k.min(rest.len())],
        _ => rest,
    };
    if let Mode::Slow { chunk, pause_ms } = mode {
        for piece in rest.chunks(chunk.max(1)) {
            stream.write_all(piece)?;
            stream.flush()?;
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
        return Ok(());
    }
    stream.write_all(rest)?;
    stream.flush()
    // dropping the stream closes the connection (early, for DropAfter)
}

/// A deterministic, incompressible-looking file of `n` bytes.
pub(crate) fn file_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub(crate) fn sha(bytes: &[u8]) -> String {
    medmine::fsutil::sha256_hex(bytes)
}

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::BIN)
        .args(args)
        .env_remove(weights::URL_ENV)
        .output()
        .expect("run medmine")
}

fn text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const N: usize = 300_000;

#[test]
fn download_verifies_and_renames_then_keeps_a_matching_file() {
    let data = file_bytes(N);
    let srv = serve(data.clone(), Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("weights"); // created by the download
    let url = srv.url("mobile_sam.pt");
    let hash = sha(&data);
    let args = [
        "weights",
        "download",
        "vit_t",
        "--dir",
        s(&dir),
        "--url",
        &url,
        "--sha256",
        &hash,
    ];
    let o = run(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(std::fs::read(dir.join("mobile_sam.pt")).unwrap(), data);
    assert_eq!(
        files_in(&dir),
        ["mobile_sam.pt"],
        "no .part or temp file left"
    );
    assert!(out.contains("SHA-256 verified"), "{out}");
    assert!(out.contains(&format!("sha256 {hash}")), "{out}");
    assert_eq!(srv.ranges(), [None]);

    // again: the file is hashed, found matching, and nothing is fetched
    let o = run(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("already present"), "{out}");
    assert_eq!(srv.ranges().len(), 1, "a second request was made");
}

#[test]
fn resume_asks_for_the_rest_of_a_partial_file() {
    let data = file_bytes(N);
    let srv = serve(data.clone(), Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("mobile_sam.pt.part");
    let have = 123_456;
    std::fs::write(&part, &data[..have]).unwrap();
    let d = Download {
        name: "vit_t".into(),
        url: srv.url("mobile_sam.pt"),
        dest: tmp.path().join("mobile_sam.pt"),
        sha256: Some(sha(&data)),
        size: Some(N as u64),
    };
    let mut events = Recorder::default();
    let r = weights::download(&d, &mut events).unwrap();
    assert_eq!(srv.ranges(), [Some(format!("bytes={have}-"))]);
    assert_eq!((r.resumed_from, r.bytes), (have as u64, N as u64));
    assert!(r.verified && !r.already_present);
    assert!(events.0.contains(&DownloadEvent::Started {
        from: have as u64,
        total: Some(N as u64)
    }));
    assert_eq!(
        events.0.last(),
        Some(&DownloadEvent::Progress { done: N as u64 })
    );
    assert_eq!(std::fs::read(&d.dest).unwrap(), data);
    assert!(!part.exists());

    // a part that is already complete: the server answers 416 and the part is verified
    std::fs::remove_file(&d.dest).unwrap();
    std::fs::write(&part, &data).unwrap();
    let r = weights::download(&d, &mut Recorder::default()).unwrap();
    assert_eq!(srv.ranges()[1], Some(format!("bytes={N}-")));
    assert_eq!(r.resumed_from, N as u64);
    assert_eq!(std::fs::read(&d.dest).unwrap(), data);
}

#[test]
fn a_server_that_ignores_range_restarts_the_file_cleanly() {
    let data = file_bytes(N);
    let srv = serve(data.clone(), Mode::IgnoreRange);
    let tmp = tempfile::tempdir().unwrap();
    // a stale part (other bytes): with a 200 answer it must be dropped, not appended to
    std::fs::write(tmp.path().join("mobile_sam.pt.part"), vec![7u8; 5000]).unwrap();
    let url = srv.url("mobile_sam.pt");
    let hash = sha(&data);
    let o = run(&[
        "weights",
        "download",
        "vit_t",
        "--dir",
        s(tmp.path()),
        "--url",
        &url,
        "--sha256",
        &hash,
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("did not resume at byte 5000"), "{err}");
    assert_eq!(srv.ranges(), [Some("bytes=5000-".to_string())]);
    assert_eq!(
        std::fs::read(tmp.path().join("mobile_sam.pt")).unwrap(),
        data
    );
    assert_eq!(files_in(tmp.path()), ["mobile_sam.pt"]);
}

#[test]
fn a_dropped_connection_keeps_the_part_for_the_next_resume() {
    let data = file_bytes(N);
    let dropping = serve(data.clone(), Mode::DropAfter(100_000));
    let tmp = tempfile::tempdir().unwrap();
    let hash = sha(&data);
    let download = |url: &str| {
        run(&[
            "weights",
            "download",
            "tiny.bin", // an unregistered file: --url and --sha256
            "--dir",
            s(tmp.path()),
            "--url",
            url,
            "--sha256",
            &hash,
        ])
    };
    let o = download(&dropping.url("tiny.bin"));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        err.contains("is kept") && err.contains("run the same command again"),
        "{err}"
    );
    let part = tmp.path().join("tiny.bin.part");
    assert_eq!(std::fs::read(&part).unwrap(), &data[..100_000]);
    assert!(!tmp.path().join("tiny.bin").exists());

    let good = serve(data.clone(), Mode::Normal);
    let o = download(&good.url("tiny.bin"));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(good.ranges(), [Some("bytes=100000-".to_string())]);
    assert!(out.contains("resumed at byte 100000"), "{out}");
    assert_eq!(std::fs::read(tmp.path().join("tiny.bin")).unwrap(), data);
    assert!(!part.exists());
}

#[test]
fn a_checksum_mismatch_writes_no_file_and_names_both_hashes() {
    let data = file_bytes(N);
    let srv = serve(data.clone(), Mode::Corrupt);
    let tmp = tempfile::tempdir().unwrap();
    let expected = sha(&data);
    let mut corrupt = data.clone();
    corrupt[N / 2] ^= 0xff;
    let actual = sha(&corrupt);
    let o = run(&[
        "weights",
        "download",
        "vit_t",
        "--dir",
        s(tmp.path()),
        "--url",
        &srv.url("mobile_sam.pt"),
        "--sha256",
        &expected,
    ]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("SHA-256 mismatch"), "{err}");
    assert!(err.contains("mobile_sam.pt"), "{err}");
    assert!(err.contains(&format!("expected {expected}")), "{err}");
    assert!(err.contains(&format!("got {actual}")), "{err}");
    assert!(
        files_in(tmp.path()).is_empty(),
        "{:?}",
        files_in(tmp.path())
    );

    // the registry's own hash applies when none is given (the library, through a mirror URL)
    let d = weights::resolve("vit_b", tmp.path(), None, Some(&srv.base), None).unwrap();
    assert_eq!(d.url, srv.url("sam_vit_b_01ec64.pth"));
    match weights::download(&d, &mut Recorder::default()) {
        Err(WeightsError::ChecksumMismatch { expected, .. }) => {
            assert_eq!(
                Some(expected.as_str()),
                weights::find("vit_b").unwrap().sha256
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(files_in(tmp.path()).is_empty());
}

#[test]
fn the_mirror_variable_and_an_unverified_download() {
    let data = file_bytes(N);
    let srv = serve(data.clone(), Mode::Normal);
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(common::BIN)
        .args(["weights", "download", "extra.bin", "--dir", s(tmp.path())])
        .env(weights::URL_ENV, format!("{}/", srv.base))
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("NOT verified"), "{out}");
    assert!(out.contains(&format!("sha256 {}", sha(&data))), "{out}");
    assert_eq!(std::fs::read(tmp.path().join("extra.bin")).unwrap(), data);

    // a server that is not there: the error says where else to get the file from
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.bin", dead.local_addr().unwrap());
    drop(dead);
    let o = run(&[
        "weights",
        "download",
        "x.bin",
        "--dir",
        s(tmp.path()),
        "--url",
        &url,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&url) && err.contains(weights::URL_ENV),
        "{err}"
    );
    assert!(!tmp.path().join("x.bin.part").exists());

    // without a URL an unregistered name is refused with the known names
    let o = run(&["weights", "download", "extra2.bin", "--dir", s(tmp.path())]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("unknown checkpoint `extra2.bin`"), "{err}");
}

#[test]
fn verify_says_ok_mismatch_missing_and_unknown_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let data = file_bytes(1000);
    std::fs::write(tmp.path().join("mobile_sam.pt"), &data).unwrap();
    std::fs::write(tmp.path().join("mine.pth"), &data).unwrap();
    let dir = s(tmp.path());

    // the whole registry: vit_t mismatches (it is not the published file), the rest missing
    let o = run(&["weights", "verify", "--dir", dir]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "a mismatch must fail:\n{out}");
    assert!(err.contains("vit_t: mismatch"), "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in\n{out}"))
            .to_string()
    };
    assert!(line("vit_t").contains(&format!(
        "mismatch expected {} actual {}",
        weights::find("vit_t").unwrap().sha256.unwrap(),
        sha(&data)
    )));
    for name in ["vit_b", "vit_l", "vit_h"] {
        assert!(line(name).ends_with("missing"), "{}", line(name));
    }

    // a given hash that matches; an unregistered file without one prints its hash
    let o = run(&[
        "weights",
        "verify",
        "mine.pth",
        "--dir",
        dir,
        "--sha256",
        &sha(&data),
    ]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains(" ok "), "{out}");
    let o = run(&["weights", "verify", "mine.pth", "--dir", dir]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains(&format!("unknown-hash {}", sha(&data))),
        "{out}"
    );
    // a name asked for explicitly that is missing fails; absent registry files alone do not
    let o = run(&["weights", "verify", "vit_h", "--dir", dir]);
    assert!(!o.status.success());
    std::fs::remove_file(tmp.path().join("mobile_sam.pt")).unwrap();
    let o = run(&["weights", "verify", "--dir", dir]);
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn list_shows_every_checkpoint_and_what_the_folder_has() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("mobile_sam.pt"), b"x").unwrap();
    std::fs::write(
        tmp.path().join("sam_vit_b_01ec64.pth.part"),
        vec![0u8; 3 << 20],
    )
    .unwrap();
    let o = run(&["weights", "list", "--dir", s(tmp.path())]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let n = weights::REGISTRY.len();
    assert_eq!(rows.len(), n + weights::MANUAL.len(), "{out}");
    for (row, c) in rows.iter().zip(weights::REGISTRY) {
        assert_eq!((row[0], row[1]), (c.name, c.file), "{out}");
        assert_eq!(*row.last().unwrap(), c.url);
    }
    // MedSAM and LiteMedSAM: by hand, where from, and that no size or hash is published
    for (row, c) in rows[n..].iter().zip(weights::MANUAL) {
        assert_eq!((row[0], row[1], row[2]), (c.name, c.file, "?"), "{out}");
        assert!(row.contains(&c.page), "{out}");
    }
    assert!(out.contains("no size or SHA-256 published"), "{out}");
    assert!(out.contains("partial (3.0 MiB)"), "{out}");
    assert_eq!(rows[0][4], "partial");
    assert_eq!(rows[1][4], "no");
    assert_eq!(rows[3][4], "yes");
}

/// Reading the whole response of a plain GET: the server itself works as the tests assume.
#[test]
fn the_test_server_speaks_http() {
    let data = file_bytes(1000);
    let srv = serve(data.clone(), Mode::Normal);
    let mut c = TcpStream::connect(srv.base.trim_start_matches("http://")).unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nRange: bytes=10-\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    assert!(got.ends_with(&data[10..]));
}
