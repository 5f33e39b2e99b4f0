//! Refinement prompts (pure functions): the prompts of round k+1 of one component from SAM's
//! round-k mask and the U-Net++ foreground.
//!
//! - box: SAM's mask's tight box, expanded by the prompt margin (as the U-Net++ box was);
//! - a positive point in the largest miss: the deepest pixel (distance-transform maximum) of
//!   "U-Net++ foreground inside the component's U-Net++ box, SAM background";
//! - a negative point in the largest leak: the deepest pixel of "SAM foreground, U-Net++
//!   background";
//!
//! each disagreement region counts only when it holds at least `min_area` pixels (as small
//! components are dropped). Conventions as in [`crate::prompts`]: flat row-major masks,
//! points `(column, row)`, boxes `[x0, y0, x1, y1]` inclusive-exclusive in image pixels.
use image::{GrayImage, Luma};
use imageproc::distance_transform::euclidean_squared_distance_transform;

/// The prompts SAM's round-k result suggests for round k+1 of one component.
#[derive(Clone, Debug, PartialEq)]
pub struct Refinement {
    /// SAM's mask's box (expanded); `None` when SAM's mask is empty (keep the previous box).
    pub box_in_image: Option<[f32; 4]>,
    /// Where U-Net++ says foreground and SAM background.
    pub positive: Option<(f32, f32)>,
    /// Where SAM says foreground and U-Net++ background.
    pub negative: Option<(f32, f32)>,
}

/// Tight inclusive-exclusive box of the foreground, `None` when empty.
pub fn tight_box(fg: &[bool], width: usize) -> Option<[usize; 4]> {
    let mut b: Option<[usize; 4]> = None;
    for (i, _) in fg.iter().enumerate().filter(|(_, &f)| f) {
        let (x, y) = (i % width, i / width);
        let bb = b.get_or_insert([x, y, x + 1, y + 1]);
        bb[0] = bb[0].min(x);
        bb[1] = bb[1].min(y);
        bb[2] = bb[2].max(x + 1);
        bb[3] = bb[3].max(y + 1);
    }
    b
}

/// A box expanded by `margin` (fraction of each side; negative or NaN counts as 0) and
/// clamped to the image, as [`crate::prompts::PromptConfig::box_margin`].
pub fn expand_box(b: [usize; 4], margin: f32, width: usize, height: usize) -> [f32; 4] {
    let m = if margin.is_nan() {
        0.0
    } else {
        margin.max(0.0)
    };
    let mx = m * (b[2] - b[0]) as f32;
    let my = m * (b[3] - b[1]) as f32;
    [
        (b[0] as f32 - mx).max(0.0),
        (b[1] as f32 - my).max(0.0),
        (b[2] as f32 + mx).min(width as f32),
        (b[3] as f32 + my).min(height as f32),
    ]
}

/// The region's deepest pixel (farthest from any non-region pixel, the outside of the image
/// counting as non-region; ties in raster order), `None` for an empty region.
pub fn deepest_point(region: &[bool], width: usize, height: usize) -> Option<(f32, f32)> {
    if width == 0 || height == 0 || !region.iter().any(|&r| r) {
        return None;
    }
    let (w32, h32) = (width as u32, height as u32);
    let outside = GrayImage::from_fn(w32 + 2, h32 + 2, |x, y| {
        let inside = x >= 1 && y >= 1 && x <= w32 && y <= h32;
        let is_region = inside && region[(y - 1) as usize * width + (x - 1) as usize];
        Luma([if is_region { 0 } else { 255 }])
    });
    let dt = euclidean_squared_distance_transform(&outside);
    let mut best: Option<(f64, usize)> = None;
    for (i, _) in region.iter().enumerate().filter(|(_, &r)| r) {
        let d = dt.get_pixel((i % width) as u32 + 1, (i / width) as u32 + 1)[0];
        if best.is_none_or(|(bd, _)| d > bd) {
            best = Some((d, i));
        }
    }
    best.map(|(_, i)| ((i % width) as f32, (i / width) as f32))
}

/// Whether pixel `i` lies in the inclusive-exclusive box.
fn in_box(i: usize, width: usize, b: &[f32; 4]) -> bool {
    let (x, y) = ((i % width) as f32, (i / width) as f32);
    x >= b[0].floor() && x < b[2].ceil() && y >= b[1].floor() && y < b[3].ceil()
}

