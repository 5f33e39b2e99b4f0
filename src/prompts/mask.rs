//! Mask prompts: the U-Net++ map in SAM's 256x256 low-res logit space, one per object.
//!
//! Each prompted component gets its own mask prompt: the probability map with every pixel of
//! another component's territory set to 0 (background), so that SAM, asked for one object,
//! is not shown the others. A pixel's territory is the prompted component nearest to it
//! (chessboard distance, 8-connected growth from every component at once; ties go to the
//! component first in raster order), so each object keeps its own soft edge and the specks
//! near it, and another object is blanked together with its own edge.
use std::collections::VecDeque;

use super::{check_size, prob_at, PromptError, LOGIT_CLAMP, OUTSIDE_LOGIT};
use crate::models::sam::preprocess::preprocess_shape;
use crate::models::sam::{IMAGE_SIZE, LOW_RES_SIZE};

/// The territory of each pixel of a `width x height` image: `1 + k` for the pixels nearest to
/// component `k` of `components` (each a list of pixel indices, row-major), 0 everywhere when
/// there are no components. Grown breadth-first over the 8-neighbourhood from all components
/// at once, so the distance is the chessboard distance; at equal distance the component
/// listed first wins.
pub fn territories(components: &[&[usize]], width: usize, height: usize) -> Vec<u32> {
    let mut owner = vec![0u32; width * height];
    let mut queue = VecDeque::new();
    for (k, pixels) in components.iter().enumerate() {
        for &i in *pixels {
            if owner[i] == 0 {
                owner[i] = k as u32 + 1;
                queue.push_back(i);
            }
        }
    }
    while let Some(i) = queue.pop_front() {
        let (x, y) = ((i % width) as i64, (i / width) as i64);
        for (dx, dy) in NEIGHBOURS {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                continue;
            }
            let j = ny as usize * width + nx as usize;
            if owner[j] == 0 {
                owner[j] = owner[i];
                queue.push_back(j);
            }
        }
    }
    owner
}

const NEIGHBOURS: [(i64, i64); 8] = [
    (-1, -1),
    (0, -1),
    (1, -1),
    (-1, 0),
    (1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
];

/// The probability map of one object: `probs` where `owner` is `label` (see [`territories`]),
/// 0 elsewhere.
pub fn object_probs(probs: &[f32], owner: &[u32], label: u32) -> Vec<f32> {
    probs
        .iter()
        .zip(owner)
        .map(|(&p, &o)| if o == label { p } else { 0.0 })
        .collect()
}

/// Area-weighted source pixels of each low-res cell along one axis: `cells` cells of SAM's
/// 256 grid, `resized` = the image's extent in SAM's 1024 input (h' or w'), `original` = H or W.
/// `None` marks a cell whose centre lies in SAM's padding.
fn axis_weights(cells: usize, resized: usize, original: usize) -> Vec<Option<Vec<(usize, f64)>>> {
    let stride = (IMAGE_SIZE / cells) as f64; // 4 input pixels per low-res cell
    let to_orig = original as f64 / resized as f64;
    (0..cells)
        .map(|i| {
            let (s0, s1) = (i as f64 * stride, (i as f64 + 1.0) * stride);
            if s0 + stride / 2.0 >= resized as f64 {
                return None;
            }
            let a = s0 * to_orig;
            let b = (s1.min(resized as f64) * to_orig).min(original as f64);
            let first = a.floor() as usize;
            let last = (b.ceil() as usize).min(original);
            let w: Vec<(usize, f64)> = (first..last)
                .map(|r| (r, (b.min(r as f64 + 1.0) - a.max(r as f64)).max(0.0)))
                .filter(|&(_, w)| w > 0.0)
                .collect();
            Some(w)
        })
        .collect()
}

/// The U-Net++ map as SAM's `mask_input`: 256x256 row-major logits in SAM's low-res space.
///
/// SAM resizes the original (H, W) so the longest side is 1024 (`(h', w') =
/// preprocess_shape`, i.e. `int(x * scale + 0.5)`), pads bottom/right to 1024x1024, and its
/// low-res grid is that square / 4. A cell whose centre lies inside the `h' x w'` region gets
/// the area-weighted mean probability of the original pixels it covers, as
/// `logit = ln(p / (1 - p))` clamped to `±LOGIT_CLAMP`; padding cells get [`OUTSIDE_LOGIT`].
/// Example: a 100x200 (HxW) image fills the top 128 of the 256 rows.
pub fn mask_prompt_from_probs(
    probs: &[f32],
    width: usize,
    height: usize,
) -> Result<Vec<f32>, PromptError> {
    check_size(probs, width, height)?;
    let n = LOW_RES_SIZE;
    let mut out = vec![OUTSIDE_LOGIT; n * n];
    if width == 0 || height == 0 {
        return Ok(out);
    }
    let (rh, rw) = preprocess_shape(height, width, IMAGE_SIZE);
    let rows = axis_weights(n, rh, height);
    let cols = axis_weights(n, rw, width);
    let mut row_sum = vec![0.0f64; width];
    for (i, rw_i) in rows.iter().enumerate() {
        let Some(rw_i) = rw_i else { continue };
        let wy: f64 = rw_i.iter().map(|&(_, w)| w).sum();
        row_sum.iter_mut().for_each(|v| *v = 0.0);
        for &(r, w) in rw_i {
            for (x, v) in row_sum.iter_mut().enumerate() {
                *v += w * prob_at(probs, r * width + x) as f64;
            }
        }
        for (j, cw_j) in cols.iter().enumerate() {
            let Some(cw_j) = cw_j else { continue };
            let wx: f64 = cw_j.iter().map(|&(_, w)| w).sum();
            let s: f64 = cw_j.iter().map(|&(x, w)| w * row_sum[x]).sum();
            let denom = wx * wy;
            let p = if denom > 0.0 { s / denom } else { 0.0 };
            out[i * n + j] = logit(p);
        }
    }
    Ok(out)
}

/// `ln(p / (1 - p))` clamped to `±LOGIT_CLAMP` (p = 0 or 1 give the clamp values).
fn logit(p: f64) -> f32 {
    let p = p.clamp(0.0, 1.0);
    let l = (p / (1.0 - p)).ln();
    (l as f32).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
}
