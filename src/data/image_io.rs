//! Decoding, encoding, binarising and resizing images and masks.
//!
//! See the module docs of [`crate::data`] for the pixel and resize
//! conventions.

use std::path::Path;

use image::{DynamicImage, ExtendedColorType, ImageError, ImageFormat, ImageReader};

use super::dicom::{dicom_size, is_dicom_path, load_dicom};
use super::{DataError, ImageF32, Mask};

fn image_error(path: &Path, err: ImageError) -> DataError {
    match err {
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            DataError::Decode {
                path: path.to_path_buf(),
                msg: "file is truncated (unexpected end of file)".into(),
            }
        }
        ImageError::IoError(source) => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => DataError::Decode {
            path: path.to_path_buf(),
            msg: other.to_string(),
        },
    }
}

fn io_error(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>, DataError> {
    ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| io_error(path, e))
}

/// The largest image medmine reads, in pixels (40 megapixels: a 6324 x 6324 square; chest
/// X-rays and mammograms are below 25). Beyond it an image is refused from its header, before
/// anything is decoded: one 3-channel `f32` copy of it alone would take 480 MB.
pub const MAX_PIXELS: u64 = 40_000_000;

fn check_pixels(path: &Path, w: u32, h: u32) -> Result<(), DataError> {
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(DataError::Decode {
            path: path.to_path_buf(),
            msg: format!(
                "{w}x{h} pixels is more than medmine reads ({} megapixels); downscale the image \
                 first",
                MAX_PIXELS / 1_000_000
            ),
        });
    }
    Ok(())
}

pub(super) fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let (w, h) = reader(path)?
        .into_dimensions()
        .map_err(|e| image_error(path, e))?;
    check_pixels(path, w, h)?;
    let r = reader(path)?;
    if r.format() == Some(ImageFormat::Jpeg) {
        // the JPEG decoder fills a truncated file's missing part with grey instead of failing
        let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
        if !jpeg_is_complete(&bytes) {
            return Err(DataError::Decode {
                path: path.to_path_buf(),
                msg: "file is truncated (the JPEG has no end-of-image marker after its image \
                      data)"
                    .into(),
            });
        }
    }
    let img = r.decode().map_err(|e| image_error(path, e))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Decode {
            path: path.to_path_buf(),
            msg: "image has zero width or height".into(),
        });
    }
    Ok(img)
}

