//! KxK 2-D convolution (stride 1, dilation 1, one group, no bias) with fast CPU gradients.
//!
//! candle 0.11.1 computes conv2d's input gradient with `conv_transpose2d`, a direct loop on
//! CPU, and its forward materialises im2col patches pixel by pixel with fresh buffers per
//! tile. This op keeps candle's semantics but, on CPU for f32/f64:
//! - forward: 3x3 with padding 1 in `winograd` (F(2x2, 3x3): 16 gemms with 2.25x fewer
//!   multiplications) once there are 16 input channels, else in `conv3x3` (three gemms over
//!   kw-shifted planes); other
//!   kernels per (image, band of output rows) by an im2col tile built with row copies into a
//!   per-thread scratch buffer reused across calls, then one `gemm` writing straight into the
//!   NCHW output (no output transpose, no full im2col matrix);
//! - input gradient (`conv_grad`): the same forward kernel on `grad` with the kernel
//!   transposed to `[Cin, Cout, K, K]` and flipped spatially, padding `K-1-p`;
//! - weight gradient (`conv_grad`): `grad_tile @ im2col_tile^T`, accumulated per parallel
//!   chunk.
//!
//! Other devices and dtypes go to candle's own `Tensor::conv2d` for the forward pass (candle's
//! `ParamsConv2D` cannot be built outside candle, so a GPU `*_fwd` could not call the
//! storage's conv2d) with a backward of forward convolutions and matmuls
//! (`conv_generic`) instead of candle's `conv_transpose2d`.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv_grad::{input_grad, WeightGrad};
use super::{conv3x3, winograd};

/// Stride-1 KxK convolution without bias, with a fast, accumulating backward on CPU.
///
/// `x: [N, Cin, H, W]`, `w: [Cout, Cin, K, K]` -> `[N, Cout, H + 2p - K + 1, W + 2p - K + 1]`
/// (p = `padding`). Same result as `x.conv2d(w, padding, 1, 1, 1)`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    Geom::new(x.dims(), w.dims(), padding)?;
    if x.dtype() != w.dtype() {
        bail!(
            "conv2d: input is {:?} but kernel is {:?}",
            x.dtype(),
            w.dtype()
        )
    }
    if !super::fast(x) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return super::conv_generic::conv2d_generic(x, w, padding);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2d { padding })
}

/// Output bytes of one im2col tile aimed at. 1 MiB measured best of 256 KiB to 4 MiB on the
/// 2-core EPYC (U-Net++ training step 128/8/32 about 5% faster than with 256 KiB, 256/4/32 the
/// same): fewer, larger gemm calls, each packing the kernel once.
const TILE_BYTES: usize = 1024 * 1024;

/// Shapes of one convolution; `new` validates them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) k: usize,
    pub(super) pad: usize,
    /// 1 but for the forward-only `conv2d_bias` (TinyViT's stride-2 patch embedding).
    pub(super) stride: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geom {
    /// `x: [N, Cin, H, W]`, `w: [Cout, Cin, K, K]`.
    pub(super) fn new(x: &[usize], w: &[usize], pad: usize) -> Result<Self> {
        Self::strided(x, w, pad, 1)
    }

    /// [`Geom::new`] with a stride (forward im2col only).
    pub(super) fn strided(x: &[usize], w: &[usize], pad: usize, stride: usize) -> Result<Self> {
        let (&[n, cin, h, wd], &[cout, wcin, k, k2]) = (x, w) else {
            bail!("conv2d: expected [N, Cin, H, W] and [Cout, Cin, K, K], got {x:?} and {w:?}")
        };
        if x.contains(&0) || w.contains(&0) {
            bail!("conv2d: empty operand {x:?} or kernel {w:?}")
        }
        if wcin != cin || k != k2 {
            bail!("conv2d: kernel {w:?} does not fit input {x:?} (square kernel, same Cin)")
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            bail!("conv2d: {k}x{k} kernel larger than padded input {x:?} (padding {pad})")
        }
        if stride == 0 {
            bail!("conv2d: stride 0")
        }
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (wd + 2 * pad - k) / stride + 1,
        );
        Ok(Self {
            n,
            cin,
            h,
            w: wd,
            cout,
            k,
            pad,
            stride,
            ho,
            wo,
        })
    }

    /// Rows of the im2col matrix: `Cin * K * K`.
    pub(super) fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// 1x1 without padding: the image itself is the im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.pad == 0 && self.stride == 1
    }

    /// Output rows per work item: tiles of about `TILE_BYTES` of scratch (`bytes_per_pixel` of
    /// it per output pixel), but at least ~4 items per thread so rayon can balance the load.
    fn rows_per_tile(&self, bytes_per_pixel: usize) -> usize {
        let pix = (TILE_BYTES / bytes_per_pixel).max(1);
        let rows = (pix / self.wo).clamp(1, self.ho);
        let want = 4 * rayon::current_num_threads();
        rows.min((self.n * self.ho).div_ceil(want).max(1))
    }
}

