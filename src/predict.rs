//! Prediction with a trained U-Net++: images of any size in, probability maps at the image's
//! original size out.
//!
//! Rule: the image is stretched to the checkpoint's training size (bilinear, half-pixel
//! centres), the model's logits go through a sigmoid, and the probability map is stretched back
//! to the original width and height with the same bilinear rule; a pixel is foreground when its
//! probability is >= 0.5.
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::{resize_image, resize_plane, ImageF32, Mask};
use crate::models::unetpp::{InferenceMode, UNetPlusPlus};
use crate::train::checkpoint::{self, CheckpointError, CheckpointMeta};

pub struct Predictor {
    pub model: UNetPlusPlus,
    pub meta: CheckpointMeta,
    pub mode: InferenceMode,
    device: Device,
}

/// A probability map (row-major, values in [0, 1]).
pub struct ProbMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl ProbMap {
    pub fn to_mask(&self) -> Mask {
        Mask {
            width: self.width,
            height: self.height,
            data: self.data.iter().map(|&p| u8::from(p >= 0.5)).collect(),
        }
    }

    /// 8-bit probability image (0..=255).
    pub fn to_u8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|&p| (p.clamp(0., 1.) * 255.).round() as u8)
            .collect()
    }
}

impl Predictor {
    pub fn load(
        path: &Path,
        device: &Device,
        mode: InferenceMode,
    ) -> Result<Self, CheckpointError> {
        let loaded = checkpoint::load_model(path, device)?;
        Ok(Self {
            model: loaded.frozen(device)?,
            meta: loaded.meta,
            mode,
            device: device.clone(),
        })
    }

    pub fn size(&self) -> usize {
        self.meta.size
    }

    /// Probability maps at the original sizes for a batch of images.
    pub fn predict(&self, images: &[&ImageF32]) -> candle_core::Result<Vec<ProbMap>> {
        let s = self.size();
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            if img.width == s && img.height == s {
                data.extend_from_slice(&img.data);
            } else {
                data.extend_from_slice(&resize_image(img, s, s).data);
            }
        }
        let x = Tensor::from_vec(data, (images.len(), 3, s, s), &self.device)?;
        let logits = self.model.infer(&x, self.mode)?;
        let probs = crate::train::loss::sigmoid(&logits)?
            .flatten_from(1)?
            .to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .zip(images)
            .map(|(p, img)| ProbMap {
                width: img.width,
                height: img.height,
                data: if img.width == s && img.height == s {
                    p
                } else {
                    resize_plane(&p, s, s, img.width, img.height)
                },
            })
            .collect())
    }
}

/// The image files of `dir` (or of `dir/images` when `dir` is a dataset folder), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, crate::data::DataError> {
    let list = |d: &Path| -> Result<Vec<std::path::PathBuf>, crate::data::DataError> {
        let entries = std::fs::read_dir(d).map_err(|source| crate::data::DataError::Io {
            path: d.to_path_buf(),
            source,
        })?;
        let mut files: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && crate::data::has_image_extension(p))
            .collect();
        files.sort();
        Ok(files)
    };
    let files = list(dir)?;
    if files.is_empty() && dir.join("images").is_dir() {
        return list(&dir.join("images"));
    }
    Ok(files)
}

/// Keeps the files named in `names` (file names or stems), in list order; a name with no file
/// is an error naming the list.
pub fn filter_by_list(
    files: Vec<std::path::PathBuf>,
    names: &[String],
    list: &Path,
) -> Result<Vec<std::path::PathBuf>, crate::data::DataError> {
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).map(str::to_string);
    let by_stem: std::collections::HashMap<String, std::path::PathBuf> = files
        .into_iter()
        .filter_map(|p| stem(&p).map(|s| (s, p)))
        .collect();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let s = stem(Path::new(n)).unwrap_or_else(|| n.clone());
            by_stem.get(&s).cloned().ok_or_else(|| {
                crate::data::DataError::InvalidArgument(format!(
                    "{}: line {}: no image named {n}",
                    list.display(),
                    i + 1
                ))
            })
        })
        .collect()
}
