//! `cv2.resize(rgb_u8, (w, h), interpolation=cv2.INTER_AREA)`: LiteMedSAM's image resize
//! (`resize_longest_side` in `CVPR24_LiteMedSAM_infer.py`), following OpenCV's `resize.cpp`.
//!
//! - Shrinking on both axes by integer factors: the box average of each cell, in integers
//!   (`(sum + 2) >> 2` for 2x2, else `round(sum * (1 / area))`).
//! - Shrinking on both axes otherwise: `computeResizeAreaTab`'s partial-cell weights (f32),
//!   a row of horizontal sums per source row, rows blended with their weights, rounded
//!   half to even.
//! - Enlarging on any axis: OpenCV's bilinear with INTER_AREA's source positions
//!   (`sx = floor(dx * scale)`, `fx = (dx + 1) - (sx + 1) / scale` wrapped to [0, 1)), weights
//!   in 11-bit fixed point, the vertical pass as OpenCV's SIMD code does it (products of the
//!   row sums shifted by 4 with the weights, high 16 bits, `(a + b + 2) >> 2`). OpenCV's
//!   scalar tail rounds once instead; this can differ by one grey level on the last pixels of
//!   a row (`tests/it/litemedsam_parity.rs` measures the effect).
use image::RgbImage;

/// One weight of `computeResizeAreaTab`: destination index, source index, weight.
struct Tab {
    d: usize,
    s: usize,
    alpha: f32,
}

