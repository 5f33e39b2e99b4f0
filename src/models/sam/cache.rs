//! Image-embedding cache: in memory (LRU, capacity in entries) and on disk (one
//! `.safetensors` per image in a folder), keyed by (SHA-256 of the image file's bytes,
//! SHA-256 of the checkpoint file), so reopening a project or clicking again never re-encodes.
//!
//! A disk entry is `<dir>/<image sha256>-<first 16 hex of checkpoint sha256>.safetensors` with
//! one tensor `features` (`[1, C, 64, 64]` f32) and header metadata (`format`, `image_sha256`,
//! `checkpoint_sha256`, `variant`, `original_size`, `input_size` as JSON `[h, w]`). Entries are
//! written to a temporary file in the same folder and renamed into place (atomic on one file
//! system). An unreadable, truncated or mismatching entry is a miss: it is recomputed and
//! replaced, never an error.
//!
//! An image is decoded for the encoder by [`crate::data::load_rgb8`], the one decoder that
//! training, mining and the app share (16-bit and DICOM included). Each image file is hashed
//! once while the cache lives: the hash is remembered with the file's size and modification
//! time, so a click on an image already open costs a `stat`, not a read of the file.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use super::{Embedding, Result, SamError, SamPredictor};

const FORMAT: &str = "medmine-sam-embedding-1";
const FEATURES: &str = "features";

/// Hex SHA-256 of a file's bytes (streamed; checkpoints are GBs).
pub fn sha256_file(path: &Path) -> Result<String> {
    crate::fsutil::sha256_file(path).map_err(|e| file_err(path, e))
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> SamError {
    SamError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Counters since the cache was made (what tests and the GUI's status line read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: usize,
    pub disk_hits: usize,
    /// Image-encoder runs (misses).
    pub encoder_calls: usize,
    /// Disk entries that could not be used (damaged, truncated, other checkpoint) and were
    /// recomputed.
    pub damaged: usize,
    /// Image files read and hashed (once per file while it is unchanged).
    pub files_hashed: usize,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicUsize,
    disk_hits: AtomicUsize,
    encoder_calls: AtomicUsize,
    damaged: AtomicUsize,
    files_hashed: AtomicUsize,
}

/// What [`EmbeddingCache::precompute`] did.
#[derive(Debug, Default)]
pub struct PrecomputeReport {
    /// Images encoded now.
    pub computed: usize,
    /// Images already cached (memory or disk).
    pub cached: usize,
    /// Images that could not be read or encoded, with the error; the others still ran.
    pub failed: Vec<(PathBuf, String)>,
    /// Stopped by `cancel` before the end of the list.
    pub cancelled: bool,
}

/// A tiny LRU: most recently used last; capacities are tens of entries (one ViT-B embedding
/// is 4 MiB), so a linear scan is cheaper than any bookkeeping.
struct Lru {
    capacity: usize,
    entries: Vec<(String, Embedding)>,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Embedding> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let e = self.entries.remove(i);
        let emb = e.1.clone();
        self.entries.push(e);
        Some(emb)
    }

    fn put(&mut self, key: String, emb: Embedding) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|(k, _)| *k != key);
        if self.entries.len() >= self.capacity {
            self.entries.remove(0);
        }
        self.entries.push((key, emb));
    }
}

/// The identity the cache keys embeddings by: the checkpoint's SHA-256 for SAM's rules (so
/// existing caches stay valid), else the SHA-256 of `<checkpoint sha256>+<rules>`: MedSAM and
/// SAM vit_b can be the same file, and their embeddings of an image differ.
pub fn embedding_identity(checkpoint_sha256: &str, rules: super::InputRules) -> String {
    use sha2::{Digest, Sha256};
    match rules {
        super::InputRules::Sam => checkpoint_sha256.to_ascii_lowercase(),
        other => {
            let tagged = format!(
                "{}+{}",
                checkpoint_sha256.to_ascii_lowercase(),
                other.label()
            );
            format!("{:x}", Sha256::digest(tagged.as_bytes()))
        }
    }
}

/// The embedding cache of one checkpoint. `Sync`: [`EmbeddingCache::precompute`] can run on a
/// background thread while the GUI calls [`EmbeddingCache::get_or_compute`].
pub struct EmbeddingCache {
    dir: Option<PathBuf>,
    checkpoint_sha256: String,
    memory: Mutex<Lru>,
    /// Image file -> (size, modification time, SHA-256).
    file_hashes: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
    counters: Counters,
}

