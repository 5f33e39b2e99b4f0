//! Reading, checking, splitting, resizing and augmenting 2-D binary
//! segmentation data.
//!
//! # Dataset layout
//!
//! A dataset is a folder `root/` with
//!
//! * `root/images/` (required): the images, PNG, JPEG, BMP, TIFF or DICOM
//!   (extensions `png`, `jpg`, `jpeg`, `bmp`, `tif`, `tiff`, `dcm`, `dicom`,
//!   any case);
//! * `root/masks/` (optional): binary masks, matched to their image by file
//!   **stem**, so `images/abc.jpg` may have its mask in `masks/abc.png`.
//!   Masks may not be DICOM ([`load_mask`] refuses them with an error).
//!
//! Images without a mask are **unlabelled** (the unlabelled pool of the
//! semi-supervised protocol). Files that cannot be used (unsupported
//! extensions, sub-folders, masks without an image, duplicate stems) are never
//! dropped silently: [`Dataset::scan`] lists them in [`Dataset::skipped`] with a
//! reason, and [`Dataset::skipped_report`] formats that list for the user.
//!
//! Split lists ([`read_split_list`]) hold one image file name per line (a bare
//! stem is accepted too); blank lines and lines starting with `#` are ignored.
//! [`split_labelled`] draws the labelled subset of a training split with a
//! seeded, order-independent shuffle (`ChaCha8Rng::seed_from_u64(seed)` over
//! the sorted names).
//!
//! # Pixel conventions
//!
//! * **Images** ([`ImageF32`]) are always **3 channels, CHW planar, `f32` in
//!   `[0, 1]`**:
//!   * 8-bit samples are divided by 255;
//!   * 16-bit images (gray or colour) get a linear **min-max stretch per
//!     image** to `[0, 1]` (one minimum and one maximum over all colour
//!     channels, so colours keep their balance); medical 16-bit data rarely
//!     uses the full range. A constant image becomes all 0;
//!   * 32-bit float images are kept as they are when every value lies in
//!     `[0, 1]`, and are min-max stretched like 16-bit images otherwise
//!     (NaN counts as 0);
//!   * grayscale is replicated to the 3 channels; alpha (RGBA, gray+alpha) is
//!     dropped;
//!   * DICOM images (see below) get the same min-max stretch as 16-bit
//!     images, whatever their bit depth.
//! * **Masks** ([`Mask`]) are row-major `u8` with values 0 or 1. Any format is
//!   first converted to gray (the `image` crate's luma conversion; masks with
//!   identical channels, as in Kvasir-SEG, keep their value). A pixel is
//!   foreground when its value is at least half of the range: `>= 128` for
//!   8-bit, `>= 32768` for 16-bit, `>= 0.5` for float. Written masks
//!   ([`save_mask_png`]) are 8-bit gray PNG with values 0 and 255.
//!
//! # DICOM
//!
//! [`read_dicom`] imports **single-frame monochrome** DICOM files (CR and DX
//! X-rays; any single-frame `MONOCHROME1`/`MONOCHROME2` image with 8 or 16
//! bits allocated works) whose transfer syntax is Implicit or Explicit VR
//! Little Endian, RLE Lossless or JPEG baseline/extended/lossless. Multi-frame
//! files, colour files, other transfer syntaxes (e.g. JPEG 2000) and files
//! without pixel data are refused with an error naming the file and the
//! problem. The pixel values go through these steps:
//!
//! 1. **stored values**: the `BitsStored` bits ending at `HighBit` of each
//!    sample (other bits, such as overlays, ignored), two's complement when
//!    `PixelRepresentation` is 1;
//! 2. **modality values** ([`DicomImage::samples`]): `stored * RescaleSlope +
//!    RescaleIntercept` (1 and 0 when the tags are absent);
//! 3. **model input** ([`DicomImage::to_image_f32`], used by [`load_image`]):
//!    a linear min-max stretch of the modality values of the image to
//!    `[0, 1]` (a constant image becomes all 0), then for `MONOCHROME1`
//!    (low values bright) `1 - v`, so that bone is bright in every image;
//!    replicated to 3 channels. The window of the file is **not** applied:
//!    the model sees the full original range.
//!
//! `WindowCenter`/`WindowWidth` (the first pair) are kept in
//! [`DicomImage::window`] for **display only**: [`window_to_u8`] applies the
//! linear VOI LUT function of PS3.3 C.11.2.1.2.1 (or a min-max stretch when
//! the file has no window) and inverts `MONOCHROME1`. Not applied anywhere:
//! Modality LUT and VOI LUT sequences, VOI LUT Function other than `LINEAR`,
//! Pixel Padding Value, Presentation LUT Shape.
//!
//! # Resizing
//!
//! Everything is **stretched** (no letterbox, aspect ratio not kept) to
//! `size x size` with **bilinear sampling at half-pixel centres**, i.e. the
//! same rule as PyTorch `interpolate(mode="bilinear", align_corners=False,
//! antialias=False)`: output pixel `x` samples the source at
//! `max((x + 0.5) * in/out - 0.5, 0)` with edge clamping ([`resize_plane`]).
//! Training masks are resized the same way as 0/1 planes and thresholded at
//! `0.5` ([`mask_to_training`]). Predictions go back to the original image
//! size by resizing the probability map with the same bilinear rule
//! ([`resize_plane`]) and thresholding at `0.5`.
//!
//! # Augmentation
//!
//! [`augment`] applies the same random geometric transform (flips, rotation by
//! multiples of 90 degrees, zoom-in crop) to image and mask, and photometric
//! jitter (brightness, contrast) to the image only; the mask stays exactly
//! 0/1. Every call draws the same number of random values from the
//! generator whatever the configuration, so a seed gives reproducible
//! results.

