//! One image's rounds: what every labeler returns ([`MinedImage`]), which round becomes the
//! pseudo-label ([`best_round`]), and SAM's rounds: U-Net++ prompts -> SAM (one decoder call
//! per component, batched on one embedding, each component with its own mask prompt) -> union
//! of the masks -> refinement rounds, each component refined from its own SAM mask.
//!
//! MedSAM and LiteMedSAM (box-only [`crate::models::sam::InputRules`]) follow their official
//! scripts' prompt rules: one box per component (whatever the configured strategy; the stored
//! prompts say `box`), one mask per box (no multimask), refinement moves only the box. Their
//! IoU head is not used by the official code and was not trained to be trusted, so their rounds
//! carry no `sam_iou`: the quality score is the stability score (of the logits of MedSAM's
//! resized probabilities, i.e. probabilities 0.27 / 0.73), the Dice agreement with U-Net++ and
//! the component-count factor.
use candle_core::{IndexOp, Tensor};

use super::quality::{self, STABILITY_OFFSET};
use super::refine::refinement;
use super::{MiningConfig, MiningError};
use crate::data::Mask;
use crate::models::sam::{Embedding, Prompt, SamPredictor};
use crate::prompts::{prompts_from_probs, sam_prompt_for, ImagePrompts, Strategy};
use crate::store::{quality_score, BoxPrompt, PointPrompt, Prompts};

/// The outcome of one round on one image. A quality field a labeler does not measure is
/// `None` (it then counts as 1 in [`crate::store::quality_score`]).
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// Every component's prompts of this round (boxes and points of all components together).
    pub prompts: Prompts,
    /// The label (for SAM: the union of the components' masks), at the image's size.
    pub mask: Mask,
    /// SAM's predicted IoU of the chosen masks, mean over components, clamped to [0, 1].
    pub sam_iou: Option<f64>,
    /// Stability score of the label's logits (IoU of the masks at logits +1 and -1).
    pub stability: Option<f64>,
    /// Dice between the label and the U-Net++ foreground.
    pub agreement: Option<f64>,
    /// Connected components (of at least the prompts' `min_area` pixels) of the U-Net++
    /// foreground and of the label; a difference flags a split, merged, lost or added object.
    pub unet_components: Option<usize>,
    pub label_components: Option<usize>,
    /// IoU between this round's label and the previous round's (`None` in round 0).
    pub iou_with_previous: Option<f64>,
}

impl RoundResult {
    /// `label_components - unet_components`, when both are known.
    pub fn component_change(&self) -> Option<i64> {
        Some(self.label_components? as i64 - self.unet_components? as i64)
    }

    /// The round's quality score ([`crate::store::quality_score`], as the store computes it
    /// for the stored row); `None` when the labeler measured nothing.
    pub fn quality(&self) -> Option<f64> {
        quality_score(
            self.sam_iou,
            self.stability,
            self.agreement,
            self.component_change(),
        )
    }
}

/// Every round of one image (round 0 from the U-Net++ prompts, then the refinements).
#[derive(Clone, Debug)]
pub struct MinedImage {
    /// Connected components of the U-Net++ prediction that were prompted (or kept).
    pub components: usize,
    /// At least one, in the order they were made.
    pub rounds: Vec<RoundResult>,
    /// The last two rounds' masks agreed (IoU >= `stop_iou`), which ended the refinement.
    pub converged: bool,
}

impl MinedImage {
    /// Index of the round that becomes the pseudo-label ([`best_round`]).
    pub fn best(&self) -> usize {
        best_round(&self.rounds)
    }

    /// The round that becomes the pseudo-label.
    pub fn chosen(&self) -> &RoundResult {
        &self.rounds[self.best()]
    }

    /// The rounds in the order they are stored: as made, except the chosen one, which comes
    /// last (the newest stored row is the one reviewed). Its prompts keep their round's name.
    pub fn store_order(&self) -> Vec<&RoundResult> {
        let best = self.best();
        let mut out: Vec<&RoundResult> = (0..self.rounds.len())
            .filter(|&k| k != best)
            .map(|k| &self.rounds[k])
            .collect();
        out.extend(self.rounds.get(best));
        out
    }
}

/// The round with the highest quality score (a round without one counts as 0); among equal
/// scores the latest (a refinement that changed nothing keeps the refined prompts). 0 for no
/// rounds.
pub fn best_round(rounds: &[RoundResult]) -> usize {
    let mut best: Option<(f64, usize)> = None;
    for (k, r) in rounds.iter().enumerate() {
        let q = r.quality().unwrap_or(0.0);
        if best.is_none_or(|(b, _)| q >= b) {
            best = Some((q, k));
        }
    }
    best.map_or(0, |(_, k)| k)
}

/// What SAM is asked for one component, carried from round to round.
struct ComponentState {
    /// The component's U-Net++ box (where refinement looks for missed parts).
    unet_box: [f32; 4],
    /// The U-Net++ foreground in this component's territory (its own object, not the others).
    own_fg: Vec<bool>,
    prompt: Prompt,
}

