//! `skimage.transform.resize(image, (h, w), order=3, preserve_range=True, anti_aliasing=True)`
//! followed by `.astype(np.uint8)`: MedSAM's image resize (`MedSAM_Inference.py`), reproduced
//! step by step in f64 so that the bytes match (`tests/it/medsam_parity.rs`).
//!
//! What scikit-image does there (0.2x; scipy's `ndimage` underneath), and so what this does:
//! 1. the uint8 image becomes float64 (`preserve_range`: no scaling to [0, 1]);
//! 2. anti-aliasing: `ndi.gaussian_filter` with `sigma = max(0, (in/out - 1) / 2)` per axis
//!    (0 on the channel axis and on every axis that is enlarged, which is then skipped),
//!    `truncate = 4` (radius `int(4 sigma + 0.5)`), mode `mirror` (skimage's `reflect`);
//! 3. `ndi.zoom(order=3, mode='mirror', grid_mode=True)` on all three axes `[H, W, 3]`: the
//!    cubic B-spline prefilter along each axis in turn (mirror boundary, pole `sqrt(3) - 2`),
//!    then for every output value the 4x4x4 spline taps around
//!    `(o + 0.5) * in / out - 0.5` (the channel axis maps onto itself, where the cubic
//!    B-spline interpolates exactly);
//! 4. the result clipped to the input's [min, max] (`clip=True`), then truncated to uint8.
//!
//! The order of every sum and product is the C code's (`ni_splines.c`, `ni_interpolation.c`,
//! `ni_filters.c`), since a value a rounding error below an integer truncates one lower. The
//! Gaussian weights go through `exp`, which numpy may evaluate with its own SIMD code where
//! this calls the C library's: a last-bit difference there could move a byte by one.
use image::RgbImage;
use rayon::prelude::*;

/// The cubic B-spline's filter pole, `sqrt(3) - 2`.
const POLE: f64 = -0.267_949_192_431_122_7;

/// `ndimage`'s `mirror` extension of index `i` into `0..len` (`d c b | a b c d | c b a`).
fn mirror(i: i64, len: usize) -> usize {
    let len = len as i64;
    if len <= 1 {
        return 0;
    }
    let s2 = 2 * len - 2;
    let mut i = i.rem_euclid(s2);
    if i >= len {
        i = s2 - i;
    }
    i as usize
}

/// numpy's pairwise sum (`np.sum` of a contiguous f64 array of at most 128 values).
fn numpy_sum(a: &[f64]) -> f64 {
    if a.len() < 8 {
        return a.iter().fold(-0.0, |s, v| s + v);
    }
    debug_assert!(a.len() <= 128, "kernels are short");
    let mut r = [0f64; 8];
    r.copy_from_slice(&a[..8]);
    let whole = a.len() - a.len() % 8;
    let mut i = 8;
    while i < whole {
        for (j, rj) in r.iter_mut().enumerate() {
            *rj += a[i + j];
        }
        i += 8;
    }
    let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for v in &a[whole..] {
        res += v;
    }
    res
}

/// `scipy.ndimage._gaussian_kernel1d(sigma, 0, radius)`: normalised weights, `2r + 1` long.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let k = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| {
            let x = x as f64;
            // numpy's Polynomial([0, 0, k])(x), Horner: 0 + (0 + k * x) * x
            (k * x * x).exp()
        })
        .collect();
    let sum = numpy_sum(&phi);
    phi.into_iter().map(|v| v / sum).collect()
}

/// An `[H, W, C]` f64 image, C order.
struct Volume {
    dims: [usize; 3],
    data: Vec<f64>,
}

impl Volume {
    fn strides(&self) -> [usize; 3] {
        [self.dims[1] * self.dims[2], self.dims[2], 1]
    }

    /// Every 1-D line along `axis`: (offset of its first element, stride).
    fn lines(&self, axis: usize) -> Vec<usize> {
        let s = self.strides();
        let (a, b) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let mut v = Vec::with_capacity(self.dims[a] * self.dims[b]);
        for i in 0..self.dims[a] {
            for j in 0..self.dims[b] {
                v.push(i * s[a] + j * s[b]);
            }
        }
        v
    }

