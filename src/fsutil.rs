//! File primitives shared by the checkpoints, the SAM embedding cache and the project store:
//! content hashes and durable writes (temporary file beside the target, fsync, rename, fsync of
//! the folder), so that a killed process never leaves a half-written file under a final name.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// An I/O error and the file it happened on (the temporary file, the target or the folder).
#[derive(Debug)]
pub struct WriteError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Lower-case hex SHA-256 of a file's content, streamed (checkpoints are gigabytes).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// Fsyncs a folder (a no-op where folders cannot be opened, i.e. off Unix).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fresh temporary name beside `path`: `.tmp-<pid>-<n>-<name>`.
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    parent(path).join(format!(
        ".tmp-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Makes the complete file `tmp` durable and moves it to `path` (fsync, rename, fsync of the
/// folder). On error `tmp` is removed and `path` is untouched.
pub fn rename_durable(tmp: &Path, path: &Path) -> Result<(), WriteError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError { path: p, source }
    };
    let result = (|| {
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(err(tmp))?;
        std::fs::rename(tmp, path).map_err(err(path))?;
        let dir = parent(path);
        sync_dir(&dir).map_err(err(&dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Writes `bytes` to `path` durably (see the module docs).
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let written = File::create(&tmp).and_then(|mut f| f.write_all(bytes));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteError { path: tmp, source });
    }
    rename_durable(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_durable_writes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_durable(&p, b"abc").unwrap();
        write_durable(&p, b"abc").unwrap(); // replaces
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert_eq!(sha256_file(&p).unwrap(), sha256_hex(b"abc"));
        // nothing but the target is left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // a folder that does not exist: the error names the temporary file, nothing is made
        let bad = dir.path().join("missing/b.bin");
        let e = write_durable(&bad, b"x").unwrap_err();
        assert!(e.path.starts_with(dir.path().join("missing")));
    }
}
