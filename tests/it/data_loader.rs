//! Integration tests of the data module on the real datasets in
//! `../shared/data` (required: a missing folder fails the tests) and on
//! broken files made in a temporary folder.

use std::fs;
use std::path::{Path, PathBuf};

use medmine::data::{
    image_size, load_image, load_mask, prepare, read_split_list, save_gray_png, DataError, Dataset,
    Sample,
};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");

/// A folder of the shared test data; panics (fails the test) when missing.
fn data(rel: &str) -> PathBuf {
    let p = Path::new(DATA).join(rel);
    assert!(
        p.exists(),
        "test data not found: expected {} (the shared data folder is {DATA}, \
         see its README.md)",
        p.display()
    );
    p
}

fn kvasir() -> Dataset {
    Dataset::scan(&data("kvasir-seg")).expect("scan kvasir-seg")
}

fn select_list(ds: &Dataset, rel: &str) -> Vec<Sample> {
    let list = data(rel);
    let names = read_split_list(&list).expect("read split list");
    ds.select(&names, &list).expect("select split")
}

#[test]
fn kvasir_scan_has_1000_labelled_samples() {
    let ds = kvasir();
    assert_eq!(ds.samples.len(), 1000);
    assert_eq!(ds.labelled().len(), 1000);
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped_report());
    assert!(ds.samples.windows(2).all(|w| w[0].name < w[1].name));
    let s = &ds.samples[0];
    assert!(s.name.ends_with(".jpg"));
    assert_eq!(s.mask.as_ref().unwrap().file_name(), s.image.file_name());
}

#[test]
fn kvasir_official_split_selects() {
    let ds = kvasir();
    let train = select_list(&ds, "splits/kvasir-seg/official-train.txt");
    let val = select_list(&ds, "splits/kvasir-seg/official-val.txt");
    assert_eq!((train.len(), val.len()), (880, 120));
    let mut all: Vec<&str> = train.iter().chain(&val).map(|s| s.name.as_str()).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        1000,
        "official train/val are disjoint and cover all"
    );
    for (rel, n) in [("train", 792), ("val", 88), ("test", 120)] {
        let sel = select_list(&ds, &format!("splits/kvasir-seg/{rel}.txt"));
        assert_eq!(sel.len(), n, "{rel}");
    }
}

#[test]
fn kvasir_image_sizes_match_masks() {
    let ds = kvasir();
    for s in ds.samples.iter().step_by(97) {
        let img = image_size(&s.image).unwrap();
        let mask = image_size(s.mask.as_ref().unwrap()).unwrap();
        assert_eq!(img, mask, "{}", s.name);
        assert!(img.0 >= 332 && img.0 <= 1920 && img.1 >= 352 && img.1 <= 1072);
    }
    // The header size agrees with the decoded size, and masks are binary with
    // some foreground.
    let s = &ds.samples[0];
    let img = load_image(&s.image).unwrap();
    assert_eq!(image_size(&s.image).unwrap(), (img.width, img.height));
    assert_eq!(img.data.len(), 3 * img.width * img.height);
    assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let m = load_mask(s.mask.as_ref().unwrap()).unwrap();
    assert!(m.data.iter().all(|&v| v <= 1));
    let fg = m.foreground_fraction();
    assert!(fg > 0.004 && fg < 0.82, "foreground fraction {fg}");
}

#[test]
fn kvasir_prepare_8_samples_at_64() {
    let ds = kvasir();
    let samples: Vec<Sample> = ds.samples.iter().step_by(125).cloned().collect();
    assert_eq!(samples.len(), 8);
    let p = prepare(&samples, 64).unwrap();
    assert_eq!(p.len(), 8);
    for (q, s) in p.iter().zip(&samples) {
        assert_eq!(q.name, s.name);
        assert_eq!(q.image.len(), 3 * 64 * 64);
        assert_eq!(q.mask.len(), 64 * 64);
        assert_eq!(q.weight, 1.0);
        assert!(q.mask.iter().all(|&v| v == 0.0 || v == 1.0));
        let fg = q.mask.iter().filter(|&&v| v == 1.0).count();
        assert!(fg > 0 && fg < 64 * 64, "{}: {fg} foreground pixels", q.name);
        assert!(q.image.iter().all(|v| (0.0..=1.0).contains(v)));
        // Colour images: the channels differ.
        assert_ne!(&q.image[..4096], &q.image[4096..8192]);
    }
}

