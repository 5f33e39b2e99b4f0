//! Loading a set of samples into memory at the training resolution, in
//! parallel.

use rayon::prelude::*;

use super::dataset::Sample;
use super::image_io::{load_image, load_mask};
use super::resize::{mask_to_training, resize_image};
use super::{DataError, ImageF32};

/// One labelled sample at the training resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// Image file name.
    pub name: String,
    /// `3 * size * size`, CHW, `[0, 1]`.
    pub image: Vec<f32>,
    /// `size * size`, values 0.0 or 1.0.
    pub mask: Vec<f32>,
    /// Loss weight of the sample (1.0 for ground truth).
    pub weight: f32,
}

/// An image for prediction: `(name, image resized to size x size, original
/// (width, height))`.
pub type PreparedImage = (String, ImageF32, (usize, usize));

fn check_size(size: usize) -> Result<(), DataError> {
    if size == 0 {
        return Err(DataError::InvalidArgument(
            "the target image size must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Runs `f` on every sample in parallel; on failure returns the error of the
/// first failing sample in input order (deterministic).
fn par_map<T: Send>(
    samples: &[Sample],
    f: impl Fn(&Sample) -> Result<T, DataError> + Sync + Send,
) -> Result<Vec<T>, DataError> {
    let results: Vec<Result<T, DataError>> = samples.par_iter().map(f).collect();
    results.into_iter().collect()
}

fn prepare_one(s: &Sample, size: usize) -> Result<Prepared, DataError> {
    let mask_path = s.mask.as_ref().ok_or_else(|| DataError::MissingMask {
        path: s.image.clone(),
    })?;
    let image = load_image(&s.image)?;
    let mask = load_mask(mask_path)?;
    if (mask.width, mask.height) != (image.width, image.height) {
        return Err(DataError::MaskSize {
            path: mask_path.clone(),
            mask_w: mask.width,
            mask_h: mask.height,
            image: s.image.clone(),
            image_w: image.width,
            image_h: image.height,
        });
    }
    Ok(Prepared {
        name: s.name.clone(),
        image: resize_image(&image, size, size).data,
        mask: mask_to_training(&mask, size),
        weight: 1.0,
    })
}

/// Loads labelled samples, stretch-resized to `size x size` (bilinear,
/// half-pixel centres; masks thresholded at 0.5 after resizing), in parallel
/// with rayon, in input order.
///
/// Every sample must have a mask (error naming the image otherwise) of
/// exactly its image's size (error naming the mask file and both sizes).
pub fn prepare(samples: &[Sample], size: usize) -> Result<Vec<Prepared>, DataError> {
    check_size(size)?;
    par_map(samples, |s| prepare_one(s, size))
}

/// Loads images for prediction (masks are not read), in parallel, in input
/// order: `(name, image resized to size x size, original (width, height))`.
pub fn prepare_images(samples: &[Sample], size: usize) -> Result<Vec<PreparedImage>, DataError> {
    check_size(size)?;
    par_map(samples, |s| {
        let img = load_image(&s.image)?;
        let orig = (img.width, img.height);
        Ok((s.name.clone(), resize_image(&img, size, size), orig))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{save_gray_png, save_mask_png, Mask};
    use std::path::Path;

    fn write_pair(dir: &Path, name: &str, w: usize, h: usize, mw: usize, mh: usize) -> Sample {
        let image = dir.join(format!("{name}.png"));
        let px: Vec<u8> = (0..w * h).map(|i| (i * 7 % 256) as u8).collect();
        save_gray_png(&image, w, h, &px).unwrap();
        let mask = dir.join(format!("{name}_m.png"));
        let data: Vec<u8> = (0..mw * mh).map(|i| u8::from(i % mw < mw / 2)).collect();
        let m = Mask {
            width: mw,
            height: mh,
            data,
        };
        save_mask_png(&mask, &m).unwrap();
        Sample {
            name: format!("{name}.png"),
            image,
            mask: Some(mask),
        }
    }

    #[test]
    fn prepares_in_order_with_expected_shapes() {
        let d = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = (0..5)
            .map(|i| write_pair(d.path(), &format!("s{i}"), 10 + i, 8, 10 + i, 8))
            .collect();
        let p = prepare(&samples, 16).unwrap();
        let names: Vec<_> = p.iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["s0.png", "s1.png", "s2.png", "s3.png", "s4.png"]);
        for q in &p {
            assert_eq!((q.image.len(), q.mask.len(), q.weight), (3 * 256, 256, 1.0));
            // Left half is foreground.
            assert_eq!(q.mask[16 * 5 + 2], 1.0);
            assert_eq!(q.mask[16 * 5 + 13], 0.0);
        }
        let imgs = prepare_images(&samples, 12).unwrap();
        assert_eq!(imgs[3].0, "s3.png");
        assert_eq!(imgs[3].2, (13, 8));
        assert_eq!((imgs[3].1.width, imgs[3].1.height), (12, 12));
        assert!(prepare(&samples, 0).is_err());
    }

    #[test]
    fn missing_mask_and_size_mismatch_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let mut good = write_pair(d.path(), "a", 6, 6, 6, 6);
        let bad = write_pair(d.path(), "b", 20, 20, 10, 12);
        let e = prepare(&[good.clone(), bad], 8).unwrap_err().to_string();
        assert!(
            e.contains("b_m.png: mask is 10x12 but its image") && e.contains("b.png is 20x20"),
            "{e}"
        );
        good.mask = None;
        let e = prepare(&[good], 8).unwrap_err().to_string();
        assert!(e.contains("a.png: image has no mask"), "{e}");
    }
}