mod augment;
mod dataset;
mod dicom;
mod display;
mod image_io;
mod prepare;
mod resize;

use std::path::PathBuf;

pub use augment::{augment, AugmentConfig};
pub use dataset::{
    has_image_extension, read_split_list, split_labelled, stem_of, Dataset, Sample, Skipped,
    IMAGE_EXTENSIONS,
};
pub use dicom::{
    dicom_size, is_dicom_path, read_dicom, window_to_u8, DicomImage, DICOM_EXTENSIONS,
};
pub use display::{load_image_with_range, ValueRange};
pub use image_io::{
    image_size, load_image, load_mask, load_mask_checked, load_rgb8, mask_warning, save_gray_png,
    save_mask_png, to_image_f32, to_mask, to_rgb8,
};
pub use prepare::{prepare, prepare_images, Prepared, PreparedImage};
pub use resize::{mask_to_training, resize_image, resize_plane};

/// Errors of the data module. Every message that concerns a file starts with
/// that file's path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a decodable image.
    #[error("{}: cannot decode image: {msg}", .path.display())]
    Decode { path: PathBuf, msg: String },
    /// An image could not be written.
    #[error("{}: cannot write image: {msg}", .path.display())]
    Encode { path: PathBuf, msg: String },
    /// A pixel buffer does not match the stated dimensions.
    #[error("{}: {len} pixel values given but {width}x{height} needs {expected}", .path.display())]
    BufferSize {
        path: PathBuf,
        width: usize,
        height: usize,
        len: usize,
        expected: usize,
    },
    /// A mask does not have the size of its image.
    #[error(
        "{}: mask is {mask_w}x{mask_h} but its image {} is {image_w}x{image_h}",
        .path.display(),
        .image.display()
    )]
    MaskSize {
        path: PathBuf,
        mask_w: usize,
        mask_h: usize,
        image: PathBuf,
        image_w: usize,
        image_h: usize,
    },
    /// A labelled sample was required but the image has no mask.
    #[error("{}: image has no mask (a labelled sample is required here)", .path.display())]
    MissingMask { path: PathBuf },
    /// The dataset root does not exist (or is not a folder).
    #[error("{}: dataset folder not found", .path.display())]
    DatasetNotFound { path: PathBuf },
    /// `root/images/` does not exist (or is not a folder).
    #[error("{}: images/ folder not found (a dataset needs root/images/)", .path.display())]
    ImagesDirNotFound { path: PathBuf },
    /// `root/masks/` exists but is not a folder.
    #[error("{}: is not a folder", .path.display())]
    NotADirectory { path: PathBuf },
    /// `root/images/` holds no usable image.
    #[error("{}: no images found in images/{}", .path.display(), skipped_note(.skipped))]
    NoImages { path: PathBuf, skipped: usize },
    /// A split list names an image that is not in the dataset.
    #[error("{}: line {line}: {name} is not in the dataset {}", .list.display(), .root.display())]
    UnknownName {
        list: PathBuf,
        line: usize,
        name: String,
        root: PathBuf,
    },
    /// A split list names the same image twice.
    #[error("{}: line {line}: {name} is listed twice (first on line {first})", .list.display())]
    DuplicateName {
        list: PathBuf,
        line: usize,
        first: usize,
        name: String,
    },
    /// A split list has no entries.
    #[error("{}: split list has no entries", .path.display())]
    EmptyList { path: PathBuf },
    /// The labelled fraction is not in `(0, 1]`.
    #[error("labelled fraction {fraction} is outside (0, 1]")]
    BadFraction { fraction: f64 },
    /// Any other invalid argument (e.g. a zero target size).
    #[error("{0}")]
    InvalidArgument(String),
}

fn skipped_note(skipped: &usize) -> String {
    if *skipped == 0 {
        String::new()
    } else {
        format!(" ({skipped} unusable entries skipped)")
    }
}

/// Image in the model-input convention: always 3 channels, CHW planar, f32 in
/// `[0, 1]`; `data.len() == 3 * width * height`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageF32 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl ImageF32 {
    /// One channel plane (`c` in `0..3`), row-major.
    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }
}

/// Binary mask, row-major, values 0 or 1; `data.len() == width * height`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Mask {
    /// Number of foreground pixels.
    pub fn foreground(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }

    /// Fraction of foreground pixels (0 for an empty mask).
    pub fn foreground_fraction(&self) -> f64 {
        if self.data.is_empty() {
            0.0
        } else {
            self.foreground() as f64 / self.data.len() as f64
        }
    }
}