/// Whether a JPEG file has an end-of-image marker (`FF D9`) after its last start-of-scan
/// (`FF DA`): inside the entropy-coded data `FF` is always followed by `00` or a restart
/// marker, so the marker cannot occur by chance; an EXIF thumbnail's own end marker comes
/// before the main image's scan.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let find_last = |m: u8| bytes.windows(2).rposition(|w| w == [0xFF, m]);
    match (find_last(0xDA), find_last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// Width and height from the file header, without decoding the pixels.
/// DICOM files (`.dcm`, `.dicom`) are read with [`crate::data::dicom_size`].
pub fn image_size(path: &Path) -> Result<(usize, usize), DataError> {
    if is_dicom_path(path) {
        return dicom_size(path);
    }
    let (w, h) = reader(path)?
        .into_dimensions()
        .map_err(|e| image_error(path, e))?;
    check_pixels(path, w, h)?;
    Ok((w as usize, h as usize))
}

/// Builds planar RGB from interleaved samples with `stride` values per pixel
/// (the first `channels` of them are colour: 1 = gray, 3 = RGB; the rest, if
/// any, is alpha and dropped), mapping each sample with `f`.
fn planar<T: Copy>(
    raw: &[T],
    width: usize,
    height: usize,
    stride: usize,
    channels: usize,
    f: impl Fn(T) -> f32,
) -> ImageF32 {
    let n = width * height;
    let mut data = vec![0.0f32; 3 * n];
    for (i, px) in raw.chunks_exact(stride).take(n).enumerate() {
        for c in 0..3 {
            data[c * n + i] = f(px[if channels == 1 { 0 } else { c }]);
        }
    }
    ImageF32 {
        width,
        height,
        data,
    }
}

/// Linear min-max stretch over the colour samples (alpha excluded).
fn stretch<T: Copy>(
    raw: &[T],
    width: usize,
    height: usize,
    stride: usize,
    channels: usize,
    to_f: impl Fn(T) -> f32,
) -> ImageF32 {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for px in raw.chunks_exact(stride) {
        for &v in &px[..channels] {
            let v = to_f(v);
            let v = if v.is_nan() { 0.0 } else { v };
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    let range = hi - lo;
    let ok = range.is_finite() && range > 0.0;
    planar(raw, width, height, stride, channels, |v| {
        let v = to_f(v);
        if !ok || v.is_nan() {
            0.0
        } else {
            ((v - lo) / range).clamp(0.0, 1.0)
        }
    })
}

fn float_image(raw: &[f32], width: usize, height: usize, stride: usize) -> ImageF32 {
    let in_unit = raw
        .chunks_exact(stride)
        .all(|px| px[..3].iter().all(|v| (0.0..=1.0).contains(v)));
    if in_unit {
        planar(raw, width, height, stride, 3, |v| v)
    } else {
        stretch(raw, width, height, stride, 3, |v| v)
    }
}

/// Converts a decoded image to the model-input convention (3 channels, CHW,
/// `[0, 1]`; see the module docs for the 16-bit and float rules).
pub fn to_image_f32(img: &DynamicImage) -> ImageF32 {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let u8f = |v: u8| f32::from(v) / 255.0;
    let u16f = |v: u16| f32::from(v);
    match img {
        DynamicImage::ImageLuma8(b) => planar(b.as_raw(), w, h, 1, 1, u8f),
        DynamicImage::ImageLumaA8(b) => planar(b.as_raw(), w, h, 2, 1, u8f),
        DynamicImage::ImageRgb8(b) => planar(b.as_raw(), w, h, 3, 3, u8f),
        DynamicImage::ImageRgba8(b) => planar(b.as_raw(), w, h, 4, 3, u8f),
        DynamicImage::ImageLuma16(b) => stretch(b.as_raw(), w, h, 1, 1, u16f),
        DynamicImage::ImageLumaA16(b) => stretch(b.as_raw(), w, h, 2, 1, u16f),
        DynamicImage::ImageRgb16(b) => stretch(b.as_raw(), w, h, 3, 3, u16f),
        DynamicImage::ImageRgba16(b) => stretch(b.as_raw(), w, h, 4, 3, u16f),
        DynamicImage::ImageRgb32F(b) => float_image(b.as_raw(), w, h, 3),
        DynamicImage::ImageRgba32F(b) => float_image(b.as_raw(), w, h, 4),
        other => float_image(other.to_rgb32f().as_raw(), w, h, 3),
    }
}

/// Converts a decoded image to a binary mask: gray, then foreground when the
/// value is at least half of the range (8-bit `>= 128`, 16-bit `>= 32768`,
/// float `>= 0.5`). An integer mask whose values are all 0 or 1 (as many public datasets
/// store them) is read as binary: 1 is foreground.
pub fn to_mask(img: &DynamicImage) -> Mask {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let zero_one = match img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().all(|&v| v <= 1),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().all(|&v| v <= 1),
        DynamicImage::ImageLumaA8(_) | DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => {
            img.to_luma8().as_raw().iter().all(|&v| v <= 1)
        }
        _ => false,
    };
    if zero_one {
        let data = match img {
            DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| v as u8).collect(),
            DynamicImage::ImageLuma8(b) => b.as_raw().clone(),
            _ => img.to_luma8().into_raw(),
        };
        return Mask {
            width,
            height,
            data,
        };
    }
    let data = match img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| u8::from(v >= 128)).collect(),
        DynamicImage::ImageLumaA8(_) | DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => {
            img.to_luma8()
                .as_raw()
                .iter()
                .map(|&v| u8::from(v >= 128))
                .collect()
        }
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => img
            .to_luma16()
            .as_raw()
            .iter()
            .map(|&v| u8::from(v >= 32768))
            .collect(),
        _ => img
            .to_luma32f()
            .as_raw()
            .iter()
            .map(|&v| u8::from(v >= 0.5))
            .collect(),
    };
    Mask {
        width,
        height,
        data,
    }
}

/// Decodes an image file into 3-channel CHW `f32` in `[0, 1]`. DICOM files
/// (`.dcm`, `.dicom`) go through [`crate::data::read_dicom`] and
/// [`crate::data::DicomImage::to_image_f32`].
pub fn load_image(path: &Path) -> Result<ImageF32, DataError> {
    if is_dicom_path(path) {
        return load_dicom(path);
    }
    Ok(to_image_f32(&decode(path)?))
}

/// An image as the models' 8-bit RGB input (SAM's encoder, the app's view): the planes of
/// [`load_image`] scaled to `0..=255`. Training, mining, the app's SAM tool and the SAM
/// embedding cache all decode through [`load_image`], so a 16-bit or DICOM file looks the same
/// to every model; an 8-bit file gives exactly its own pixels.
pub fn load_rgb8(path: &Path) -> Result<image::RgbImage, DataError> {
    Ok(to_rgb8(&load_image(path)?))
}

