//! The oracle labelers: they answer each prompt with the ground truth. The prompts are the
//! U-Net++ components' boxes, as in mining. Two answers ([`OracleKind`]):
//! - `objects` (`--labeler oracle`): the ground-truth objects (8-connected components) that the
//!   prompted boxes touch, whole: what a perfect promptable segmenter returns for a box on an
//!   object. Objects the U-Net++ missed get no prompt and stay out.
//! - `box` (`--labeler oracle-box`): the ground truth clipped to the union of the boxes, so an
//!   object that sticks out of its box is truncated.
//!
//! Quality fields are all 1 and no component counts are recorded (the truth vouches for itself),
//! so any threshold up to 1 accepts it. It gives the loop's upper bound and tests the whole flow
//! without SAM weights. An unlabelled image without ground truth is an error for that image.
use image::{GrayImage, Luma};
use imageproc::region_labelling::{connected_components, Connectivity};

use super::{LabelInput, Labeler};
use crate::data::{self, Mask};
use crate::mining::{MinedImage, MiningConfig, MiningError, RoundResult};
use crate::prompts::{prompts_from_probs, PromptConfig, Strategy};
use crate::store::{BoxPrompt, Prompts};

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

/// Which ground truth the oracle answers with (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OracleKind {
    /// Whole ground-truth objects touched by a prompted box.
    Objects,
    /// The ground truth clipped to the prompted boxes.
    Box,
}

impl OracleKind {
    /// The oracle's answer for `boxes` (`[x0, y0, x1, y1]`, inclusive-exclusive, in pixels).
    pub fn answer(self, truth: &Mask, boxes: &[[f32; 4]]) -> Mask {
        match self {
            OracleKind::Objects => oracle_objects(truth, boxes),
            OracleKind::Box => oracle_mask(truth, boxes),
        }
    }

    /// The name stored as the pseudo-labels' strategy and checkpoint.
    pub fn name(self) -> &'static str {
        match self {
            OracleKind::Objects => "oracle",
            OracleKind::Box => "oracle-box",
        }
    }
}

/// The oracle's object answer: every 8-connected ground-truth component with at least one pixel
/// inside one of the boxes, whole.
pub fn oracle_objects(truth: &Mask, boxes: &[[f32; 4]]) -> Mask {
    let (w, h) = (truth.width, truth.height);
    let binary = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        Luma([u8::from(truth.data[y as usize * w + x as usize] != 0)])
    });
    let labels = connected_components(&binary, Connectivity::Eight, Luma([0u8]));
    // the components seen inside the boxes: exactly the pixels `oracle_mask` keeps
    let inside = oracle_mask(truth, boxes);
    let mut touched = std::collections::HashSet::new();
    for (i, &v) in inside.data.iter().enumerate() {
        if v != 0 {
            touched.insert(labels.as_raw()[i]);
        }
    }
    let data = labels
        .as_raw()
        .iter()
        .map(|l| u8::from(*l != 0 && touched.contains(l)))
        .collect();
    Mask {
        width: w,
        height: h,
        data,
    }
}

/// The oracle as a [`Labeler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OracleLabeler {
    kind: OracleKind,
}

impl OracleLabeler {
    pub fn new(kind: OracleKind) -> Self {
        Self { kind }
    }
}

impl Labeler for OracleLabeler {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn id(&self) -> &str {
        match self.kind {
            OracleKind::Objects => "oracle-object",
            OracleKind::Box => "oracle-box",
        }
    }

    fn label(
        &mut self,
        input: &LabelInput<'_>,
        cfg: &MiningConfig,
    ) -> Result<Option<MinedImage>, MiningError> {
        let invalid = |reason: String| MiningError::Invalid {
            image: input.name.to_string(),
            reason,
        };
        let Some(gt) = input.ground_truth else {
            return Err(MiningError::NoGroundTruth {
                image: input.name.to_string(),
            });
        };
        let p = input.probs;
        let prompt_cfg = PromptConfig {
            strategy: Strategy::Box,
            ..cfg.prompt.clone()
        };
        let prompts =
            prompts_from_probs(&p.data, p.width, p.height, &prompt_cfg).map_err(|source| {
                MiningError::Prompts {
                    image: input.name.to_string(),
                    source,
                }
            })?;
        if prompts.components.is_empty() {
            return Ok(None);
        }
        let boxes: Vec<[f32; 4]> = prompts.components.iter().map(|c| c.box_in_image).collect();
        let truth = data::load_mask(gt).map_err(|e| invalid(format!("ground truth: {e}")))?;
        if (truth.width, truth.height) != (p.width, p.height) {
            return Err(invalid(format!(
                "ground truth {} is {}x{}, the image {}x{}",
                gt.display(),
                truth.width,
                truth.height,
                p.width,
                p.height
            )));
        }
        let round = RoundResult {
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
                strategy: Some(self.kind.name().into()),
            },
            mask: self.kind.answer(&truth, &boxes),
            sam_iou: Some(1.0),
            stability: Some(1.0),
            agreement: Some(1.0),
            unet_components: None,
            label_components: None,
            iou_with_previous: None,
        };
        Ok(Some(MinedImage {
            components: boxes.len(),
            rounds: vec![round],
            converged: true,
        }))
    }
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

    fn disc(w: usize, h: usize, discs: &[(f32, f32, f32)]) -> Mask {
        let mut data = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let inside = discs
                    .iter()
                    .any(|&(cx, cy, r)| (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r);
                data[y * w + x] = u8::from(inside);
            }
        }
        Mask {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn object_oracle_returns_touched_objects_whole() {
        // two objects; the box covers the left half of the first only
        let truth = disc(40, 20, &[(10.0, 10.0, 6.0), (30.0, 10.0, 5.0)]);
        let boxes = [[0.0, 0.0, 10.0, 20.0]];
        let first = disc(40, 20, &[(10.0, 10.0, 6.0)]);
        assert_eq!(oracle_objects(&truth, &boxes), first);
        assert_eq!(OracleKind::Objects.answer(&truth, &boxes), first);
        // the box answer truncates it at x = 10
        let clipped = OracleKind::Box.answer(&truth, &boxes);
        let count = |m: &Mask| m.data.iter().filter(|&&v| v != 0).count();
        assert!(count(&clipped) < count(&first));
        assert!(clipped.data.iter().zip(&first.data).all(|(c, f)| c <= f));
        // a box on background only gets nothing; a box on each object gets both
        assert_eq!(count(&oracle_objects(&truth, &[[0.0, 0.0, 3.0, 3.0]])), 0);
        let both = oracle_objects(&truth, &[[9.0, 9.0, 11.0, 11.0], [29.0, 9.0, 31.0, 11.0]]);
        assert_eq!(both, truth);
    }
}
