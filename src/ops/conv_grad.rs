//! The gradients of the stride-1 convolution of `conv`: the input gradient is itself a
//! convolution of the output gradient (with the flipped, transposed kernel; 3x3 with padding
//! 1 through `conv3x3`), the kernel gradient a sum over im2col tiles.
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{forward_im2col, image, plan, run_pass, with_cols, Elem, Geom, Pass};
use super::conv3x3;

/// The input gradient's convolution: `grad: [N, Cout, Ho, Wo]` with geometry `g` (its `cin`
/// is the forward pass's Cout, its `cout` the forward Cin) and the *forward* kernel
/// `w: [Cout, Cin, K, K]`, flipped and transposed here -> `[N, Cin, H, W]`.
pub(super) fn forward_adjoint<T: Elem>(g: &Geom, grad: &[T], w: &[T]) -> Vec<T> {
    let (cout, cin, k) = (g.cin, g.cout, g.k);
    let mut out = vec![T::from_f64(0.); g.n * g.cout * g.ho * g.wo];
    if super::winograd::pays(g) {
        let wt = flipped_transpose(w, cout, cin, k);
        super::winograd::forward(g, &[grad], &wt, None, None, &mut out);
        return out;
    }
    if conv3x3::applies(g) {
        let wp = conv3x3::pack_kernel(w, cout, cin, true);
        conv3x3::forward(g, &[grad], &wp, &mut out, false);
        return out;
    }
    let wt = flipped_transpose(w, cout, cin, k);
    forward_im2col(g, &[grad], &wt, &mut out, false);
    out
}

/// `[Cout, Cin, K, K]` -> `[Cin, Cout, K, K]`, flipped spatially: the kernel of the input
/// gradient as a forward convolution.
fn flipped_transpose<T: Copy>(w: &[T], cout: usize, cin: usize, k: usize) -> Vec<T> {
    let mut wt = Vec::with_capacity(w.len());
    for ci in 0..cin {
        for co in 0..cout {
            for kh in (0..k).rev() {
                for kw in (0..k).rev() {
                    wt.push(w[((co * cin + ci) * k + kh) * k + kw]);
                }
            }
        }
    }
    wt
}

/// Weight gradient: `x: [N, Cin, H, W]` as channel blocks (see [`forward`]), `grad: [N, Cout,
/// Ho, Wo]` -> `[Cout, Cin*K*K]`.
///
/// Items are split into a fixed number of chunks per thread count, each summed in order, so
/// the result is deterministic for a given thread count.
///
/// With few output channels and many more input channels (U-Net++'s decoder nodes) the
/// gradient is accumulated transposed, `[Cin*K*K, Cout]`: gemm then reads the im2col tile in
/// place instead of repacking it (the decoder's 128x128 kernel gradients take 30% less time
/// on the 2-core EPYC); otherwise the small gradient tile is the one repacked.
pub(super) fn weight_grad<T: Elem>(g: &Geom, x: &[&[T]], grad: &[T]) -> Vec<T> {
    let (out_len, wlen) = (g.cout * g.ho * g.wo, g.cout * g.ckk());
    let transposed = g.cout <= 128 && (g.cin >= 2 * g.cout || (g.cout <= 32 && g.cin >= g.cout));
    // acc[co, r] at co * dst_rs + r * dst_cs
    let (dst_cs, dst_rs) = if transposed {
        (g.cout as isize, 1)
    } else {
        (1, g.ckk() as isize)
    };
    let (items, rows, par) = plan::<T>(g, g.ckk());
    let tiles = items / g.n;
    let chunks = items.min(2 * rayon::current_num_threads()).max(1);
    let partial: Vec<Vec<T>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::from_f64(0.); wlen];
            for item in (c * items / chunks)..((c + 1) * items / chunks) {
                let (b, y0) = (item / tiles, (item % tiles) * rows);
                let y1 = (y0 + rows).min(g.ho);
                let img = image(g, x, b);
                let gt = &grad[b * out_len + y0 * g.wo..];
                with_cols(g, &img, y0, y1, |col, col_rs| {
                    // SAFETY: acc is [Cout, ckk] or [ckk, Cout]; gt is [Cout, npix] at row stride Ho*Wo;
                    // col^T is [npix, ckk] (col rows at stride col_rs).
                    unsafe {
                        gemm::gemm(
                            g.cout,
                            g.ckk(),
                            (y1 - y0) * g.wo,
                            acc.as_mut_ptr(),
                            dst_cs,
                            dst_rs,
                            true,
                            gt.as_ptr(),
                            1,
                            (g.ho * g.wo) as isize,
                            col,
                            col_rs as isize,
                            1,
                            T::from_f64(1.),
                            T::from_f64(1.),
                            false,
                            false,
                            false,
                            par,
                        )
                    }
                });
            }
            acc
        })
        .collect();
    let mut parts = partial.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![T::from_f64(0.); wlen]);
    for part in parts {
        total.iter_mut().zip(&part).for_each(|(t, p)| *t += *p);
    }
    if transposed {
        // [Cin*K*K, Cout] -> [Cout, Cin*K*K]
        let ckk = g.ckk();
        return (0..wlen)
            .map(|i| total[(i % ckk) * g.cout + i / ckk])
            .collect();
    }
    total
}

