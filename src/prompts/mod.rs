//! SAM prompts from a U-Net++ probability map (issue 5, "Prompts from a U-Net++ prediction").
//!
//! Pure functions: threshold the map, label 8-connected components (imageproc), drop those under
//! `min_area`, and per component derive a box, positive points (distance-transform maxima,
//! spread apart) and negative points (background near the object); and, when the strategy uses
//! one, a mask prompt per component holding that component only ([`mask`]: the U-Net++ map with
//! every other component's territory blanked, as logits in SAM's 256x256 low-res input space).
//!
//! Conventions (all coordinates in original-image pixels, `*_in_image`):
//! - a pixel is foreground when `p >= threshold` (as `medmine predict`); probabilities are
//!   clamped to [0, 1] and NaN counts as 0;
//! - a point `(x, y)` is a pixel's column and row index (integer-valued f32); SAM's prompt
//!   encoder adds 0.5 itself to reach the pixel centre;
//! - a box `[x0, y0, x1, y1]` is inclusive-exclusive: the tight box of a component covers
//!   columns `x0..x1` and rows `y0..y1`, so `x1 = max column + 1` and `x1 - x0` is its width.
use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use image::{GrayImage, Luma};
use imageproc::distance_transform::euclidean_squared_distance_transform;
use imageproc::region_labelling::{connected_components, Connectivity};

use crate::models::sam::predictor::Prompt;
use crate::models::sam::LOW_RES_SIZE;

pub mod mask;

pub use mask::{mask_prompt_from_probs, object_probs, territories};

/// Logits of the mask prompt are clamped to `[-LOGIT_CLAMP, LOGIT_CLAMP]`.
pub const LOGIT_CLAMP: f32 = 20.0;
/// The mask prompt's value in SAM's padding (outside the image): strongly negative, the same
/// as a probability of 0 after clamping.
pub const OUTSIDE_LOGIT: f32 = -LOGIT_CLAMP;

/// Errors from malformed inputs; each says what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    #[error("probability map has {len} values; expected width {width} x height {height}")]
    SizeMismatch {
        len: usize,
        width: usize,
        height: usize,
    },
    #[error("image {width}x{height} is too large for connected-component labelling")]
    TooLarge { width: usize, height: usize },
    #[error("unknown prompt strategy '{0}'; expected box, points, box+points or box+points+mask")]
    UnknownStrategy(String),
}

/// Which prompts go to SAM, named as on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// `box`: the component's box only.
    Box,
    /// `points`: positive and negative points only.
    Points,
    /// `box+points`: box and points.
    #[default]
    BoxPoints,
    /// `box+points+mask`: box, points and the U-Net++ logits as SAM's `mask_input`.
    BoxPointsMask,
}

impl Strategy {
    /// All strategies, in CLI order.
    pub const ALL: [Strategy; 4] = [
        Strategy::Box,
        Strategy::Points,
        Strategy::BoxPoints,
        Strategy::BoxPointsMask,
    ];
    /// Whether SAM gets the box.
    pub fn uses_box(self) -> bool {
        self != Strategy::Points
    }
    /// Whether SAM gets the points.
    pub fn uses_points(self) -> bool {
        self != Strategy::Box
    }
    /// Whether SAM gets the mask prompt.
    pub fn uses_mask(self) -> bool {
        self == Strategy::BoxPointsMask
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Box => "box",
            Strategy::Points => "points",
            Strategy::BoxPoints => "box+points",
            Strategy::BoxPointsMask => "box+points+mask",
        })
    }
}

impl FromStr for Strategy {
    type Err = PromptError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.to_string() == s.trim())
            .ok_or_else(|| PromptError::UnknownStrategy(s.to_string()))
    }
}

/// How prompts are derived from a probability map.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptConfig {
    /// Foreground is `p >= threshold`.
    pub threshold: f32,
    /// Components with fewer pixels are dropped (their pixels still count as foreground, so no
    /// negative point lands on them).
    pub min_area: usize,
    /// Box expansion per side as a **fraction of the tight box's side**: x0 and x1 move out by
    /// `box_margin * width`, y0 and y1 by `box_margin * height`, then the box is clamped to
    /// `[0, W] x [0, H]`. 0 keeps the tight box; negative or NaN counts as 0.
    pub box_margin: f32,
    /// Positive points per component (fewer if the component has fewer well-spaced pixels).
    pub positives_k: usize,
    /// Negative points per component (fewer if there is not enough background).
    pub negatives_k: usize,
    /// Width in pixels of the band around the (expanded) box where negatives are sought.
    pub negative_band: usize,
    /// Which prompts go to SAM; `prompts_from_probs` builds the mask prompt only when it is used.
    pub strategy: Strategy,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig {
            threshold: 0.5,
            min_area: 25,
            box_margin: 0.05,
            positives_k: 3,
            negatives_k: 2,
            negative_band: 10,
            strategy: Strategy::default(),
        }
    }
}

