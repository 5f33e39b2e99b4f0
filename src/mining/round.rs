//! One image's mining: U-Net++ prompts -> SAM (one decoder call per component, batched on one
//! embedding) -> union of the masks -> refinement rounds -> quality.
use candle_core::{IndexOp, Tensor};

use super::quality::{self, STABILITY_OFFSET};
use super::refine::refinement;
use super::{MiningConfig, MiningError};
use crate::data::Mask;
use crate::models::sam::{Embedding, Prompt, SamPredictor};
use crate::prompts::{prompts_from_probs, sam_prompt_for};
use crate::store::{BoxPrompt, PointPrompt, Prompts};

/// The outcome of one SAM round on one image.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// Every component's prompts of this round (boxes and points of all components together).
    pub prompts: Prompts,
    /// Union of the components' masks, at the image's size.
    pub mask: Mask,
    /// SAM's predicted IoU of the chosen masks, mean over components, clamped to [0, 1].
    pub sam_iou: f64,
    /// Stability score of the union (IoU of its logits thresholded at +1 and -1).
    pub stability: f64,
    /// Dice between the union and the U-Net++ foreground.
    pub agreement: f64,
    /// Connected components (of at least the prompts' `min_area` pixels) of the U-Net++
    /// foreground and of the union; a difference flags a split, merged, lost or added object.
    pub unet_components: usize,
    pub label_components: usize,
    /// IoU between this round's union and the previous round's (`None` in round 0).
    pub iou_with_previous: Option<f64>,
}

/// Every round of one image (round 0 from the U-Net++ prompts, then the refinements).
#[derive(Clone, Debug)]
pub struct MinedImage {
    /// Connected components of the U-Net++ prediction that were prompted.
    pub components: usize,
    /// At least one; the last is the pseudo-label.
    pub rounds: Vec<RoundResult>,
    /// The last two rounds' masks agreed (IoU >= `stop_iou`), which ended the refinement.
    pub converged: bool,
}

impl MinedImage {
    /// The final round (the pseudo-label).
    pub fn last(&self) -> &RoundResult {
        self.rounds
            .last()
            .expect("a mined image has at least one round")
    }
}

/// What SAM is asked for one component, carried from round to round.
struct ComponentState {
    /// The component's U-Net++ box (where refinement looks for missed parts).
    unet_box: [f32; 4],
    prompt: Prompt,
}

