//! The forward pass of a 3x3 convolution with padding 1 without the 9x im2col copy, for those
//! with too few channels for `winograd` (U-Net++'s RGB stem and its input gradient).
//!
//! For a band of output rows `y0..y1`, three copies of the input shifted by one column, zero
//! at the borders, `x3[(ci, kw), r, x] = x[ci, y0 - 1 + r, x + kw - 1]` (r in `0..y1-y0+2`),
//! make each kernel row a plain strided matrix: the rows `(ci, kw)` of `x3` read from offset
//! `kh * W` are exactly the im2col rows `(ci, kh, kw)`. So
//! `out[:, band] = sum_kh w_kh[Cout, (ci, kw)] @ x3[(ci, kw), kh W ..]`: three gemms with
//! K = 3 Cin instead of one with K = 9 Cin over a third of the copying. Measured on the 2-core
//! EPYC over the convolutions of a U-Net++ training step (128/8/32, forward and input
//! gradients): 12% less time than the im2col path.
use rayon::prelude::*;

use super::conv::{image, plan, Elem, Geom, SyncPtr};

/// Whether [`forward`] computes this convolution.
pub(super) fn applies(g: &Geom) -> bool {
    g.k == 3 && g.pad == 1 && g.stride == 1
}

/// A 3x3 kernel `[Cout, Cin, 3, 3]` rearranged as `[kh][Cout][Cin][kw]` (one `[Cout, 3 Cin]`
/// matrix per kernel row). With `adjoint`, the kernel of the input gradient instead: that of
/// `[Cin, Cout, 3, 3]` with `w'[ci, co, kh, kw] = w[co, ci, 2 - kh, 2 - kw]`.
pub(super) fn pack_kernel<T: Copy>(w: &[T], cout: usize, cin: usize, adjoint: bool) -> Vec<T> {
    let at = |co: usize, ci: usize, kh: usize, kw: usize| w[((co * cin + ci) * 3 + kh) * 3 + kw];
    let (o, i) = if adjoint { (cin, cout) } else { (cout, cin) };
    let mut out = Vec::with_capacity(w.len());
    for kh in 0..3 {
        for a in 0..o {
            for b in 0..i {
                for kw in 0..3 {
                    out.push(if adjoint {
                        at(b, a, 2 - kh, 2 - kw)
                    } else {
                        at(a, b, kh, kw)
                    });
                }
            }
        }
    }
    out
}

