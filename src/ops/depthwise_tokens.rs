//! Depthwise convolution (stride 1) on tokens, channels last: TinyViT's `local_conv` runs
//! between two token-major steps (attention, MLP), and the official code transposes the
//! `[B, L, C]` tokens to `[B, C, H, W]` for it and back (two full copies per block). Here the
//! convolution reads and writes the tokens in place, vectorised along the channels. Forward
//! only; other devices run the transposes and [`super::depthwise_conv2d`].
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_slice;

/// `x: [B, side*side, C]` tokens in row-major grid order, `weight: [C, 1, K, K]`, `bias: [C]`
/// -> the same as `depthwise_conv2d` on `x` as `[B, C, side, side]` with `padding` (stride 1,
/// same size: `2 padding = K - 1`), returned as tokens `[B, side*side, C]`.
pub fn depthwise_tokens(
    x: &Tensor,
    side: usize,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    let (cw, one, k, k2) = weight.dims4()?;
    if l != side * side || cw != c || one != 1 || k != k2 || 2 * padding + 1 != k {
        bail!(
            "depthwise_tokens: tokens {:?} of a {side}x{side} grid, weight {:?}, padding {padding}",
            x.dims(),
            weight.dims()
        );
    }
    if super::fast(x) && [x.dtype(), weight.dtype(), bias.dtype()] == [DType::F32; 3] {
        // [C, 1, K, K] -> [K*K, C]: one row of per-channel weights per tap
        let taps = weight.reshape((c, k * k))?.t()?.contiguous()?;
        return x.contiguous()?.apply_op3_no_bwd(
            &taps,
            &bias.contiguous()?,
            &DepthwiseTokens { side, k, padding },
        );
    }
    let planes = x.transpose(1, 2)?.reshape((b, c, side, side))?;
    super::depthwise_conv2d(&planes, weight, bias, 1, padding, super::Epilogue::None)?
        .reshape((b, c, l))?
        .transpose(1, 2)?
        .contiguous()
}

struct DepthwiseTokens {
    side: usize,
    k: usize,
    padding: usize,
}

/// One output grid row `orow: [side, C]` of image tokens `xi: [side*side, C]`, vectorised
/// along the channels (8 lanes where the CPU has AVX2; the build's baseline SSE2 gives 4).
#[allow(clippy::too_many_arguments)]
fn grid_row(
    orow: &mut [f32],
    xi: &[f32],
    taps: &[f32],
    bias: &[f32],
    y: usize,
    g: &DepthwiseTokens,
    c: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the feature the function is compiled for.
        unsafe { grid_row_avx2(orow, xi, taps, bias, y, g, c) };
        return;
    }
    grid_row_body(orow, xi, taps, bias, y, g, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn grid_row_avx2(
    orow: &mut [f32],
    xi: &[f32],
    taps: &[f32],
    bias: &[f32],
    y: usize,
    g: &DepthwiseTokens,
    c: usize,
) {
    grid_row_body(orow, xi, taps, bias, y, g, c)
}

#[inline(always)]
fn grid_row_body(
    orow: &mut [f32],
    xi: &[f32],
    taps: &[f32],
    bias: &[f32],
    y: usize,
    g: &DepthwiseTokens,
    c: usize,
) {
    let (s, k, p) = (g.side, g.k, g.padding);
    for px in orow.chunks_exact_mut(c) {
        px.copy_from_slice(bias);
    }
    for ky in 0..k {
        let Some(iy) = (y + ky).checked_sub(p).filter(|&iy| iy < s) else {
            continue;
        };
        let irow = &xi[iy * s * c..(iy + 1) * s * c];
        for kx in 0..k {
            let w = &taps[(ky * k + kx) * c..(ky * k + kx + 1) * c];
            // output columns ox whose input column ox + kx - p is inside
            let lo = p.saturating_sub(kx);
            let hi = (s + p).saturating_sub(kx).min(s);
            for ox in lo..hi {
                let src = &irow[(ox + kx - p) * c..(ox + kx - p + 1) * c];
                let dst = &mut orow[ox * c..(ox + 1) * c];
                for ((o, &w), &x) in dst.iter_mut().zip(w).zip(src) {
                    *o += w * x;
                }
            }
        }
    }
}

impl CustomOp3 for DepthwiseTokens {
    fn name(&self) -> &'static str {
        "medmine-depthwise-tokens"
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
        let what = "depthwise_tokens";
        let (x, taps, bias) = (
            cpu_slice::<f32>(s1, l1, what)?,
            cpu_slice::<f32>(s2, l2, what)?,
            cpu_slice::<f32>(s3, l3, what)?,
        );
        let (b, l, c) = l1.shape().dims3()?;
        let s = self.side;
        let mut out = vec![0f32; b * l * c];
        // one output grid row per task: [side, C]
        out.par_chunks_mut(s * c)
            .enumerate()
            .for_each(|(row, orow)| {
                let (img, y) = (row / s, row % s);
                let xi = &x[img * l * c..(img + 1) * l * c];
                grid_row(orow, xi, taps, bias, y, self, c);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, l, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn equals_the_transposed_depthwise_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (b, side, c, k) in [(1, 8, 16, 3), (2, 5, 12, 3), (1, 6, 8, 5), (1, 4, 3, 1)] {
            let p = (k - 1) / 2;
            let x = Tensor::randn(0f32, 1., (b, side * side, c), &dev)?;
            let w = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., c, &dev)?;
            let got = depthwise_tokens(&x, side, &w, &bias, p)?;
            let want = {
                let _g = crate::ops::force_generic();
                depthwise_tokens(&x, side, &w, &bias, p)?
            };
            // the generic path is candle's grouped convolution on the transposed tokens
            let planes = x.transpose(1, 2)?.reshape((b, c, side, side))?;
            let reference = planes
                .conv2d(&w, p, 1, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                .reshape((b, c, side * side))?
                .transpose(1, 2)?;
            assert!(max_abs_diff(&want, &reference) < 1e-4);
            let d = max_abs_diff(&got, &reference);
            assert!(d < 1e-4, "{:?}: {d}", (b, side, c, k));
        }
        let x = Tensor::zeros((1, 9, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &dev)?;
        let bias = Tensor::zeros(4, DType::F32, &dev)?;
        assert!(
            depthwise_tokens(&x, 4, &w, &bias, 1).is_err(),
            "9 tokens are not 4x4"
        );
        assert!(
            depthwise_tokens(&x, 3, &w, &bias, 0).is_err(),
            "3x3 needs padding 1"
        );
        Ok(())
    }
}
