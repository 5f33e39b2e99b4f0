//! The official SAM checkpoints: a registry (name, file, URL, size, SHA-256), their download
//! (HTTP(S) GET into `FILE.part` with `Range:` resume, SHA-256 check, durable rename through
//! [`crate::fsutil`]) and the check of files already on disk. Checkpoints are never committed
//! to git; `weights/README.md` says where each value of the registry comes from.
//!
//! The SHA-256 is what decides whether a file is the published one. Sizes are only shown and
//! used for the progress bar: where a source's size is wrong, nothing breaks (a part file that
//! is already complete is detected by the server's `416 Range Not Satisfiable`, not by size).
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::fsutil;

/// One published checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The SAM variant name (`vit_b` …), as `--sam-variant` spells it.
    pub name: &'static str,
    /// File name as published.
    pub file: &'static str,
    pub url: &'static str,
    /// Bytes, where a source recorded them (informative; the SHA-256 decides).
    pub size: Option<u64>,
    /// Lower-case hex SHA-256, where a source recorded it.
    pub sha256: Option<&'static str>,
}

/// The official checkpoints (sources of every value: `weights/README.md`).
pub const REGISTRY: &[Checkpoint] = &[
    Checkpoint {
        name: "vit_b",
        file: "sam_vit_b_01ec64.pth",
        url: "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        size: Some(375_042_383),
        sha256: Some("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    },
    Checkpoint {
        name: "vit_l",
        file: "sam_vit_l_0b3195.pth",
        url: "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        size: Some(1_249_524_607),
        sha256: Some("3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    },
    Checkpoint {
        name: "vit_h",
        file: "sam_vit_h_4b8939.pth",
        url: "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        size: Some(2_564_550_879),
        sha256: Some("a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    },
    Checkpoint {
        name: "vit_t",
        file: "mobile_sam.pt",
        url: "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        size: Some(40_728_226),
        sha256: Some("6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"),
    },
];

/// Environment variable with a mirror's base URL: the file name is appended
/// (`MEDMINE_WEIGHTS_URL=https://mirror/sam/` fetches `https://mirror/sam/sam_vit_b_01ec64.pth`).
pub const URL_ENV: &str = "MEDMINE_WEIGHTS_URL";

/// Errors of the registry, the download and the check; each names the URL or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("unknown checkpoint `{name}` (known: {known}); an unregistered file needs --url (or {URL_ENV}) and should have --sha256")]
    Unknown { name: String, known: String },
    #[error("`{0}` is not a plain file name")]
    BadName(String),
    #[error("invalid SHA-256 `{0}`: expected 64 hex digits")]
    BadHash(String),
    #[error("{url}: {reason}{hint}")]
    Transfer {
        url: String,
        reason: String,
        hint: String,
    },
    #[error("{url}: the server answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: SHA-256 mismatch: expected {expected}, got {actual}; the download was discarded and no file was written")]
    ChecksumMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{file}: size mismatch: expected {expected} bytes, got {actual}; the download was discarded and no file was written")]
    SizeMismatch {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The registry entry called `name` (`vit_b` …) or published as file `name`.
pub fn find(name: &str) -> Option<&'static Checkpoint> {
    REGISTRY.iter().find(|c| c.name == name || c.file == name)
}

/// `name` as a lower-case 64-digit hex SHA-256, or an error.
pub fn parse_sha256(hex: &str) -> Result<String> {
    let h = hex.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(WeightsError::BadHash(hex.to_string()))
    }
}

/// What to fetch, where to, and how to check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Download {
    /// A registry name, or the file name of an unregistered file.
    pub name: String,
    pub url: String,
    /// The final file (`FILE.part` beside it while downloading).
    pub dest: PathBuf,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// Turns a name and the overrides into a [`Download`] into `dir`.
/// `url` replaces the URL; `base_url` (a mirror, e.g. from [`URL_ENV`]) gets the file name
/// appended; `sha256` replaces or supplies the expected hash. An unregistered `name` is a file
/// name and needs `url` or `base_url`.
pub fn resolve(
    name: &str,
    dir: &Path,
    url: Option<&str>,
    base_url: Option<&str>,
    sha256: Option<&str>,
) -> Result<Download> {
    let sha256 = sha256.map(parse_sha256).transpose()?;
    let mirror = |file: &str| base_url.map(|b| format!("{}/{file}", b.trim_end_matches('/')));
    if let Some(c) = find(name) {
        let url = url.map(str::to_string).or_else(|| mirror(c.file));
        return Ok(Download {
            name: c.name.to_string(),
            url: url.unwrap_or_else(|| c.url.to_string()),
            dest: dir.join(c.file),
            sha256: sha256.or(c.sha256.map(str::to_string)),
            size: c.size,
        });
    }
    check_file_name(name)?;
    let url = url
        .map(str::to_string)
        .or_else(|| mirror(name))
        .ok_or_else(|| WeightsError::Unknown {
            name: name.to_string(),
            known: REGISTRY
                .iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok(Download {
        name: name.to_string(),
        url,
        dest: dir.join(name),
        sha256,
        size: None,
    })
}

/// Refuses anything but a plain file name (no folders, no `..`).
pub fn check_file_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && Path::new(name).file_name().is_some_and(|f| f == name);
    if plain {
        Ok(())
    } else {
        Err(WeightsError::BadName(name.to_string()))
    }
}

/// `FILE.part` beside `dest`: the bytes downloaded so far.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// What a download reports (the CLI draws a progress bar from these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadEvent {
    /// Bytes from `from` on are being fetched; `total` is the whole file where known.
    Started { from: u64, total: Option<u64> },
    /// `done` bytes of the file are on disk.
    Progress { done: u64 },
    /// Hashing a file already on disk.
    Verifying { path: PathBuf },
    /// A note for the user: resumed, restarted, replaced.
    Note(String),
}

pub trait DownloadProgress {
    fn event(&mut self, event: &DownloadEvent);
}

/// Ignores every event.
pub struct NoProgress;

impl DownloadProgress for NoProgress {
    fn event(&mut self, _: &DownloadEvent) {}
}

/// Keeps every event (tests).
#[derive(Default)]
pub struct Recorder(pub Vec<DownloadEvent>);

impl DownloadProgress for Recorder {
    fn event(&mut self, event: &DownloadEvent) {
        self.0.push(event.clone());
    }
}

/// The outcome of [`download`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    /// SHA-256 of the file as written.
    pub sha256: String,
    /// Whether `sha256` was checked against an expected value.
    pub verified: bool,
    /// Bytes taken from an earlier `.part` (0 for a fresh download).
    pub resumed_from: u64,
    /// The final file was already there (and matched, where a hash is known): nothing fetched.
    pub already_present: bool,
}

fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("medmine/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::new_with_config(config)
}

/// Start of a `Content-Range: bytes START-END/TOTAL` value.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// How a response continues the `.part` file.
enum Reply {
    /// The body is the file from `from` on.
    Body {
        from: u64,
        resp: ureq::http::Response<ureq::Body>,
    },
    /// `416`: nothing after the part file's end (it is complete, or longer than the file).
    NothingMore,
}

fn request(agent: &ureq::Agent, d: &Download, offset: u64) -> Result<Reply> {
    let mut req = agent.get(&d.url);
    if offset > 0 {
        req = req.header("Range", format!("bytes={offset}-"));
    }
    let resp = req.call().map_err(|e| WeightsError::Transfer {
        url: d.url.clone(),
        reason: e.to_string(),
        hint: kept_hint(&part_path(&d.dest), offset),
    })?;
    match resp.status().as_u16() {
        200 => Ok(Reply::Body { from: 0, resp }),
        206 => {
            let start = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            Ok(Reply::Body {
                from: start.unwrap_or(u64::MAX),
                resp,
            })
        }
        416 if offset > 0 => Ok(Reply::NothingMore),
        status => Err(WeightsError::Status {
            url: d.url.clone(),
            status,
        }),
    }
}

fn kept_hint(part: &Path, bytes: u64) -> String {
    if bytes > 0 {
        format!(
            "; the partial download {} ({bytes} bytes) is kept: run the same command again to resume",
            part.display()
        )
    } else {
        String::new()
    }
}

/// SHA-256 state over the first `len` bytes of `path`.
fn hash_prefix(path: &Path) -> Result<(Sha256, u64)> {
    let mut h = Sha256::new();
    let mut f = File::open(path).map_err(io_err(path))?;
    let n = std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok((h, n))
}

/// Downloads `d.url` to `d.dest`: resumes `DEST.part` with a `Range:` request, restarts where
/// the server ignores it, checks the SHA-256 (and, without one, the size), then renames the
/// part durably. A checksum mismatch discards the part and writes no file; a dropped
/// connection keeps the part for the next call. A `dest` already there and matching is kept.
pub fn download(d: &Download, progress: &mut dyn DownloadProgress) -> Result<Downloaded> {
    if let Some(h) = &d.sha256 {
        parse_sha256(h)?;
    }
    if d.dest.is_file() {
        progress.event(&DownloadEvent::Verifying {
            path: d.dest.clone(),
        });
        let actual = fsutil::sha256_file(&d.dest).map_err(io_err(&d.dest))?;
        if d.sha256.as_deref().is_none_or(|e| e == actual) {
            let bytes = std::fs::metadata(&d.dest).map_err(io_err(&d.dest))?.len();
            return Ok(Downloaded {
                path: d.dest.clone(),
                bytes,
                verified: d.sha256.is_some(),
                sha256: actual,
                resumed_from: 0,
                already_present: true,
            });
        }
        progress.event(&DownloadEvent::Note(format!(
            "{} is there but its SHA-256 is {actual}: downloading it again (it is replaced only by a verified file)",
            d.dest.display()
        )));
    }
    if let Some(dir) = d.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let part = part_path(&d.dest);
    let (mut hasher, mut offset) = if part.is_file() {
        progress.event(&DownloadEvent::Verifying { path: part.clone() });
        hash_prefix(&part)?
    } else {
        (Sha256::new(), 0)
    };
    let resumed_from = offset;
    let agent = agent();
    let mut reply = request(&agent, d, offset)?;
    if let Reply::Body { from, .. } = reply {
        if from != offset {
            // a 200 (Range ignored) or a 206 for another range: start again from byte 0
            progress.event(&DownloadEvent::Note(format!(
                "the server did not resume at byte {offset}: downloading {} from the start",
                d.url
            )));
            File::create(&part).map_err(io_err(&part))?;
            (hasher, offset) = (Sha256::new(), 0);
            if from != 0 {
                reply = request(&agent, d, 0)?;
            }
        }
    }
    let resumed_from = if offset == 0 { 0 } else { resumed_from };
    if let Reply::Body { resp, .. } = reply {
        offset = stream(d, resp, &part, offset, &mut hasher, progress)?;
    }
    let actual = format!("{:x}", hasher.finalize());
    if let Some(expected) = &d.sha256 {
        if *expected != actual {
            let _ = std::fs::remove_file(&part);
            return Err(WeightsError::ChecksumMismatch {
                file: d.dest.clone(),
                expected: expected.clone(),
                actual,
            });
        }
    } else if let Some(size) = d.size.filter(|s| *s != offset) {
        let _ = std::fs::remove_file(&part);
        return Err(WeightsError::SizeMismatch {
            file: d.dest.clone(),
            expected: size,
            actual: offset,
        });
    }
    fsutil::rename_durable(&part, &d.dest).map_err(|e| WeightsError::Io {
        path: e.path,
        source: e.source,
    })?;
    Ok(Downloaded {
        path: d.dest.clone(),
        bytes: offset,
        sha256: actual,
        verified: d.sha256.is_some(),
        resumed_from,
        already_present: false,
    })
}

/// Appends the response body to `part` (which holds `offset` bytes); returns the new length.
fn stream(
    d: &Download,
    resp: ureq::http::Response<ureq::Body>,
    part: &Path,
    offset: u64,
    hasher: &mut Sha256,
    progress: &mut dyn DownloadProgress,
) -> Result<u64> {
    let remaining = resp.body().content_length();
    let total = remaining.map(|r| offset + r).or(d.size);
    progress.event(&DownloadEvent::Started {
        from: offset,
        total,
    });
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(io_err(part))?;
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = offset;
    let interrupted = |reason: String, done: u64| WeightsError::Transfer {
        url: d.url.clone(),
        reason,
        hint: kept_hint(part, done),
    };
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                out.flush().map_err(io_err(part))?;
                return Err(interrupted(
                    format!("the download stopped after {done} bytes ({e})"),
                    done,
                ));
            }
        };
        out.write_all(&buf[..n]).map_err(io_err(part))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.event(&DownloadEvent::Progress { done });
    }
    out.flush().map_err(io_err(part))?;
    if let Some(r) = remaining.filter(|r| offset + r != done) {
        return Err(interrupted(
            format!("the connection closed after {done} of {} bytes", offset + r),
            done,
        ));
    }
    Ok(done)
}

/// The state of one file on disk against its expected hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileStatus {
    Ok,
    Mismatch {
        expected: String,
        actual: String,
    },
    Missing,
    /// No expected hash is recorded: the computed one, to be filled in.
    UnknownHash {
        actual: String,
    },
}

