//! The embedding cache (memory LRU + disk) on the parity fixture's small SAM.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use medmine::models::sam::{self, CacheStats, EmbeddingCache, SamPredictor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam")
}

fn checkpoint() -> PathBuf {
    dir().join("sam_tiny.safetensors")
}

fn predictor() -> SamPredictor {
    SamPredictor::new(sam::load_sam(&checkpoint(), None, &Device::Cpu).unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    let d = d.abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `n` distinct small images (the fixture image, flipped/shifted) in `tmp`.
fn images(tmp: &Path, n: usize) -> Vec<PathBuf> {
    let base = image::open(dir().join("image.png")).unwrap().to_rgb8();
    (0..n)
        .map(|i| {
            let mut img = if i % 2 == 1 {
                image::imageops::flip_horizontal(&base)
            } else {
                base.clone()
            };
            img.put_pixel(0, 0, image::Rgb([i as u8, 0, 0]));
            let p = tmp.join(format!("img{i}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

fn stats(memory_hits: usize, disk_hits: usize, encoder_calls: usize, damaged: usize) -> CacheStats {
    CacheStats {
        memory_hits,
        disk_hits,
        encoder_calls,
        damaged,
        files_hashed: 0,
    }
}

/// The counters but the file hashes.
fn hits(s: CacheStats) -> CacheStats {
    CacheStats {
        files_hashed: 0,
        ..s
    }
}

#[test]
fn second_call_hits_memory_and_lru_evicts() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(tmp.path(), 2);
    let p = predictor();
    let cache = EmbeddingCache::new(None, 1, &checkpoint()).unwrap();
    assert_eq!(cache.checkpoint_sha256().len(), 64);
    let a = cache.get_or_compute(&imgs[0], &p).unwrap();
    let b = cache.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(cache.stats()), stats(1, 0, 1, 0));
    assert_eq!(max_abs_diff(&a.features, &b.features), 0.0);
    assert_eq!((a.original_size, a.input_size), ((136, 160), (870, 1024)));
    // capacity 1: the second image evicts the first
    cache.get_or_compute(&imgs[1], &p).unwrap();
    cache.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(cache.stats()), stats(1, 0, 3, 0));
}

#[test]
fn fresh_cache_hits_disk_with_identical_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(tmp.path(), 1);
    let store = tmp.path().join("cache");
    let p = predictor();
    let first = EmbeddingCache::new(Some(&store), 4, &checkpoint()).unwrap();
    let a = first.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(first.stats()), stats(0, 0, 1, 0));
    let files: Vec<_> = std::fs::read_dir(&store).unwrap().collect();
    assert_eq!(files.len(), 1, "one entry, no temporary files left");

    let second = EmbeddingCache::new(Some(&store), 4, &checkpoint()).unwrap();
    let b = second.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(second.stats()), stats(0, 1, 0, 0));
    assert_eq!(max_abs_diff(&a.features, &b.features), 0.0);
    assert_eq!(
        (a.original_size, a.input_size),
        (b.original_size, b.input_size)
    );
    second.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(second.stats()), stats(1, 1, 0, 0));
}

#[test]
fn damaged_entries_are_recomputed_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(tmp.path(), 1);
    let store = tmp.path().join("cache");
    let p = predictor();
    let cache = EmbeddingCache::new(Some(&store), 0, &checkpoint()).unwrap();
    let a = cache.get_or_compute(&imgs[0], &p).unwrap();
    let sha = cache.checkpoint_sha256().to_string();
    let image_sha = sam::cache::sha256_file(&imgs[0]).unwrap();
    let entry = cache.entry_path(&image_sha).unwrap();
    let good = std::fs::read(&entry).unwrap();
    let damages: [(&str, Vec<u8>); 4] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("garbage", vec![0xff; 1000]),
        ("header only", good[..good.len() - 4 * 64 * 64].to_vec()),
    ];
    for (what, bytes) in damages {
        std::fs::write(&entry, bytes).unwrap();
        let fresh = EmbeddingCache::with_checkpoint_hash(Some(&store), 0, &sha).unwrap();
        let b = fresh.get_or_compute(&imgs[0], &p).unwrap();
        assert_eq!(hits(fresh.stats()), stats(0, 0, 1, 1), "{what}");
        assert_eq!(max_abs_diff(&a.features, &b.features), 0.0, "{what}");
        // replaced: the next fresh cache hits disk
        let again = EmbeddingCache::with_checkpoint_hash(Some(&store), 0, &sha).unwrap();
        again.get_or_compute(&imgs[0], &p).unwrap();
        assert_eq!(hits(again.stats()), stats(0, 1, 0, 0), "{what}");
    }
}

