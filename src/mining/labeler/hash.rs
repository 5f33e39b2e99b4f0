//! Checkpoint content hashes, cached: a SAM checkpoint is gigabytes, and every `mine` names
//! its models by SHA-256. The cache is a small JSON file (the project's
//! `cache/checkpoint-hashes.json`) keyed by the file's canonical path, with its size and
//! modification time: a file that changed in either is hashed again. The cache is only a
//! cache: a missing, damaged or unwritable file costs a re-hash, never an error.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::mining::MiningError;

/// The cache file's name in a project's cache folder.
pub const HASH_CACHE_FILE: &str = "checkpoint-hashes.json";

/// One cached hash: valid while the file keeps this size and modification time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    mtime_ns: u128,
    sha256: String,
}

/// Lower-case hex SHA-256 of `file`'s content, read from `cache` (a JSON file) when the
/// file's canonical path, size and modification time match an entry, computed and recorded
/// there otherwise. `cache: None` always hashes.
pub fn cached_sha256(file: &Path, cache: Option<&Path>) -> Result<String, MiningError> {
    let err = |source| MiningError::Hash {
        path: file.to_path_buf(),
        source,
    };
    let canonical = file.canonicalize().map_err(err)?;
    let meta = std::fs::metadata(&canonical).map_err(err)?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = canonical.display().to_string();
    let mut entries = cache.map(read_cache).unwrap_or_default();
    if let Some(e) = entries.get(&key) {
        if e.size == meta.len() && e.mtime_ns == mtime_ns && mtime_ns != 0 {
            return Ok(e.sha256.clone());
        }
    }
    let sha256 = crate::fsutil::sha256_file(&canonical).map_err(err)?;
    if let Some(cache) = cache {
        entries.insert(
            key,
            Entry {
                size: meta.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        write_cache(cache, &entries);
    }
    Ok(sha256)
}

fn read_cache(path: &Path) -> BTreeMap<String, Entry> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Best effort: a cache that cannot be written is simply not kept.
fn write_cache(path: &Path, entries: &BTreeMap<String, Entry>) {
    let Ok(bytes) = serde_json::to_vec_pretty(entries) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = crate::fsutil::write_durable(path, &bytes);
}

/// The cache file of a project's cache folder.
pub fn hash_cache_in(cache_dir: &Path) -> PathBuf {
    cache_dir.join(HASH_CACHE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::sha256_hex;

    #[test]
    fn hashes_are_cached_by_path_size_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.bin");
        let cache = dir.path().join("cache/hashes.json");
        std::fs::write(&file, b"weights").unwrap();
        let h = cached_sha256(&file, Some(&cache)).unwrap();
        assert_eq!(h, sha256_hex(b"weights"));
        assert!(cache.is_file());
        // a cached entry is used as long as size and time match: poison it to see
        let text = std::fs::read_to_string(&cache).unwrap();
        std::fs::write(&cache, text.replace(&h, "cached")).unwrap();
        assert_eq!(cached_sha256(&file, Some(&cache)).unwrap(), "cached");
        // same path through another spelling: the canonical path is the key
        let other = dir.path().join("cache/../model.bin");
        assert_eq!(cached_sha256(&other, Some(&cache)).unwrap(), "cached");
        // new content (another size): hashed again, cache updated
        std::fs::write(&file, b"better weights").unwrap();
        let h2 = cached_sha256(&file, Some(&cache)).unwrap();
        assert_eq!(h2, sha256_hex(b"better weights"));
        assert_eq!(cached_sha256(&file, Some(&cache)).unwrap(), h2);
        // a damaged cache is ignored and rewritten; no cache at all always hashes
        std::fs::write(&cache, b"{not json").unwrap();
        assert_eq!(cached_sha256(&file, Some(&cache)).unwrap(), h2);
        assert_eq!(cached_sha256(&file, None).unwrap(), h2);
        // a missing file is an error naming it
        let e = cached_sha256(&dir.path().join("none.pth"), Some(&cache)).unwrap_err();
        assert!(e.to_string().contains("none.pth"), "{e}");
    }
}
