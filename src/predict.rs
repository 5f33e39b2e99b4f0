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

/// What [`score_project`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreSummary {
    pub scored: usize,
    /// Images that could not be read or predicted (name, reason).
    pub failed: Vec<(String, String)>,
    pub cancelled: bool,
}

/// Why [`score_project`] stopped (an image that cannot be read or predicted is only
/// counted in [`ScoreSummary::failed`]).
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Predicts every image of a project with the U-Net++ at `model` and caches per image the
/// Dice of the prediction (>= 0.5) against the ground truth (where there is one) and the
/// mean binary entropy of the probability map ([`crate::metrics::mean_binary_entropy`]): the
/// scores the app's image list sorts by. `progress(done, total)` after each image; `cancel`
/// is checked before each.
pub fn score_project(
    p: &mut crate::store::Project,
    model: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<ScoreSummary, ScoreError> {
    use crate::store::{ImageScore, ScoreSource};
    let predictor = Predictor::load(model, device, InferenceMode::Accurate)?;
    let images = p.images()?;
    let total = images.len();
    let mut out = ScoreSummary::default();
    progress(0, total);
    for (i, rec) in images.iter().enumerate() {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            out.cancelled = true;
            break;
        }
        let one = || -> Result<ImageScore, String> {
            let path = p.image_file(&rec.name).map_err(|e| e.to_string())?;
            let img = crate::data::load_image(&path).map_err(|e| e.to_string())?;
            let prob = predictor
                .predict(&[&img])
                .map_err(|e| format!("{}: prediction failed: {e}", rec.name))?
                .pop()
                .ok_or_else(|| format!("{}: no probability map", rec.name))?;
            let dice = p
                .dice_against_truth(&rec.name, &prob.to_mask().data)
                .map_err(|e| e.to_string())?;
            Ok(ImageScore {
                reference: model.display().to_string(),
                dice,
                uncertainty: Some(crate::metrics::mean_binary_entropy(&prob.data)),
            })
        };
        match one() {
            Ok(score) => {
                p.set_score(&rec.name, ScoreSource::Unet, &score)?;
                out.scored += 1;
            }
            Err(e) => out.failed.push((rec.name.clone(), e)),
        }
        progress(i + 1, total);
    }
    Ok(out)
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
