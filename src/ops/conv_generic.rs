//! The device-generic path of [`super::conv2d`] (CUDA, Metal, and CPU tensors when the generic
//! path is forced): candle's forward convolution, with a backward pass of forward
//! convolutions and matmuls instead of candle's own.
//!
//! candle 0.11.1 computes conv2d's input gradient with `conv_transpose2d`, a direct kernel on
//! every device (no cuDNN, no cuBLAS). Here, for the stride-1 convolution of `conv2d`:
//! - input gradient: the forward convolution of the output gradient with the kernel transposed
//!   to `[Cin, Cout, K, K]` and flipped spatially, padding `K-1-p` (the output gradient cropped
//!   by `p-(K-1)` on each side when `p > K-1`): cuDNN's or candle's im2col+gemm forward;
//! - kernel gradient: im2col of the zero-padded input (`K*K` shifted views stacked; the image
//!   itself for a 1x1 without padding) and one batched matmul with the output gradient,
//!   summed over the batch: cuBLAS on CUDA.
//!
//! The op itself only carries the backward: its forward is candle's `conv2d` on detached
//! operands, computed before and handed through (a storage clone; on Metal a shared buffer) so
//! that autograd calls [`ConvGeneric::bwd`]. The op holds that result only until its forward
//! runs: the graph keeps `x`, `w` and the op's output, as for candle's own convolution. Only tensor ops every device has are used: `conv2d`, `matmul`,
//! `index_select`, `narrow`, `stack`, `pad_with_zeros`, `reshape`, `transpose`, `sum`.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// `x: [N, Cin, H, W]`, `w: [Cout, Cin, K, K]` -> `[N, Cout, H + 2p - K + 1, W + 2p - K + 1]`,
/// stride 1: candle's convolution, with [`input_grad`] and [`kernel_grad`] as its backward.
pub(super) fn conv2d_generic(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let y = x.detach().conv2d(&w.detach(), padding, 1, 1, 1)?;
    if !x.track_op() && !w.track_op() {
        return Ok(y);
    }
    // the op hands `y`'s storage through as is: it must start at offset 0, in row-major order
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.force_contiguous()?
    };
    let op = ConvGeneric {
        padding,
        y: Mutex::new(Some(y)),
    };
    x.apply_op2(w, op)
}

/// The input gradient of the stride-1 convolution: `grad: [N, Cout, Ho, Wo]`,
/// `w: [Cout, Cin, K, K]` -> `[N, Cin, Ho - 2p + K - 1, Wo - 2p + K - 1]`.
pub(super) fn input_grad(grad: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (cout, cin, k, k2) = w.dims4()?;
    if k != k2 {
        bail!(
            "conv2d input grad: square kernel expected, got {:?}",
            w.dims()
        )
    }
    // [Cout, Cin, K, K] -> [Cin, Cout, K*K] with the K*K taps reversed (both axes flipped)
    let rev: Vec<u32> = (0..(k * k) as u32).rev().collect();
    let rev = Tensor::from_vec(rev, k * k, w.device())?;
    let wt = w
        .detach()
        .transpose(0, 1)?
        .reshape((cin, cout, k * k))?
        .index_select(&rev, 2)?
        .reshape((cin, cout, k, k))?;
    let (g, pad) = if padding < k {
        (grad.clone(), k - 1 - padding)
    } else {
        // padding beyond K-1: the outer rings of the output saw only zeros
        let c = padding + 1 - k;
        let (_, _, ho, wo) = grad.dims4()?;
        if ho <= 2 * c || wo <= 2 * c {
            bail!(
                "conv2d input grad: gradient {:?} for padding {padding}",
                grad.dims()
            )
        }
        (grad.narrow(2, c, ho - 2 * c)?.narrow(3, c, wo - 2 * c)?, 0)
    };
    // [N, Cout, Ho, Wo] -> [N, Cin, H, W]
    g.contiguous()?.conv2d(&wt, pad, 1, 1, 1)
}

/// The kernel gradient of the stride-1 convolution: `x: [N, Cin, H, W]`,
/// `grad: [N, Cout, Ho, Wo]` -> `[Cout, Cin, K, K]`, by im2col and one batched matmul.
pub(super) fn kernel_grad(x: &Tensor, grad: &Tensor, k: usize, padding: usize) -> Result<Tensor> {
    kernel_grad_in_chunks(x, grad, k, padding, COLS_BUDGET)
}