/// The image-wide facts every SAM round of one image compares with.
struct Frame<'a> {
    name: &'a str,
    width: usize,
    height: usize,
    unet_fg: Vec<bool>,
    unet_components: usize,
    cfg: &'a MiningConfig,
    /// The model takes boxes only (MedSAM, LiteMedSAM): see the module docs.
    box_only: bool,
    /// The prompt strategy in effect (`box` for the box-only models).
    strategy: Strategy,
}

/// Mines one image with SAM: `probs` is the U-Net++ probability map (`width x height`,
/// row-major, the image's original size) and `emb` SAM's embedding of the same image. `None`
/// when the prediction has no component of at least `min_area` pixels.
pub fn mine_image(
    name: &str,
    sam: &SamPredictor,
    emb: &Embedding,
    probs: &[f32],
    width: usize,
    height: usize,
    cfg: &MiningConfig,
) -> Result<Option<MinedImage>, MiningError> {
    let prompts = prompts_from_probs(probs, width, height, &cfg.prompt).map_err(|source| {
        MiningError::Prompts {
            image: name.to_string(),
            source,
        }
    })?;
    if prompts.components.is_empty() {
        return Ok(None);
    }
    sam_rounds(name, sam, emb, &prompts, probs, (width, height), cfg).map(Some)
}