/// The prompts for one connected component, in original-image pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentPrompt {
    /// `[x0, y0, x1, y1]`, inclusive-exclusive, expanded by the margin and clamped.
    pub box_in_image: [f32; 4],
    /// Interior points, deepest first (the first is the distance-transform maximum).
    pub positives_in_image: Vec<(f32, f32)>,
    /// Background points near the object, never on a foreground pixel.
    pub negatives_in_image: Vec<(f32, f32)>,
    /// Pixels in the component.
    pub area: usize,
    /// This component's mask prompt, when the strategy uses one: `LOW_RES_SIZE x
    /// LOW_RES_SIZE` (256x256) row-major logits of the map with every other component's
    /// territory blanked ([`mask`]).
    pub mask_prompt: Option<Vec<f32>>,
}

/// Everything derived from one probability map.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePrompts {
    /// Kept components in raster order of their first pixel (top-most, then left-most).
    pub components: Vec<ComponentPrompt>,
    /// Per pixel (row-major), `1 + k` when it lies in the territory of `components[k]` (the
    /// nearest kept component, see [`territories`]); all 0 when there is no component.
    pub owner: Vec<u32>,
}

/// Per-component statistics gathered in one raster scan.
struct Component {
    area: usize,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    pixels: Vec<usize>,
}

/// Probability clamped to [0, 1], NaN read as 0.
fn prob_at(probs: &[f32], i: usize) -> f32 {
    let p = probs[i];
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

fn check_size(probs: &[f32], width: usize, height: usize) -> Result<(), PromptError> {
    if width.checked_mul(height) != Some(probs.len()) {
        return Err(PromptError::SizeMismatch {
            len: probs.len(),
            width,
            height,
        });
    }
    // imageproc works in u32 coordinates (plus our 1-pixel border) and < 2^32 pixels.
    let fits = (width + 2) as u64 * (height + 2) as u64 <= u32::MAX as u64 / 2;
    if !fits {
        return Err(PromptError::TooLarge { width, height });
    }
    Ok(())
}

/// Derives the prompts of every component of `probs` (row-major, `width x height`, original
/// image pixels). Errors only when `probs` does not hold `width * height` values or the image
/// is too large to label.
pub fn prompts_from_probs(
    probs: &[f32],
    width: usize,
    height: usize,
    cfg: &PromptConfig,
) -> Result<ImagePrompts, PromptError> {
    check_size(probs, width, height)?;
    if width == 0 || height == 0 {
        return Ok(ImagePrompts {
            components: Vec::new(),
            owner: Vec::new(),
        });
    }
    let fg: Vec<bool> = (0..probs.len())
        .map(|i| prob_at(probs, i) >= cfg.threshold)
        .collect();
    let (w32, h32) = (width as u32, height as u32);

    // 8-connected components of the foreground.
    let binary = GrayImage::from_fn(w32, h32, |x, y| {
        Luma([if fg[y as usize * width + x as usize] {
            255
        } else {
            0
        }])
    });
    let labels = connected_components(&binary, Connectivity::Eight, Luma([0u8]));
    let mut comps: Vec<Component> = Vec::new();
    let mut slot: Vec<Option<usize>> = Vec::new(); // label -> index in comps (raster order)
    for (x, y, l) in labels.enumerate_pixels() {
        let label = l[0] as usize;
        if label == 0 {
            continue;
        }
        if slot.len() <= label {
            slot.resize(label + 1, None);
        }
        let (x, y) = (x as usize, y as usize);
        let k = *slot[label].get_or_insert_with(|| {
            comps.push(Component {
                area: 0,
                x0: x,
                y0: y,
                x1: x + 1,
                y1: y + 1,
                pixels: Vec::new(),
            });
            comps.len() - 1
        });
        let c = &mut comps[k];
        c.area += 1;
        c.x0 = c.x0.min(x);
        c.y0 = c.y0.min(y);
        c.x1 = c.x1.max(x + 1);
        c.y1 = c.y1.max(y + 1);
        c.pixels.push(y * width + x);
    }

    // Squared distance of each foreground pixel to the nearest background pixel, with the
    // outside of the image counted as background (a 1-pixel background border).
    let background = GrayImage::from_fn(w32 + 2, h32 + 2, |x, y| {
        let inside = x >= 1 && y >= 1 && x <= w32 && y <= h32;
        let is_fg = inside && fg[(y - 1) as usize * width + (x - 1) as usize];
        Luma([if is_fg { 0 } else { 255 }])
    });
    let dt = euclidean_squared_distance_transform(&background);
    let depth2 = |i: usize| dt.get_pixel((i % width) as u32 + 1, (i / width) as u32 + 1)[0];

    let kept: Vec<&Component> = comps.iter().filter(|c| c.area >= cfg.min_area).collect();
    let pixels: Vec<&[usize]> = kept.iter().map(|c| c.pixels.as_slice()).collect();
    let owner = territories(&pixels, width, height);
    let components = kept
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let box_in_image = expand_box(c, cfg.box_margin, width, height);
            let mask_prompt = if cfg.strategy.uses_mask() {
                let own = object_probs(probs, &owner, k as u32 + 1);
                Some(mask_prompt_from_probs(&own, width, height)?)
            } else {
                None
            };
            Ok(ComponentPrompt {
                box_in_image,
                positives_in_image: positives(c, cfg.positives_k, width, &depth2),
                negatives_in_image: negatives(c, &box_in_image, probs, &fg, width, height, cfg),
                area: c.area,
                mask_prompt,
            })
        })
        .collect::<Result<_, PromptError>>()?;
    Ok(ImagePrompts { components, owner })
}