/// [`kernel_grad`] with at most `budget` elements of im2col columns at once.
fn kernel_grad_in_chunks(
    x: &Tensor,
    grad: &Tensor,
    k: usize,
    padding: usize,
    budget: usize,
) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (gn, cout, ho, wo) = grad.dims4()?;
    if gn != n || h + 2 * padding + 1 != ho + k || w + 2 * padding + 1 != wo + k {
        bail!(
            "conv2d kernel grad: gradient {:?} does not fit input {:?} ({k}x{k}, padding {padding})",
            grad.dims(),
            x.dims()
        )
    }
    let x = x.detach();
    let grad = grad.contiguous()?;
    if k == 1 && padding == 0 {
        // the image is its own im2col matrix: [N, Cin, H*W], no copy
        let cols = x.reshape((n, cin, h * w))?;
        return cols_product(&grad, &cols)?.reshape((cout, cin, k, k));
    }
    // im2col a few images at a time: at most COLS_BUDGET elements of columns at once
    let per_image = cin * k * k * ho * wo;
    let chunk = (budget / per_image).clamp(1, n);
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        // [len, Cin, H + 2p, W + 2p]
        let xp = x
            .narrow(0, start, len)?
            .pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?;
        let mut taps = Vec::with_capacity(k * k);
        for kh in 0..k {
            for kw in 0..k {
                taps.push(xp.narrow(2, kh, ho)?.narrow(3, kw, wo)?); // [len, Cin, Ho, Wo]
            }
        }
        // [len, Cin, K*K, Ho, Wo] -> [len, Cin*K*K, Ho*Wo], rows ordered like the kernel's
        let cols = Tensor::stack(&taps, 2)?.reshape((len, cin * k * k, ho * wo))?;
        let part = cols_product(&grad.narrow(0, start, len)?, &cols)?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
    }
    let total = total.ok_or_else(|| candle_core::Error::Msg("conv2d: empty batch".into()))?;
    total.reshape((cout, cin, k, k))
}

/// Elements of im2col columns [`kernel_grad`] builds at once (64 MiB of f32): a batch of
/// large images goes in chunks of images (one at least), bounding the transient memory.
const COLS_BUDGET: usize = 16 << 20;

/// `grad: [n, Cout, Ho, Wo]`, `cols: [n, R, Ho*Wo]` -> `sum_n grad[n] @ cols[n]^T`: `[Cout, R]`.
fn cols_product(grad: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let (n, cout, ho, wo) = grad.dims4()?;
    // [n, Cout, Ho*Wo] @ [n, Ho*Wo, R] -> [n, Cout, R] -> summed over the images
    let g = grad.reshape((n, cout, ho * wo))?;
    g.matmul(&cols.transpose(1, 2)?)?.sum(0)
}

/// `(x, w)` -> `y`, the convolution of `x` and `w` computed beforehand (from detached
/// operands, so it has no graph of its own); backward: the gradients of `x` and `w`.
struct ConvGeneric {
    padding: usize,
    /// The result, taken by the forward pass (which candle runs once).
    y: Mutex<Option<Tensor>>,
}