fn area_tab(ssize: usize, dsize: usize, scale: f64) -> Vec<Tab> {
    let mut tab = Vec::new();
    for dx in 0..dsize {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(ssize as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        let mut sx1 = fsx1.ceil() as i64;
        sx2 = sx2.min(ssize as i64 - 1);
        sx1 = sx1.min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push(Tab {
                d: dx,
                s: (sx1 - 1) as usize,
                alpha: ((sx1 as f64 - fsx1) / cell) as f32,
            });
        }
        for sx in sx1..sx2 {
            tab.push(Tab {
                d: dx,
                s: sx as usize,
                alpha: (1.0 / cell) as f32,
            });
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            tab.push(Tab {
                d: dx,
                s: sx2 as usize,
                alpha: ((fsx2 - sx2 as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    tab
}

/// `saturate_cast<uchar>(float)`: round half to even, clamp.
fn sat_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

fn area_general(src: &RgbImage, nh: usize, nw: usize, sy: f64, sx: f64) -> Vec<u8> {
    let w = src.width() as usize;
    let raw = src.as_raw();
    let xtab = area_tab(w, nw, sx);
    let ytab = area_tab(src.height() as usize, nh, sy);
    let mut out = vec![0u8; nh * nw * 3];
    let mut sum = vec![0f32; nw * 3];
    let mut buf = vec![0f32; nw * 3];
    let mut prev: Option<usize> = None;
    for t in &ytab {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &raw[t.s * w * 3..][..w * 3];
        for x in &xtab {
            for c in 0..3 {
                buf[x.d * 3 + c] += row[x.s * 3 + c] as f32 * x.alpha;
            }
        }
        match prev {
            Some(p) if p == t.d => {
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s += t.alpha * b;
                }
            }
            _ => {
                if let Some(p) = prev {
                    for (o, s) in out[p * nw * 3..][..nw * 3].iter_mut().zip(&sum) {
                        *o = sat_u8(*s);
                    }
                }
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s = t.alpha * b;
                }
                prev = Some(t.d);
            }
        }
    }
    if let Some(p) = prev {
        for (o, s) in out[p * nw * 3..][..nw * 3].iter_mut().zip(&sum) {
            *o = sat_u8(*s);
        }
    }
    out
}

fn area_integer(src: &RgbImage, nh: usize, nw: usize, ky: usize, kx: usize) -> Vec<u8> {
    let w = src.width() as usize;
    let raw = src.as_raw();
    let scale = 1.0f32 / (kx * ky) as f32;
    let mut out = vec![0u8; nh * nw * 3];
    for y in 0..nh {
        for x in 0..nw {
            for c in 0..3 {
                let mut s = 0i32;
                for dy in 0..ky {
                    for dx in 0..kx {
                        s += raw[((y * ky + dy) * w + x * kx + dx) * 3 + c] as i32;
                    }
                }
                out[(y * nw + x) * 3 + c] = if kx == 2 && ky == 2 {
                    ((s + 2) >> 2) as u8
                } else {
                    sat_u8(s as f32 * scale)
                };
            }
        }
    }
    out
}

/// Source index and 11-bit weights of one axis of OpenCV's INTER_AREA-mode bilinear.
fn linear_axis(ssize: usize, dsize: usize) -> Vec<(usize, usize, [i32; 2])> {
    let inv = dsize as f64 / ssize as f64;
    let scale = 1.0 / inv;
    (0..dsize)
        .map(|d| {
            let mut s = (d as f64 * scale).floor() as i64;
            let mut f = ((d + 1) as f64 - (s + 1) as f64 * inv) as f32;
            f = if f <= 0.0 { 0.0 } else { f - f.floor() };
            if s < 0 {
                (f, s) = (0.0, 0);
            }
            let last = ssize as i64 - 1;
            let second = if s + 1 >= ssize as i64 {
                if s >= last {
                    (f, s) = (0.0, last);
                }
                s as usize // one tap
            } else {
                s as usize + 1
            };
            let a0 = ((1.0 - f) * 2048.0).round_ties_even() as i32;
            let a1 = (f * 2048.0).round_ties_even() as i32;
            if second == s as usize {
                (s as usize, second, [2048, 0])
            } else {
                (s as usize, second, [a0, a1])
            }
        })
        .collect()
}

fn linear(src: &RgbImage, nh: usize, nw: usize) -> Vec<u8> {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let raw = src.as_raw();
    let xs = linear_axis(w, nw);
    let ys = linear_axis(h, nh);
    // horizontal pass per source row: ints scaled by 2048
    let hrow = |y: usize| -> Vec<i32> {
        let row = &raw[y * w * 3..][..w * 3];
        let mut v = Vec::with_capacity(nw * 3);
        for &(s0, s1, [a0, a1]) in &xs {
            for c in 0..3 {
                v.push(row[s0 * 3 + c] as i32 * a0 + row[s1 * 3 + c] as i32 * a1);
            }
        }
        v
    };
    let mulhi = |a: i32, b: i32| ((a >> 4).clamp(-32768, 32767) * b) >> 16;
    let mut out = vec![0u8; nh * nw * 3];
    for (y, &(s0, s1, [b0, b1])) in ys.iter().enumerate() {
        let (r0, r1) = (hrow(s0), hrow(s1.min(h - 1)));
        let (b0, b1) = if s0 == s1 { (b0, 0) } else { (b0, b1) };
        for (o, (a, b)) in out[y * nw * 3..][..nw * 3]
            .iter_mut()
            .zip(r0.iter().zip(&r1))
        {
            *o = ((mulhi(*a, b0) + mulhi(*b, b1) + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    out
}

/// `cv2.resize(src, (nw, nh), interpolation=cv2.INTER_AREA)` -> `[nh, nw, 3]` bytes.
pub fn resize_area_rgb(src: &RgbImage, nh: usize, nw: usize) -> Vec<u8> {
    let (w, h) = (src.width() as usize, src.height() as usize);
    if (w, h) == (nw, nh) {
        return src.as_raw().clone();
    }
    let sx = w as f64 / nw as f64;
    let sy = h as f64 / nh as f64;
    if sx >= 1.0 && sy >= 1.0 {
        let (kx, ky) = (sx.round() as usize, sy.round() as usize);
        if (sx - kx as f64).abs() < f64::EPSILON && (sy - ky as f64).abs() < f64::EPSILON {
            return area_integer(src, nh, nw, ky, kx);
        }
        return area_general(src, nh, nw, sy, sx);
    }
    linear(src, nh, nw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_images_stay_flat_every_way() {
        let img = RgbImage::from_pixel(30, 20, image::Rgb([7, 128, 255]));
        for (nh, nw) in [(10, 15), (7, 11), (40, 60), (25, 13)] {
            let out = resize_area_rgb(&img, nh, nw);
            assert_eq!(out.len(), nh * nw * 3);
            assert!(out.chunks(3).all(|p| p == [7, 128, 255]), "{nh}x{nw}");
        }
    }

    #[test]
    fn integer_shrink_is_the_box_average() {
        let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x * 10 + y) as u8, 0, 255]));
        let out = resize_area_rgb(&img, 1, 2);
        // (0 + 10 + 1 + 11 + 2) >> 2 = 6, (20 + 30 + 21 + 31 + 2) >> 2 = 26
        assert_eq!(out, [6, 0, 255, 26, 0, 255]);
    }
}
