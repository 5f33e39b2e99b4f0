//! The mask decoder's `output_upscaling` (official keys `mask_decoder.output_upscaling.*`) and
//! the hypernetwork product that turns its output into masks, channels last throughout.
//!
//! `ConvTranspose2d(kernel 2, stride 2)` has non-overlapping 2x2 output blocks, so it is one
//! matmul of the pixel rows with the weight laid out `[C, (u, v), O]`: each input pixel's four
//! output pixels come out as consecutive rows, with no transpose. On the CPU everything after
//! the first product runs per grid row in one pass: bias + `LayerNorm2d` + GELU, the second
//! transposed convolution, bias + GELU and the hypernetwork dot products, written to the masks
//! in raster order (the `[65536, C/8]` activations are never stored), with the vectorised GELU
//! of [`crate::ops::fast_math`] (within 6e-7 of the libm one). Other devices compose candle ops.
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::ops::cpu_slice;
use crate::ops::fast_math::{dot, gelu_slice, mean_inv_std};
use crate::ops::linear::gemm_rows;

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
    /// Host copies of the parameters the fused CPU pass reads, taken once at load.
    fused: LnGeluMix,
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
        let w2 = blocks_last(&vb.pp("3").get((c4, c8, 2, 2), "weight")?)?;
        Ok(Self {
            w1: blocks_last(&vb.pp("0").get((dim, c4, 2, 2), "weight")?)?,
            fused: LnGeluMix {
                b1: b1.to_vec1()?,
                ln_w: ln_w.to_vec1()?,
                ln_b: ln_b.to_vec1()?,
                w2: w2.flatten_all()?.to_vec1()?,
                b2: b2.to_vec1()?,
            },
            w2,
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
        let y1 = rows.matmul(&self.w1)?;
        if crate::ops::fast(&y1) && h == w {
            let y1 = y1.reshape((b, hw * 4, c4))?;
            let r = y1.apply_op2_no_bwd(&hyper_in.contiguous()?, &self.fused);
            return r;
        }
        let y1 = y1.reshape((b * hw * 4, c4))?;
        let z1 = self.bias_ln_gelu(&y1)?;
        // pixel rows (b, h, w, u1, v1, u2, v2): [B, HW * 16, C/8]
        let y2 = z1.matmul(&self.w2)?.reshape((b, hw * 16, c8))?;
        reference_gelu_mix(&y2, &self.b2, hyper_in, (h, w))
    }

    /// `gelu(layer_norm(y + b1))` over the last axis (the composed form).
    fn bias_ln_gelu(&self, y: &Tensor) -> Result<Tensor> {
        let z =
            candle_nn::ops::layer_norm(&y.broadcast_add(&self.b1)?, &self.ln_w, &self.ln_b, 1e-6)?;
        crate::ops::gelu_erf(&z)
    }
}

/// `hyper_in . gelu(y + b2)` per pixel in raster order, composed of candle ops (other devices;
/// the fused CPU op's test): y `[B, HW * 16, C/8]`, hyper `[B, M, C/8]` -> `[B, M, 4H, 4W]`.
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

/// Bias + `LayerNorm2d` + GELU, the second transposed convolution, bias + GELU and the
/// hypernetwork products, per grid row: y1 `[B, HW * 4, C/4]` (the first convolution's pixel
/// rows), hyper `[B, M, C/8]` -> masks `[B, M, 4H, 4W]`. One task's activations (`4W` rows of
/// `C/4`, then `16W` of `C/8`: 192 KiB for SAM) stay in cache; the `[B, 16 HW, C/8]` tensor is
/// never stored.
#[derive(Debug)]
struct LnGeluMix {
    /// `output_upscaling.0.bias`, `.1.weight`, `.1.bias`: `[C/4]`.
    b1: Vec<f32>,
    ln_w: Vec<f32>,
    ln_b: Vec<f32>,
    /// `output_upscaling.3.weight` as `[C/4, 4 * C/8]` ((u, v) major), row-major.
    w2: Vec<f32>,
    /// `output_upscaling.3.bias` `[C/8]`.
    b2: Vec<f32>,
}