impl ConvGeneric {
    /// The result's storage on the device `pick` selects (a clone; it is contiguous from
    /// offset 0, see [`conv2d_generic`], so the clone has the output's layout).
    fn result<S: BackendStorage>(
        &self,
        pick: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let y = self
            .y
            .lock()
            .ok()
            .and_then(|mut y| y.take())
            .ok_or_else(|| candle_core::Error::Msg("conv2d: generic forward run twice".into()))?;
        let (storage, l) = y.storage_and_layout();
        let Some(s) = pick(&storage) else {
            bail!("conv2d: the generic forward result is on another device")
        };
        if !l.is_contiguous() || l.start_offset() != 0 {
            bail!("conv2d: the generic forward result must be contiguous from offset 0")
        }
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}

impl CustomOp2 for ConvGeneric {
    fn name(&self) -> &'static str {
        "medmine-conv2d-generic"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.result(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.result(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.result(|s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, k, _) = w.dims4()?;
        // a leaf constant (the network input) needs no gradient
        let grad_x = if x.track_op() {
            Some(input_grad(grad, w, self.padding)?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            Some(kernel_grad(x, grad, k, self.padding)?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_kernel, check_op, max_abs_diff};
    use crate::ops::{conv2d, fast, force_generic};
    use candle_core::{DType, Device, Var};

    /// (input shape, K, padding, Cout): U-Net++'s 3x3 with padding 1 and 1x1 heads, and the
    /// other cases of the op (no padding, padding beyond K-1, 5x5).
    const CASES: &[([usize; 4], usize, usize, usize)] = &[
        ([2, 3, 5, 6], 3, 1, 4),
        ([1, 2, 6, 5], 3, 0, 3),
        ([2, 3, 4, 5], 1, 0, 2),
        ([1, 2, 4, 3], 1, 1, 2),
        ([1, 2, 4, 5], 3, 3, 2),
        ([1, 2, 7, 6], 5, 2, 3),
    ];

    #[test]
    fn generic_input_gradient_matches_finite_differences() -> Result<()> {
        let _g = force_generic();
        for &(x_shape, k, p, cout) in CASES {
            let w = Tensor::randn(0f64, 1., (cout, x_shape[1], k, k), &Device::Cpu)?;
            assert!(!fast(&w));
            check_op(&x_shape, |x| conv2d(x, &w, p))?;
        }
        Ok(())
    }

    #[test]
    fn generic_kernel_gradient_matches_finite_differences() -> Result<()> {
        let _g = force_generic();
        for &(x_shape, k, p, cout) in CASES {
            check_kernel(&x_shape, &[cout, x_shape[1], k, k], |x, w| conv2d(x, w, p))?;
        }
        Ok(())
    }

    /// The gradients of an input feeding three convolutions (3x3 padding 1 and 0, 1x1) and of
    /// their kernels: generic path, fast path and candle's own autograd (the old generic path).
    #[test]
    fn generic_gradients_equal_fast_and_candles() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 8, 19, 17), &dev)?)?;
        let ws = [(6, 3), (5, 3), (4, 1)]
            .iter()
            .map(|&(co, k)| Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, 8, k, k), &dev)?))
            .collect::<Result<Vec<_>>>()?;
        let pads = [1, 0, 0];
        let probes: Vec<Tensor> = ws
            .iter()
            .zip(pads)
            .map(|(w, p)| x.conv2d(w, p, 1, 1, 1)?.randn_like(0., 1.))
            .collect::<Result<_>>()?;
        let loss = |conv: &dyn Fn(&Tensor, &Tensor, usize) -> Result<Tensor>| -> Result<Tensor> {
            let mut total = Tensor::zeros((), DType::F32, &dev)?;
            for ((w, p), r) in ws.iter().zip(pads).zip(&probes) {
                total = (total + conv(&x, w, p)?.mul(r)?.sum_all()?)?;
            }
            Ok(total)
        };
        let fast_grads = loss(&|x, w, p| conv2d(x, w, p))?.backward()?;
        let candle_grads = loss(&|x, w, p| x.conv2d(w, p, 1, 1, 1))?.backward()?;
        let generic_grads = {
            let _g = force_generic();
            let y = loss(&|x, w, p| conv2d(x, w, p))?;
            y.backward()?
        };
        let vars = std::iter::once(&x).chain(&ws);
        for (i, v) in vars.enumerate() {
            let gen = generic_grads.get(v).expect("generic gradient");
            let scale = candle_grads
                .get(v)
                .expect("candle gradient")
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()? as f64;
            for (what, other) in [("fast", &fast_grads), ("candle", &candle_grads)] {
                let d = max_abs_diff(gen, other.get(v).expect("gradient"));
                // f32 sums in another order: measured up to ~1e-6 of the scale
                assert!(
                    d < 1e-5 * scale.max(1.),
                    "variable {i}: generic vs {what}: {d} (scale {scale})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn generic_constant_input_gets_no_gradient_and_inference_is_candles_conv() -> Result<()> {
        let _g = force_generic();
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 3, 3), &dev)?)?;
        let grads = conv2d(&x, &w, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some());
        let plain = conv2d(&x, &w.detach(), 1)?;
        assert_eq!(max_abs_diff(&plain, &x.conv2d(&w, 1, 1, 1, 1)?), 0.);
        Ok(())
    }

    /// The kernel gradient summed over chunks of images (one image, two, all) is the same.
    #[test]
    fn kernel_gradient_in_chunks_of_images_is_the_same() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (5, 3, 7, 6), &dev)?;
        let g = Tensor::randn(0f64, 1., (5, 4, 7, 6), &dev)?;
        let per_image = 3 * 9 * 7 * 6;
        let whole = kernel_grad_in_chunks(&x, &g, 3, 1, usize::MAX)?;
        for budget in [1, 2 * per_image + 1] {
            let chunked = kernel_grad_in_chunks(&x, &g, 3, 1, budget)?;
            assert!(max_abs_diff(&whole, &chunked) < 1e-12, "budget {budget}");
        }
        Ok(())
    }

    #[test]
    fn gradient_shapes_that_do_not_fit_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 6, 6), DType::F32, &dev)?;
        let g = Tensor::zeros((1, 3, 5, 5), DType::F32, &dev)?;
        assert!(kernel_grad(&x, &g, 3, 1).is_err());
        assert!(input_grad(&g, &Tensor::zeros((3, 2, 3, 2), DType::F32, &dev)?, 1).is_err());
        Ok(())
    }
}