/// The tight box expanded by `margin` (fraction of each side) and clamped to the image.
fn expand_box(c: &Component, margin: f32, width: usize, height: usize) -> [f32; 4] {
    let m = if margin.is_nan() {
        0.0
    } else {
        margin.max(0.0)
    };
    let mx = m * (c.x1 - c.x0) as f32;
    let my = m * (c.y1 - c.y0) as f32;
    [
        (c.x0 as f32 - mx).max(0.0),
        (c.y0 as f32 - my).max(0.0),
        (c.x1 as f32 + mx).min(width as f32),
        (c.y1 as f32 + my).min(height as f32),
    ]
}

fn dist2(a: usize, b: usize, width: usize) -> f64 {
    let dx = (a % width) as f64 - (b % width) as f64;
    let dy = (a / width) as f64 - (b / width) as f64;
    dx * dx + dy * dy
}

fn to_point(i: usize, width: usize) -> (f32, f32) {
    ((i % width) as f32, (i / width) as f32)
}

/// Up to `k` interior points: pixels in decreasing distance-transform depth (ties in raster
/// order), greedily kept when at least `max(1, r / 2)` pixels from every point already kept,
/// where `r` is the component's inscribed radius (its maximum depth). The first point is the
/// deepest pixel; the spacing keeps the others apart yet well inside the object.
fn positives(
    c: &Component,
    k: usize,
    width: usize,
    depth2: &impl Fn(usize) -> f64,
) -> Vec<(f32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut order: Vec<(f64, usize)> = c.pixels.iter().map(|&i| (depth2(i), i)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let radius = order.first().map_or(0.0, |o| o.0.sqrt());
    let spacing = (radius / 2.0).max(1.0);
    let mut kept: Vec<usize> = Vec::with_capacity(k);
    for &(_, i) in &order {
        if kept
            .iter()
            .all(|&q| dist2(i, q, width) >= spacing * spacing)
        {
            kept.push(i);
            if kept.len() == k {
                break;
            }
        }
    }
    kept.into_iter().map(|i| to_point(i, width)).collect()
}

/// Up to `k` background points (`p < threshold`, so never in any component) near the object.
///
/// Candidates are the background pixels of the band of `negative_band` pixels around the
/// component's box (inside the image); if the band holds none, the background pixels inside
/// the box; if none either, every background pixel of the image. The first point is the
/// candidate with the lowest probability (ties: nearest the component's box centre, then
/// raster order); each next one is the candidate farthest from those chosen (farthest-point
/// sampling, ties in raster order).
fn negatives(
    c: &Component,
    bx: &[f32; 4],
    probs: &[f32],
    fg: &[bool],
    width: usize,
    height: usize,
    cfg: &PromptConfig,
) -> Vec<(f32, f32)> {
    if cfg.negatives_k == 0 {
        return Vec::new();
    }
    // Integer pixel ranges of the box (pixels whose index lies in [x0, x1)).
    let (bx0, by0) = (bx[0].floor() as usize, bx[1].floor() as usize);
    let (bx1, by1) = (
        (bx[2].ceil() as usize).min(width),
        (bx[3].ceil() as usize).min(height),
    );
    let band = cfg.negative_band;
    let (ex0, ey0) = (bx0.saturating_sub(band), by0.saturating_sub(band));
    let (ex1, ey1) = ((bx1 + band).min(width), (by1 + band).min(height));
    let in_box = |x: usize, y: usize| x >= bx0 && x < bx1 && y >= by0 && y < by1;
    let collect = |x0: usize, y0: usize, x1: usize, y1: usize, ring: bool| -> Vec<usize> {
        let mut v = Vec::new();
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * width + x;
                if !fg[i] && (!ring || !in_box(x, y)) {
                    v.push(i);
                }
            }
        }
        v
    };
    let mut cand = collect(ex0, ey0, ex1, ey1, true);
    if cand.is_empty() {
        cand = collect(bx0, by0, bx1, by1, false);
    }
    if cand.is_empty() {
        cand = collect(0, 0, width, height, false);
    }
    // Box centre in doubled pixel units (exact for the integer tight box).
    let (cx2, cy2) = ((c.x0 + c.x1 - 1) as f64, (c.y0 + c.y1 - 1) as f64);
    let centre_d2 = |i: usize| {
        let dx = 2.0 * (i % width) as f64 - cx2;
        let dy = 2.0 * (i / width) as f64 - cy2;
        dx * dx + dy * dy
    };
    let Some(&first) = cand.iter().min_by(|&&a, &&b| {
        prob_at(probs, a)
            .total_cmp(&prob_at(probs, b))
            .then(centre_d2(a).total_cmp(&centre_d2(b)))
            .then(a.cmp(&b))
    }) else {
        return Vec::new();
    };
    let mut chosen = vec![first];
    // Squared distance of each candidate to the nearest chosen point.
    let mut near: Vec<f64> = cand.iter().map(|&i| dist2(i, first, width)).collect();
    while chosen.len() < cfg.negatives_k {
        let mut best: Option<(f64, usize)> = None;
        for (j, &d) in near.iter().enumerate() {
            if d > 0.0 && best.is_none_or(|(bd, _)| d > bd) {
                best = Some((d, j));
            }
        }
        let Some((_, j)) = best else { break };
        let pick = cand[j];
        chosen.push(pick);
        for (n, &i) in near.iter_mut().zip(&cand) {
            *n = n.min(dist2(i, pick, width));
        }
    }
    chosen.into_iter().map(|i| to_point(i, width)).collect()
}