impl EmbeddingCache {
    /// A cache for `checkpoint` (its SHA-256 is computed here, once), keeping `capacity`
    /// embeddings in memory and, with `dir`, every embedding on disk (the folder is created).
    pub fn new(dir: Option<&Path>, capacity: usize, checkpoint: &Path) -> Result<Self> {
        Self::with_checkpoint_hash(dir, capacity, &sha256_file(checkpoint)?)
    }

    /// As [`EmbeddingCache::new`] with the checkpoint's SHA-256 (hex) already known.
    pub fn with_checkpoint_hash(
        dir: Option<&Path>,
        capacity: usize,
        checkpoint_sha256: &str,
    ) -> Result<Self> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).map_err(|e| file_err(d, e))?;
        }
        Ok(Self {
            dir: dir.map(Path::to_path_buf),
            checkpoint_sha256: checkpoint_sha256.to_ascii_lowercase(),
            memory: Mutex::new(Lru {
                capacity,
                entries: Vec::new(),
            }),
            file_hashes: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        })
    }

    pub fn checkpoint_sha256(&self) -> &str {
        &self.checkpoint_sha256
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            encoder_calls: c.encoder_calls.load(Ordering::Relaxed),
            damaged: c.damaged.load(Ordering::Relaxed),
            files_hashed: c.files_hashed.load(Ordering::Relaxed),
        }
    }

    /// The SHA-256 of an image file's bytes, hashed once while its size and modification time
    /// stay the same.
    pub fn image_sha256(&self, image_path: &Path) -> Result<String> {
        let meta = std::fs::metadata(image_path).map_err(|e| file_err(image_path, e))?;
        let stamp = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let memo = |m: &HashMap<_, (u64, SystemTime, String)>| {
            m.get(image_path)
                .filter(|(len, time, _)| (*len, *time) == stamp && *time != SystemTime::UNIX_EPOCH)
                .map(|e| e.2.clone())
        };
        if let Some(sha) = memo(&self.file_hashes.lock().expect("hash lock")) {
            return Ok(sha);
        }
        let sha = sha256_file(image_path)?;
        self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.file_hashes
            .lock()
            .expect("hash lock")
            .insert(image_path.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
        Ok(sha)
    }

    /// The disk entry of an image hash (whether or not it exists).
    pub fn entry_path(&self, image_sha256: &str) -> Option<PathBuf> {
        let ck = &self.checkpoint_sha256[..self.checkpoint_sha256.len().min(16)];
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{image_sha256}-{ck}.safetensors")))
    }

    fn memory_key(&self, image_sha256: &str) -> String {
        format!("{image_sha256}/{}", self.checkpoint_sha256)
    }

    /// The embedding of the image file at `image_path`: from memory, else from disk, else
    /// encoded by `predictor` (and then stored in both).
    pub fn get_or_compute(&self, image_path: &Path, predictor: &SamPredictor) -> Result<Embedding> {
        self.lookup_or_compute(image_path, predictor, true)
            .map(|(emb, _)| emb)
    }

    /// Returns the embedding and whether it was computed now. `keep` puts it in memory.
    fn lookup_or_compute(
        &self,
        image_path: &Path,
        predictor: &SamPredictor,
        keep: bool,
    ) -> Result<(Embedding, bool)> {
        let image_sha256 = self.image_sha256(image_path)?;
        let key = self.memory_key(&image_sha256);
        if let Some(emb) = self.memory.lock().expect("cache lock").get(&key) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((emb, false));
        }
        let device = predictor.sam.device();
        let variant = predictor.sam.config().name();
        let entry = self.entry_path(&image_sha256);
        if let Some(p) = entry.as_ref().filter(|p| p.exists()) {
            match read_entry(p, &image_sha256, &self.checkpoint_sha256, device) {
                Ok(emb) => {
                    self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                    if keep {
                        self.memory
                            .lock()
                            .expect("cache lock")
                            .put(key, emb.clone());
                    }
                    return Ok((emb, false));
                }
                Err(reason) => {
                    self.counters.damaged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "{}: unusable cached embedding ({reason}); recomputing",
                        p.display()
                    );
                }
            }
        }
        let image = crate::data::load_rgb8(image_path)?;
        self.counters.encoder_calls.fetch_add(1, Ordering::Relaxed);
        let emb = predictor.set_image(&image)?;
        if let Some(p) = &entry {
            write_entry(p, &emb, &image_sha256, &self.checkpoint_sha256, variant)?;
        }
        if keep {
            self.memory
                .lock()
                .expect("cache lock")
                .put(key, emb.clone());
        }
        Ok((emb, true))
    }

    /// Encodes every image of `paths` that is not cached yet (for a background thread).
    /// `progress(done, total)` is called after each image; `cancel` is checked before each
    /// one. With a disk folder, results go to disk only (a long list would just churn the LRU);
    /// without one, to memory. An image that fails is recorded and the rest still run.
    pub fn precompute(
        &self,
        paths: &[PathBuf],
        predictor: &SamPredictor,
        progress: &mut dyn FnMut(usize, usize),
        cancel: &AtomicBool,
    ) -> PrecomputeReport {
        let mut report = PrecomputeReport::default();
        let total = paths.len();
        for (i, path) in paths.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                report.cancelled = true;
                break;
            }
            match self.lookup_or_compute(path, predictor, self.dir.is_none()) {
                Ok((_, true)) => report.computed += 1,
                Ok((_, false)) => report.cached += 1,
                Err(e) => report.failed.push((path.clone(), e.to_string())),
            }
            progress(i + 1, total);
        }
        report
    }
}