/// Mines one image: `probs` is the U-Net++ probability map (`width x height`, row-major,
/// the image's original size) and `emb` SAM's embedding of the same image. `None` when the
/// prediction has no component of at least `min_area` pixels.
pub fn mine_image(
    name: &str,
    sam: &SamPredictor,
    emb: &Embedding,
    probs: &[f32],
    width: usize,
    height: usize,
    cfg: &MiningConfig,
) -> Result<Option<MinedImage>, MiningError> {
    if emb.original_size != (height, width) {
        return Err(MiningError::Invalid {
            image: name.to_string(),
            reason: format!(
                "SAM embedding is of a {}x{} image, the prediction {width}x{height}",
                emb.original_size.1, emb.original_size.0
            ),
        });
    }
    let sam_err = |source| MiningError::Sam {
        image: name.to_string(),
        source,
    };
    let candle_err = |e: candle_core::Error| sam_err(e.into());
    let pc = &cfg.prompt;
    let strategy = pc.strategy;
    let prompts =
        prompts_from_probs(probs, width, height, pc).map_err(|source| MiningError::Prompts {
            image: name.to_string(),
            source,
        })?;
    if prompts.components.is_empty() {
        return Ok(None);
    }
    let device = sam.sam.device();
    let mut states = prompts
        .components
        .iter()
        .map(|c| {
            Ok(ComponentState {
                unet_box: c.box_in_image,
                prompt: sam_prompt_for(c, strategy, prompts.mask_prompt.as_deref(), device)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(candle_err)?;
    let unet_fg: Vec<bool> = probs.iter().map(|&p| p >= pc.threshold).collect();
    let unet_components = quality::component_count(&unet_fg, width, height, pc.min_area);
    let rounds_max = cfg.rounds.max(1);
    let mut rounds: Vec<RoundResult> = Vec::new();
    let mut converged = false;
    for k in 0..rounds_max {
        let batch: Vec<Prompt> = states.iter().map(|s| s.prompt.clone()).collect();
        let preds = sam
            .predict_batch(emb, &batch, cfg.multimask)
            .map_err(sam_err)?;
        let mut union_logits = vec![f32::NEG_INFINITY; width * height];
        let mut ious = Vec::with_capacity(preds.len());
        let mut per_component = Vec::with_capacity(preds.len());
        for pred in &preds {
            let best = pred.best();
            let logits: Vec<f32> = pred
                .logits
                .i(best)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(candle_err)?;
            for (u, &v) in union_logits.iter_mut().zip(&logits) {
                *u = u.max(v);
            }
            ious.push(f64::from(pred.iou_predictions[best]));
            let low_res: Tensor = pred.low_res_logits.narrow(0, best, 1).map_err(candle_err)?; // [1, 256, 256]
            per_component.push((
                logits.iter().map(|&v| v > 0.0).collect::<Vec<bool>>(),
                low_res,
            ));
        }
        let union: Vec<bool> = union_logits.iter().map(|&v| v > 0.0).collect();
        let iou_with_previous = rounds.last().map(|r: &RoundResult| {
            let prev: Vec<bool> = r.mask.data.iter().map(|&v| v != 0).collect();
            quality::iou(&union, &prev)
        });
        rounds.push(RoundResult {
            prompts: stored_prompts(&batch, k, &strategy.to_string()),
            mask: Mask {
                width,
                height,
                data: union.iter().map(|&f| u8::from(f)).collect(),
            },
            sam_iou: quality::mean(ious).unwrap_or(0.0).clamp(0.0, 1.0),
            stability: quality::stability_score(&union_logits, STABILITY_OFFSET),
            agreement: quality::dice(&union, &unet_fg),
            unet_components,
            label_components: quality::component_count(&union, width, height, pc.min_area),
            iou_with_previous,
        });
        if iou_with_previous.is_some_and(|v| v >= cfg.stop_iou) {
            converged = true;
            break;
        }
        if k + 1 == rounds_max {
            break;
        }
        // Prompts of round k+1 from SAM's round-k masks.
        for (state, (sam_fg, low_res)) in states.iter_mut().zip(per_component) {
            let r = refinement(
                &sam_fg,
                &unet_fg,
                &state.unet_box,
                width,
                height,
                pc.box_margin,
                pc.min_area,
            );
            let p = &mut state.prompt;
            p.bbox = r.box_in_image.or(p.bbox).or(Some(state.unet_box));
            for (pt, label) in [(r.positive, 1u8), (r.negative, 0u8)] {
                if let Some((x, y)) = pt {
                    if !p.points.contains(&(x, y, label)) {
                        p.points.push((x, y, label));
                    }
                }
            }
            p.mask_input = Some(low_res);
        }
    }
    Ok(Some(MinedImage {
        components: states.len(),
        rounds,
        converged,
    }))
}

/// The prompts of one round as the store keeps them; `strategy` names round 0's recipe and
/// later rounds are `refine K`.
fn stored_prompts(batch: &[Prompt], round: usize, strategy: &str) -> Prompts {
    Prompts {
        boxes_in_image: batch
            .iter()
            .filter_map(|p| p.bbox)
            .map(|[x0, y0, x1, y1]| BoxPrompt { x0, y0, x1, y1 })
            .collect(),
        points_in_image: batch
            .iter()
            .flat_map(|p| &p.points)
            .map(|&(x, y, l)| PointPrompt {
                x,
                y,
                positive: l == 1,
            })
            .collect(),
        mask_prompt: batch.iter().any(|p| p.mask_input.is_some()),
        strategy: Some(if round == 0 {
            strategy.to_string()
        } else {
            format!("refine {round}")
        }),
    }
}