impl FileStatus {
    /// `ok`, `mismatch`, `missing`, `unknown-hash`.
    pub fn label(&self) -> &'static str {
        match self {
            FileStatus::Ok => "ok",
            FileStatus::Mismatch { .. } => "mismatch",
            FileStatus::Missing => "missing",
            FileStatus::UnknownHash { .. } => "unknown-hash",
        }
    }
}

/// Hashes `path` (if present) and compares it with `expected`.
pub fn check_file(path: &Path, expected: Option<&str>) -> Result<FileStatus> {
    if !path.exists() {
        return Ok(FileStatus::Missing);
    }
    let actual = fsutil::sha256_file(path).map_err(io_err(path))?;
    Ok(match expected {
        None => FileStatus::UnknownHash { actual },
        Some(e) if e == actual => FileStatus::Ok,
        Some(e) => FileStatus::Mismatch {
            expected: e.to_string(),
            actual,
        },
    })
}

/// Whether a checkpoint is in a folder (without hashing: `list` must stay fast).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    Present {
        bytes: u64,
    },
    /// Only `FILE.part` (an interrupted download) is there.
    Partial {
        bytes: u64,
    },
    Absent,
}

pub fn presence(dir: &Path, file: &str) -> Presence {
    let path = dir.join(file);
    if let Ok(m) = std::fs::metadata(&path) {
        return Presence::Present { bytes: m.len() };
    }
    match std::fs::metadata(part_path(&path)) {
        Ok(m) => Presence::Partial { bytes: m.len() },
        Err(_) => Presence::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_well_formed() {
        for c in REGISTRY {
            assert!(
                c.url.starts_with("https://") && c.url.ends_with(c.file),
                "{c:?}"
            );
            assert_eq!(parse_sha256(c.sha256.unwrap()).unwrap(), c.sha256.unwrap());
            assert_eq!(find(c.name), Some(c));
            assert_eq!(find(c.file), Some(c));
            assert!(crate::models::sam::Variant::parse(c.name)
                .unwrap()
                .is_some());
        }
        assert_eq!(find("vit_x"), None);
    }

    #[test]
    fn names_hashes_and_ranges_are_parsed_strictly() {
        assert!(parse_sha256(&"AB".repeat(32)).is_ok());
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        for bad in ["../x", "a/b", "", ".."] {
            assert!(
                resolve(bad, Path::new("w"), Some("http://h/x"), None, None).is_err(),
                "{bad}"
            );
        }
        let d = resolve("vit_b", Path::new("w"), None, Some("http://m/sam/"), None).unwrap();
        assert_eq!(d.url, "http://m/sam/sam_vit_b_01ec64.pth");
        assert_eq!(d.dest, Path::new("w/sam_vit_b_01ec64.pth"));
        let e = resolve("other.pth", Path::new("w"), None, None, None).unwrap_err();
        assert!(e.to_string().contains("vit_b, vit_l, vit_h, vit_t"), "{e}");
        assert_eq!(
            part_path(Path::new("w/a.pth")),
            PathBuf::from("w/a.pth.part")
        );
    }
}