/// Reads and checks a disk entry; any problem is a reason string (the caller recomputes).
fn read_entry(
    path: &Path,
    image_sha256: &str,
    checkpoint_sha256: &str,
    device: &Device,
) -> std::result::Result<Embedding, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or(format!("no `{k}` in the header"))
    };
    if field("format")? != FORMAT {
        return Err("another format".to_string());
    }
    if field("image_sha256")? != image_sha256 {
        return Err("made for another image".to_string());
    }
    if field("checkpoint_sha256")? != checkpoint_sha256 {
        return Err("made with another checkpoint".to_string());
    }
    let size = |k: &str| -> std::result::Result<(usize, usize), String> {
        let v: [usize; 2] = serde_json::from_str(&field(k)?).map_err(|e| format!("{k}: {e}"))?;
        Ok((v[0], v[1]))
    };
    let (original_size, input_size) = (size("original_size")?, size("input_size")?);
    let view = st.tensor(FEATURES).map_err(|e| e.to_string())?;
    let shape = view.shape().to_vec();
    let ok_shape = shape.len() == 4 && shape[0] == 1 && shape[2] == super::EMBED_SIZE;
    if view.dtype() != safetensors::Dtype::F32 || !ok_shape || shape[3] != super::EMBED_SIZE {
        return Err(format!("features {:?} {shape:?}", view.dtype()));
    }
    let features = Tensor::from_raw_buffer(view.data(), DType::F32, &shape, &Device::Cpu)
        .and_then(|t| t.to_device(device))
        .map_err(|e| e.to_string())?;
    Ok(Embedding {
        features,
        original_size,
        input_size,
    })
}

/// Writes a disk entry durably (temporary file in the same folder, fsync, rename).
fn write_entry(
    path: &Path,
    emb: &Embedding,
    image_sha256: &str,
    checkpoint_sha256: &str,
    variant: &str,
) -> Result<()> {
    let features = emb.features.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let shape = features.dims().to_vec();
    let data: Vec<f32> = features.flatten_all()?.to_vec1()?;
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        TensorView::new(safetensors::Dtype::F32, shape, &raw).map_err(|e| file_err(path, e))?;
    let size = |s: (usize, usize)| format!("[{}, {}]", s.0, s.1);
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("image_sha256".to_string(), image_sha256.to_string()),
        (
            "checkpoint_sha256".to_string(),
            checkpoint_sha256.to_string(),
        ),
        ("variant".to_string(), variant.to_string()),
        ("original_size".to_string(), size(emb.original_size)),
        ("input_size".to_string(), size(emb.input_size)),
    ]);
    let bytes =
        safetensors::serialize([(FEATURES, view)], Some(meta)).map_err(|e| file_err(path, e))?;
    crate::fsutil::write_durable(path, &bytes).map_err(|e| file_err(&e.path, e.source))
}