/// f32/f64 with a per-thread scratch buffer for im2col tiles.
pub(super) trait Elem: WithDType {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

/// Scratch kept per thread between calls is dropped beyond this many elements.
const SCRATCH_KEEP: usize = 16 << 20;

macro_rules! elem {
    ($t:ty, $scratch:ident) => {
        thread_local! {
            static $scratch: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Elem for $t {
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $scratch.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut v) => {
                        if v.len() < len {
                            v.resize(len, 0.);
                        }
                        let r = f(&mut v[..len]);
                        if v.len() > SCRATCH_KEEP {
                            *v = Vec::new();
                        }
                        r
                    }
                    // re-entered from a nested rayon task: use a one-off buffer
                    Err(_) => f(&mut vec![0.; len]),
                })
            }
        }
    };
}
elem!(f32, SCRATCH_F32);
elem!(f64, SCRATCH_F64);

/// A raw pointer shared by rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: only used for writes to disjoint regions (see the callers).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f(col_ptr, col_row_stride)` on the im2col tile of rows `y0..y1` of `img`.
pub(super) fn with_cols<T: Elem, R>(
    g: &Geom,
    img: &[&[T]],
    y0: usize,
    y1: usize,
    f: impl FnOnce(*const T, usize) -> R,
) -> R {
    if let (true, [img]) = (g.is_pointwise(), img) {
        return f(img[y0 * g.w..].as_ptr(), g.h * g.w);
    }
    let npix = (y1 - y0) * g.wo;
    T::with_scratch(g.ckk() * npix, |col| {
        super::im2col::im2col_rows(g, img, y0, y1, col);
        f(col.as_ptr(), npix)
    })
}

/// `(work items, rows per item, gemm parallelism)` for a pass over all (image, row band)s.
///
/// `scratch_per_pixel`: scratch elements per output pixel (im2col: `Cin*K*K`).
pub(super) fn plan<T>(g: &Geom, scratch_per_pixel: usize) -> (usize, usize, Parallelism) {
    let rows = g.rows_per_tile(scratch_per_pixel * std::mem::size_of::<T>());
    let items = g.n * g.ho.div_ceil(rows);
    // too few items to keep every thread busy: let gemm split them further
    let par = if items < rayon::current_num_threads() {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    (items, rows, par)
}

/// The channel blocks of image `b` of an input given as parts `[N, C_i, H, W]`.
pub(super) fn image<'a, T>(g: &Geom, x: &[&'a [T]], b: usize) -> Vec<&'a [T]> {
    x.iter()
        .map(|part| {
            let len = part.len() / g.n;
            &part[b * len..(b + 1) * len]
        })
        .collect()
}

/// Which pass of a convolution [`run_pass`] computes from two CPU operands.
#[derive(Clone, Copy)]
pub(super) enum Pass {
    /// `(x, w) -> y`, see [`forward`].
    Forward,
    /// `(grad, w) -> dx` with the forward kernel, see `conv_grad::forward_adjoint`.
    InputGrad,
    /// `(x, grad) -> dw`, see `conv_grad::weight_grad`.
    WeightGrad,
}

/// `pass` with geometry `g` on two contiguous f32 or f64 operands (`what` names the op in
/// errors).
pub(super) fn run_pass(
    pass: Pass,
    g: &Geom,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    what: &str,
) -> Result<CpuStorage> {
    fn typed<T: Elem>(pass: Pass, g: &Geom, a: &[T], b: &[T]) -> Vec<T> {
        match pass {
            Pass::Forward => forward(g, &[a], b),
            Pass::InputGrad => super::conv_grad::forward_adjoint(g, a, b),
            Pass::WeightGrad => super::conv_grad::weight_grad(g, &[a], b),
        }
    }
    Ok(match s1.dtype() {
        DType::F32 => f32::to_cpu_storage_owned(typed(
            pass,
            g,
            super::cpu_slice::<f32>(s1, l1, what)?,
            super::cpu_slice::<f32>(s2, l2, what)?,
        )),
        DType::F64 => f64::to_cpu_storage_owned(typed(
            pass,
            g,
            super::cpu_slice::<f64>(s1, l1, what)?,
            super::cpu_slice::<f64>(s2, l2, what)?,
        )),
        dt => bail!("{what}: f32 or f64 expected, got {dt:?}"),
    })
}

/// Forward pass: `x: [N, Cin, H, W]` as channel blocks `[N, C_i, H, W]` (their concatenation
/// along the channels, never built; one block for a plain input), `w: [Cout, Cin*K*K]` ->
/// `[N, Cout, Ho, Wo]`. 3x3 with padding 1 goes to `conv3x3`.
pub(super) fn forward<T: Elem>(g: &Geom, x: &[&[T]], w: &[T]) -> Vec<T> {
    forward_bias(g, x, w, None, None)
}

