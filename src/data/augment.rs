//! Seeded data augmentation for square training samples.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::DataError;

/// Which augmentations [`augment`] applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// Horizontal flip with probability 1/2.
    pub hflip: bool,
    /// Vertical flip with probability 1/2.
    pub vflip: bool,
    /// Rotation by 0, 90, 180 or 270 degrees, each with probability 1/4.
    pub rot90: bool,
    /// Random zoom-in crop: a scale `s` is drawn uniformly from
    /// `[scale_min, scale_max]`, a square of side `size / s` is cropped at a
    /// random position and resized back to `size` (bilinear; the mask is
    /// thresholded at 0.5). Scales below 1 are treated as 1 (no zoom-out).
    pub scale_min: f32,
    pub scale_max: f32,
    /// Additive brightness shift drawn uniformly from `[-brightness,
    /// brightness]`.
    pub brightness: f32,
    /// Contrast factor drawn uniformly from `[1 - contrast, 1 + contrast]`,
    /// applied around the image mean.
    pub contrast: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            hflip: true,
            vflip: true,
            rot90: true,
            scale_min: 1.0,
            scale_max: 1.25,
            brightness: 0.1,
            contrast: 0.1,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all: [`augment`] returns its inputs unchanged.
    pub fn none() -> Self {
        AugmentConfig {
            hflip: false,
            vflip: false,
            rot90: false,
            scale_min: 1.0,
            scale_max: 1.0,
            brightness: 0.0,
            contrast: 0.0,
        }
    }

    /// Checks the numeric fields: `1 <= scale_min <= scale_max`, brightness
    /// and contrast finite and in `[0, 1]`.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::InvalidArgument(format!("augmentation: {m}")));
        if !(self.scale_min >= 1.0
            && self.scale_max.is_finite()
            && self.scale_max >= self.scale_min)
        {
            return bad(format!(
                "scale range [{}, {}] must satisfy 1 <= scale_min <= scale_max",
                self.scale_min, self.scale_max
            ));
        }
        for (name, v) in [("brightness", self.brightness), ("contrast", self.contrast)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} {v} must lie in [0, 1]"));
            }
        }
        Ok(())
    }
}

/// The random choices of one call, always drawn in full and in this order.
struct Draw {
    hflip: bool,
    vflip: bool,
    rot: usize,
    scale: f32,
    crop_x: f32,
    crop_y: f32,
    brightness: f32,
    contrast: f32,
}