/// The SAM predictor prompt for one component under `strategy`: the box (`box*`), the
/// positives (label 1) then negatives (label 0) (`*points*`), and the component's own
/// `mask_prompt` as `[1, 256, 256]` `mask_input` on `device` (`*mask`; omitted when it is
/// `None`). Errors only when the mask prompt does not hold 256x256 values.
pub fn sam_prompt_for(
    component: &ComponentPrompt,
    strategy: Strategy,
    device: &Device,
) -> candle_core::Result<Prompt> {
    let mask_prompt = component.mask_prompt.as_deref();
    let points = if strategy.uses_points() {
        let pos = component.positives_in_image.iter().map(|&(x, y)| (x, y, 1));
        let neg = component.negatives_in_image.iter().map(|&(x, y)| (x, y, 0));
        pos.chain(neg).collect()
    } else {
        Vec::new()
    };
    let mask_input = match (strategy.uses_mask(), mask_prompt) {
        (true, Some(m)) => Some(Tensor::from_slice(
            m,
            (1, LOW_RES_SIZE, LOW_RES_SIZE),
            device,
        )?),
        _ => None,
    };
    Ok(Prompt {
        points,
        bbox: strategy.uses_box().then_some(component.box_in_image),
        mask_input,
    })
}

#[cfg(test)]
mod tests;
