//! The store's side of [`crate::fsutil`] (durable writes, content hashes): I/O errors mapped to
//! clear store errors (disk full, read-only, which file), and content-addressed mask files.
use std::fs::File;
use std::path::Path;

use super::{Result, StoreError};
use crate::data::Mask;

pub use crate::fsutil::sha256_hex;

/// Lower-case hex SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    crate::fsutil::sha256_file(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
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

/// Fsyncs a file and the folder that holds it.
pub fn fsync_file_and_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| write_error(path, e))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            crate::fsutil::sync_dir(dir).map_err(|e| write_error(dir, e))
        }
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` durably: a temporary file beside it, fsync, rename over `path`,
/// fsync of the folder. On any error the temporary file is removed and `path` is untouched.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_durable(path, bytes).map_err(|e| write_error(&e.path, e.source))
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

/// Stores PNG bytes under their content address; returns the file name.
pub fn store_png_bytes(masks_dir: &Path, bytes: &[u8]) -> Result<String> {
    let name = format!("{}.png", sha256_hex(bytes));
    store_named(masks_dir, &name, bytes)?;
    Ok(name)
}

/// Writes `bytes` as `masks_dir/name` unless a complete file is there; returns whether this
/// call wrote it.
fn store_named(masks_dir: &Path, name: &str, bytes: &[u8]) -> Result<bool> {
    let path = masks_dir.join(name);
    let complete = std::fs::metadata(&path)
        .map(|m| m.is_file() && m.len() == bytes.len() as u64)
        .unwrap_or(false);
    if !complete {
        write_durable(&path, bytes)?;
    }
    Ok(!complete)
}

/// A mask encoded as PNG under its content address (`<sha256 of the PNG>.png`), stored in
/// `masks/` durably and at most once. It keeps its bytes so that a writer can
/// store it before its transaction and make sure again, inside the transaction, that it is
/// still there (a machine write that was refused removes the files it created, see
/// [`super::MachineWrite`]).
#[derive(Clone, Debug)]
pub struct MaskPng {
    /// `<sha256 of bytes>.png`.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl MaskPng {
    /// Encodes a mask (see [`mask_png_bytes`]).
    pub fn encode(mask: &Mask) -> Result<MaskPng> {
        Ok(Self::from_bytes(mask_png_bytes(mask)?))
    }

    /// PNG bytes as they are.
    pub fn from_bytes(bytes: Vec<u8>) -> MaskPng {
        MaskPng {
            name: format!("{}.png", sha256_hex(&bytes)),
            bytes,
        }
    }

    /// Stores the file durably unless it is there already; returns whether this call wrote it.
    pub fn store(&self, masks_dir: &Path) -> Result<bool> {
        store_named(masks_dir, &self.name, &self.bytes)
    }
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
        let png = MaskPng::encode(&m).unwrap();
        assert!(png.store(dir.path()).unwrap(), "written");
        assert!(
            !png.store(dir.path()).unwrap(),
            "an identical mask is reused"
        );
        let a = png.name.clone();
        assert_eq!(MaskPng::encode(&m).unwrap().name, a);
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
