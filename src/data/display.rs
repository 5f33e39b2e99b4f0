//! What an image's `[0, 1]` values stand for, for display: the DICOM modality range (Hounsfield
//! units when the file has a rescale), its inversion and the file's own window. The app's
//! window/level and its presets work in these units; the model input is unchanged.
use std::path::Path;

use super::dicom::{is_dicom_path, min_max, read_dicom, DicomImage};
use super::image_io::{decode, to_image_f32};
use super::{DataError, ImageF32};

/// What the `[0, 1]` values of an image from [`crate::data::load_image`] stand for, for
/// display: the image's own value at 0 and at 1, the inversion, and the file's window. The
/// app's window/level and its presets work in these units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueRange {
    /// The image's own value shown as 0 (as 1 when `inverted`).
    pub lo: f64,
    /// The image's own value shown as 1 (as 0 when `inverted`).
    pub hi: f64,
    /// `MONOCHROME1`: `[0, 1]` value = `1 - (v - lo) / (hi - lo)`.
    pub inverted: bool,
    /// DICOM modality values with a rescale (Hounsfield units for CT).
    pub rescaled: bool,
    /// DICOM: the values are modality values (else 8-bit gray `0..=255`).
    pub dicom: bool,
    /// The file's own (centre, width), in the image's values.
    pub window: Option<(f64, f64)>,
}

impl ValueRange {
    /// 8-bit images (and 16-bit or float images, whose values are stretched to `[0, 1]` on
    /// decoding): the gray levels `0..=255`.
    pub const GRAY8: ValueRange = ValueRange {
        lo: 0.0,
        hi: 255.0,
        inverted: false,
        rescaled: false,
        dicom: false,
        window: None,
    };
}

impl DicomImage {
    /// The display range of [`DicomImage::to_image_f32`]'s output.
    pub fn value_range(&self) -> ValueRange {
        let (lo, hi) = min_max(&self.samples);
        let (lo, hi) = if lo.is_finite() && hi.is_finite() {
            (f64::from(lo), f64::from(hi))
        } else {
            (0.0, 0.0)
        };
        ValueRange {
            lo,
            hi,
            inverted: self.is_inverted(),
            rescaled: self.rescaled,
            dicom: true,
            window: self
                .window
                .filter(|(c, w)| c.is_finite() && w.is_finite() && *w > 0.0),
        }
    }
}

/// [`load_image`] and what its `[0, 1]` values stand for (the DICOM modality range and
/// window; [`ValueRange::GRAY8`] for every other format), from one decoding.
pub fn load_image_with_range(path: &Path) -> Result<(ImageF32, ValueRange), DataError> {
    if is_dicom_path(path) {
        let d = read_dicom(path)?;
        return Ok((d.to_image_f32(), d.value_range()));
    }
    Ok((to_image_f32(&decode(path)?), ValueRange::GRAY8))
}
