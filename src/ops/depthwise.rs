//! Depthwise convolution (one filter per channel, `groups == channels`) with a bias, for
//! inference. candle 0.11 runs a grouped convolution as one convolution per group (an im2col
//! and a GEMM for every channel, then a concatenation); TinyViT (MobileSAM's encoder) has a
//! depthwise 3x3 in every block. Here it is a direct loop, channels in parallel. Forward only:
//! the op has no backward pass (SAM is never trained here). Other devices (and the forced
//! generic path) run [`depthwise_generic`]: `K*K` shifted views of the padded input, each
//! scaled per channel and summed, a few elementwise ops on the whole tensor instead of one
//! convolution per channel.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x: [N, C, H, W]`, `weight: [C, 1, K, K]`, `bias: [C]` -> `[N, C, Ho, Wo]` with
/// `Ho = (H + 2 padding - K) / stride + 1`, then `epilogue` (a GELU runs on each output plane
/// as it is finished; a residual is added afterwards).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
    epilogue: super::Epilogue,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (cw, one, k, k2) = weight.dims4()?;
    if cw != c || one != 1 || k != k2 || bias.dims1()? != c {
        bail!(
            "depthwise_conv2d: weight {:?} and bias {:?} do not fit {c} channels",
            weight.dims(),
            bias.dims()
        );
    }
    if stride == 0 {
        bail!("depthwise_conv2d: stride 0");
    }
    if super::fast(x) {
        let gelu = matches!(epilogue, super::Epilogue::Gelu);
        let op = Depthwise {
            stride,
            padding,
            gelu,
        };
        let y = x.apply_op3_no_bwd(weight, bias, &op)?;
        if gelu {
            Ok(y)
        } else {
            epilogue.apply_tensor(y)
        }
    } else {
        epilogue.apply_tensor(depthwise_generic(x, weight, bias, stride, padding)?)
    }
}

/// `t` along `dim` with `before` zeros in front, then zero-padded or cut to `len` in all.
fn place(t: &Tensor, dim: usize, before: usize, len: usize) -> Result<Tensor> {
    let t = t.pad_with_zeros(dim, before, 0)?;
    let have = t.dim(dim)?;
    if have < len {
        t.pad_with_zeros(dim, 0, len - have)
    } else {
        t.narrow(dim, 0, len)
    }
}

/// The device-generic depthwise convolution (same arguments as [`depthwise_conv2d`]): output
/// pixel `(oy, ox)` reads padded pixel `(s*oy + ky, s*ox + kx)`, so with the padded input split
/// into its `s*s` phases `[N, C, s, s, Hp/s, Wp/s]` each tap `(ky, kx)` is one window of one
/// phase, scaled by its per-channel weight and summed. Elementwise ops only (no per-channel convolutions), about
/// the same work as the convolution itself.
fn depthwise_generic(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    s: usize,
    p: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (_, _, k, _) = weight.dims4()?;
    if h + 2 * p < k || w + 2 * p < k {
        bail!("depthwise_conv2d: input {h}x{w} smaller than the kernel {k}");
    }
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    // taps reach (K-1)/s + Ho rows of each phase
    let (qh, qw) = ((k - 1) / s + ho, (k - 1) / s + wo);
    // [N, C, H, W] -> padded [N, C, s*qh, s*qw] -> phases [N, C, s, s, qh, qw] (for stride
    // 1 a reshape; else one strided copy, so that every tap below is copied by whole rows)
    let xp = place(&place(x, 2, p, s * qh)?, 3, p, s * qw)?.contiguous()?;
    let phases = if s == 1 {
        xp.reshape((n, c, 1, 1, qh, qw))?
    } else {
        xp.reshape((n, c, qh, s, qw, s))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
    };
    let taps = weight.reshape((c, k * k))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            // [N, C, 1, 1, Ho, Wo], made contiguous (row copies)
            let v = phases
                .narrow(2, ky % s, 1)?
                .narrow(3, kx % s, 1)?
                .narrow(4, ky / s, ho)?
                .narrow(5, kx / s, wo)?
                .contiguous()?;
            let wt = taps
                .narrow(1, ky * k + kx, 1)?
                .reshape((1, c, 1, 1, 1, 1))?;
            let term = v.broadcast_mul(&wt)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg("depthwise_conv2d: 0x0 kernel".into()))?;
    // [N, C, 1, 1, Ho, Wo] -> [N, C, Ho, Wo]
    acc.reshape((n, c, ho, wo))?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

struct Depthwise {
    stride: usize,
    padding: usize,
    /// GELU on each finished plane.
    gelu: bool,
}

/// [`plane_body`], 8 lanes at a time where the CPU has AVX2 (the build targets the x86-64
/// baseline, whose SSE2 gives 4: perf showed this loop at a third of the speed of memory).
#[allow(clippy::too_many_arguments)]
fn plane(
    out: &mut [f32],
    x: &[f32],
    hw: (usize, usize),
    howo: (usize, usize),
    kernel: &[f32],
    k: usize,
    s: usize,
    p: usize,
    bias: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { plane_avx2(out, x, hw, howo, kernel, k, s, p, bias) };
        return;
    }
    plane_body(out, x, hw, howo, kernel, k, s, p, bias)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx2(
    out: &mut [f32],
    x: &[f32],
    hw: (usize, usize),
    howo: (usize, usize),
    kernel: &[f32],
    k: usize,
    s: usize,
    p: usize,
    bias: f32,
) {
    plane_body(out, x, hw, howo, kernel, k, s, p, bias)
}