    /// Applies `f` to a copy of every line along `axis` and writes the result back.
    fn map_lines(&mut self, axis: usize, f: impl Fn(&[f64]) -> Vec<f64> + Sync) {
        let n = self.dims[axis];
        let stride = self.strides()[axis];
        let starts = self.lines(axis);
        let data = &self.data;
        let done: Vec<Vec<f64>> = starts
            .par_iter()
            .map(|&o| {
                let line: Vec<f64> = (0..n).map(|i| data[o + i * stride]).collect();
                f(&line)
            })
            .collect();
        for (o, line) in starts.into_iter().zip(done) {
            for (i, v) in line.into_iter().enumerate() {
                self.data[o + i * stride] = v;
            }
        }
    }
}

/// `ndimage.correlate1d` with a symmetric odd kernel, mode `mirror` (`NI_Correlate1D`'s
/// symmetric branch: the centre tap, then the pairs from the outermost in).
fn correlate_symmetric(line: &[f64], w: &[f64]) -> Vec<f64> {
    let r = (w.len() / 2) as i64;
    let n = line.len();
    let at = |i: i64| line[mirror(i, n)];
    (0..n as i64)
        .map(|i| {
            let mut acc = at(i) * w[r as usize];
            for j in -r..0 {
                acc += (at(i + j) + at(i - j)) * w[(r + j) as usize];
            }
            acc
        })
        .collect()
}

/// `spline_filter1d(order=3, mode='mirror')` of one line (`ni_splines.c`).
fn spline_filter_line(line: &[f64]) -> Vec<f64> {
    let n = line.len();
    let mut c = line.to_vec();
    if n <= 1 {
        return c;
    }
    let z = POLE;
    let gain = (1.0 - z) * (1.0 - 1.0 / z);
    c.iter_mut().for_each(|v| *v *= gain);
    // causal initialisation (mirror)
    let z_n_1 = z.powf((n - 1) as f64);
    let mut z_i = z;
    c[0] += z_n_1 * c[n - 1];
    for i in 1..n - 1 {
        c[0] += z_i * (c[i] + z_n_1 * c[n - 1 - i]);
        z_i *= z;
    }
    c[0] /= 1.0 - z_n_1 * z_n_1;
    for i in 1..n {
        c[i] += z * c[i - 1];
    }
    // anticausal initialisation (mirror)
    c[n - 1] = (z * c[n - 2] + c[n - 1]) * z / (z * z - 1.0);
    for i in (0..n - 1).rev() {
        c[i] = z * (c[i + 1] - c[i]);
    }
    c
}

/// The cubic B-spline weights of the 4 knots around `x` (`get_spline_interpolation_weights`).
fn spline_weights(x: f64) -> [f64; 4] {
    let y = x - x.floor();
    let z = 1.0 - y;
    let w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0;
    let w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
    let w0 = z * z * z / 6.0;
    let mut w3 = 1.0;
    for w in [w0, w1, w2] {
        w3 -= w;
    }
    [w0, w1, w2, w3]
}

/// `map_coordinate` for mode `mirror`: an input coordinate outside `[0, len - 1]` folded in.
fn map_coordinate(x: f64, len: usize) -> f64 {
    let lenf = len as f64;
    if x < 0.0 {
        if len <= 1 {
            return 0.0;
        }
        let sz2 = 2.0 * lenf - 2.0;
        let mut x = x;
        if x < -sz2 {
            x += sz2 * ((-x / sz2) as i64) as f64;
        }
        if x <= 1.0 - lenf {
            x + sz2
        } else {
            -x
        }
    } else if x > lenf - 1.0 {
        if len <= 1 {
            return 0.0;
        }
        let sz2 = 2.0 * lenf - 2.0;
        let mut x = x;
        x -= sz2 * ((x / sz2) as i64) as f64;
        if x >= lenf {
            sz2 - x
        } else {
            x
        }
    } else {
        x
    }
}

/// Per output index of one axis: the 4 input indices (mirrored) and their spline weights.
fn axis_taps(inp: usize, out: usize) -> Vec<([usize; 4], [f64; 4])> {
    let zoom = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let cc = map_coordinate((o as f64 + 0.5) * zoom - 0.5, inp);
            let start = cc.floor() as i64 - 1;
            let idx = [0, 1, 2, 3].map(|l| mirror(start + l, inp));
            (idx, spline_weights(cc))
        })
        .collect()
}

