//! DICOM import: files built in memory with dicom-object, written to a
//! temporary folder, then read back through the data layer.

use std::fs;
use std::path::{Path, PathBuf};

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use medmine::data::{
    image_size, load_image, load_image_with_range, load_mask, prepare, read_dicom, save_gray_png,
    window_to_u8, DataError, Dataset, ValueRange,
};

enum Pixels {
    /// Native 16-bit words (OW).
    Words(Vec<u16>),
    /// Native 8-bit samples (OB).
    Bytes(Vec<u8>),
    /// One encapsulated fragment (compressed transfer syntaxes).
    Fragment(Vec<u8>),
    None,
}

struct Spec {
    rows: u16,
    cols: u16,
    bits: u16,
    stored: u16,
    signed: bool,
    photometric: &'static str,
    samples_per_pixel: u16,
    frames: Option<&'static str>,
    rescale: Option<(&'static str, &'static str)>,
    window: Option<(&'static str, &'static str)>,
    ts: &'static str,
    pixels: Pixels,
}

impl Spec {
    /// A 16-bit, 12 bits stored MONOCHROME2 CR in Explicit VR Little Endian.
    fn cr(rows: u16, cols: u16, words: Vec<u16>) -> Spec {
        Spec {
            rows,
            cols,
            bits: 16,
            stored: 12,
            signed: false,
            photometric: "MONOCHROME2",
            samples_per_pixel: 1,
            frames: None,
            rescale: None,
            window: None,
            ts: uids::EXPLICIT_VR_LITTLE_ENDIAN,
            pixels: Pixels::Words(words),
        }
    }
}

fn write_dicom(path: &Path, s: Spec) {
    let el = |tag, vr, v: PrimitiveValue| DataElement::new(tag, vr, v);
    let us = |tag, v: u16| el(tag, VR::US, PrimitiveValue::from(v));
    let mut obj = InMemDicomObject::from_element_iter([
        el(
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE.into(),
        ),
        el(tags::SOP_INSTANCE_UID, VR::UI, "2.25.1234567890".into()),
        el(tags::MODALITY, VR::CS, "CR".into()),
        us(tags::SAMPLES_PER_PIXEL, s.samples_per_pixel),
        el(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            s.photometric.into(),
        ),
        us(tags::ROWS, s.rows),
        us(tags::COLUMNS, s.cols),
        us(tags::BITS_ALLOCATED, s.bits),
        us(tags::BITS_STORED, s.stored),
        us(tags::HIGH_BIT, s.stored - 1),
        us(tags::PIXEL_REPRESENTATION, u16::from(s.signed)),
    ]);
    if s.samples_per_pixel > 1 {
        obj.put(us(tags::PLANAR_CONFIGURATION, 0));
    }
    if let Some(n) = s.frames {
        obj.put(el(tags::NUMBER_OF_FRAMES, VR::IS, n.into()));
    }
    if let Some((slope, intercept)) = s.rescale {
        obj.put(el(tags::RESCALE_SLOPE, VR::DS, slope.into()));
        obj.put(el(tags::RESCALE_INTERCEPT, VR::DS, intercept.into()));
    }
    if let Some((c, w)) = s.window {
        obj.put(el(tags::WINDOW_CENTER, VR::DS, c.into()));
        obj.put(el(tags::WINDOW_WIDTH, VR::DS, w.into()));
    }
    match s.pixels {
        Pixels::Words(w) => obj.put(el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(w.into()))),
        Pixels::Bytes(b) => obj.put(el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(b.into()))),
        Pixels::Fragment(f) => obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(Vec::<u32>::new(), vec![f]),
        )),
        Pixels::None => None,
    };
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(s.ts))
        .expect("meta");
    file.write_to_file(path).expect("write DICOM");
}

