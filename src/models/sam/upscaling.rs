//! The mask decoder's `output_upscaling` (official keys `mask_decoder.output_upscaling.*`) and
//! the hypernetwork product that turns its output into masks, channels last throughout.
//!
//! `ConvTranspose2d(kernel 2, stride 2)` has non-overlapping 2x2 output blocks, so it is one
//! matmul of the pixel rows with the weight laid out `[C, (u, v), O]`: each input pixel's four
//! output pixels come out as consecutive rows, with no transpose. On the CPU the elementwise
//! steps are fused: bias + `LayerNorm2d` + GELU over each pixel's channels in one pass, and the
//! last bias + GELU + hypernetwork dot product in another that writes the masks in raster order
//! (the `[65536, C/8]` activations are never stored), with the vectorised GELU of
//! [`crate::ops::fast_math`] (within 6e-7 of the libm one). Other devices compose candle ops.
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::ops::cpu_slice;
use crate::ops::fast_math::gelu_slice;

/// `LayerNorm2d` of the official upscaling.
const LN_EPS: f64 = 1e-6;

/// `output_upscaling`: ConvTranspose2d(C, C/4), LayerNorm2d, GELU, ConvTranspose2d(C/4, C/8),
/// GELU.
#[derive(Debug)]
pub(super) struct Upscaling {
    /// `output_upscaling.0.weight` `[C, C/4, 2, 2]` as `[C, 4 * C/4]` ((u, v) major).
    w1: Tensor,
    /// `output_upscaling.0.bias` `[C/4]`
    b1: Tensor,
    /// `output_upscaling.1.{weight, bias}` `[C/4]`
    ln_w: Tensor,
    ln_b: Tensor,
    /// `output_upscaling.3.weight` `[C/4, C/8, 2, 2]` as `[C/4, 4 * C/8]`.
    w2: Tensor,
    /// `output_upscaling.3.bias` `[C/8]`
    b2: Tensor,
    /// Host copies of the parameters the fused CPU passes read, taken once at load.
    ln_gelu: BiasLnGelu,
    b2_host: Vec<f32>,
}

/// `[C, O, 2, 2]` -> `[C, 4 O]` with the output pixel (u, v) major and the channel minor.
fn blocks_last(w: &Tensor) -> Result<Tensor> {
    let (c, o, _, _) = w.dims4()?;
    w.permute((0, 2, 3, 1))?.contiguous()?.reshape((c, 4 * o))
}

impl Upscaling {
    pub(super) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let (c4, c8) = (dim / 4, dim / 8);
        let b1 = vb.pp("0").get(c4, "bias")?;
        let ln_w = vb.pp("1").get(c4, "weight")?;
        let ln_b = vb.pp("1").get(c4, "bias")?;
        let b2 = vb.pp("3").get(c8, "bias")?;
        Ok(Self {
            w1: blocks_last(&vb.pp("0").get((dim, c4, 2, 2), "weight")?)?,
            w2: blocks_last(&vb.pp("3").get((c4, c8, 2, 2), "weight")?)?,
            ln_gelu: BiasLnGelu {
                bias: b1.to_vec1()?,
                weight: ln_w.to_vec1()?,
                shift: ln_b.to_vec1()?,
            },
            b2_host: b2.to_vec1()?,
            b1,
            ln_w,
            ln_b,
            b2,
        })
    }

    /// The transformer's image tokens `[B, HW, C]` and `hyper_in` `[B, M, C/8]` -> masks
    /// `[B, M, 4H, 4W]`.
    pub(super) fn masks(
        &self,
        tokens: &Tensor,
        hyper_in: &Tensor,
        (h, w): (usize, usize),
    ) -> Result<Tensor> {
        let (b, hw, c) = tokens.dims3()?;
        let c4 = self.ln_w.dim(0)?;
        let c8 = self.b2.dim(0)?;
        let rows = tokens.contiguous()?.reshape((b * hw, c))?;
        // pixel rows (b, h, w, u1, v1): [BHW * 4, C/4]
        let y1 = rows.matmul(&self.w1)?.reshape((b * hw * 4, c4))?;
        let z1 = self.bias_ln_gelu(&y1)?;
        // pixel rows (b, h, w, u1, v1, u2, v2): [B, HW * 16, C/8]
        let y2 = z1.matmul(&self.w2)?.reshape((b, hw * 16, c8))?;
        self.gelu_mix(&y2, hyper_in, (h, w))
    }

    /// `gelu(layer_norm(y + b1))` over the last axis.
    fn bias_ln_gelu(&self, y: &Tensor) -> Result<Tensor> {
        if crate::ops::fast(y) {
            return y.apply_op1_no_bwd(&self.ln_gelu);
        }
        let z =
            candle_nn::ops::layer_norm(&y.broadcast_add(&self.b1)?, &self.ln_w, &self.ln_b, 1e-6)?;
        crate::ops::gelu_erf(&z)
    }

    /// `hyper_in . gelu(y + b2)` per pixel, in raster order: y `[B, HW * 16, C/8]`, hyper
    /// `[B, M, C/8]` -> `[B, M, 4H, 4W]`.
    fn gelu_mix(&self, y: &Tensor, hyper: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        if crate::ops::fast(y) {
            let op = GeluMix {
                bias: &self.b2_host,
                h,
                w,
            };
            return y.apply_op2_no_bwd(&hyper.contiguous()?, &op);
        }
        reference_gelu_mix(y, &self.b2, hyper, (h, w))
    }
}

