//! DICOM single-frame import (CR/DX X-rays and other monochrome images).
//!
//! See the module docs of [`crate::data`] for the normalisation that turns a
//! [`DicomImage`] into model input, and [`window_to_u8`] for display.

use std::io::Read;
use std::path::Path;

use dicom_core::header::HasLength;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, ReadError, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use super::{DataError, ImageF32};

/// File extensions (lower case) read as DICOM.
pub const DICOM_EXTENSIONS: &[&str] = &["dcm", "dicom"];

/// A decoded single-frame monochrome DICOM image.
#[derive(Clone, Debug, PartialEq)]
pub struct DicomImage {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Row-major modality values: stored value `* RescaleSlope +
    /// RescaleIntercept` (slope 1 and intercept 0 when the tags are absent).
    pub samples: Vec<f32>,
    /// The first WindowCenter/WindowWidth pair of the file (centre, width), in
    /// modality values; for display only. `None` when absent or unreadable.
    pub window: Option<(f64, f64)>,
    /// `MONOCHROME1` (low values bright) or `MONOCHROME2` (low values dark).
    pub photometric: String,
    pub bits_stored: u16,
    /// The file has a RescaleSlope or RescaleIntercept tag: its modality values are
    /// physical units (Hounsfield units for CT).
    pub rescaled: bool,
}

impl DicomImage {
    /// Whether low values are shown bright (`MONOCHROME1`).
    pub fn is_inverted(&self) -> bool {
        self.photometric == "MONOCHROME1"
    }

    /// Model input: min-max stretch of the modality values to `[0, 1]`
    /// (a constant image becomes all 0), inverted (`1 - v`) for
    /// `MONOCHROME1`, replicated to 3 channels, CHW.
    pub fn to_image_f32(&self) -> ImageF32 {
        let (lo, hi) = min_max(&self.samples);
        let range = hi - lo;
        let ok = range.is_finite() && range > 0.0;
        let invert = self.is_inverted();
        let plane: Vec<f32> = self
            .samples
            .iter()
            .map(|&v| {
                if !ok {
                    return 0.0;
                }
                let u = ((v - lo) / range).clamp(0.0, 1.0);
                if invert {
                    1.0 - u
                } else {
                    u
                }
            })
            .collect();
        let mut data = Vec::with_capacity(3 * plane.len());
        for _ in 0..3 {
            data.extend_from_slice(&plane);
        }
        ImageF32 {
            width: self.width,
            height: self.height,
            data,
        }
    }
}

pub(super) fn min_max(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Whether `path` has a DICOM extension (`dcm`, `dicom`, any case).
pub fn is_dicom_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DICOM_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// 8-bit display image (row-major, one byte per pixel) of the modality
/// values.
///
/// With `Some((centre, width))` this is the DICOM linear VOI LUT function
/// (PS3.3 C.11.2.1.2.1) onto `0..=255`, with `c = centre`, `w = width`:
/// `x <= c - 0.5 - (w - 1) / 2` gives 0, `x > c - 0.5 + (w - 1) / 2` gives
/// 255, and in between `((x - (c - 0.5)) / (w - 1) + 0.5) * 255`, rounded.
/// Widths below 1 (not allowed by the standard) are taken as 1. With `None`
/// (no window tag) the values are min-max stretched to `0..=255` (a constant
/// image gives 0). `MONOCHROME1` images are then inverted (`255 - y`) so that
/// low values are shown bright, as the standard asks.
///
/// Pass `img.window` to use the window stored in the file.
pub fn window_to_u8(img: &DicomImage, window: Option<(f64, f64)>) -> Vec<u8> {
    let window = window.filter(|(c, w)| c.is_finite() && w.is_finite());
    let map: Box<dyn Fn(f32) -> f64> = match window {
        Some((c, w)) => {
            let w = w.max(1.0);
            let lo = c - 0.5 - (w - 1.0) / 2.0;
            let hi = c - 0.5 + (w - 1.0) / 2.0;
            Box::new(move |x| {
                let x = f64::from(x);
                if x <= lo {
                    0.0
                } else if x > hi {
                    255.0
                } else {
                    ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
                }
            })
        }
        None => {
            let (lo, hi) = min_max(&img.samples);
            let (lo, range) = (f64::from(lo), f64::from(hi) - f64::from(lo));
            if range.is_finite() && range > 0.0 {
                Box::new(move |x| (f64::from(x) - lo) / range * 255.0)
            } else {
                Box::new(|_| 0.0)
            }
        }
    };
    let invert = img.is_inverted();
    img.samples
        .iter()
        .map(|&x| {
            let y = map(x).round().clamp(0.0, 255.0) as u8;
            if invert {
                255 - y
            } else {
                y
            }
        })
        .collect()
}

fn bad(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Decode {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn unsupported(path: &Path, uid: &str, name: &str) -> DataError {
    bad(
        path,
        format!(
            "unsupported transfer syntax {uid} ({name}); medmine decodes Implicit/Explicit VR \
             Little Endian, RLE Lossless and JPEG baseline/extended/lossless"
        ),
    )
}

/// The error and its sources, `a: b: c`, without repeating a message that
/// the previous one already contains.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

fn is_truncation(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                return true;
            }
        }
        if e.to_string().contains("failed to fill whole buffer") {
            return true;
        }
        next = e.source();
    }
    false
}