fn err_text(r: Result<impl std::fmt::Debug, DataError>, path: &Path) -> String {
    let e = r.expect_err("expected an error").to_string();
    assert!(
        e.starts_with(&path.display().to_string()),
        "error does not name the file: {e}"
    );
    e
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// 16-bit MONOCHROME2 CR with rescale and a two-valued window.
/// A small 16-bit CR file (also used by the SAM cache tests).
pub(crate) fn write_cr(path: &Path) {
    // 2 rows x 3 columns; the top nibble of the first word is overlay garbage
    let words = vec![0xF000 | 100, 200, 300, 1000, 2000, 4095];
    let mut s = Spec::cr(2, 3, words);
    s.rescale = Some(("2", "-1024"));
    s.window = Some(("1000\\2000", "400\\800"));
    write_dicom(path, s);
}

/// A `size x size` CT-like slice (stored values 0..4095 in a gradient, rescale slope 1 and
/// intercept -1024, so -1024..3071 HU) with the soft-tissue window 40 / 400 in the file.
pub(crate) fn write_ct(path: &Path, size: u16) {
    let n = usize::from(size) * usize::from(size);
    let words = (0..n).map(|i| (i * 4095 / (n - 1)) as u16).collect();
    let mut s = Spec::cr(size, size, words);
    s.rescale = Some(("1", "-1024"));
    s.window = Some(("40", "400"));
    write_dicom(path, s);
}

#[test]
fn value_range_keeps_the_modality_range_rescale_and_window() {
    let dir = tmp();
    let p = dir.path().join("cr.dcm");
    write_cr(&p);
    let (img, range) = load_image_with_range(&p).expect("load with range");
    assert_eq!(img, load_image(&p).unwrap(), "the same image as load_image");
    assert_eq!(
        range,
        ValueRange {
            lo: -824.0,
            hi: 7166.0,
            inverted: false,
            rescaled: true,
            dicom: true,
            window: Some((1000.0, 400.0)),
        }
    );
    // no rescale tags: modality values are the stored values, not HU
    let q = dir.path().join("plain.dcm");
    write_dicom(&q, Spec::cr(1, 2, vec![5, 9]));
    let (_, r) = load_image_with_range(&q).unwrap();
    assert!(r.dicom && !r.rescaled && r.window.is_none());
    assert_eq!((r.lo, r.hi), (5.0, 9.0));
    // a PNG: gray levels
    let png = dir.path().join("a.png");
    save_gray_png(&png, 2, 1, &[0, 255]).unwrap();
    assert_eq!(load_image_with_range(&png).unwrap().1, ValueRange::GRAY8);
}

#[test]
fn cr_16bit_rescale_window_and_model_input() {
    let dir = tmp();
    let p = dir.path().join("cr.dcm");
    write_cr(&p);

    let img = read_dicom(&p).expect("read CR");
    assert_eq!((img.width, img.height), (3, 2));
    assert_eq!(img.photometric, "MONOCHROME2");
    assert_eq!(img.bits_stored, 12);
    assert_eq!(img.window, Some((1000.0, 400.0)));
    // stored * 2 - 1024
    let expected = [-824.0, -624.0, -424.0, 976.0, 2976.0, 7166.0];
    assert_eq!(img.samples, expected);
    assert_eq!(image_size(&p).expect("size"), (3, 2));

    let x = load_image(&p).expect("load_image");
    assert_eq!((x.width, x.height, x.data.len()), (3, 2, 18));
    let range = 7166.0 - -824.0;
    for c in 0..3 {
        assert_eq!(x.channel(c), x.channel(0));
        for (v, e) in x.channel(c).iter().zip(expected) {
            assert!((v - (e - -824.0) / range).abs() < 1e-6, "{v} vs {e}");
        }
    }
    assert_eq!(x.channel(0)[0], 0.0);
    assert_eq!(x.channel(0)[5], 1.0);

    // window c = 1000, w = 400: x <= 800 -> 0, x > 1199 -> 255, else
    // ((x - 999.5) / 399 + 0.5) * 255: 976 -> 112.48
    assert_eq!(window_to_u8(&img, img.window), vec![0, 0, 0, 112, 255, 255]);
    // the second pair, given by hand: c = 2000, w = 800: 976 -> 0,
    // 2976 -> 255; without a window: min-max
    assert_eq!(
        window_to_u8(&img, Some((2000.0, 800.0))),
        vec![0, 0, 0, 0, 255, 255]
    );
    let mm: Vec<u8> = expected
        .iter()
        .map(|e| ((e - -824.0) / range * 255.0f32).round() as u8)
        .collect();
    assert_eq!(window_to_u8(&img, None), mm);
    assert_eq!(mm, vec![0, 6, 13, 57, 121, 255]);
}

#[test]
fn monochrome1_is_inverted_for_the_model_and_display() {
    let dir = tmp();
    let p = dir.path().join("m1.DCM");
    let mut s = Spec::cr(1, 3, vec![0, 500, 1000]);
    s.photometric = "MONOCHROME1";
    s.stored = 16;
    s.ts = uids::IMPLICIT_VR_LITTLE_ENDIAN;
    write_dicom(&p, s);
    let img = read_dicom(&p).expect("read MONOCHROME1");
    assert_eq!(img.photometric, "MONOCHROME1");
    assert_eq!(img.samples, [0.0, 500.0, 1000.0]);
    assert_eq!(img.window, None);
    let x = load_image(&p).expect("load_image");
    for c in 0..3 {
        assert_eq!(x.channel(c), &[1.0, 0.5, 0.0]);
    }
    assert_eq!(window_to_u8(&img, None), vec![255, 127, 0]);
    assert!(load_image_with_range(&p).unwrap().1.inverted);
}

#[test]
fn eight_bit_is_min_max_stretched_and_signed_values_are_sign_extended() {
    let dir = tmp();
    let p = dir.path().join("dx8.dcm");
    let mut s = Spec::cr(2, 2, vec![]);
    s.bits = 8;
    s.stored = 8;
    s.pixels = Pixels::Bytes(vec![10, 20, 40, 60]);
    write_dicom(&p, s);
    let img = read_dicom(&p).expect("read 8-bit");
    assert_eq!(img.samples, [10.0, 20.0, 40.0, 60.0]);
    assert_eq!(img.bits_stored, 8);
    let x = load_image(&p).expect("load 8-bit");
    assert_eq!(x.channel(1), &[0.0, 0.2, 0.6, 1.0]);

    // 12 bits stored, signed: 0xFFF is -1, 0x800 is -2048
    let p = dir.path().join("signed.dcm");
    let mut s = Spec::cr(1, 3, vec![0x0FFF, 0x0800, 0x07FF]);
    s.signed = true;
    s.rescale = Some(("1", "10"));
    write_dicom(&p, s);
    let img = read_dicom(&p).expect("read signed");
    assert_eq!(img.samples, [9.0, -2038.0, 2057.0]);
}

#[test]
fn multi_frame_is_refused() {
    let dir = tmp();
    let p = dir.path().join("two.dcm");
    let mut s = Spec::cr(2, 2, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    s.frames = Some("2");
    write_dicom(&p, s);
    let e = err_text(read_dicom(&p), &p);
    assert!(
        e.contains("2 frames; medmine imports single-frame CR/DX"),
        "{e}"
    );
    let e = err_text(image_size(&p), &p);
    assert!(e.contains("2 frames"), "{e}");
    let e = err_text(load_image(&p), &p);
    assert!(e.contains("2 frames"), "{e}");
}

#[test]
fn truncated_and_non_dicom_files_are_clear_errors() {
    let dir = tmp();
    let full = dir.path().join("full.dcm");
    write_cr(&full);
    let bytes = fs::read(&full).expect("read back");

    // cut inside the pixel data
    let p = dir.path().join("cut.dcm");
    fs::write(&p, &bytes[..bytes.len() - 5]).expect("write");
    let e = err_text(read_dicom(&p), &p);
    assert!(e.contains("truncated"), "{e}");
    let e = err_text(load_image(&p), &p);
    assert!(e.contains("truncated"), "{e}");

    // cut inside the header
    let p = dir.path().join("cut_head.dcm");
    fs::write(&p, &bytes[..200]).expect("write");
    let e = err_text(read_dicom(&p), &p);
    assert!(e.contains("truncated") || e.contains("DICOM"), "{e}");

    // a text file and an empty file with the extension
    let p = dir.path().join("notes.dcm");
    fs::write(&p, "patient notes, not an image\n").expect("write");
    let e = err_text(read_dicom(&p), &p);
    assert!(e.contains("not a DICOM file"), "{e}");
    let e = err_text(image_size(&p), &p);
    assert!(e.contains("not a DICOM file"), "{e}");
    let p = dir.path().join("empty.dicom");
    fs::write(&p, "").expect("write");
    assert!(err_text(load_image(&p), &p).contains("not a DICOM file"));

    // a missing file is an I/O error naming it
    let p = dir.path().join("gone.dcm");
    let e = err_text(read_dicom(&p), &p);
    assert!(matches!(read_dicom(&p), Err(DataError::Io { .. })), "{e}");
}

#[test]
fn colour_missing_pixels_and_unsupported_syntax_are_refused() {
    let dir = tmp();
    let p = dir.path().join("rgb.dcm");
    let mut s = Spec::cr(1, 2, vec![]);
    s.photometric = "RGB";
    s.samples_per_pixel = 3;
    s.bits = 8;
    s.stored = 8;
    s.pixels = Pixels::Bytes(vec![1, 2, 3, 4, 5, 6]);
    write_dicom(&p, s);
    let e = err_text(read_dicom(&p), &p);
    assert!(
        e.contains("colour DICOM (PhotometricInterpretation RGB"),
        "{e}"
    );

    let p = dir.path().join("nopix.dcm");
    let mut s = Spec::cr(2, 2, vec![]);
    s.pixels = Pixels::None;
    write_dicom(&p, s);
    let e = err_text(read_dicom(&p), &p);
    assert!(e.contains("missing pixel data"), "{e}");
    // the header alone is fine
    assert_eq!(image_size(&p).expect("size"), (2, 2));

    let p = dir.path().join("j2k.dcm");
    let mut s = Spec::cr(2, 2, vec![]);
    s.ts = uids::JPEG2000;
    s.pixels = Pixels::Fragment(vec![0xFF, 0x4F, 0xFF, 0x51]);
    write_dicom(&p, s);
    let e = err_text(read_dicom(&p), &p);
    assert!(
        e.contains("unsupported transfer syntax 1.2.840.10008.1.2.4.91"),
        "{e}"
    );
    let e = err_text(image_size(&p), &p);
    assert!(e.contains("unsupported transfer syntax"), "{e}");

    let p = dir.path().join("short.dcm");
    write_dicom(&p, Spec::cr(2, 2, vec![1, 2, 3]));
    let e = err_text(read_dicom(&p), &p);
    assert!(e.contains("pixel data is too short"), "{e}");
}

/// PackBits literal runs, as RLE Lossless segments use.
fn packbits_literal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(128) {
        out.push((chunk.len() - 1) as u8);
        out.extend_from_slice(chunk);
    }
    if out.len() % 2 == 1 {
        out.push(0);
    }
    out
}

#[test]
fn rle_lossless_16bit_decodes_exactly() {
    // 3 x 5 pixels: 15 bytes per segment + 1 control byte = even segments
    let words: Vec<u16> = (0..15u16).map(|i| i * 251 + 7).collect();
    let hi: Vec<u8> = words.iter().map(|w| (w >> 8) as u8).collect();
    let lo: Vec<u8> = words.iter().map(|w| (w & 0xFF) as u8).collect();
    let (s1, s2) = (packbits_literal(&hi), packbits_literal(&lo));
    let mut header = [0u32; 16];
    header[0] = 2;
    header[1] = 64;
    header[2] = 64 + s1.len() as u32;
    let mut frag: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    frag.extend(s1);
    frag.extend(s2);

    let dir = tmp();
    let p = dir.path().join("rle.dcm");
    let mut s = Spec::cr(3, 5, vec![]);
    s.stored = 16;
    s.ts = uids::RLE_LOSSLESS;
    s.pixels = Pixels::Fragment(frag);
    write_dicom(&p, s);
    let img = read_dicom(&p).expect("read RLE");
    let expected: Vec<f32> = words.iter().map(|&w| f32::from(w)).collect();
    assert_eq!(img.samples, expected);
}

#[test]
fn jpeg_baseline_8bit_decodes() {
    let (w, h) = (16u32, 8u32);
    let gray = image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 12 + y * 4) as u8]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
        .encode_image(&gray)
        .expect("encode JPEG");
    if jpeg.len() % 2 == 1 {
        jpeg.push(0);
    }
    let dir = tmp();
    let p = dir.path().join("jpeg.dcm");
    let mut s = Spec::cr(h as u16, w as u16, vec![]);
    s.bits = 8;
    s.stored = 8;
    s.ts = uids::JPEG_BASELINE8_BIT;
    s.pixels = Pixels::Fragment(jpeg);
    write_dicom(&p, s);
    let img = read_dicom(&p).expect("read JPEG");
    assert_eq!((img.width, img.height), (16, 8));
    for (v, g) in img.samples.iter().zip(gray.as_raw()) {
        assert!((v - f32::from(*g)).abs() <= 3.0, "{v} vs {g}");
    }
}

