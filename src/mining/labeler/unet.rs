//! Self-training (`--labeler unet`): the pseudo-label is the U-Net++'s own thresholded
//! prediction, its components under `min_area` pixels dropped. No SAM: the baseline every
//! semi-supervised method must beat, and a real option without SAM weights.
//!
//! Quality: the stability score of the probability map (as for SAM's logits: the IoU of the
//! masks at logits +1 and -1, i.e. probabilities `sigmoid(±1)`), agreement 1 (the label is the
//! prediction), the component counts of the prediction and of the label (equal), no SAM IoU;
//! so the score is the stability and the same auto-accept rule applies.
use super::{LabelInput, Labeler};
use crate::data::Mask;
use crate::mining::quality::{self, prob_logit, STABILITY_OFFSET};
use crate::mining::{MinedImage, MiningConfig, MiningError, RoundResult};
use crate::store::Prompts;

/// The self-training labeler.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfTraining;

impl Labeler for SelfTraining {
    fn name(&self) -> &'static str {
        "unet"
    }

    fn id(&self) -> &str {
        "unet"
    }

    fn label(
        &mut self,
        input: &LabelInput<'_>,
        cfg: &MiningConfig,
    ) -> Result<Option<MinedImage>, MiningError> {
        let p = input.probs;
        if p.data.len() != p.width * p.height {
            return Err(MiningError::Invalid {
                image: input.name.to_string(),
                reason: format!(
                    "probability map has {} values for {}x{}",
                    p.data.len(),
                    p.width,
                    p.height
                ),
            });
        }
        Ok(
            self_training_round(&p.data, p.width, p.height, cfg).map(|round| MinedImage {
                components: round.label_components.unwrap_or(0),
                rounds: vec![round],
                converged: true,
            }),
        )
    }
}

/// The self-training label of a probability map (`width x height`, row-major); `None` when
/// no component has `min_area` pixels.
pub fn self_training_round(
    probs: &[f32],
    width: usize,
    height: usize,
    cfg: &MiningConfig,
) -> Option<RoundResult> {
    let pc = &cfg.prompt;
    let fg: Vec<bool> = probs.iter().map(|&v| v >= pc.threshold).collect();
    let (kept, components) = quality::keep_components(&fg, width, height, pc.min_area);
    if components == 0 {
        return None;
    }
    let logits: Vec<f32> = probs.iter().map(|&v| prob_logit(v)).collect();
    Some(RoundResult {
        prompts: Prompts {
            strategy: Some("unet".into()),
            ..Prompts::default()
        },
        mask: Mask {
            width,
            height,
            data: kept.iter().map(|&k| u8::from(k)).collect(),
        },
        sam_iou: None,
        stability: Some(quality::stability_score(&logits, STABILITY_OFFSET)),
        agreement: Some(1.0),
        unet_components: Some(components),
        label_components: Some(components),
        iou_with_previous: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::quality_score;

    #[test]
    fn the_label_is_the_thresholded_prediction_without_specks() {
        // 8x4: an object of 6 confident pixels, a 1-pixel speck, an uncertain rim
        let (w, h) = (8, 4);
        #[rustfmt::skip]
        let probs = vec![
            0.9, 0.9, 0.9, 0.6, 0.0, 0.0, 0.0, 0.8,
            0.9, 0.9, 0.9, 0.4, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let cfg = MiningConfig {
            prompt: crate::prompts::PromptConfig {
                min_area: 3,
                ..Default::default()
            },
            ..MiningConfig::default()
        };
        let r = self_training_round(&probs, w, h, &cfg).expect("one component");
        let mut expected = vec![0u8; w * h];
        for i in [0, 1, 2, 3, 8, 9, 10] {
            expected[i] = 1;
        }
        assert_eq!(r.mask.data, expected, "the speck at (7, 0) is dropped");
        // over the whole map, speck included: > logit +1 (p > 0.731): 7 pixels; > logit -1
        // (p > 0.269): 9 (0.6 and 0.4 are in the band)
        assert_eq!(r.stability, Some(7.0 / 9.0));
        assert_eq!((r.unet_components, r.label_components), (Some(1), Some(1)));
        assert_eq!(r.sam_iou, None);
        // the score is the stability: the auto-accept rule is SAM's
        assert_eq!(
            r.quality(),
            quality_score(None, r.stability, Some(1.0), Some(0))
        );
        assert_eq!(r.quality(), r.stability);
        // nothing above the threshold, or only specks: no label
        assert!(self_training_round(&[0.2; 32], w, h, &cfg).is_none());
        let mut speck = vec![0.0; 32];
        speck[5] = 0.9;
        assert!(self_training_round(&speck, w, h, &cfg).is_none());
    }
}