/// Refuses files without the Part 10 `DICM` marker before the parser sees
/// them, so that the error says what is wrong.
fn check_magic(path: &Path) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(132);
    std::fs::File::open(path)
        .map_err(io)?
        .take(132)
        .read_to_end(&mut head)
        .map_err(io)?;
    let marked = head.get(128..132) == Some(b"DICM") || head.get(..4) == Some(b"DICM");
    if marked {
        Ok(())
    } else {
        Err(bad(
            path,
            "not a DICOM file (no \"DICM\" marker after the 128-byte preamble)",
        ))
    }
}

fn open(path: &Path, header_only: bool) -> Result<DefaultDicomObject, DataError> {
    check_magic(path)?;
    let options = OpenFileOptions::new();
    let options = if header_only {
        options.read_until(tags::PIXEL_DATA)
    } else {
        options
    };
    options.open_file(path).map_err(|e| match &e {
        ReadError::ReadUnrecognizedTransferSyntax { uid, .. } => unsupported(path, uid, "unknown"),
        ReadError::ReadUnsupportedTransferSyntax { uid, name, .. }
        | ReadError::ReadUnsupportedTransferSyntaxWithSuggestion { uid, name, .. } => {
            unsupported(path, uid, name)
        }
        _ if is_truncation(&e) => bad(path, "DICOM file is truncated (unexpected end of file)"),
        _ => bad(path, format!("cannot read DICOM file: {}", chain(&e))),
    })
}

/// The image attributes medmine needs, checked.
#[derive(Debug)]
struct Header {
    width: usize,
    height: usize,
    photometric: String,
    bits_stored: u16,
    slope: f64,
    intercept: f64,
    rescaled: bool,
    window: Option<(f64, f64)>,
}

fn int_tag(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    name: &str,
) -> Result<Option<i64>, DataError> {
    match obj.get(tag) {
        None => Ok(None),
        Some(e) if e.is_empty() => Ok(None),
        Some(e) => e
            .to_int::<i64>()
            .map(Some)
            .map_err(|err| bad(path, format!("invalid {name}: {err}"))),
    }
}

fn float_tag(obj: &DefaultDicomObject, tag: Tag) -> Option<Result<f64, String>> {
    let e = obj.get(tag).filter(|e| !e.is_empty())?;
    Some(match e.to_multi_float64() {
        Ok(v) => v
            .first()
            .copied()
            .filter(|x| x.is_finite())
            .ok_or_else(|| "no finite value".to_string()),
        Err(err) => Err(err.to_string()),
    })
}