/// What runs on each finished part of an output, while it is in cache:
/// `(offset in the output, the part)`.
pub(super) type TileFn<'a, T> = &'a (dyn Fn(usize, &mut [T]) + Sync);

/// [`forward`] plus a per-channel `bias: [Cout]` (written into each tile first, the products
/// accumulated onto it: no extra pass) and an `epilogue` run on each output channel's rows of
/// a tile right after its product (the 3x3 path: on each finished output plane; Winograd: on
/// each finished pair of output rows).
pub(super) fn forward_bias<T: Elem>(
    g: &Geom,
    x: &[&[T]],
    w: &[T],
    bias: Option<&[T]>,
    epilogue: Option<TileFn<T>>,
) -> Vec<T> {
    let plane = g.ho * g.wo;
    let mut out = vec![T::from_f64(0.); g.n * g.cout * plane];
    if winograd::pays(g) {
        winograd::forward(g, x, w, bias, epilogue, &mut out);
    } else if conv3x3::applies(g) {
        if let Some(bias) = bias {
            out.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, p)| p.fill(bias[i % g.cout]));
        }
        let wp = conv3x3::pack_kernel(w, g.cout, g.cin, false);
        conv3x3::forward(g, x, &wp, &mut out, bias.is_some());
        if let Some(epi) = epilogue {
            out.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, p)| epi(i * plane, p));
        }
    } else {
        run_im2col(g, x, w, &mut out, false, bias, epilogue);
    }
    out
}

/// `out: [N, Cout, Ho, Wo]` = (with `accumulate`, `out +`) the convolution, by im2col tiles.
pub(super) fn forward_im2col<T: Elem>(
    g: &Geom,
    x: &[&[T]],
    w: &[T],
    out: &mut [T],
    accumulate: bool,
) {
    run_im2col(g, x, w, out, accumulate, None, None)
}

/// [`forward_im2col`], each tile's rows first set to `bias` (then accumulated onto) and
/// finished by `epilogue`.
fn run_im2col<T: Elem>(
    g: &Geom,
    x: &[&[T]],
    w: &[T],
    out: &mut [T],
    accumulate: bool,
    bias: Option<&[T]>,
    epilogue: Option<TileFn<T>>,
) {
    let plane = g.ho * g.wo;
    let out_len = g.cout * plane;
    assert_eq!(out.len(), g.n * out_len);
    let (items, rows, par) = plan::<T>(g, g.ckk());
    let tiles = items / g.n;
    let dst = SyncPtr(out.as_mut_ptr());
    // the rows of every output channel of one tile: disjoint between items
    let tile_rows = |b: usize, y0: usize, y1: usize, f: &mut dyn FnMut(usize, usize, &mut [T])| {
        for co in 0..g.cout {
            let off = b * out_len + co * plane + y0 * g.wo;
            // SAFETY: out[b, co, y0..y1, :] belongs to this item alone
            let seg =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add(off), (y1 - y0) * g.wo) };
            f(co, off, seg);
        }
    };
    (0..items).into_par_iter().for_each(|item| {
        let (b, y0) = (item / tiles, (item % tiles) * rows);
        let y1 = (y0 + rows).min(g.ho);
        if let Some(bias) = bias {
            tile_rows(b, y0, y1, &mut |co, _, seg| seg.fill(bias[co]));
        }
        let img = image(g, x, b);
        with_cols(g, &img, y0, y1, |col, col_rs| {
            // SAFETY: out[b, :, y0..y1, :] is written by this item only; `col` holds
            // ckk rows of (y1-y0)*Wo elements at stride col_rs; `w` is [Cout, ckk].
            unsafe {
                gemm::gemm(
                    g.cout,
                    (y1 - y0) * g.wo,
                    g.ckk(),
                    dst.get().add(b * out_len + y0 * g.wo),
                    1,
                    plane as isize,
                    accumulate || bias.is_some(),
                    w.as_ptr(),
                    1,
                    g.ckk() as isize,
                    col,
                    1,
                    col_rs as isize,
                    T::from_f64(1.),
                    T::from_f64(1.),
                    false,
                    false,
                    false,
                    par,
                )
            }
        });
        if let Some(epi) = epilogue {
            tile_rows(b, y0, y1, &mut |_, off, seg| epi(off, seg));
        }
    });
}