/// skimage's `resize(rgb, (out_h, out_w), order=3, preserve_range=True,
/// anti_aliasing=True).astype(np.uint8)`, as `[out_h, out_w, 3]` bytes (row-major RGB).
pub fn resize_order3_antialiased(src: &RgbImage, out_h: usize, out_w: usize) -> Vec<u8> {
    let (h, w) = (src.height() as usize, src.width() as usize);
    let mut v = Volume {
        dims: [h, w, 3],
        data: src.as_raw().iter().map(|&b| b as f64).collect(),
    };
    let (lo, hi) = v
        .data
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    // anti-aliasing along the shrunk axes
    for (axis, (inp, out)) in [(h, out_h), (w, out_w)].into_iter().enumerate() {
        let sigma = ((inp as f64 / out as f64) - 1.0) / 2.0;
        if sigma > 1e-15 {
            let k = gaussian_kernel(sigma);
            v.map_lines(axis, |line| correlate_symmetric(line, &k));
        }
    }
    // the spline prefilter along every axis, channels too
    for axis in 0..3 {
        v.map_lines(axis, spline_filter_line);
    }
    let ty = axis_taps(h, out_h);
    let tx = axis_taps(w, out_w);
    let tc = axis_taps(3, 3);
    let [sy, sx, _] = v.strides();
    let data = &v.data;
    let mut out = vec![0u8; out_h * out_w * 3];
    out.par_chunks_exact_mut(out_w * 3)
        .zip(ty.par_iter())
        .for_each(|(row, (iy, wy))| {
            for (px, (ix, wx)) in row.chunks_exact_mut(3).zip(&tx) {
                for (o, (ic, wc)) in px.iter_mut().zip(&tc) {
                    let mut t = 0.0;
                    for a in 0..4 {
                        for b in 0..4 {
                            let base = iy[a] * sy + ix[b] * sx;
                            for c in 0..4 {
                                let mut coeff = data[base + ic[c]];
                                coeff *= wy[a];
                                coeff *= wx[b];
                                coeff *= wc[c];
                                t += coeff;
                            }
                        }
                    }
                    // clip to the input's range, then numpy's float -> uint8 (truncation)
                    *o = t.clamp(lo, hi) as u8;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_folds_without_repeating_the_edge() {
        let got: Vec<usize> = (-4..9).map(|i| mirror(i, 4)).collect();
        assert_eq!(got, [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(mirror(-3, 1), 0);
    }

    #[test]
    fn spline_prefilter_then_taps_at_the_knots_give_the_samples_back() {
        let line: Vec<f64> = [3.0, 7.0, 1.0, 250.0, 0.0, 42.0].to_vec();
        let c = spline_filter_line(&line);
        for (i, want) in line.iter().enumerate() {
            let (idx, w) = axis_taps(line.len(), line.len())[i];
            let got: f64 = (0..4).map(|k| c[idx[k]] * w[k]).sum();
            assert!((got - want).abs() < 1e-9, "{i}: {got} vs {want}");
        }
    }

    #[test]
    fn gaussian_kernel_is_normalised_and_symmetric() {
        for sigma in [0.3, 1.0, 2.7, 9.0] {
            let k = gaussian_kernel(sigma);
            assert_eq!(k.len() % 2, 1);
            assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let n = k.len();
            assert!((0..n).all(|i| k[i] == k[n - 1 - i]));
        }
    }

    #[test]
    fn a_flat_image_stays_flat_up_or_down() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 255]));
        for (oh, ow) in [(64, 64), (5, 11), (23, 37)] {
            let out = resize_order3_antialiased(&img, oh, ow);
            assert_eq!(out.len(), oh * ow * 3);
            for px in out.chunks_exact(3) {
                // truncation: a value a rounding error below 128 would give 127
                assert!(px[0] >= 9 && px[0] <= 10 && px[2] >= 254, "{px:?}");
                assert!(px[1] == 128 || px[1] == 127, "{px:?}");
            }
        }
    }
}
