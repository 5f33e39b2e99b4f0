//! The oracle labeler: it answers each prompt with the ground truth. The pseudo-label of an
//! image is its ground-truth mask restricted to the union of the prompted boxes (the U-Net++
//! components' boxes, as in mining). Its quality fields are all 1 and it records no component
//! counts (the truth vouches for itself), so any threshold up to 1 accepts it. It gives the
//! loop's upper bound and tests the whole flow without SAM weights.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use super::{predict_mask, ExperimentError};
use crate::data::{self, Mask};
use crate::mining::{MiningConfig, MiningError};
use crate::predict::Predictor;
use crate::prompts::{PromptConfig, Strategy};
use crate::store::{Actor, BoxPrompt, NewPseudoLabel, Project, Prompts, Role};

/// The oracle's answer: `truth` restricted to the union of the boxes (`[x0, y0, x1, y1]`,
/// inclusive-exclusive, in pixels).
pub fn oracle_mask(truth: &Mask, boxes: &[[f32; 4]]) -> Mask {
    let mut data = vec![0u8; truth.width * truth.height];
    for b in boxes {
        let clamp = |v: f32, hi: usize| (v.max(0.0).floor() as usize).min(hi);
        let (x0, x1) = (clamp(b[0], truth.width), clamp(b[2].ceil(), truth.width));
        let (y0, y1) = (clamp(b[1], truth.height), clamp(b[3].ceil(), truth.height));
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * truth.width + x;
                data[i] = u8::from(truth.data[i] != 0);
            }
        }
    }
    Mask {
        width: truth.width,
        height: truth.height,
        data,
    }
}

/// Mining with the oracle labeler: prompts from the U-Net++ as in
/// [`crate::mining::mine_project`], the answer from the ground truth; stored as pseudo-labels
/// with quality 1, then accepted by `cfg.auto_accept`. Returns `(stored, accepted)`.
pub fn oracle_mine(
    project: &mut Project,
    unet_checkpoint: &Path,
    cfg: &MiningConfig,
    device: &Device,
    cancel: &AtomicBool,
) -> Result<(usize, usize), ExperimentError> {
    let unet = Predictor::load(unet_checkpoint, device, cfg.unet_mode).map_err(|source| {
        ExperimentError::Checkpoint {
            path: unet_checkpoint.to_path_buf(),
            source,
        }
    })?;
    let prompt_cfg = PromptConfig {
        strategy: Strategy::Box,
        ..cfg.prompt.clone()
    };
    let mut stored = 0;
    for rec in project.images()? {
        if cancel.load(Ordering::Relaxed) {
            return Err(ExperimentError::Cancelled);
        }
        if rec.role != Role::Unlabelled {
            continue;
        }
        let Some(gt) = project.ground_truth(&rec.name)? else {
            continue;
        };
        let probs = predict_mask(&unet, project, &rec.name)?;
        let prompts =
            crate::prompts::prompts_from_probs(&probs.data, probs.width, probs.height, &prompt_cfg)
                .map_err(|e| MiningError::Prompts {
                    image: rec.name.clone(),
                    source: e,
                })?;
        if prompts.components.is_empty() {
            continue;
        }
        let boxes: Vec<[f32; 4]> = prompts.components.iter().map(|c| c.box_in_image).collect();
        let truth = data::load_mask(&gt)?;
        let round = project
            .latest_pseudo_label(&rec.name)?
            .map_or(0, |p| p.round + 1);
        let label = NewPseudoLabel {
            round,
            mask: oracle_mask(&truth, &boxes),
            prompts: Prompts {
                boxes_in_image: boxes
                    .iter()
                    .map(|b| BoxPrompt {
                        x0: b[0],
                        y0: b[1],
                        x1: b[2],
                        y1: b[3],
                    })
                    .collect(),
                points_in_image: Vec::new(),
                mask_prompt: false,
                strategy: Some("oracle".into()),
            },
            sam_iou: Some(1.0),
            stability: Some(1.0),
            agreement: Some(1.0),
            unet_components: None,
            label_components: None,
            sam_checkpoint: Some("oracle".into()),
            unet_checkpoint: Some(unet_checkpoint.display().to_string()),
        };
        project.add_pseudo_label(&rec.name, &label)?;
        stored += 1;
    }
    let accepted = match cfg.auto_accept {
        Some(min) => {
            let note = format!("auto-accepted: quality >= {min}");
            project
                .accept_by_quality(
                    min,
                    Actor {
                        reviewer: Some("medmine experiment"),
                        note: Some(&note),
                    },
                )?
                .len()
        }
        None => 0,
    };
    Ok((stored, accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_keeps_truth_inside_boxes_only() {
        let truth = Mask {
            width: 4,
            height: 2,
            data: vec![1, 1, 0, 1, 1, 0, 1, 1],
        };
        let m = oracle_mask(&truth, &[[0.0, 0.0, 2.0, 2.0]]);
        assert_eq!(m.data, vec![1, 1, 0, 0, 1, 0, 0, 0]);
        // boxes beyond the image are clamped; two boxes unite
        let m = oracle_mask(&truth, &[[-3.0, 0.0, 1.0, 1.0], [3.0, 1.0, 9.0, 9.0]]);
        assert_eq!(m.data, vec![1, 0, 0, 0, 0, 0, 0, 1]);
    }
}