/// One output plane: `out = bias + sum_{ky,kx} w[ky, kx] * x[oy*s + ky - p, ox*s + kx - p]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plane_body(
    out: &mut [f32],
    x: &[f32],
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    kernel: &[f32],
    k: usize,
    s: usize,
    p: usize,
    bias: f32,
) {
    out.fill(bias);
    for (oy, orow) in out.chunks_exact_mut(wo).enumerate().take(ho) {
        for ky in 0..k {
            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                continue;
            };
            let irow = &x[iy * w..(iy + 1) * w];
            for kx in 0..k {
                let wv = kernel[ky * k + kx];
                // ox with 0 <= ox*s + kx - p < w
                let lo = p.saturating_sub(kx).div_ceil(s);
                let hi = ((w + p).saturating_sub(kx)).div_ceil(s).min(wo);
                if s == 1 {
                    let off = kx as isize - p as isize;
                    let src = &irow[(lo as isize + off) as usize..(hi as isize + off) as usize];
                    for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                        *o += wv * v;
                    }
                } else {
                    for (ox, o) in orow.iter_mut().enumerate().take(hi).skip(lo) {
                        *o += wv * irow[ox * s + kx - p];
                    }
                }
            }
        }
    }
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "medmine-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != DType::F32 {
            bail!("depthwise_conv2d: f32 expected, got {:?}", s1.dtype());
        }
        let (n, c, h, w) = l1.shape().dims4()?;
        let (_, _, k, _) = l2.shape().dims4()?;
        let (s, p) = (self.stride, self.padding);
        if h + 2 * p < k || w + 2 * p < k {
            bail!("depthwise_conv2d: input {h}x{w} smaller than the kernel {k}");
        }
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let x = super::cpu_slice::<f32>(s1, l1, "depthwise_conv2d")?;
        let weight = super::cpu_slice::<f32>(s2, l2, "depthwise_conv2d")?;
        let bias = super::cpu_slice::<f32>(s3, l3, "depthwise_conv2d")?;
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(nc, o)| {
            let ch = nc % c;
            plane(
                o,
                &x[nc * h * w..(nc + 1) * h * w],
                (h, w),
                (ho, wo),
                &weight[ch * k * k..(ch + 1) * k * k],
                k,
                s,
                p,
                bias[ch],
            );
            if self.gelu {
                super::fast_math::gelu_slice(o);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(n: usize, c: usize, h: usize, w: usize, k: usize, stride: usize, padding: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let none = crate::ops::Epilogue::None;
        let ours = depthwise_conv2d(&x, &wt, &b, stride, padding, none).unwrap();
        let generic = {
            let _g = crate::ops::force_generic();
            depthwise_conv2d(&x, &wt, &b, stride, padding, none).unwrap()
        };
        // the GELU fused on each plane equals the GELU after
        let gelu = crate::ops::Epilogue::Gelu;
        let fused = depthwise_conv2d(&x, &wt, &b, stride, padding, gelu).unwrap();
        let after = crate::ops::gelu_erf(&ours).unwrap();
        let d = crate::ops::gradcheck::max_abs_diff(&fused, &after);
        assert!(d < 1e-6, "gelu epilogue: {d}");
        // the old generic path: candle's grouped convolution, one convolution per channel
        let reference = x
            .conv2d(&wt, padding, stride, 1, c)
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        for (what, t) in [("fast", &ours), ("generic", &generic)] {
            assert_eq!(
                t.dims(),
                reference.dims(),
                "{what}: {h}x{w} k{k} s{stride} p{padding}"
            );
            let diff = crate::ops::gradcheck::max_abs_diff(t, &reference);
            // f32 sums of K*K products in another order
            assert!(
                diff < 1e-4,
                "{what}: max diff {diff}: {h}x{w} k{k} s{stride} p{padding}"
            );
        }
    }

    #[test]
    fn matches_candles_grouped_convolution() {
        check(1, 3, 8, 8, 3, 1, 1); // TinyViT's local conv
        check(2, 5, 9, 7, 3, 2, 1); // PatchMerging, odd sizes
        check(1, 4, 6, 10, 3, 1, 0);
        check(1, 2, 7, 7, 5, 2, 2);
        check(1, 2, 5, 5, 1, 1, 0);
        check(1, 2, 9, 9, 3, 3, 1);
        check(2, 3, 10, 11, 2, 3, 0); // taps of a phase stop short of the padded input
        check(1, 3, 6, 7, 3, 2, 0);
    }

    #[test]
    fn rejects_mismatched_weights() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let wt = Tensor::zeros((2, 1, 3, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let e = depthwise_conv2d(&x, &wt, &b, 1, 1, crate::ops::Epilogue::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 channels"), "{e}");
    }
}