fn header(obj: &DefaultDicomObject, path: &Path) -> Result<Header, DataError> {
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(|c: char| c.is_whitespace() || c == '\0');
    match TransferSyntaxRegistry.get(ts_uid) {
        None => return Err(unsupported(path, ts_uid, "unknown")),
        Some(ts) if !ts.can_decode_all() => return Err(unsupported(path, ts_uid, ts.name())),
        Some(_) => {}
    }

    let frames = int_tag(obj, path, tags::NUMBER_OF_FRAMES, "NumberOfFrames")?.unwrap_or(1);
    if frames > 1 {
        return Err(bad(
            path,
            format!("{frames} frames; medmine imports single-frame CR/DX"),
        ));
    }
    let photometric = match obj.get(tags::PHOTOMETRIC_INTERPRETATION) {
        Some(e) => e
            .to_str()
            .map(|s| s.trim_end_matches([' ', '\0']).to_string())
            .unwrap_or_default(),
        None => String::new(),
    };
    let spp = int_tag(obj, path, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
    let monochrome = photometric == "MONOCHROME1" || photometric == "MONOCHROME2";
    if photometric.is_empty() {
        return Err(bad(path, "missing PhotometricInterpretation"));
    }
    if !monochrome || spp != 1 {
        return Err(bad(
            path,
            format!(
                "colour DICOM (PhotometricInterpretation {photometric}, {spp} samples per \
                 pixel) is not supported; medmine imports monochrome CR/DX"
            ),
        ));
    }
    let dim = |tag, name| -> Result<usize, DataError> {
        match int_tag(obj, path, tag, name)? {
            None => Err(bad(path, format!("missing {name}"))),
            Some(v) if v <= 0 => Err(bad(path, format!("{name} is {v}: image is empty"))),
            Some(v) => usize::try_from(v).map_err(|_| bad(path, format!("{name} is {v}"))),
        }
    };
    let height = dim(tags::ROWS, "Rows")?;
    let width = dim(tags::COLUMNS, "Columns")?;
    let allocated = int_tag(obj, path, tags::BITS_ALLOCATED, "BitsAllocated")?
        .ok_or_else(|| bad(path, "missing BitsAllocated"))?;
    if allocated != 8 && allocated != 16 {
        return Err(bad(
            path,
            format!("BitsAllocated {allocated} is not supported (8 or 16)"),
        ));
    }
    let stored = int_tag(obj, path, tags::BITS_STORED, "BitsStored")?.unwrap_or(allocated);
    if !(1..=allocated).contains(&stored) {
        return Err(bad(
            path,
            format!("BitsStored {stored} does not fit BitsAllocated {allocated}"),
        ));
    }

    let rescale = |tag, name, default: f64| -> Result<f64, DataError> {
        match float_tag(obj, tag) {
            None => Ok(default),
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(bad(path, format!("invalid {name}: {e}"))),
        }
    };
    let slope = rescale(tags::RESCALE_SLOPE, "RescaleSlope", 1.0)?;
    if slope == 0.0 {
        return Err(bad(path, "RescaleSlope is 0"));
    }
    let intercept = rescale(tags::RESCALE_INTERCEPT, "RescaleIntercept", 0.0)?;
    let rescaled = float_tag(obj, tags::RESCALE_SLOPE).is_some()
        || float_tag(obj, tags::RESCALE_INTERCEPT).is_some();
    let window = match (
        float_tag(obj, tags::WINDOW_CENTER),
        float_tag(obj, tags::WINDOW_WIDTH),
    ) {
        (Some(Ok(c)), Some(Ok(w))) => Some((c, w)),
        _ => None,
    };
    Ok(Header {
        width,
        height,
        photometric,
        bits_stored: stored as u16,
        slope,
        intercept,
        rescaled,
        window,
    })
}

/// Width and height (Columns, Rows) from the DICOM header, without reading
/// the pixel data. Multi-frame, colour and undecodable files are refused here
/// already, with the same errors as [`read_dicom`].
pub fn dicom_size(path: &Path) -> Result<(usize, usize), DataError> {
    let obj = open(path, true)?;
    let h = header(&obj, path)?;
    Ok((h.width, h.height))
}

/// Stored sample layout of decoded pixel data.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    pub signed: bool,
}