impl LnGeluMix {
    /// One grid row: `y1` `[4W, C/4]` pixel rows (w, u1, v1), `hyper` `[M, C/8]`; writes
    /// `out(mi, r, col)` for the grid row's 4 output rows r of each mask.
    fn grid_row(
        &self,
        y1: &[f32],
        hyper: &[f32],
        w: usize,
        out: &mut dyn FnMut(usize, usize, usize, f32),
    ) {
        let c4 = self.b1.len();
        let c8 = self.b2.len();
        let rows1 = 4 * w;
        let mut z1 = y1.to_vec();
        for row in z1.chunks_exact_mut(c4) {
            row.iter_mut().zip(&self.b1).for_each(|(v, b)| *v += b);
            let (mean, inv) = mean_inv_std(row, LN_EPS as f32);
            for ((v, &g), &s) in row.iter_mut().zip(&self.ln_w).zip(&self.ln_b) {
                *v = (*v - mean) * inv * g + s;
            }
        }
        gelu_slice(&mut z1);
        // [4W, C/4] x [C/4, 4 C/8] -> [4W, 4 C/8] = pixel rows (w, u1, v1, u2, v2) of C/8,
        // each starting from its bias
        let n = 4 * c8;
        let mut z2 = vec![0f32; rows1 * n];
        for row in z2.chunks_exact_mut(c8) {
            row.copy_from_slice(&self.b2);
        }
        // SAFETY: z2 [rows1, n], z1 [rows1, c4], w2 [c4, n], all row-major and in bounds.
        unsafe {
            gemm_rows(
                &mut z2,
                true,
                &z1,
                (c4 as isize, 1),
                &self.w2,
                (n as isize, 1),
                (rows1, n, c4),
                gemm::Parallelism::None,
            )
        }
        gelu_slice(&mut z2);
        for (q, z) in z2.chunks_exact(c8).enumerate() {
            // q = ((x * 4) + (u1, v1)) * 4 + (u2, v2) within the grid row
            let (x, uv1, uv2) = (q / 16, (q / 4) % 4, q % 4);
            let (u1, v1, u2, v2) = (uv1 / 2, uv1 % 2, uv2 / 2, uv2 % 2);
            let (r, col) = (2 * u1 + u2, 4 * x + 2 * v1 + v2);
            for (mi, hy) in hyper.chunks_exact(c8).enumerate() {
                out(mi, r, col, dot(hy, z));
            }
        }
    }
}

impl CustomOp2 for LnGeluMix {
    fn name(&self) -> &'static str {
        "medmine-sam-ln-gelu-mix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y1 = cpu_slice::<f32>(s1, l1, "ln_gelu_mix")?;
        let hyper = cpu_slice::<f32>(s2, l2, "ln_gelu_mix")?;
        let (b, p, c4) = l1.shape().dims3()?;
        let (b2, m, c8) = l2.shape().dims3()?;
        // the grid is square (SAM's 64 x 64 embedding)
        let side = ((p / 4) as f64).sqrt().round() as usize;
        if b2 != b || c4 != self.b1.len() || c8 != self.b2.len() || 4 * side * side != p {
            bail!(
                "ln_gelu_mix: y1 {:?}, hyper {:?}, C/4 {}, C/8 {}",
                l1.dims(),
                l2.dims(),
                self.b1.len(),
                self.b2.len()
            );
        }
        let (h, w) = (side, side);
        let mut out = vec![0f32; b * m * 16 * h * w];
        let dst = crate::ops::SyncPtr(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|task| {
            let (bi, hi) = (task / h, task % h);
            let y1 = &y1[task * 4 * w * c4..][..4 * w * c4];
            let hyper = &hyper[bi * m * c8..][..m * c8];
            let mut write = |mi: usize, r: usize, col: usize, v: f32| {
                let i = ((bi * m + mi) * 4 * h + 4 * hi + r) * 4 * w + col;
                // SAFETY: output rows 4 hi .. 4 hi + 4 of batch bi belong to this task alone,
                // and i is within [B, M, 4H, 4W]
                unsafe { *dst.get().add(i) = v };
            };
            self.grid_row(y1, hyper, w, &mut write);
        });
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
        // the fused CPU pass equals the composed ops (the other devices' path)
        let tokens = randn(&[b, h * h, c]);
        let hyper = randn(&[b, m, c / 8]);
        let fused = up.masks(&tokens, &hyper, (h, h)).unwrap();
        let composed = {
            let _g = crate::ops::force_generic();
            up.masks(&tokens, &hyper, (h, h)).unwrap()
        };
        assert_eq!(fused.dims(), &[b, m, 4 * h, 4 * h]);
        assert_eq!(composed.dims(), fused.dims());
        let d = max_abs_diff(&fused, &composed);
        assert!(d < 1e-4, "{d}");

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