/// The input gradient of a stride-1 convolution, itself a convolution with the flipped kernel:
/// `grad: [N, Cout, Ho, Wo]` (contiguous), `w: [Cout, Cin, K, K]` -> `[N, Cin, H, W]`.
pub(super) fn input_grad(grad: &Tensor, w: &Tensor, p: usize) -> Result<Tensor> {
    let (_, _, k, _) = w.dims4()?;
    let (g_in, pad) = if p < k {
        (grad.clone(), k - 1 - p)
    } else {
        // padding beyond K-1: the outer rings of the output saw only zeros
        let c = p + 1 - k;
        let (_, _, ho, wo) = grad.dims4()?;
        let g_in = grad.narrow(2, c, ho - 2 * c)?.narrow(3, c, wo - 2 * c)?;
        (g_in.contiguous()?, 0)
    };
    // [N, Cout, Ho, Wo] -> [N, Cin, H, W]
    g_in.apply_op2_no_bwd(&w.detach().contiguous()?, &InputGrad { padding: pad })
}

/// Input-gradient op: `(grad: [N, Cout, Ho, Wo], w: [Cout, Cin, K, K]) -> [N, Cin, H, W]`, the
/// convolution of `grad` with the flipped, transposed kernel (arranged on the host, no
/// tensor ops) and padding `padding`.
struct InputGrad {
    padding: usize,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "medmine-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[cout, cin, k, k2] = l2.dims() else {
            bail!("conv2d input grad: kernel {:?} is not 4-D", l2.dims())
        };
        let g = Geom::new(l1.dims(), &[cin, cout, k, k2], self.padding)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let out = run_pass(Pass::InputGrad, &g, (s1, l1), (s2, l2), "conv2d input grad")?;
        Ok((out, shape))
    }
}

/// Weight-gradient op: `(x: [N, Cin, H, W], grad: [N, Cout, Ho, Wo]) -> [Cout, Cin, K, K]`.
pub(super) struct WeightGrad {
    pub(super) k: usize,
    pub(super) padding: usize,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "medmine-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x_dims, g_dims) = (l1.dims(), l2.dims());
        let (&[n, cin, ..], &[gn, cout, gh, gw]) = (x_dims, g_dims) else {
            bail!("conv2d weight grad: bad shapes {x_dims:?} and {g_dims:?}")
        };
        let g = Geom::new(x_dims, &[cout, cin, self.k, self.k], self.padding)?;
        if (gn, gh, gw) != (n, g.ho, g.wo) {
            bail!("conv2d weight grad: gradient {g_dims:?} does not fit input {x_dims:?}")
        }
        let shape = Shape::from((cout, cin, self.k, self.k));
        let out = run_pass(
            Pass::WeightGrad,
            &g,
            (s1, l1),
            (s2, l2),
            "conv2d weight grad",
        )?;
        Ok((out, shape))
    }
}
