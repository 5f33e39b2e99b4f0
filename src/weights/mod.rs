//! The official SAM checkpoints: a registry (name, file, URL, size, SHA-256), their download
//! (HTTP(S) GET into `FILE.part` with `Range:` resume, SHA-256 check, durable rename through
//! [`crate::fsutil`]) and the check of files already on disk. Checkpoints are never committed
//! to git; `weights/README.md` says where each value of the registry comes from.
//!
//! The SHA-256 is what decides whether a file is the published one. Sizes are only shown and
//! used for the progress bar: where a source's size is wrong, nothing breaks (a part file that
//! is already complete is detected by the server's `416 Range Not Satisfiable`, not by size).
use std::path::{Path, PathBuf};

use crate::fsutil;

mod download;

pub use download::{download, DownloadEvent, DownloadProgress, Downloaded, NoProgress, Recorder};

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

/// A checkpoint published where no program can fetch it: the user downloads it by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManualCheckpoint {
    /// The SAM variant name, as `--sam-variant` spells it.
    pub name: &'static str,
    /// File name as published.
    pub file: &'static str,
    /// Where the official README points for the download.
    pub page: &'static str,
}

/// MedSAM and LiteMedSAM: bowang-lab/MedSAM's READMEs link Google Drive folders and files,
/// and publish no size or SHA-256 (checked in the repository, branches main and LiteMedSAM).
/// `weights download` therefore cannot fetch or check them: the user supplies the file (or a
/// `--url` and `--sha256` of a copy they trust), and `weights verify` prints its hash.
pub const MANUAL: &[ManualCheckpoint] = &[
    ManualCheckpoint {
        name: "medsam",
        file: "medsam_vit_b.pth",
        page: "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
    },
    ManualCheckpoint {
        name: "litemedsam",
        file: "lite_medsam.pth",
        page: "https://drive.google.com/file/d/18Zed-TUTsmr2zc5CHUWd5Tu13nb6vq6z/view",
    },
];

/// The by-hand checkpoint called `name` or published as file `name`.
pub fn find_manual(name: &str) -> Option<&'static ManualCheckpoint> {
    MANUAL.iter().find(|c| c.name == name || c.file == name)
}

/// Environment variable with a mirror's base URL: the file name is appended
/// (`MEDMINE_WEIGHTS_URL=https://mirror/sam/` fetches `https://mirror/sam/sam_vit_b_01ec64.pth`).
pub const URL_ENV: &str = "MEDMINE_WEIGHTS_URL";

/// Errors of the registry, the download and the check; each names the URL or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("unknown checkpoint `{name}` (known: {known}); an unregistered file needs --url (or {URL_ENV}) and should have --sha256")]
    Unknown { name: String, known: String },
    #[error(
        "{name} ({file}) is published only on Google Drive ({page}), without a size or SHA-256: \
         download it by hand into the weights folder, or give --url (and --sha256) of a copy \
         you trust"
    )]
    Manual {
        name: String,
        file: String,
        page: String,
    },
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
    #[error("download cancelled; the partial file {} ({bytes} bytes) is kept: download again to resume", .part.display())]
    Cancelled { part: PathBuf, bytes: u64 },
    #[error("{file}: size mismatch: expected {expected} bytes, got {actual}; the download was discarded and no file was written")]
    SizeMismatch {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
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
    if let Some(c) = find_manual(name) {
        let url = url.map(str::to_string).or_else(|| mirror(c.file));
        return match url {
            Some(url) => Ok(Download {
                name: c.name.to_string(),
                url,
                dest: dir.join(c.file),
                sha256,
                size: None,
            }),
            None => Err(WeightsError::Manual {
                name: c.name.to_string(),
                file: c.file.to_string(),
                page: c.page.to_string(),
            }),
        };
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
        // MedSAM / LiteMedSAM: by hand, unless a URL is given
        for name in ["medsam", "lite_medsam.pth"] {
            let e = resolve(name, Path::new("w"), None, None, None).unwrap_err();
            assert!(matches!(e, WeightsError::Manual { .. }), "{e}");
            assert!(e.to_string().contains("drive.google.com"), "{e}");
        }
        let d = resolve("medsam", Path::new("w"), Some("http://h/m.pth"), None, None).unwrap();
        assert_eq!(d.dest, Path::new("w/medsam_vit_b.pth"));
        for c in MANUAL {
            assert!(crate::models::sam::Variant::parse(c.name)
                .unwrap()
                .is_some());
            assert_eq!(find(c.name), None, "{c:?} is not downloadable");
        }
        assert_eq!(
            part_path(Path::new("w/a.pth")),
            PathBuf::from("w/a.pth.part")
        );
    }
}
