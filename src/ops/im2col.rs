//! im2col of a band of output rows (the convolutions that are not 3x3 stride 1, whose
//! forward pass [`super::conv3x3`] does without it): contiguous row copies at stride 1,
//! gathers at larger strides.
use super::conv::{Elem, Geom};

/// im2col of output rows `y0..y1` of one image.
///
/// `img: [Cin, H, W]`, given as consecutive channel blocks (the parts of a concatenation that
/// is never materialised) -> `col: [Cin*K*K, (y1-y0)*Wo]`, rows ordered `(ci, kh, kw)` like a
/// flattened `[Cout, Cin, K, K]` kernel. Every element of `col` is written.
pub(super) fn im2col_rows<T: Elem>(g: &Geom, img: &[&[T]], y0: usize, y1: usize, col: &mut [T]) {
    // input pixel (oy s + kh - p, ox s + kw - p)
    let (k, p, s, h, w, wo) = (g.k, g.pad, g.stride, g.h, g.w, g.wo);
    let npix = (y1 - y0) * wo;
    let zero = T::from_f64(0.);
    let planes = img.iter().flat_map(|part| part.chunks_exact(h * w));
    for (ci, plane) in planes.enumerate() {
        for kh in 0..k {
            for kw in 0..k {
                let row = (ci * k + kh) * k + kw;
                // output columns ox whose input column ox s + kw - p lies inside the image
                let lo = p.saturating_sub(kw).div_ceil(s).min(wo);
                let hi = (w + p).saturating_sub(kw).div_ceil(s).min(wo).max(lo);
                let dst = &mut col[row * npix..(row + 1) * npix];
                for (yy, seg) in dst.chunks_exact_mut(wo).enumerate() {
                    let iy = ((y0 + yy) * s + kh).checked_sub(p).filter(|&iy| iy < h);
                    let Some(iy) = iy else {
                        seg.fill(zero);
                        continue;
                    };
                    seg[..lo].fill(zero);
                    seg[hi..].fill(zero);
                    let src = &plane[iy * w..(iy + 1) * w];
                    if s == 1 && hi > lo {
                        // a contiguous run of the input row
                        seg[lo..hi].copy_from_slice(&src[lo + kw - p..hi + kw - p]);
                    } else {
                        for (ox, v) in seg.iter_mut().enumerate().take(hi).skip(lo) {
                            *v = src[ox * s + kw - p];
                        }
                    }
                }
            }
        }
    }
}