/// The kw-shifted planes of output rows `y0..y1` of one image (see the module docs).
///
/// `img: [Cin, H, W]` as consecutive channel blocks -> `x3: [(Cin, 3), y1 - y0 + 2, W]`; every
/// element is written.
fn shifted_planes<T: Elem>(g: &Geom, img: &[&[T]], y0: usize, y1: usize, x3: &mut [T]) {
    let (h, w) = (g.h, g.w);
    let plane_len = (y1 - y0 + 2) * w;
    let zero = T::from_f64(0.);
    let planes = img.iter().flat_map(|part| part.chunks_exact(h * w));
    for (plane, dst) in planes.zip(x3.chunks_exact_mut(3 * plane_len)) {
        for (kw, dst) in dst.chunks_exact_mut(plane_len).enumerate() {
            for (r, seg) in dst.chunks_exact_mut(w).enumerate() {
                // input row y0 - 1 + r, zero above and below the image
                let Some(iy) = (y0 + r).checked_sub(1).filter(|&iy| iy < h) else {
                    seg.fill(zero);
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                match kw {
                    0 => {
                        seg[0] = zero;
                        seg[1..].copy_from_slice(&src[..w - 1]);
                    }
                    1 => seg.copy_from_slice(src),
                    _ => {
                        seg[..w - 1].copy_from_slice(&src[1..]);
                        seg[w - 1] = zero;
                    }
                }
            }
        }
    }
}

/// Forward pass: `x: [N, Cin, H, W]` as channel blocks (see `conv::forward`), `wp` from
/// [`pack_kernel`] -> `out: [N, Cout, H, W]` (with `accumulate`, added to what `out` holds).
pub(super) fn forward<T: Elem>(g: &Geom, x: &[&[T]], wp: &[T], out: &mut [T], accumulate: bool) {
    debug_assert!(applies(g) && wp.len() == 9 * g.cout * g.cin);
    let (c3, hw) = (3 * g.cin, g.h * g.w);
    let out_len = g.cout * hw;
    assert_eq!(out.len(), g.n * out_len);
    // bands of about TILE_BYTES of shifted planes (3 Cin values per output pixel)
    let (items, rows, par) = plan::<T>(g, c3);
    let tiles = items / g.n;
    let dst = SyncPtr(out.as_mut_ptr());
    (0..items).into_par_iter().for_each(|item| {
        let (b, y0) = (item / tiles, (item % tiles) * rows);
        let y1 = (y0 + rows).min(g.h);
        let plane_len = (y1 - y0 + 2) * g.w;
        let img = image(g, x, b);
        T::with_scratch(c3 * plane_len, |x3| {
            shifted_planes(g, &img, y0, y1, x3);
            for kh in 0..3 {
                // SAFETY: out[b, :, y0..y1, :] is written by this item only (rows at stride
                // H*W); wp[kh] is [Cout, 3 Cin]; x3 from row kh holds 3 Cin rows of
                // (y1-y0)*W elements at stride plane_len, inside the scratch buffer.
                unsafe {
                    gemm::gemm(
                        g.cout,
                        (y1 - y0) * g.w,
                        c3,
                        dst.get().add(b * out_len + y0 * g.w),
                        1,
                        hw as isize,
                        kh > 0 || accumulate,
                        wp.as_ptr().add(kh * g.cout * c3),
                        1,
                        c3 as isize,
                        x3.as_ptr().add(kh * g.w),
                        1,
                        plane_len as isize,
                        T::from_f64(1.),
                        T::from_f64(1.),
                        false,
                        false,
                        false,
                        par,
                    )
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv_reference::{direct3x3, max_abs_diff, values};

    #[test]
    fn matches_a_direct_convolution_in_bands_and_channel_blocks() {
        // tiny widths and heights (1 and 2 columns: both borders in one segment), several
        // bands per image for the tall one
        for &(n, cin, h, wd, cout) in &[
            (2, 3, 5, 4, 2),
            (1, 2, 1, 1, 3),
            (3, 4, 2, 2, 5),
            (2, 5, 300, 7, 3),
        ] {
            let x = values(n * cin * h * wd, 1);
            let w = values(cout * cin * 9, 2);
            let g = Geom::new(&[n, cin, h, wd], &[cout, cin, 3, 3], 1).unwrap();
            let want = direct3x3(&x, &w, None, (n, cin, h, wd, cout));
            let run = |parts: &[&[f64]]| {
                let mut out = vec![0.; want.len()];
                forward(
                    &g,
                    parts,
                    &pack_kernel(&w, cout, cin, false),
                    &mut out,
                    false,
                );
                out
            };
            let got = run(&[&x]);
            assert!(
                max_abs_diff(&got, &want) < 1e-12,
                "{:?}",
                (n, cin, h, wd, cout)
            );
            // the same input as two channel blocks [N, 1, H, W] and [N, Cin-1, H, W]
            let hw = h * wd;
            let (mut a, mut b) = (vec![], vec![]);
            for img in x.chunks_exact(cin * hw) {
                a.extend_from_slice(&img[..hw]);
                b.extend_from_slice(&img[hw..]);
            }
            let got = run(&[&a, &b]);
            assert!(max_abs_diff(&got, &want) < 1e-12);
        }
    }

    #[test]
    fn adjoint_kernel_is_the_flipped_transpose() {
        let (cout, cin) = (2, 3);
        let w = values(cout * cin * 9, 3);
        let p = pack_kernel(&w, cout, cin, true); // [kh][Cin][Cout][kw]
        for kh in 0..3 {
            for ci in 0..cin {
                for co in 0..cout {
                    for kw in 0..3 {
                        let got = p[((kh * cin + ci) * cout + co) * 3 + kw];
                        assert_eq!(got, w[((co * cin + ci) * 3 + 2 - kh) * 3 + 2 - kw]);
                    }
                }
            }
        }
    }
}