/// Forward op: `(x: [N, Cin, H, W], w: [Cout, Cin, K, K]) -> [N, Cout, Ho, Wo]`.
struct Conv2d {
    padding: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "medmine-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.padding)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let out = run_pass(Pass::Forward, &g, (s1, l1), (s2, l2), "conv2d")?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, k, _) = w.dims4()?;
        let p = self.padding;
        let grad = grad.contiguous()?;
        // a leaf constant (the network input) needs no gradient
        let grad_x = if x.track_op() {
            Some(input_grad(&grad, w, self.padding)?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &WeightGrad { k, padding: p })?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_kernel, check_op};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar()
    }

    /// (N, Cin, H, W, Cout, K, padding)
    const SHAPES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (2, 3, 7, 9, 5, 3, 1),
        (1, 4, 6, 5, 3, 3, 0),
        (3, 16, 33, 31, 8, 3, 1),
        (2, 6, 5, 5, 4, 1, 0),
        (1, 3, 8, 7, 2, 1, 1),
        (2, 5, 9, 8, 3, 5, 2),
        (1, 2, 3, 3, 2, 3, 2),
        (1, 3, 3, 4, 2, 3, 0),
    ];

    #[test]
    fn forward_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, cin, h, w, cout, k, p) in SHAPES {
            let x = Tensor::randn(0f32, 1., (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let d = max_diff(&conv2d(&x, &wt, p)?, &x.conv2d(&wt, p, 1, 1, 1)?)?;
            assert!(d < 1e-4, "{:?}: max diff {d}", (n, cin, h, w, cout, k, p));
        }
        Ok(())
    }

    #[test]
    fn strided_operands_and_bad_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 6), &dev)?.transpose(2, 3)?;
        let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?.transpose(2, 3)?;
        assert!(max_diff(&conv2d(&x, &w, 1)?, &x.conv2d(&w, 1, 1, 1, 1)?)? < 1e-4);
        assert!(conv2d(&x, &Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?, 1).is_err());
        assert!(conv2d(&x, &Tensor::zeros((4, 3, 3, 2), DType::F32, &dev)?, 1).is_err());
        assert!(conv2d(&x.narrow(2, 0, 1)?, &w, 0).is_err());
        assert!(conv2d(&x.narrow(3, 0, 0)?, &w, 1).is_err());
        Ok(())
    }

    #[test]
    fn input_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for (x_shape, k, p, cout) in [
            ([2, 3, 5, 6], 3, 1, 4),
            ([1, 2, 6, 5], 3, 0, 3),
            ([2, 3, 4, 5], 1, 0, 2),
            ([1, 2, 4, 3], 1, 1, 2),
        ] {
            let w = Tensor::randn(0f64, 1., (cout, x_shape[1], k, k), &dev)?;
            check_op(&x_shape, |x| conv2d(x, &w, p))?;
        }
        Ok(())
    }

    #[test]
    fn kernel_gradient_matches_finite_differences() -> Result<()> {
        for (x_shape, w_shape, p) in [
            ([2, 3, 5, 6], [4, 3, 3, 3], 1),
            ([1, 2, 6, 5], [3, 2, 3, 3], 0),
            ([2, 3, 4, 5], [2, 3, 1, 1], 0),
            ([1, 2, 4, 3], [2, 2, 1, 1], 1),
        ] {
            check_kernel(&x_shape, &w_shape, |x, w| conv2d(x, w, p))?;
        }
        Ok(())
    }

    #[test]
    fn input_feeding_two_convs_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 8, 19, 17), &dev)?)?;
        let w1 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (6, 8, 3, 3), &dev)?)?;
        let w2 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (6, 8, 3, 3), &dev)?)?;
        let r1 = Tensor::randn(0f32, 1., (2, 6, 19, 17), &dev)?;
        let r2 = Tensor::randn(0f32, 1., (2, 6, 17, 15), &dev)?;
        let ours = (conv2d(&x, &w1, 1)?.mul(&r1)?.sum_all()?
            + conv2d(&x, &w2, 0)?.mul(&r2)?.sum_all()?)?
        .backward()?;
        let theirs = (x.conv2d(&w1, 1, 1, 1, 1)?.mul(&r1)?.sum_all()?
            + x.conv2d(&w2, 0, 1, 1, 1)?.mul(&r2)?.sum_all()?)?
        .backward()?;
        for v in [&x, &w1, &w2] {
            let (a, b) = (ours.get(v).expect("ours"), theirs.get(v).expect("theirs"));
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let d = max_diff(a, b)?;
            assert!(
                d < 1e-4 * scale.max(1.),
                "gradient differs by {d} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn constant_input_gets_no_gradient_but_kernel_does() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 3, 3), &dev)?)?;
        let grads = conv2d(&x, &w, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        let theirs = x.conv2d(&w, 1, 1, 1, 1)?.sum_all()?.backward()?;
        let d = max_diff(
            grads.get(&w).expect("ours"),
            theirs.get(&w).expect("theirs"),
        )?;
        assert!(d < 1e-3, "kernel gradient differs by {d}");
        Ok(())
    }
}
