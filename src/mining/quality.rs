//! Quality of a pseudo-label (pure functions on flat masks and logits): SAM's stability
//! score, Dice agreement, the IoU of successive rounds and the connected-component counts
//! whose change (U-Net++ prediction vs pseudo-label) flags a split, merged, lost or added
//! object. How they combine into one score: [`crate::store::quality_score`].
use image::{GrayImage, Luma};
use imageproc::region_labelling::{connected_components, Connectivity};

/// Offset of SAM's stability score: masks thresholded at logits `+OFFSET` and `-OFFSET`.
pub const STABILITY_OFFSET: f32 = 1.0;

/// `|a ∧ b|` and `|a ∨ b|` / `|a| + |b|` counts of two equally long masks.
fn counts(a: &[bool], b: &[bool]) -> (usize, usize, usize) {
    debug_assert_eq!(a.len(), b.len());
    let (mut inter, mut na, mut nb) = (0, 0, 0);
    for (&x, &y) in a.iter().zip(b) {
        inter += usize::from(x && y);
        na += usize::from(x);
        nb += usize::from(y);
    }
    (inter, na, nb)
}

/// Dice `2|a ∧ b| / (|a| + |b|)`; two empty masks agree fully (1).
pub fn dice(a: &[bool], b: &[bool]) -> f64 {
    let (inter, na, nb) = counts(a, b);
    if na + nb == 0 {
        1.0
    } else {
        2.0 * inter as f64 / (na + nb) as f64
    }
}