/// The stored values of `n` samples: little-endian words of
/// `bits_allocated` bits, of which bits `high_bit + 1 - bits_stored ..=
/// high_bit` hold the value (other bits, e.g. overlays, are ignored), two's
/// complement when `signed`. `None` when `raw` is too short.
pub(crate) fn stored_values(raw: &[u8], n: usize, layout: Layout) -> Option<Vec<i32>> {
    let bytes = usize::from(layout.bits_allocated / 8);
    let stored = u32::from(layout.bits_stored.clamp(1, 16));
    let high = u32::from(layout.high_bit);
    let shift = (high + 1).saturating_sub(stored);
    let mask = (1u32 << stored) - 1;
    let sign = 1u32 << (stored - 1);
    let raw = raw.get(..n.checked_mul(bytes)?)?;
    let word = |c: &[u8]| match c {
        [a] => u32::from(*a),
        [a, b] => u32::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    Some(
        raw.chunks_exact(bytes)
            .map(|c| {
                let v = (word(c) >> shift) & mask;
                if layout.signed && v & sign != 0 {
                    v as i32 - (1i32 << stored)
                } else {
                    v as i32
                }
            })
            .collect(),
    )
}

/// Reads a single-frame monochrome DICOM image (CR, DX, or any other
/// single-frame `MONOCHROME1`/`MONOCHROME2` image with 8 or 16 bits
/// allocated) and applies the rescale (modality) transform.
///
/// Errors name the file and the problem: not a DICOM file, truncated,
/// several frames, colour, unsupported transfer syntax, missing or short
/// pixel data.
pub fn read_dicom(path: &Path) -> Result<DicomImage, DataError> {
    let obj = open(path, false)?;
    let h = header(&obj, path)?;
    if obj.get(tags::PIXEL_DATA).is_none() {
        return Err(bad(path, "missing pixel data (no PixelData element)"));
    }
    let decoded = obj
        .decode_pixel_data()
        .map_err(|e| bad(path, format!("cannot decode pixel data: {}", chain(&e))))?;
    let n = h.width * h.height;
    let layout = Layout {
        bits_allocated: decoded.bits_allocated(),
        bits_stored: decoded.bits_stored(),
        high_bit: decoded.high_bit(),
        signed: decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed,
    };
    if layout.bits_allocated != 8 && layout.bits_allocated != 16 {
        return Err(bad(
            path,
            format!(
                "decoded pixel data has {} bits per sample (8 or 16 supported)",
                layout.bits_allocated
            ),
        ));
    }
    let raw = decoded.data();
    let values = stored_values(raw, n, layout).ok_or_else(|| {
        bad(
            path,
            format!(
                "pixel data is too short: {} bytes for {}x{} samples of {} bits \
                 (file truncated?)",
                raw.len(),
                h.width,
                h.height,
                layout.bits_allocated
            ),
        )
    })?;
    let samples = values
        .into_iter()
        .map(|v| (f64::from(v) * h.slope + h.intercept) as f32)
        .collect();
    Ok(DicomImage {
        width: h.width,
        height: h.height,
        samples,
        window: h.window,
        photometric: h.photometric,
        bits_stored: h.bits_stored,
        rescaled: h.rescaled,
    })
}

/// [`read_dicom`], then the model-input normalisation
/// ([`DicomImage::to_image_f32`]).
pub fn load_dicom(path: &Path) -> Result<ImageF32, DataError> {
    Ok(read_dicom(path)?.to_image_f32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(samples: Vec<f32>, photometric: &str) -> DicomImage {
        DicomImage {
            width: samples.len(),
            height: 1,
            samples,
            window: None,
            photometric: photometric.into(),
            bits_stored: 12,
            rescaled: false,
        }
    }

    #[test]
    fn stored_values_mask_shift_and_sign() {
        // 12 bits stored in 16, high bits hold overlay garbage
        let raw: Vec<u8> = [0xF000u16 | 0x0FFF, 0x1001, 0x0800]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut l = Layout {
            bits_allocated: 16,
            bits_stored: 12,
            high_bit: 11,
            signed: false,
        };
        assert_eq!(stored_values(&raw, 3, l), Some(vec![4095, 1, 2048]));
        l.signed = true;
        assert_eq!(stored_values(&raw, 3, l), Some(vec![-1, 1, -2048]));
        // high bit 15 with 12 bits stored: value in the top bits
        l = Layout {
            bits_allocated: 16,
            bits_stored: 12,
            high_bit: 15,
            signed: false,
        };
        let raw: Vec<u8> = 0xABC0u16.to_le_bytes().to_vec();
        assert_eq!(stored_values(&raw, 1, l), Some(vec![0xABC]));
        // 8-bit and too-short buffers
        l = Layout {
            bits_allocated: 8,
            bits_stored: 8,
            high_bit: 7,
            signed: true,
        };
        assert_eq!(
            stored_values(&[0, 127, 128, 255], 4, l),
            Some(vec![0, 127, -128, -1])
        );
        assert_eq!(stored_values(&[0, 1], 3, l), None);
    }

    #[test]
    fn linear_window_matches_the_standard() {
        // c = 100, w = 51: x <= 74.5 -> 0, x > 124.5 -> 255,
        // else ((x - 99.5) / 50 + 0.5) * 255, rounded
        let im = img(
            vec![0.0, 74.5, 75.0, 99.5, 100.0, 124.0, 124.5, 125.0, 4000.0],
            "MONOCHROME2",
        );
        let y = window_to_u8(&im, Some((100.0, 51.0)));
        // 75 -> 2.55, 99.5 -> 127.5, 100 -> 130.05, 124 -> 252.45, 124.5 -> 255
        assert_eq!(y, vec![0, 0, 3, 128, 130, 252, 255, 255, 255]);
        // width 1 is a threshold at c - 0.5 (and widths below 1 count as 1)
        let y = window_to_u8(&im, Some((100.0, 1.0)));
        assert_eq!(y, vec![0, 0, 0, 0, 255, 255, 255, 255, 255]);
        assert_eq!(window_to_u8(&im, Some((100.0, 0.0))), y);
        // MONOCHROME1 shows the inverse
        let im1 = DicomImage {
            photometric: "MONOCHROME1".into(),
            ..im
        };
        let y = window_to_u8(&im1, Some((100.0, 51.0)));
        assert_eq!(y, vec![255, 255, 252, 127, 125, 3, 0, 0, 0]);
    }

    #[test]
    fn display_fallback_and_monochrome1() {
        let im = img(vec![-10.0, 0.0, 10.0], "MONOCHROME2");
        assert_eq!(window_to_u8(&im, None), vec![0, 128, 255]);
        let im1 = img(vec![-10.0, 0.0, 10.0], "MONOCHROME1");
        assert_eq!(window_to_u8(&im1, None), vec![255, 127, 0]);
        let flat = img(vec![5.0; 4], "MONOCHROME2");
        assert_eq!(window_to_u8(&flat, None), vec![0; 4]);
    }

    #[test]
    fn model_input_is_min_max_and_inverted_for_monochrome1() {
        let im = img(vec![-1000.0, 0.0, 1000.0], "MONOCHROME2");
        let x = im.to_image_f32();
        assert_eq!((x.width, x.height), (3, 1));
        for c in 0..3 {
            assert_eq!(x.channel(c), &[0.0, 0.5, 1.0]);
        }
        let x = img(vec![-1000.0, 0.0, 1000.0], "MONOCHROME1").to_image_f32();
        assert_eq!(x.channel(2), &[1.0, 0.5, 0.0]);
        let x = img(vec![7.0; 2], "MONOCHROME1").to_image_f32();
        assert_eq!(x.data, vec![0.0; 6]);
    }

    #[test]
    fn dicom_extensions() {
        assert!(is_dicom_path(Path::new("a/b.dcm")));
        assert!(is_dicom_path(Path::new("b.DICOM")));
        assert!(!is_dicom_path(Path::new("b.png")));
        assert!(!is_dicom_path(Path::new("dcm")));
    }
}