/// 8-bit RGB from our normalised planes (values in `[0, 1]`, clamped).
pub fn to_rgb8(img: &ImageF32) -> image::RgbImage {
    let n = img.width * img.height;
    let px = |c: usize, i: usize| (img.data[c * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
    image::RgbImage::from_fn(img.width as u32, img.height as u32, |x, y| {
        let i = y as usize * img.width + x as usize;
        image::Rgb([px(0, i), px(1, i), px(2, i)])
    })
}

/// Decodes a mask file (any format, converted to gray) and binarises it:
/// foreground = value `>=` half of the range. DICOM masks are refused.
pub fn load_mask(path: &Path) -> Result<Mask, DataError> {
    load_mask_checked(path).map(|(mask, _)| mask)
}

/// [`load_mask`], with what looks wrong in the file ([`mask_warning`]; `None`: nothing).
pub fn load_mask_checked(path: &Path) -> Result<(Mask, Option<String>), DataError> {
    if is_dicom_path(path) {
        return Err(DataError::Decode {
            path: path.to_path_buf(),
            msg: "DICOM masks are not supported; store the mask as PNG (0 = background, \
                  255 = foreground) with the image's stem"
                .into(),
        });
    }
    let img = decode(path)?;
    let warning = mask_warning(&img);
    Ok((to_mask(&img), warning))
}

/// What looks wrong in a decoded mask file, in words, or `None`: one value everywhere that is
/// neither background (0) nor foreground (1 or the top of the range), so the whole image
/// becomes one class; or more than 5% of the pixels at grey levels between the two (an image
/// given as a mask, a probability map), which the threshold at half the range decides.
pub fn mask_warning(img: &DynamicImage) -> Option<String> {
    let gray = img.to_luma8();
    let px = gray.as_raw();
    let first = *px.first()?;
    if px.iter().all(|&v| v == first) {
        return (!matches!(first, 0 | 1 | 255)).then(|| {
            let class = if first >= 128 {
                "foreground"
            } else {
                "background"
            };
            format!(
                "every pixel is {first}, so the whole mask is {class} (a mask holds 0 for \
                 background and 255 or 1 for foreground)"
            )
        });
    }
    let mid = px.iter().filter(|&&v| (32..224).contains(&v)).count();
    let share = mid as f64 / px.len() as f64;
    (share > 0.05).then(|| {
        format!(
            "{:.0}% of the pixels are grey levels between background and foreground (an image \
             or a probability map rather than a mask?); read as foreground from 128 up",
            share * 100.0
        )
    })
}

fn check_len(path: &Path, width: usize, height: usize, len: usize) -> Result<(), DataError> {
    let expected = width * height;
    if len != expected || width == 0 || height == 0 {
        return Err(DataError::BufferSize {
            path: path.to_path_buf(),
            width,
            height,
            len,
            expected,
        });
    }
    Ok(())
}

/// Writes 8-bit gray pixels as PNG (the format is PNG whatever the extension).
pub fn save_gray_png(
    path: &Path,
    width: usize,
    height: usize,
    data: &[u8],
) -> Result<(), DataError> {
    check_len(path, width, height, data.len())?;
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(DataError::InvalidArgument(format!(
                "{}: {width}x{height} is too large for PNG",
                path.display()
            )))
        }
    };
    image::save_buffer_with_format(path, data, w, h, ExtendedColorType::L8, ImageFormat::Png)
        .map_err(|e| match e {
            ImageError::IoError(source) => io_error(path, source),
            other => DataError::Encode {
                path: path.to_path_buf(),
                msg: other.to_string(),
            },
        })
}

