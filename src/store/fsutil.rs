//! Durable file writes (temporary file, fsync, rename, fsync of the folder), content hashes
//! and the mapping of I/O errors to clear store errors.
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{Result, StoreError};
use crate::data::Mask;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Whether an I/O error means "no space": a full disk (`ENOSPC`), a quota (`EDQUOT`) or a
/// file size limit (`EFBIG`, as set by `ulimit -f` / `RLIMIT_FSIZE`).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(27) | Some(28) | Some(122))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::FileTooLarge
}

fn is_read_only(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
        || e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
        || e.raw_os_error() == Some(30)
}

/// Maps an error of a write to `path` to [`StoreError::DiskFull`],
/// [`StoreError::ReadOnly`] or [`StoreError::Io`].
pub fn write_error(path: &Path, source: std::io::Error) -> StoreError {
    if is_disk_full(&source) {
        StoreError::DiskFull {
            path: path.to_path_buf(),
            source,
        }
    } else if is_read_only(&source) {
        StoreError::ReadOnly {
            path: path.to_path_buf(),
            reason: source.to_string(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Fails with [`StoreError::ReadOnly`] unless a file can be created in `dir`.
pub fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".medmine-write-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if is_read_only(&e) => Err(StoreError::ReadOnly {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) => Err(write_error(dir, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be opened read-only and fsynced on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| write_error(dir, e))?;
        f.sync_all().map_err(|e| write_error(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Fsyncs a file and the folder that holds it.
pub fn fsync_file_and_dir(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| write_error(path, e))?;
    f.sync_all().map_err(|e| write_error(path, e))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` durably: a temporary file beside it (`.tmp-<pid>-<n>-<name>`),
/// fsync, rename over `path`, fsync of the folder. On any error the temporary file is
/// removed and `path` is untouched.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp).map_err(|e| write_error(&tmp, e))?;
        f.write_all(bytes).map_err(|e| write_error(&tmp, e))?;
        f.sync_all().map_err(|e| write_error(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| write_error(path, e))?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Encodes a mask as an 8-bit gray PNG (0 background, 255 foreground).
pub fn mask_png_bytes(mask: &Mask) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let n = mask.width * mask.height;
    if mask.data.len() != n || n == 0 {
        return Err(StoreError::Invalid(format!(
            "mask of {}x{} has {} values",
            mask.width,
            mask.height,
            mask.data.len()
        )));
    }
    let (Ok(w), Ok(h)) = (u32::try_from(mask.width), u32::try_from(mask.height)) else {
        return Err(StoreError::Invalid(format!(
            "mask of {}x{} is too large for PNG",
            mask.width, mask.height
        )));
    };
    let px: Vec<u8> = mask
        .data
        .iter()
        .map(|&v| if v != 0 { 255 } else { 0 })
        .collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&px, w, h, image::ExtendedColorType::L8)
        .map_err(|e| StoreError::Invalid(format!("cannot encode mask as PNG: {e}")))?;
    Ok(out)
}

/// Stores a mask in `masks_dir` under its content address (`<sha256 of the PNG>.png`),
/// durably; returns the file name. An identical mask already stored is reused.
pub fn store_mask(masks_dir: &Path, mask: &Mask) -> Result<String> {
    let bytes = mask_png_bytes(mask)?;
    store_png_bytes(masks_dir, &bytes)
}

/// Stores PNG bytes under their content address; returns the file name.
pub fn store_png_bytes(masks_dir: &Path, bytes: &[u8]) -> Result<String> {
    let name = format!("{}.png", sha256_hex(bytes));
    let path = masks_dir.join(&name);
    let complete = std::fs::metadata(&path)
        .map(|m| m.is_file() && m.len() == bytes.len() as u64)
        .unwrap_or(false);
    if !complete {
        write_durable(&path, bytes)?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_value() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn durable_write_and_content_address() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mask {
            width: 3,
            height: 2,
            data: vec![0, 1, 1, 0, 0, 1],
        };
        let a = store_mask(dir.path(), &m).unwrap();
        let b = store_mask(dir.path(), &m).unwrap();
        assert_eq!(a, b);
        let bytes = std::fs::read(dir.path().join(&a)).unwrap();
        assert_eq!(format!("{}.png", sha256_hex(&bytes)), a);
        let back = crate::data::load_mask(&dir.path().join(&a)).unwrap();
        assert_eq!(back, m);
        // no temporary files left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![a]);
    }
}