impl Draw {
    fn new(cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Draw {
        let mut u = || rng.gen::<f32>();
        let (h, v, r, s, cx, cy, b, c) = (u(), u(), u(), u(), u(), u(), u(), u());
        let lo = finite_or(cfg.scale_min, 1.0).max(1.0);
        let hi = finite_or(cfg.scale_max, lo).max(lo);
        let sym = |amount: f32, t: f32| finite_or(amount, 0.0).abs() * (2.0 * t - 1.0);
        Draw {
            hflip: cfg.hflip && h < 0.5,
            vflip: cfg.vflip && v < 0.5,
            rot: if cfg.rot90 {
                ((r * 4.0) as usize).min(3)
            } else {
                0
            },
            scale: lo + (hi - lo) * s,
            crop_x: cx,
            crop_y: cy,
            brightness: sym(cfg.brightness, b),
            contrast: 1.0 + sym(cfg.contrast, c),
        }
    }
}

fn finite_or(v: f32, default: f32) -> f32 {
    if v.is_finite() {
        v
    } else {
        default
    }
}

/// Source pixel of output `(x, y)` for the flips and the rotation (applied in
/// that order: flips, then `rot` quarter turns counter-clockwise).
fn source_index(x: usize, y: usize, n: usize, d: &Draw) -> usize {
    // Undo the rotation: output (x, y) of a CCW quarter turn comes from
    // input (n-1-y, x).
    let (mut sx, mut sy) = (x, y);
    for _ in 0..d.rot {
        (sx, sy) = (n - 1 - sy, sx);
    }
    if d.vflip {
        sy = n - 1 - sy;
    }
    if d.hflip {
        sx = n - 1 - sx;
    }
    sy * n + sx
}

/// Bilinear resample of the crop `[x0, x0 + side) x [y0, y0 + side)` of an
/// `n x n` plane back to `n x n` (half-pixel centres, edge clamping).
fn crop_resize(plane: &[f32], n: usize, x0: f32, y0: f32, side: f32) -> Vec<f32> {
    let step = side / n as f32;
    let axis = |origin: f32| -> Vec<(usize, usize, f32)> {
        (0..n)
            .map(|d| {
                let s = (origin + (d as f32 + 0.5) * step - 0.5).clamp(0.0, (n - 1) as f32);
                let i0 = s as usize;
                let i1 = (i0 + 1).min(n - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let (xs, ys) = (axis(x0), axis(y0));
    let mut out = Vec::with_capacity(n * n);
    for &(a0, a1, ly) in &ys {
        let (r0, r1) = (&plane[a0 * n..(a0 + 1) * n], &plane[a1 * n..(a1 + 1) * n]);
        for &(b0, b1, lx) in &xs {
            let top = r0[b0] * (1.0 - lx) + r0[b1] * lx;
            let bot = r1[b0] * (1.0 - lx) + r1[b1] * lx;
            out.push(top * (1.0 - ly) + bot * ly);
        }
    }
    out
}

/// Applies one random augmentation to a square sample.
///
/// `image` is `3 * size * size` CHW, `mask` is `size * size` with values 0/1.
/// The same geometric transform (zoom-in crop, flips, quarter turns) is applied
/// to both; brightness and contrast only to the image, which is clamped to
/// `[0, 1]`. The mask is resampled bilinearly and thresholded at 0.5, so it
/// stays exactly 0/1 (flips and rotations are exact permutations). Every call
/// draws the same number of values from `rng`, whatever `cfg` enables.
///
/// # Panics
/// If the buffer lengths do not match `size` (a programming error).
pub fn augment(
    image: &[f32],
    mask: &[f32],
    size: usize,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, Vec<f32>) {
    let n = size;
    let area = n * n;
    assert_eq!(image.len(), 3 * area, "augment: image is not 3x{n}x{n}");
    assert_eq!(mask.len(), area, "augment: mask is not {n}x{n}");
    let d = Draw::new(cfg, rng);
    if area == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut planes: Vec<Vec<f32>> = image.chunks_exact(area).map(<[f32]>::to_vec).collect();
    planes.push(mask.to_vec());

    if d.scale > 1.0 {
        let side = n as f32 / d.scale;
        let (x0, y0) = (d.crop_x * (n as f32 - side), d.crop_y * (n as f32 - side));
        for p in &mut planes {
            *p = crop_resize(p, n, x0, y0, side);
        }
    }
    if d.hflip || d.vflip || d.rot != 0 {
        let index: Vec<usize> = (0..area)
            .map(|i| source_index(i % n, i / n, n, &d))
            .collect();
        for p in &mut planes {
            *p = index.iter().map(|&j| p[j]).collect();
        }
    }

    let Some(mask_plane) = planes.pop() else {
        return (Vec::new(), Vec::new());
    };
    let mask_out = mask_plane
        .into_iter()
        .map(|v| if v >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    let mut img_out: Vec<f32> = planes.concat();
    if d.brightness != 0.0 || d.contrast != 1.0 {
        let mean = img_out.iter().map(|&v| f64::from(v)).sum::<f64>() / img_out.len() as f64;
        let mean = mean as f32;
        for v in &mut img_out {
            *v = ((*v - mean) * d.contrast + mean + d.brightness).clamp(0.0, 1.0);
        }
    }
    (img_out, mask_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A textured image and an asymmetric mask (an L shape off-centre).
    fn sample(n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut mask = vec![0.0; n * n];
        for y in 2..n / 2 {
            mask[y * n + 3] = 1.0;
            mask[y * n + 4] = 1.0;
        }
        for x in 3..n - 3 {
            mask[(n / 2) * n + x] = 1.0;
        }
        let mut image = mask.clone();
        for c in 1..3 {
            image.extend((0..n * n).map(|i| ((i * (c + 3)) % 17) as f32 / 16.0));
        }
        (image, mask)
    }

    fn is_binary(m: &[f32]) -> bool {
        m.iter().all(|&v| v == 0.0 || v == 1.0)
    }

    #[test]
    fn same_seed_same_output_different_seed_differs() {
        let n = 24;
        let (img, mask) = sample(n);
        let cfg = AugmentConfig::default();
        let run = |seed| augment(&img, &mask, n, &cfg, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(run(11), run(11));
        let outs: Vec<_> = (0..6).map(run).collect();
        assert!(outs.iter().skip(1).any(|o| o != &outs[0]));
        // A continuing stream also changes from call to call.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = augment(&img, &mask, n, &cfg, &mut rng);
        let b = augment(&img, &mask, n, &cfg, &mut rng);
        assert_ne!(a, b);
    }

    #[test]
    fn mask_stays_binary_and_image_in_range() {
        let n = 20;
        let (img, mask) = sample(n);
        let cfg = AugmentConfig {
            scale_max: 1.7,
            brightness: 0.4,
            contrast: 0.5,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        for _ in 0..50 {
            let (i, m) = augment(&img, &mask, n, &cfg, &mut rng);
            assert_eq!((i.len(), m.len()), (3 * n * n, n * n));
            assert!(is_binary(&m));
            assert!(i.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn none_is_identity() {
        let n = 10;
        let (img, mask) = sample(n);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (i, m) = augment(&img, &mask, n, &AugmentConfig::none(), &mut rng);
        assert_eq!(i, img);
        assert_eq!(m, mask);
    }

    #[test]
    fn pure_hflip_maps_known_mask_exactly() {
        let n = 4;
        #[rustfmt::skip]
        let mask = vec![
            1.0, 1.0, 0.0, 0.0,
            1.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 1.0,
        ];
        #[rustfmt::skip]
        let flipped = vec![
            0.0, 0.0, 1.0, 1.0,
            0.0, 0.0, 0.0, 1.0,
            0.0, 0.0, 0.0, 0.0,
            1.0, 0.0, 0.0, 0.0,
        ];
        let image: Vec<f32> = mask.iter().cycle().take(3 * n * n).copied().collect();
        let cfg = AugmentConfig {
            hflip: true,
            ..AugmentConfig::none()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (mut seen_flip, mut seen_id) = (false, false);
        for _ in 0..40 {
            let (i, m) = augment(&image, &mask, n, &cfg, &mut rng);
            if m == flipped {
                seen_flip = true;
            } else {
                assert_eq!(m, mask, "only identity or the exact flip may come out");
                seen_id = true;
            }
            assert_eq!(&i[..n * n], &m[..], "image follows the mask");
        }
        assert!(seen_flip && seen_id);
    }

    #[test]
    fn rotations_are_exact_quarter_turns() {
        let n = 3;
        let mask = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let image: Vec<f32> = (0..3 * n * n).map(|i| (i % 9) as f32 / 8.0).collect();
        let cfg = AugmentConfig {
            rot90: true,
            ..AugmentConfig::none()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut corners = std::collections::HashSet::new();
        for _ in 0..60 {
            let (i, m) = augment(&image, &mask, n, &cfg, &mut rng);
            let pos = m.iter().position(|&v| v == 1.0).unwrap();
            assert_eq!(m.iter().filter(|&&v| v == 1.0).count(), 1);
            corners.insert(pos);
            // Image value 0 (at the mask pixel) moves along with the mask.
            assert_eq!(i[pos], 0.0);
            let mut sorted = i[..9].to_vec();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, image[..9].to_vec(), "a permutation");
        }
        assert_eq!(corners, [0, 2, 6, 8].into_iter().collect());
    }

    #[test]
    fn geometry_is_shared_between_image_and_mask() {
        // Channel 0 of the image equals the mask; with photometric jitter off
        // the transformed channel 0, thresholded, must equal the transformed
        // mask, and channels 1..3 keep their range.
        let n = 32;
        let (img, mask) = sample(n);
        let cfg = AugmentConfig {
            brightness: 0.0,
            contrast: 0.0,
            scale_max: 1.5,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let mut changed = 0;
        for _ in 0..30 {
            let (i, m) = augment(&img, &mask, n, &cfg, &mut rng);
            let ch0: Vec<f32> = i[..n * n]
                .iter()
                .map(|&v| if v >= 0.5 { 1.0 } else { 0.0 })
                .collect();
            assert_eq!(ch0, m);
            assert!(m.contains(&1.0));
            changed += usize::from(m != mask);
        }
        assert!(changed > 20, "the transform should usually change the mask");
    }

    #[test]
    fn photometric_touches_only_the_image() {
        let n = 8;
        let (img, mask) = sample(n);
        let cfg = AugmentConfig {
            brightness: 0.3,
            contrast: 0.3,
            ..AugmentConfig::none()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (i, m) = augment(&img, &mask, n, &cfg, &mut rng);
        assert_eq!(m, mask);
        assert_ne!(i, img);
    }

    #[test]
    fn validate_config() {
        assert!(AugmentConfig::default().validate().is_ok());
        assert!(AugmentConfig::none().validate().is_ok());
        let bad = AugmentConfig {
            scale_min: 1.3,
            scale_max: 1.1,
            ..AugmentConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = AugmentConfig {
            brightness: -0.1,
            ..AugmentConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