/// IoU `|a ∧ b| / |a ∨ b|`; two empty masks are identical (1).
pub fn iou(a: &[bool], b: &[bool]) -> f64 {
    let (inter, na, nb) = counts(a, b);
    let union = na + nb - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// SAM's stability score: IoU of the masks `logits > +offset` and `logits > -offset` (the
/// first lies inside the second, so it is their count ratio). A mask that is empty even at
/// `-offset` is perfectly stable (1); NaN logits count as background.
pub fn stability_score(logits: &[f32], offset: f32) -> f64 {
    let hi = logits.iter().filter(|&&v| v > offset).count();
    let lo = logits.iter().filter(|&&v| v > -offset).count();
    if lo == 0 {
        1.0
    } else {
        hi as f64 / lo as f64
    }
}

/// Number of 8-connected foreground components of at least `min_area` pixels (the rule that
/// decides which U-Net++ components are prompted, so specks do not count) of a `width x
/// height` row-major mask. `min_area` 0 counts as 1.
pub fn component_count(mask: &[bool], width: usize, height: usize, min_area: usize) -> usize {
    keep_components(mask, width, height, min_area).1
}

/// The mask without its 8-connected components of fewer than `min_area` pixels (0 counts as
/// 1), and the number of components kept.
pub fn keep_components(
    mask: &[bool],
    width: usize,
    height: usize,
    min_area: usize,
) -> (Vec<bool>, usize) {
    debug_assert_eq!(mask.len(), width * height);
    if width == 0 || height == 0 || !mask.iter().any(|&m| m) {
        return (vec![false; mask.len()], 0);
    }
    let binary = GrayImage::from_fn(width as u32, height as u32, |x, y| {
        Luma([if mask[y as usize * width + x as usize] {
            255u8
        } else {
            0
        }])
    });
    let labels = connected_components(&binary, Connectivity::Eight, Luma([0u8]));
    let mut areas: Vec<usize> = Vec::new();
    for l in labels.pixels() {
        let label = l[0] as usize;
        if label == 0 {
            continue;
        }
        if areas.len() < label {
            areas.resize(label, 0);
        }
        areas[label - 1] += 1;
    }
    let need = min_area.max(1);
    let kept = labels
        .pixels()
        .map(|l| l[0] != 0 && areas[l[0] as usize - 1] >= need)
        .collect();
    (kept, areas.iter().filter(|&&a| a >= need).count())
}

/// A probability as a logit, `ln(p / (1 - p))` (so thresholds at logits ±1 read as
/// probabilities `sigmoid(±1)`); 0 and 1 give -inf and +inf, NaN stays NaN.
pub fn prob_logit(p: f32) -> f32 {
    (p / (1.0 - p)).ln()
}

/// Mean of the values, `None` for none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(s: &str) -> Vec<bool> {
        s.chars().map(|c| c == '1').collect()
    }

    #[test]
    fn dice_and_iou_exact() {
        let a = mask("11110000");
        let b = mask("00111100");
        assert_eq!(dice(&a, &b), 0.5); // 2*2 / (4+4)
        assert_eq!(iou(&a, &b), 2.0 / 6.0);
        assert_eq!(dice(&a, &a), 1.0);
        assert_eq!(iou(&a, &mask("00001111")), 0.0);
        assert_eq!(dice(&mask("0000"), &mask("0000")), 1.0);
        assert_eq!(iou(&mask("0000"), &mask("0000")), 1.0);
        assert_eq!(dice(&mask("0000"), &mask("0100")), 0.0);
    }

    #[test]
    fn stability_is_the_ratio_of_the_two_thresholded_masks() {
        // > +1: 2 pixels; > -1: 4 pixels (0.5 and -0.5 are in the band)
        let logits = [3.0, 1.5, 0.5, -0.5, -1.0, -4.0, f32::NAN];
        assert_eq!(stability_score(&logits, 1.0), 0.5);
        // a confident mask is fully stable
        assert_eq!(stability_score(&[10.0, 10.0, -10.0], 1.0), 1.0);
        // nothing above -1: empty and stable
        assert_eq!(stability_score(&[-5.0, -2.0], 1.0), 1.0);
        // only uncertain pixels: unstable
        assert_eq!(stability_score(&[0.2, -0.2], 1.0), 0.0);
    }

    /// A `w x h` mask from rows of `.` (background) and `#` (foreground).
    fn grid(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let (w, h) = (rows[0].len(), rows.len());
        let m = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        (m, w, h)
    }

    #[test]
    fn components_are_eight_connected_and_small_ones_do_not_count() {
        let (m, w, h) = grid(&[
            "##....#", //
            "##...#.", // the diagonal pair at the right is one component
            "......#", "..###..", "..###..",
        ]);
        assert_eq!(component_count(&m, w, h, 1), 3);
        assert_eq!(component_count(&m, w, h, 0), 3);
        assert_eq!(
            component_count(&m, w, h, 4),
            2,
            "the 3-pixel diagonal is a speck"
        );
        assert_eq!(component_count(&m, w, h, 6), 1);
        assert_eq!(component_count(&m, w, h, 7), 0);
        assert_eq!(component_count(&vec![false; w * h], w, h, 1), 0);
        assert_eq!(component_count(&[], 0, 0, 1), 0);
        assert_eq!(component_count(&[true; 6], 3, 2, 1), 1);
    }

    #[test]
    fn component_count_change_between_a_prediction_and_a_label() {
        // U-Net++: two blobs; SAM's label bridges them into one (a merge: 2 -> 1).
        let (unet, w, h) = grid(&["###...###", "###...###", "###...###"]);
        let (merged, _, _) = grid(&["###...###", "#########", "###...###"]);
        // SAM splits the left blob and drops the right one (2 -> 2: same count).
        let (split, _, _) = grid(&["#.#......", "#.#......", "#.#......"]);
        let n = |m: &[bool]| component_count(m, w, h, 3) as i64;
        assert_eq!(n(&merged) - n(&unet), -1);
        assert_eq!(n(&split) - n(&unet), 0);
        // 4-connected pieces touching only at a corner are one 8-connected component.
        let (corner, w2, h2) = grid(&["##..", "##..", "..##", "..##"]);
        assert_eq!(component_count(&corner, w2, h2, 1), 1);
    }

    #[test]
    fn small_components_are_dropped_from_the_mask() {
        let (m, w, h) = grid(&["##....#", "##.....", "......#", "..###..", "..###.."]);
        let (kept, n) = keep_components(&m, w, h, 4);
        assert_eq!(n, 2);
        let (expected, _, _) = grid(&["##.....", "##.....", ".......", "..###..", "..###.."]);
        assert_eq!(kept, expected);
        assert_eq!(keep_components(&m, w, h, 1), (m.clone(), 4));
    }

    #[test]
    fn probability_logits_threshold_like_sam_logits() {
        assert_eq!(prob_logit(0.5), 0.0);
        assert!((prob_logit(0.9) - 9f32.ln()).abs() < 1e-6);
        assert_eq!(prob_logit(1.0), f32::INFINITY);
        assert_eq!(prob_logit(0.0), f32::NEG_INFINITY);
        // p in (sigmoid(-1), sigmoid(1)) = (0.269, 0.731) is the unstable band
        let logits: Vec<f32> = [0.95, 0.8, 0.6, 0.4, 0.1].map(prob_logit).to_vec();
        assert_eq!(stability_score(&logits, STABILITY_OFFSET), 2.0 / 4.0);
    }

    #[test]
    fn mean_of_nothing_is_none() {
        assert_eq!(mean([]), None);
        assert_eq!(mean([0.5, 1.0]), Some(0.75));
    }
}