#[test]
fn lung_cxr_600_gray_256() {
    let ds = Dataset::scan(&data("lung-cxr")).unwrap();
    assert_eq!(ds.samples.len(), 600);
    assert_eq!(ds.labelled().len(), 600);
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped_report());
    for (rel, n) in [("train", 360), ("val", 90), ("test", 150)] {
        let sel = select_list(&ds, &format!("splits/lung-cxr/{rel}.txt"));
        assert_eq!(sel.len(), n, "{rel}");
    }
    for s in ds.samples.iter().step_by(60) {
        let img = load_image(&s.image).unwrap();
        assert_eq!((img.width, img.height), (256, 256), "{}", s.name);
        let n = 256 * 256;
        assert_eq!(img.data.len(), 3 * n);
        assert_eq!(img.channel(0), img.channel(1), "{}", s.name);
        assert_eq!(img.channel(0), img.channel(2), "{}", s.name);
        assert!(img.data.iter().any(|&v| v > 0.5));
        let m = load_mask(s.mask.as_ref().unwrap()).unwrap();
        assert_eq!((m.width, m.height), (256, 256));
        let fg = m.foreground_fraction();
        assert!(fg > 0.06 && fg < 0.48, "{}: lung fraction {fg}", s.name);
    }
}

// ---------- broken and unusual files ----------

fn gray_png(path: &Path, w: usize, h: usize) {
    let px: Vec<u8> = (0..w * h).map(|i| (i * 13 % 256) as u8).collect();
    save_gray_png(path, w, h, &px).unwrap();
}

fn dataset_dirs(root: &Path) {
    fs::create_dir_all(root.join("images")).unwrap();
    fs::create_dir_all(root.join("masks")).unwrap();
}

#[test]
fn truncated_png_is_a_decode_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("trunc.png");
    gray_png(&p, 64, 64);
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_image(&p).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&p.display().to_string()), "{msg}");
    assert!(matches!(e, DataError::Decode { .. }), "{e:?}");
    assert!(msg.contains("cannot decode image"), "{msg}");
    assert!(load_mask(&p).is_err());
}

#[test]
fn garbage_jpg_is_a_decode_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("garbage.jpg");
    fs::write(
        &p,
        b"this is not a jpeg at all, just some bytes \x00\x01\x02",
    )
    .unwrap();
    let msg = load_image(&p).unwrap_err().to_string();
    assert!(
        msg.contains("garbage.jpg") && msg.contains("cannot decode image"),
        "{msg}"
    );
    assert!(image_size(&p).is_err());
    let missing = d.path().join("nope.png");
    let msg = load_image(&missing).unwrap_err().to_string();
    assert!(msg.contains("nope.png"), "{msg}");
}

#[test]
fn mask_of_another_size_is_reported_by_prepare() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    dataset_dirs(root);
    gray_png(&root.join("images/a.png"), 20, 20);
    gray_png(&root.join("masks/a.png"), 10, 12);
    let ds = Dataset::scan(root).unwrap();
    let msg = prepare(&ds.samples, 16).unwrap_err().to_string();
    let mask_path = root.join("masks/a.png").display().to_string();
    assert!(msg.starts_with(&mask_path), "{msg}");
    assert!(
        msg.contains("mask is 10x12") && msg.contains("is 20x20"),
        "{msg}"
    );
}

#[test]
fn missing_root_and_empty_images_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("no-such-dataset");
    let msg = Dataset::scan(&missing).unwrap_err().to_string();
    assert!(
        msg.contains("no-such-dataset: dataset folder not found"),
        "{msg}"
    );

    let root = d.path().join("empty");
    dataset_dirs(&root);
    let msg = Dataset::scan(&root).unwrap_err().to_string();
    assert!(msg.contains("no images found in images/"), "{msg}");

    let root = d.path().join("no-images-dir");
    fs::create_dir_all(&root).unwrap();
    let msg = Dataset::scan(&root).unwrap_err().to_string();
    assert!(msg.contains("images/ folder not found"), "{msg}");
}