/// Writes a mask as 8-bit gray PNG with values 0 (background) and 255
/// (foreground; any non-zero mask value).
pub fn save_mask_png(path: &Path, mask: &Mask) -> Result<(), DataError> {
    check_len(path, mask.width, mask.height, mask.data.len())?;
    let px: Vec<u8> = mask
        .data
        .iter()
        .map(|&v| if v != 0 { 255 } else { 0 })
        .collect();
    save_gray_png(path, mask.width, mask.height, &px)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};

    #[test]
    fn binarise_8bit_threshold_is_128() {
        let img = GrayImage::from_raw(5, 1, vec![0, 127, 128, 200, 255]).unwrap();
        let m = to_mask(&DynamicImage::ImageLuma8(img));
        assert_eq!(m.data, vec![0, 0, 1, 1, 1]);
        assert_eq!((m.width, m.height), (5, 1));
    }

    #[test]
    fn binarise_rgb_mask_with_equal_channels() {
        let px = [0u8, 127, 128, 255];
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([px[x as usize]; 3]));
        let m = to_mask(&DynamicImage::ImageRgb8(img));
        assert_eq!(m.data, vec![0, 0, 1, 1]);
    }

    #[test]
    fn binarise_16bit_threshold_is_32768() {
        let img: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(5, 1, vec![0, 200, 32767, 32768, 65535]).unwrap();
        let m = to_mask(&DynamicImage::ImageLuma16(img));
        // 200 would be foreground under an 8-bit rule; it is not here.
        assert_eq!(m.data, vec![0, 0, 0, 1, 1]);
    }

    #[test]
    fn sixteen_bit_image_is_min_max_stretched() {
        let img: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(3, 1, vec![1000, 1500, 2000]).unwrap();
        let f = to_image_f32(&DynamicImage::ImageLuma16(img));
        assert_eq!(f.data.len(), 9);
        for c in 0..3 {
            assert_eq!(f.channel(c), &[0.0, 0.5, 1.0]);
        }
        let flat: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(2, 1, vec![777, 777]).unwrap();
        let f = to_image_f32(&DynamicImage::ImageLuma16(flat));
        assert!(f.data.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn eight_bit_rgb_is_planar_over_255() {
        let img = RgbImage::from_raw(2, 1, vec![255, 0, 51, 0, 102, 255]).unwrap();
        let f = to_image_f32(&DynamicImage::ImageRgb8(img));
        assert_eq!(f.channel(0), &[1.0, 0.0]);
        assert_eq!(f.channel(1), &[0.0, 0.4]);
        assert_eq!(f.channel(2), &[0.2, 1.0]);
    }

    #[test]
    fn save_and_reload_mask() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        let m = Mask {
            width: 3,
            height: 2,
            data: vec![0, 1, 0, 1, 1, 0],
        };
        save_mask_png(&p, &m).unwrap();
        assert_eq!(load_mask(&p).unwrap(), m);
        assert_eq!(image_size(&p).unwrap(), (3, 2));
        let raw = image::open(&p).unwrap().to_luma8().into_raw();
        assert_eq!(raw, vec![0, 255, 0, 255, 255, 0]);
        let bad = save_gray_png(&p, 4, 4, &[0; 3]).unwrap_err().to_string();
        assert!(bad.contains("m.png") && bad.contains("4x4"), "{bad}");
    }

    #[test]
    fn zero_one_masks_are_binary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m01.png");
        // stored as 0/1 (not 0/255), as many public datasets do
        save_gray_png(&p, 3, 2, &[0, 1, 1, 0, 0, 1]).unwrap();
        assert_eq!(load_mask(&p).unwrap().data, vec![0, 1, 1, 0, 0, 1]);
        // 16-bit 0/1 too
        let p16 = dir.path().join("m16.png");
        image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![1u16, 0])
            .unwrap()
            .save(&p16)
            .unwrap();
        assert_eq!(load_mask(&p16).unwrap().data, vec![1, 0]);
        // a 0/255 mask with a stray 1 still thresholds at half the range
        save_gray_png(&p, 3, 1, &[255, 1, 0]).unwrap();
        assert_eq!(load_mask(&p).unwrap().data, vec![1, 0, 0]);
    }

    #[test]
    fn truncated_jpeg_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full.jpg");
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        img.save(&full).unwrap();
        assert!(load_image(&full).is_ok());
        let bytes = std::fs::read(&full).unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = load_image(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
        // the same for masks
        let e = load_mask(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // a complete file with bytes after its end marker still reads
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        let p = dir.path().join("padded.jpg");
        std::fs::write(&p, &padded).unwrap();
        assert!(load_image(&p).is_ok());
    }

    #[test]
    fn images_beyond_the_pixel_limit_are_refused_from_their_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.png");
        // 8000 x 6000 = 48 MP of zeros: a small file, refused before decoding
        let enc = image::codecs::png::PngEncoder::new(std::fs::File::create(&p).unwrap());
        image::ImageEncoder::write_image(
            enc,
            &vec![0u8; 8000 * 6000],
            8000,
            6000,
            ExtendedColorType::L8,
        )
        .unwrap();
        for e in [
            load_image(&p).unwrap_err().to_string(),
            image_size(&p).unwrap_err().to_string(),
            load_mask(&p).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("huge.png") && e.contains("8000x6000") && e.contains("40 megapixels"),
                "{e}"
            );
        }
    }
}