#[test]
fn dataset_with_dicom_image_and_png_mask_prepares() {
    let dir = tmp();
    let root = dir.path();
    fs::create_dir_all(root.join("images")).expect("mkdir");
    fs::create_dir_all(root.join("masks")).expect("mkdir");
    let (w, h) = (6u16, 4u16);
    let words: Vec<u16> = (0..w * h).map(|i| i * 100).collect();
    write_dicom(&root.join("images/xr.dcm"), Spec::cr(h, w, words));
    let mask: Vec<u8> = (0..w * h)
        .map(|i| if i % 6 < 3 { 255 } else { 0 })
        .collect();
    save_gray_png(&root.join("masks/xr.png"), w as usize, h as usize, &mask).expect("mask");

    let ds = Dataset::scan(root).expect("scan");
    assert_eq!(ds.samples.len(), 1);
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);
    assert_eq!(ds.samples[0].name, "xr.dcm");
    assert_eq!(ds.labelled().len(), 1);
    let prepared = prepare(&ds.labelled(), 8).expect("prepare");
    assert_eq!(prepared[0].image.len(), 3 * 64);
    assert_eq!(prepared[0].mask.len(), 64);
    let (lo, hi) = prepared[0]
        .image
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo >= 0.0 && hi <= 1.0 && hi > lo, "{lo} {hi}");

    // a DICOM mask is refused when loaded
    let mpath: PathBuf = root.join("masks/xr.dcm");
    fs::remove_file(root.join("masks/xr.png")).expect("rm");
    write_dicom(&mpath, Spec::cr(h, w, vec![0; usize::from(w * h)]));
    let e = err_text(load_mask(&mpath), &mpath);
    assert!(e.contains("DICOM masks are not supported"), "{e}");
    let ds = Dataset::scan(root).expect("scan");
    let e = err_text(prepare(&ds.labelled(), 8), &mpath);
    assert!(e.contains("DICOM masks are not supported"), "{e}");
}