#[test]
fn unsupported_file_and_orphan_mask_are_skipped_with_reasons() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    dataset_dirs(root);
    gray_png(&root.join("images/a.jpg"), 8, 8); // PNG bytes, .jpg name: content wins
    gray_png(&root.join("images/b.png"), 8, 8);
    gray_png(&root.join("masks/a.png"), 8, 8); // other extension, same stem
    gray_png(&root.join("masks/orphan.png"), 8, 8);
    fs::write(root.join("images/readme.txt"), "notes").unwrap();
    let ds = Dataset::scan(root).unwrap();
    assert_eq!(ds.samples.len(), 2);
    assert_eq!(ds.labelled().len(), 1);
    assert_eq!(
        ds.get("a.jpg").unwrap().mask,
        Some(root.join("masks/a.png"))
    );
    assert!(
        ds.get("b.png").unwrap().mask.is_none(),
        "no mask = unlabelled"
    );
    assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
    let txt = ds
        .skipped
        .iter()
        .find(|s| s.path.ends_with("readme.txt"))
        .unwrap();
    assert!(txt.reason.contains("unsupported"), "{}", txt.reason);
    let orphan = ds
        .skipped
        .iter()
        .find(|s| s.path.ends_with("orphan.png"))
        .unwrap();
    assert!(orphan.reason.contains("no image"), "{}", orphan.reason);
    let report = ds.skipped_report().unwrap();
    assert!(
        report.contains("readme.txt") && report.contains("orphan.png"),
        "{report}"
    );
    // Loading still works on the mismatched extension.
    assert_eq!(load_image(&root.join("images/a.jpg")).unwrap().width, 8);
}

#[test]
fn sixteen_bit_gray_png_loads_stretched_to_unit_range() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("g16.png");
    let vals: Vec<u16> = (0..16).map(|i| 1000 + 100 * i).collect();
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(4, 4, vals).unwrap();
    img.save(&p).unwrap();
    let f = load_image(&p).unwrap();
    assert_eq!((f.width, f.height, f.data.len()), (4, 4, 48));
    assert_eq!(f.channel(0), f.channel(1));
    assert_eq!(f.channel(0), f.channel(2));
    assert_eq!(f.data[0], 0.0);
    assert_eq!(f.data[15], 1.0);
    assert!((f.data[5] - 5.0 / 15.0).abs() < 1e-6);
    assert!(f.data.iter().all(|v| (0.0..=1.0).contains(v)));
    // As a mask, the 16-bit rule applies: all values < 32768 -> background.
    assert_eq!(load_mask(&p).unwrap().foreground(), 0);
}

#[test]
fn rgba_png_drops_alpha() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("rgba.png");
    let img = image::RgbaImage::from_fn(3, 2, |x, y| {
        image::Rgba([255, (x * 100) as u8, (y * 51) as u8, (x * 40) as u8])
    });
    img.save(&p).unwrap();
    let f = load_image(&p).unwrap();
    assert_eq!((f.width, f.height, f.data.len()), (3, 2, 18));
    assert!(f.channel(0).iter().all(|&v| v == 1.0));
    assert_eq!(f.channel(1)[2], 200.0 / 255.0);
    assert_eq!(f.channel(2)[3], 51.0 / 255.0);
    assert!(f.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn list_entry_not_in_dataset_names_the_list() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("ds");
    dataset_dirs(&root);
    gray_png(&root.join("images/a.png"), 4, 4);
    let ds = Dataset::scan(&root).unwrap();
    let list = d.path().join("my-split.txt");
    fs::write(&list, "a.png\n# comment\nghost.png\n").unwrap();
    let names = read_split_list(&list).unwrap();
    let msg = ds.select(&names, &list).unwrap_err().to_string();
    assert!(msg.starts_with(&list.display().to_string()), "{msg}");
    assert!(
        msg.contains("line 3: ghost.png is not in the dataset"),
        "{msg}"
    );
    let e = read_split_list(&d.path().join("absent.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.txt"), "{e}");
}