/// The refinement of one component: `sam_fg` is SAM's round-k mask of this component,
/// `unet_fg` the whole U-Net++ foreground, `component_box` the component's U-Net++ box (where
/// a missed part may be sought), all `width x height`.
pub fn refinement(
    sam_fg: &[bool],
    unet_fg: &[bool],
    component_box: &[f32; 4],
    width: usize,
    height: usize,
    margin: f32,
    min_area: usize,
) -> Refinement {
    let need = min_area.max(1);
    let point_of = |region: Vec<bool>| {
        let n = region.iter().filter(|&&r| r).count();
        if n >= need {
            deepest_point(&region, width, height)
        } else {
            None
        }
    };
    let missed: Vec<bool> = (0..sam_fg.len())
        .map(|i| unet_fg[i] && !sam_fg[i] && in_box(i, width, component_box))
        .collect();
    let leaked: Vec<bool> = (0..sam_fg.len())
        .map(|i| sam_fg[i] && !unet_fg[i])
        .collect();
    Refinement {
        box_in_image: tight_box(sam_fg, width).map(|b| expand_box(b, margin, width, height)),
        positive: point_of(missed),
        negative: point_of(leaked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w x h` mask with the rectangle `[x0, x1) x [y0, y1)` set.
    fn rect(w: usize, h: usize, r: [usize; 4]) -> Vec<bool> {
        (0..w * h)
            .map(|i| (r[0]..r[2]).contains(&(i % w)) && (r[1]..r[3]).contains(&(i / w)))
            .collect()
    }

    fn or(a: &[bool], b: &[bool]) -> Vec<bool> {
        a.iter().zip(b).map(|(x, y)| *x || *y).collect()
    }

    #[test]
    fn tight_and_expanded_boxes() {
        let m = rect(20, 10, [3, 2, 9, 6]);
        assert_eq!(tight_box(&m, 20), Some([3, 2, 9, 6]));
        assert_eq!(tight_box(&[false; 200], 20), None);
        // margin 0.5: 3 px in x (width 6), 2 px in y (height 4), clamped at 0
        assert_eq!(expand_box([3, 2, 9, 6], 0.5, 20, 10), [0.0, 0.0, 12.0, 8.0]);
        assert_eq!(
            expand_box([3, 2, 9, 6], f32::NAN, 20, 10),
            [3.0, 2.0, 9.0, 6.0]
        );
    }

    #[test]
    fn deepest_point_is_the_centre_of_a_square() {
        let m = rect(21, 21, [5, 5, 16, 16]); // 11x11, centre (10, 10)
        assert_eq!(deepest_point(&m, 21, 21), Some((10.0, 10.0)));
        assert_eq!(deepest_point(&vec![false; 441], 21, 21), None);
        // the image border counts as outside
        let full = vec![true; 9 * 9];
        assert_eq!(deepest_point(&full, 9, 9), Some((4.0, 4.0)));
    }

    #[test]
    fn agreement_gives_no_points_and_the_same_box() {
        let (w, h) = (40, 30);
        let m = rect(w, h, [10, 5, 30, 25]);
        let r = refinement(&m, &m, &[10.0, 5.0, 30.0, 25.0], w, h, 0.0, 4);
        assert_eq!(r.box_in_image, Some([10.0, 5.0, 30.0, 25.0]));
        assert_eq!((r.positive, r.negative), (None, None));
    }

    #[test]
    fn a_miss_gives_a_positive_inside_it_and_a_leak_a_negative_inside_it() {
        let (w, h) = (60, 40);
        // U-Net++: [10, 30) x [10, 30); SAM found only its left half [10, 20) and leaked into
        // [40, 50) x [10, 20) where U-Net++ sees background.
        let unet = rect(w, h, [10, 10, 30, 30]);
        let sam = or(&rect(w, h, [10, 10, 20, 30]), &rect(w, h, [40, 10, 50, 20]));
        let r = refinement(&sam, &unet, &[10.0, 10.0, 30.0, 30.0], w, h, 0.0, 4);
        assert_eq!(r.box_in_image, Some([10.0, 10.0, 50.0, 30.0]));
        let (px, py) = r.positive.expect("a positive in the missed half");
        let (nx, ny) = r.negative.expect("a negative in the leak");
        let at = |x: f32, y: f32| y as usize * w + x as usize;
        assert!(
            unet[at(px, py)] && !sam[at(px, py)],
            "positive ({px}, {py})"
        );
        assert!(
            sam[at(nx, ny)] && !unet[at(nx, ny)],
            "negative ({nx}, {ny})"
        );
        // deepest pixels: the missed half's centre columns (depth 5, first in raster order),
        // the leak's centre
        assert_eq!((px, py), (24.0, 14.0));
        assert_eq!((nx, ny), (44.0, 14.0));
    }

    #[test]
    fn small_disagreements_and_misses_outside_the_component_box_are_ignored() {
        let (w, h) = (60, 40);
        let unet = or(&rect(w, h, [10, 10, 30, 30]), &rect(w, h, [40, 10, 55, 25]));
        // SAM misses a 2x2 corner of its component only; the other U-Net++ component lies
        // outside this component's box and is not a miss of this one.
        let sam: Vec<bool> = rect(w, h, [10, 10, 30, 30])
            .iter()
            .enumerate()
            .map(|(i, &v)| v && !((28..30).contains(&(i % w)) && (28..30).contains(&(i / w))))
            .collect();
        let r = refinement(&sam, &unet, &[10.0, 10.0, 30.0, 30.0], w, h, 0.0, 5);
        assert_eq!((r.positive, r.negative), (None, None));
        // with min_area 4 the corner counts
        let r = refinement(&sam, &unet, &[10.0, 10.0, 30.0, 30.0], w, h, 0.0, 4);
        assert!(r.positive.is_some());
    }

    #[test]
    fn empty_sam_mask_keeps_no_box_and_asks_for_the_object() {
        let (w, h) = (30, 30);
        let unet = rect(w, h, [5, 5, 25, 25]);
        let r = refinement(
            &vec![false; w * h],
            &unet,
            &[5.0, 5.0, 25.0, 25.0],
            w,
            h,
            0.1,
            4,
        );
        assert_eq!(r.box_in_image, None);
        assert_eq!(r.positive, Some((14.0, 14.0)));
        assert_eq!(r.negative, None);
    }
}