/// SAM's rounds on one image from its prompts (at least one component).
pub(crate) fn sam_rounds(
    name: &str,
    sam: &SamPredictor,
    emb: &Embedding,
    prompts: &ImagePrompts,
    probs: &[f32],
    (width, height): (usize, usize),
    cfg: &MiningConfig,
) -> Result<MinedImage, MiningError> {
    if emb.original_size != (height, width) {
        return Err(MiningError::Invalid {
            image: name.to_string(),
            reason: format!(
                "SAM embedding is of a {}x{} image, the prediction {width}x{height}",
                emb.original_size.1, emb.original_size.0
            ),
        });
    }
    let pc = &cfg.prompt;
    let unet_fg: Vec<bool> = probs.iter().map(|&p| p >= pc.threshold).collect();
    let box_only = sam.sam.config().rules.box_only();
    let frame = Frame {
        name,
        width,
        height,
        unet_components: quality::component_count(&unet_fg, width, height, pc.min_area),
        unet_fg,
        cfg,
        box_only,
        strategy: if box_only { Strategy::Box } else { pc.strategy },
    };
    let device = sam.sam.device();
    let mut states = prompts
        .components
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let own = k as u32 + 1;
            Ok(ComponentState {
                unet_box: c.box_in_image,
                own_fg: (frame.unet_fg.iter().zip(&prompts.owner))
                    .map(|(&f, &o)| f && o == own)
                    .collect(),
                prompt: sam_prompt_for(c, frame.strategy, device)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| sam_error(name, e))?;
    let rounds_max = cfg.rounds.max(1);
    let mut rounds: Vec<RoundResult> = Vec::new();
    let mut converged = false;
    for k in 0..rounds_max {
        let (round, per_component) = sam_round(sam, emb, &states, k, rounds.last(), &frame)?;
        let agreed = round.iou_with_previous.is_some_and(|v| v >= cfg.stop_iou);
        rounds.push(round);
        if agreed {
            converged = true;
            break;
        }
        if k + 1 < rounds_max {
            refine_states(&mut states, per_component, &frame);
        }
    }
    Ok(MinedImage {
        components: states.len(),
        rounds,
        converged,
    })
}

fn sam_error(name: &str, e: impl Into<crate::models::sam::SamError>) -> MiningError {
    MiningError::Sam {
        image: name.to_string(),
        source: e.into(),
    }
}

/// Each component's SAM mask of one round and its low-res logits (the next round's mask input).
type ComponentMasks = Vec<(Vec<bool>, Tensor)>;

/// Round `k`: one batched decoder call over every component's prompt.
fn sam_round(
    sam: &SamPredictor,
    emb: &Embedding,
    states: &[ComponentState],
    k: usize,
    previous: Option<&RoundResult>,
    f: &Frame<'_>,
) -> Result<(RoundResult, ComponentMasks), MiningError> {
    let err = |e: candle_core::Error| sam_error(f.name, e);
    let batch: Vec<Prompt> = states.iter().map(|s| s.prompt.clone()).collect();
    let preds = sam
        .predict_batch(emb, &batch, f.cfg.multimask && !f.box_only)
        .map_err(|e| sam_error(f.name, e))?;
    let mut union_logits = vec![f32::NEG_INFINITY; f.width * f.height];
    let mut ious = Vec::with_capacity(preds.len());
    let mut per_component = Vec::with_capacity(preds.len());
    for pred in &preds {
        let best = pred.best();
        let logits: Vec<f32> = pred
            .logits
            .i(best)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(err)?;
        for (u, &v) in union_logits.iter_mut().zip(&logits) {
            *u = u.max(v);
        }
        ious.push(f64::from(pred.iou_predictions[best]));
        let low_res = pred.low_res_logits.narrow(0, best, 1).map_err(err)?; // [1, 256, 256]
        per_component.push((logits.iter().map(|&v| v > 0.0).collect(), low_res));
    }
    let union: Vec<bool> = union_logits.iter().map(|&v| v > 0.0).collect();
    let iou_with_previous = previous.map(|r| {
        let prev: Vec<bool> = r.mask.data.iter().map(|&v| v != 0).collect();
        quality::iou(&union, &prev)
    });
    let min_area = f.cfg.prompt.min_area;
    let round = RoundResult {
        prompts: stored_prompts(&batch, k, &f.strategy.to_string()),
        mask: Mask {
            width: f.width,
            height: f.height,
            data: union.iter().map(|&v| u8::from(v)).collect(),
        },
        sam_iou: (!f.box_only).then(|| quality::mean(ious).unwrap_or(0.0).clamp(0.0, 1.0)),
        stability: Some(quality::stability_score(&union_logits, STABILITY_OFFSET)),
        agreement: Some(quality::dice(&union, &f.unet_fg)),
        unet_components: Some(f.unet_components),
        label_components: Some(quality::component_count(
            &union, f.width, f.height, min_area,
        )),
        iou_with_previous,
    };
    Ok((round, per_component))
}

/// The prompts of the next round, each component's from its own SAM mask and its own U-Net++
/// object: box around its SAM mask, a positive point in its largest miss, a negative point in
/// its largest leak (another object counts as a leak), its own logits as mask input.
fn refine_states(states: &mut [ComponentState], per_component: ComponentMasks, f: &Frame<'_>) {
    let pc = &f.cfg.prompt;
    for (state, (sam_fg, low_res)) in states.iter_mut().zip(per_component) {
        let r = refinement(
            &sam_fg,
            &state.own_fg,
            &state.unet_box,
            f.width,
            f.height,
            pc.box_margin,
            pc.min_area,
        );
        let p = &mut state.prompt;
        p.bbox = r.box_in_image.or(p.bbox).or(Some(state.unet_box));
        if f.box_only {
            continue; // the box is all these models take
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A round with these quality factors (no component counts unless given).
    fn round(sam_iou: f64, stability: f64, counts: Option<(usize, usize)>) -> RoundResult {
        RoundResult {
            prompts: Prompts::default(),
            mask: Mask {
                width: 1,
                height: 1,
                data: vec![1],
            },
            sam_iou: Some(sam_iou),
            stability: Some(stability),
            agreement: Some(1.0),
            unet_components: counts.map(|c| c.0),
            label_components: counts.map(|c| c.1),
            iou_with_previous: None,
        }
    }

    #[test]
    fn the_best_quality_round_is_chosen_even_when_a_later_one_is_worse() {
        // round 1 is best; round 2 refines into a worse mask
        let rounds = vec![
            round(0.8, 0.9, None),
            round(0.95, 0.95, None),
            round(0.99, 0.5, None),
        ];
        assert_eq!(best_round(&rounds), 1);
        // a changed component count halves an otherwise better round
        let rounds = vec![round(0.8, 0.8, Some((2, 2))), round(0.9, 0.9, Some((2, 1)))];
        assert_eq!(rounds[1].component_change(), Some(-1));
        assert_eq!(best_round(&rounds), 0);
        // ties go to the later round; no rounds: 0
        let rounds = vec![round(0.9, 0.9, None), round(0.9, 0.9, None)];
        assert_eq!(best_round(&rounds), 1);
        assert_eq!(best_round(&[]), 0);
        // the quality is the store's score of the stored row
        let r = round(0.5, 0.8, Some((1, 3)));
        assert_eq!(
            r.quality(),
            quality_score(Some(0.5), Some(0.8), Some(1.0), Some(2))
        );
    }

    #[test]
    fn the_chosen_round_is_stored_last_with_its_own_name() {
        let mut rounds = vec![
            round(0.8, 0.9, None),
            round(0.95, 0.95, None),
            round(0.99, 0.5, None),
        ];
        for (k, r) in rounds.iter_mut().enumerate() {
            r.prompts.strategy = Some(if k == 0 {
                "box+points".into()
            } else {
                format!("refine {k}")
            });
        }
        let mined = MinedImage {
            components: 1,
            rounds,
            converged: false,
        };
        assert_eq!(mined.best(), 1);
        let names: Vec<_> = mined
            .store_order()
            .iter()
            .map(|r| r.prompts.strategy.clone().unwrap())
            .collect();
        assert_eq!(names, ["box+points", "refine 2", "refine 1"]);
        assert_eq!(mined.chosen().sam_iou, Some(0.95));
    }
}
