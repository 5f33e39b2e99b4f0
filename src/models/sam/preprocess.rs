//! The official `SamPredictor`'s image pre- and post-processing, reproduced exactly.
//!
//! `ResizeLongestSide.apply_image` resizes with torchvision on a PIL image, i.e. Pillow's
//! BILINEAR filter: a separable triangle filter widened by the scale when shrinking
//! (antialiased), fixed-point coefficients, horizontal pass first with a uint8 intermediate.
//! [`pil_resize_rgb`] is a port of Pillow's `Resample.c` and gives identical bytes.
//! Masks go back with `F.interpolate(bilinear, align_corners=False)` ([`resize_bilinear`]).
use candle_core::{Device, Result, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use super::IMAGE_SIZE;

const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// `ResizeLongestSide.get_preprocess_shape`: (h, w) -> (h', w') with the longest side `long`.
pub fn preprocess_shape(h: usize, w: usize, long: usize) -> (usize, usize) {
    let scale = long as f64 / h.max(w) as f64;
    let nh = (h as f64 * scale + 0.5) as usize;
    let nw = (w as f64 * scale + 0.5) as usize;
    (nh, nw)
}

/// `ResizeLongestSide.apply_coords` for one point, original pixels -> input-square pixels
/// (computed in f64 like numpy, then stored as f32 like `torch.as_tensor(.., dtype=float)`).
pub fn input_from_image(x: f32, y: f32, original: (usize, usize)) -> (f32, f32) {
    let (h, w) = original;
    let (nh, nw) = preprocess_shape(h, w, IMAGE_SIZE);
    let sx = nw as f64 / w as f64;
    let sy = nh as f64 / h as f64;
    ((x as f64 * sx) as f32, (y as f64 * sy) as f32)
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter:
/// per output pixel, (first input index, fixed-point weights).
fn pil_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C (int): truncation
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((new_w, new_h), BILINEAR)` on an RGB image, bit for bit.
pub fn pil_resize_rgb(src: &RgbImage, new_w: usize, new_h: usize) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let half = 1i32 << (PRECISION_BITS - 1);
    // horizontal pass: [h, w] -> [h, new_w]
    let tmp = if new_w != w {
        let coeffs = pil_coeffs(w, new_w);
        let mut out = RgbImage::new(new_w as u32, h as u32);
        for y in 0..h {
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                let mut ss = [half; 3];
                for (i, &kv) in k.iter().enumerate() {
                    let p = src.get_pixel((xmin + i) as u32, y as u32).0;
                    for c in 0..3 {
                        ss[c] += p[c] as i32 * kv;
                    }
                }
                out.put_pixel(xx as u32, y as u32, image::Rgb(ss.map(clip8)));
            }
        }
        out
    } else {
        src.clone()
    };
    // vertical pass: [h, new_w] -> [new_h, new_w]
    if new_h == h {
        return tmp;
    }
    let coeffs = pil_coeffs(h, new_h);
    let mut out = RgbImage::new(new_w as u32, new_h as u32);
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..new_w {
            let mut ss = [half; 3];
            for (i, &kv) in k.iter().enumerate() {
                let p = tmp.get_pixel(x as u32, (ymin + i) as u32).0;
                for c in 0..3 {
                    ss[c] += p[c] as i32 * kv;
                }
            }
            out.put_pixel(x as u32, yy as u32, image::Rgb(ss.map(clip8)));
        }
    }
    out
}

/// `ResizeLongestSide(1024).apply_image`: `[H, W, 3]` -> `[h', w', 3]`, longest side 1024.
pub fn resize_longest_side(image: &RgbImage) -> RgbImage {
    let (h, w) = (image.height() as usize, image.width() as usize);
    let (nh, nw) = preprocess_shape(h, w, IMAGE_SIZE);
    pil_resize_rgb(image, nw, nh)
}

/// `Sam.preprocess` on a resized image: `(x - mean) / std`, zero-padded at the bottom and
/// right to the 1024 square. `[h', w', 3]` u8 -> `[1, 3, 1024, 1024]` f32.
pub fn normalize_pad(resized: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let n = IMAGE_SIZE;
    let mut data = vec![0f32; 3 * n * n];
    for (x, y, p) in resized.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        for c in 0..3 {
            data[c * n * n + y * n + x] = (p.0[c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
        }
    }
    debug_assert!(w <= n && h <= n);
    Tensor::from_vec(data, (1, 3, n, n), device)
}

/// PyTorch's bilinear source of output pixel `dst` along an axis of `in_size` -> `out_size`
/// (`area_pixel_compute_source_index`: `max(scale * (dst + 0.5) - 0.5, 0)`): the two input
/// pixels and the weight of the second.
pub(super) fn source_index(dst: usize, in_size: usize, out_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let s = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = s as usize;
    let step = usize::from(i0 < in_size - 1);
    (i0, i0 + step, s - i0 as f32)
}

/// PyTorch's bilinear `F.interpolate(align_corners=False)` (no antialias) of one channel,
/// reading only `src[..in_h, ..in_w]` of a `src_w`-wide buffer, to `[out_h, out_w]`, of which
/// only the top-left `[keep_h, keep_w]` is computed and returned.
pub fn resize_bilinear(
    src: &[f32],
    src_w: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    (keep_h, keep_w): (usize, usize),
) -> Vec<f32> {
    let index = source_index;
    if (in_h, in_w) == (out_h, out_w) && (keep_h, keep_w) == (in_h, in_w) && src_w == in_w {
        // scale 1: every source index is the destination index with weight 0 (bit-identical)
        return src[..in_h * in_w].to_vec();
    }
    let cols: Vec<_> = (0..keep_w).map(|x| index(x, in_w, out_w)).collect();
    // separable: the source rows that are read, resized along x once (gathers), then every
    // output row is a blend of two of them (contiguous, vectorised); the same products in the
    // same order as blending the four taps per pixel, so the values are identical
    let rows_read = if keep_h == 0 {
        0
    } else {
        index(keep_h - 1, in_h, out_h).1 + 1
    };
    let mut across = vec![0f32; rows_read * keep_w];
    across
        .par_chunks_exact_mut(keep_w)
        .enumerate()
        .for_each(|(y, row)| {
            let r = &src[y * src_w..];
            for (o, &(x0, x1, lx)) in row.iter_mut().zip(&cols) {
                *o = (1.0 - lx) * r[x0] + lx * r[x1];
            }
        });
    let mut out = vec![0f32; keep_h * keep_w];
    out.par_chunks_exact_mut(keep_w)
        .enumerate()
        .for_each(|(y, row)| {
            let (y0, y1, ly) = index(y, in_h, out_h);
            let top = &across[y0 * keep_w..][..keep_w];
            let bottom = &across[y1 * keep_w..][..keep_w];
            for ((o, &t), &b) in row.iter_mut().zip(top).zip(bottom) {
                *o = (1.0 - ly) * t + ly * b;
            }
        });
    out
}

/// `Sam.postprocess_masks` for one low-res mask: `[256, 256]` -> upscale to 1024, crop the
/// padding to `input` (h', w'), resize to `original` (H, W). Returns logits `[H, W]`.
pub fn postprocess_mask(
    low_res: &[f32],
    input: (usize, usize),
    original: (usize, usize),
) -> Vec<f32> {
    postprocess_mask_n(low_res, IMAGE_SIZE, input, original)
}

/// [`postprocess_mask`] for an input square of side `n` (256 for LiteMedSAM, where the
/// upscaling is the identity).
pub fn postprocess_mask_n(
    low_res: &[f32],
    n: usize,
    input: (usize, usize),
    original: (usize, usize),
) -> Vec<f32> {
    let low = super::LOW_RES_SIZE;
    // only the crop is needed: compute [h', w'] of the 1024 square
    let up = resize_bilinear(low_res, low, (low, low), (n, n), input); // [h', w']
    resize_bilinear(&up, input.1, input, original, original) // [H, W]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's bilinear resize written per output pixel (four taps).
    fn four_taps(src: &[f32], src_w: usize, inp: (usize, usize), out: (usize, usize)) -> Vec<f32> {
        let index = |dst: usize, in_size: usize, out_size: usize| {
            let s = (in_size as f32 / out_size as f32 * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = s as usize;
            (i0, (i0 + 1).min(in_size - 1), s - i0 as f32)
        };
        let mut v = Vec::new();
        for y in 0..out.0 {
            let (y0, y1, ly) = index(y, inp.0, out.0);
            for x in 0..out.1 {
                let (x0, x1, lx) = index(x, inp.1, out.1);
                let top = (1.0 - lx) * src[y0 * src_w + x0] + lx * src[y0 * src_w + x1];
                let bottom = (1.0 - lx) * src[y1 * src_w + x0] + lx * src[y1 * src_w + x1];
                v.push((1.0 - ly) * top + ly * bottom);
            }
        }
        v
    }

    #[test]
    fn separable_resize_equals_the_four_tap_formula() {
        let (h, w, src_w) = (13, 17, 20);
        let src: Vec<f32> = (0..h * src_w)
            .map(|i| ((i * 37) % 101) as f32 - 50.0)
            .collect();
        for out in [(52, 68), (5, 7), (13, 40), (31, 9)] {
            let want = four_taps(&src, src_w, (h, w), out);
            assert_eq!(
                resize_bilinear(&src, src_w, (h, w), out, out),
                want,
                "{out:?}"
            );
            // only the top-left part
            let keep = (out.0 / 2 + 1, out.1 / 3 + 1);
            let part = resize_bilinear(&src, src_w, (h, w), out, keep);
            for y in 0..keep.0 {
                assert_eq!(part[y * keep.1..][..keep.1], want[y * out.1..][..keep.1]);
            }
        }
    }
}