/// The composed-op form of [`Upscaling::gelu_mix`] (other devices; the CPU op's test).
fn reference_gelu_mix(
    y: &Tensor,
    bias: &Tensor,
    hyper: &Tensor,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let (b, m, _) = hyper.dims3()?;
    let z = crate::ops::gelu_erf(&y.broadcast_add(bias)?)?;
    let masks = hyper.matmul(&z.t()?)?; // [B, M, HW*16]
                                        // pixel (h, w, u1, v1, u2, v2) goes to (4h + 2 u1 + u2, 4w + 2 v1 + v2)
    masks
        .reshape(vec![b, m, h, w, 2, 2, 2, 2])?
        .permute(vec![0, 1, 2, 4, 6, 3, 5, 7])?
        .reshape((b, m, 4 * h, 4 * w))
}

/// Rows per parallel task of [`BiasLnGelu`].
const ROWS_PER_TASK: usize = 256;

/// `gelu(layer_norm(x + bias) * weight + shift)` over the last axis of `[R, K]`.
#[derive(Debug)]
struct BiasLnGelu {
    bias: Vec<f32>,
    weight: Vec<f32>,
    shift: Vec<f32>,
}

impl CustomOp1 for BiasLnGelu {
    fn name(&self) -> &'static str {
        "medmine-sam-bias-ln-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(s, l, "bias_ln_gelu")?;
        let k = self.bias.len();
        if l.dims().last() != Some(&k) {
            bail!("bias_ln_gelu: last axis {:?}, expected {k}", l.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k * ROWS_PER_TASK)
            .zip(x.par_chunks(k * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                let mut y = vec![0f32; k];
                for (o, x) in o.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
                    for ((y, &x), &b) in y.iter_mut().zip(x).zip(&self.bias) {
                        *y = x + b;
                    }
                    let mean = y.iter().sum::<f32>() / k as f32;
                    let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / k as f32;
                    let inv = 1.0 / (var + LN_EPS as f32).sqrt();
                    for (((o, &y), &g), &s) in
                        o.iter_mut().zip(&y).zip(&self.weight).zip(&self.shift)
                    {
                        *o = (y - mean) * inv * g + s;
                    }
                }
                gelu_slice(o);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `out[b, m, pixel] = sum_c hyper[b, m, c] gelu(y[b, p, c] + bias[c])`, with the upscaled pixel
/// p = (h, w, u1, v1, u2, v2) written at (4h + 2 u1 + u2, 4w + 2 v1 + v2).
struct GeluMix<'a> {
    bias: &'a [f32],
    h: usize,
    w: usize,
}

impl CustomOp2 for GeluMix<'_> {
    fn name(&self) -> &'static str {
        "medmine-sam-gelu-mix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = cpu_slice::<f32>(s1, l1, "gelu_mix")?;
        let hyper = cpu_slice::<f32>(s2, l2, "gelu_mix")?;
        let (b, p, k) = l1.shape().dims3()?;
        let (b2, m, k2) = l2.shape().dims3()?;
        let (h, w) = (self.h, self.w);
        if b2 != b || k2 != k || k != self.bias.len() || p != h * w * 16 {
            bail!(
                "gelu_mix: y {:?}, hyper {:?}, bias {}, grid {h}x{w}",
                l1.dims(),
                l2.dims(),
                self.bias.len()
            );
        }
        // one task per (batch, grid row): its 16 w pixels give 4 output rows of every mask,
        // written to `rows` as [B, H, M, 4, 4W] and moved to [B, M, 4H, 4W] after
        let band = m * 16 * w;
        let mut rows = vec![0f32; b * h * band];
        rows.par_chunks_mut(band)
            .enumerate()
            .for_each(|(task, out)| {
                let bi = task / h;
                let hyper = &hyper[bi * m * k..][..m * k];
                let y = &y[task * 16 * w * k..][..16 * w * k];
                // the task's pixels: bias + GELU in one vectorised pass, then the products
                let mut z: Vec<f32> = y.to_vec();
                for row in z.chunks_exact_mut(k) {
                    row.iter_mut().zip(self.bias).for_each(|(v, b)| *v += b);
                }
                gelu_slice(&mut z);
                for (q, z) in z.chunks_exact(k).enumerate() {
                    // q = ((x * 4) + (u1, v1)) * 4 + (u2, v2) within the grid row
                    let (x, uv1, uv2) = (q / 16, (q / 4) % 4, q % 4);
                    let (u1, v1, u2, v2) = (uv1 / 2, uv1 % 2, uv2 / 2, uv2 % 2);
                    let row = 2 * u1 + u2;
                    let col = 4 * x + 2 * v1 + v2;
                    for (mi, hy) in hyper.chunks_exact(k).enumerate() {
                        let dot: f32 = hy.iter().zip(z).map(|(a, b)| a * b).sum();
                        out[(mi * 4 + row) * 4 * w + col] = dot;
                    }
                }
            });
        let mut out = vec![0f32; rows.len()];
        let plane = 16 * w; // 4 output rows of one mask
        for bi in 0..b {
            for hi in 0..h {
                for mi in 0..m {
                    let src = &rows[((bi * h + hi) * m + mi) * plane..][..plane];
                    out[((bi * m + mi) * h + hi) * plane..][..plane].copy_from_slice(src);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, m, 4 * h, 4 * w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{DType, Device};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_cpu_steps_equal_the_composed_ops() {
        let (c, h, w, b, m) = (32, 3, 5, 2, 4);
        let vb = VarBuilder::from_tensors(
            [
                ("0.weight", randn(&[c, c / 4, 2, 2])),
                ("0.bias", randn(&[c / 4])),
                ("1.weight", randn(&[c / 4])),
                ("1.bias", randn(&[c / 4])),
                ("3.weight", randn(&[c / 4, c / 8, 2, 2])),
                ("3.bias", randn(&[c / 8])),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            DType::F32,
            &Device::Cpu,
        );
        let up = Upscaling::new(c, vb).unwrap();
        let y = randn(&[b * h * w * 4, c / 4]);
        let fused = up.bias_ln_gelu(&y).unwrap();
        let z =
            candle_nn::ops::layer_norm(&y.broadcast_add(&up.b1).unwrap(), &up.ln_w, &up.ln_b, 1e-6)
                .unwrap();
        let composed = crate::ops::gelu_erf(&z).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);

        let y = randn(&[b, h * w * 16, c / 8]);
        let hyper = randn(&[b, m, c / 8]);
        let fused = up.gelu_mix(&y, &hyper, (h, w)).unwrap();
        let composed = reference_gelu_mix(&y, &up.b2, &hyper, (h, w)).unwrap();
        assert_eq!(fused.dims(), &[b, m, 4 * h, 4 * w]);
        assert!(max_abs_diff(&fused, &composed) < 1e-5);

        // the transposed convolutions as matmuls equal candle's conv_transpose2d
        let x = randn(&[b, c, h, w]);
        let w1 = up
            .w1
            .reshape((c, 2, 2, c / 4))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let want = x
            .conv_transpose2d(&w1.contiguous().unwrap(), 0, 0, 2, 1)
            .unwrap(); // [B, C/4, 2H, 2W]
        let rows = x
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let got = rows
            .reshape((b * h * w, c))
            .unwrap()
            .matmul(&up.w1)
            .unwrap() // [(b, h, w), (u, v, o)]
            .reshape(vec![b, h, w, 2, 2, c / 4])
            .unwrap()
            .permute(vec![0, 5, 1, 3, 2, 4])
            .unwrap()
            .reshape((b, c / 4, 2 * h, 2 * w))
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4);
    }
}