#[test]
fn another_checkpoint_hash_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(tmp.path(), 1);
    let store = tmp.path().join("cache");
    let p = predictor();
    let sha = sam::cache::sha256_file(&checkpoint()).unwrap();
    let cache = EmbeddingCache::with_checkpoint_hash(Some(&store), 2, &sha).unwrap();
    cache.get_or_compute(&imgs[0], &p).unwrap();
    // a different checkpoint: another file name, a miss
    let other = EmbeddingCache::with_checkpoint_hash(Some(&store), 2, &"0".repeat(64)).unwrap();
    other.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(other.stats()), stats(0, 0, 1, 0));
    // same first 16 hex digits (same file name), other hash: the header says no
    let twin = format!("{}{}", &sha[..16], "f".repeat(48));
    let twin = EmbeddingCache::with_checkpoint_hash(Some(&store), 2, &twin).unwrap();
    twin.get_or_compute(&imgs[0], &p).unwrap();
    assert_eq!(hits(twin.stats()), stats(0, 0, 1, 1));
}

#[test]
fn precompute_reports_progress_and_cancel_stops_early() {
    let tmp = tempfile::tempdir().unwrap();
    let mut imgs = images(tmp.path(), 3);
    imgs.insert(1, tmp.path().join("missing.png"));
    let store = tmp.path().join("cache");
    let p = predictor();
    let cache = EmbeddingCache::new(Some(&store), 4, &checkpoint()).unwrap();

    let cancel = AtomicBool::new(false);
    let mut seen = Vec::new();
    let rep = cache.precompute(
        &imgs,
        &p,
        &mut |done, total| {
            seen.push((done, total));
            if done == 2 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(rep.cancelled);
    assert_eq!(seen, vec![(1, 4), (2, 4)]);
    assert_eq!((rep.computed, rep.cached), (1, 0));
    assert_eq!(rep.failed.len(), 1);
    assert!(rep.failed[0].1.contains("missing.png"), "{:?}", rep.failed);
    assert_eq!(cache.stats().encoder_calls, 1);

    // the rest, then everything is on disk
    let go = AtomicBool::new(false);
    let rep = cache.precompute(&imgs, &p, &mut |_, _| {}, &go);
    assert!(!rep.cancelled);
    assert_eq!((rep.computed, rep.cached, rep.failed.len()), (2, 1, 1));
    let fresh = EmbeddingCache::new(Some(&store), 4, &checkpoint()).unwrap();
    for i in [0, 2, 3] {
        fresh.get_or_compute(&imgs[i], &p).unwrap();
    }
    assert_eq!(hits(fresh.stats()), stats(0, 3, 0, 0));
}

#[test]
fn images_are_hashed_once_and_decoded_as_mining_decodes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let p = predictor();
    let cache = EmbeddingCache::new(None, 4, &checkpoint()).unwrap();
    // A 16-bit gray image using part of its range: the data layer stretches it to [0, 1];
    // the image crate's own 8-bit conversion (what the cache used) keeps the high byte.
    let path = tmp.path().join("ct16.png");
    let img = image::ImageBuffer::from_fn(40, 30, |x, y| {
        image::Luma([1000u16 + 50 * x as u16 + 7 * y as u16])
    });
    img.save(&path).unwrap();
    let shared = medmine::data::load_rgb8(&path).unwrap();
    let naive = image::open(&path).unwrap().to_rgb8();
    assert_ne!(shared, naive, "the two decodings differ on this image");
    let first = cache.get_or_compute(&path, &p).unwrap();
    let expected = p.set_image(&shared).unwrap();
    assert_eq!(max_abs_diff(&first.features, &expected.features), 0.0);
    // a second click: memory hit, and the file is not read and hashed again
    cache.get_or_compute(&path, &p).unwrap();
    let s = cache.stats();
    assert_eq!((s.memory_hits, s.encoder_calls, s.files_hashed), (1, 1, 1));
    // the file changes (another size): hashed again, encoded again
    let img = image::ImageBuffer::from_fn(41, 30, |x, _| image::Luma([2000u16 + 9 * x as u16]));
    img.save(&path).unwrap();
    cache.get_or_compute(&path, &p).unwrap();
    let s = cache.stats();
    assert_eq!((s.encoder_calls, s.files_hashed), (2, 2));

    // DICOM, which the image crate cannot read at all, through the same decoder
    let dcm = tmp.path().join("cr.dcm");
    crate::data_dicom::write_cr(&dcm);
    let emb = cache.get_or_compute(&dcm, &p).unwrap();
    let expected = p
        .set_image(&medmine::data::load_rgb8(&dcm).unwrap())
        .unwrap();
    assert_eq!(max_abs_diff(&emb.features, &expected.features), 0.0);
}
