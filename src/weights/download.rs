//! The download: HTTP(S) GET into `FILE.part` with `Range:` resume, restart where the server
//! ignores `Range`, SHA-256 (or size) check, durable rename.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{io_err, parse_sha256, part_path, Download, Result, WeightsError, URL_ENV};
use crate::fsutil;

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

    /// Polled after every chunk: `true` stops the download with [`WeightsError::Cancelled`],
    /// keeping the part file for a later resume.
    fn cancelled(&self) -> bool {
        false
    }
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
        hint: if offset > 0 {
            kept_hint(&part_path(&d.dest), offset)
        } else {
            format!("; another source: --url URL, or {URL_ENV}=BASE_URL for a mirror")
        },
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
        if progress.cancelled() {
            out.flush().map_err(io_err(part))?;
            return Err(WeightsError::Cancelled {
                part: part.to_path_buf(),
                bytes: done,
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_start_is_parsed_strictly() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start(" bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }
}
