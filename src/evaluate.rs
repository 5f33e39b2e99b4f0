//! Evaluation of a folder of predicted masks against a folder of ground-truth masks.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::{has_image_extension, load_mask, stem_of, DataError};
use crate::metrics::{Confusion, Scores};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{}: no prediction for ground truth {}", pred_dir.display(), gt.display())]
    MissingPrediction { pred_dir: PathBuf, gt: PathBuf },
    #[error("{}: no ground-truth mask for {name}", gt_dir.display())]
    MissingTruth { gt_dir: PathBuf, name: String },
    #[error("{}: prediction is {pw}x{ph} but the ground truth {} is {gw}x{gh}", pred.display(), gt.display())]
    Size {
        pred: PathBuf,
        gt: PathBuf,
        pw: usize,
        ph: usize,
        gw: usize,
        gh: usize,
    },
    #[error("{}: no masks to evaluate", .0.display())]
    Empty(PathBuf),
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageScore {
    pub name: String,
    #[serde(flatten)]
    pub scores: Scores,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub mean: Scores,
    pub images: Vec<ImageScore>,
}

/// Image-like files of a folder by stem.
fn files_by_stem(dir: &Path) -> Result<HashMap<String, PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut map = HashMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if has_image_extension(&path) {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                map.insert(stem.to_string(), path.clone());
            }
        }
    }
    Ok(map)
}

/// Scores every ground-truth mask of `gt_dir` (or those named in `names`, image file names or
/// stems) against the prediction with the same stem in `pred_dir`. Masks are binarised at half
/// of their range; each image counts once in the mean (empty vs empty scores 1, see
/// [`crate::metrics`]).
pub fn evaluate_dirs(
    pred_dir: &Path,
    gt_dir: &Path,
    names: Option<&[String]>,
) -> Result<EvalReport, EvalError> {
    let preds = files_by_stem(pred_dir)?;
    let gts = files_by_stem(gt_dir)?;
    let mut stems: Vec<String> = match names {
        Some(n) => n.iter().map(|s| stem_of(s).to_string()).collect(),
        None => gts.keys().cloned().collect(),
    };
    if names.is_none() {
        stems.sort();
    }
    if stems.is_empty() {
        return Err(EvalError::Empty(gt_dir.to_path_buf()));
    }
    let mut images = Vec::with_capacity(stems.len());
    for stem in stems {
        let gt = gts.get(&stem).ok_or_else(|| EvalError::MissingTruth {
            gt_dir: gt_dir.to_path_buf(),
            name: stem.clone(),
        })?;
        let pred = preds
            .get(&stem)
            .ok_or_else(|| EvalError::MissingPrediction {
                pred_dir: pred_dir.to_path_buf(),
                gt: gt.clone(),
            })?;
        let (p, g) = (load_mask(pred)?, load_mask(gt)?);
        if (p.width, p.height) != (g.width, g.height) {
            return Err(EvalError::Size {
                pred: pred.clone(),
                gt: gt.clone(),
                pw: p.width,
                ph: p.height,
                gw: g.width,
                gh: g.height,
            });
        }
        images.push(ImageScore {
            name: stem,
            scores: Confusion::from_masks(&p.data, &g.data).scores(),
        });
    }
    let all: Vec<Scores> = images.iter().map(|i| i.scores).collect();
    Ok(EvalReport {
        mean: Scores::mean(&all),
        images,
    })
}
