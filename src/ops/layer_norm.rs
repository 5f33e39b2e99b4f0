//! `layer_norm(x + y + bias)` over the last axis in one pass: the residual update of a
//! transformer's image tokens (SAM's decoder: `norm4(keys + out_proj(attn))`), where candle
//! adds twice and normalises in a third pass over 4096 x 256 values. Forward only; other
//! devices compose candle ops.
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_slice;

/// `layer_norm(x + y + bias) * weight + shift` over the last axis; `x`, `y` `[.., K]`,
/// `bias`, `weight`, `shift` `[K]`.
pub fn add_layer_norm(
    x: &Tensor,
    y: &Tensor,
    bias: &Tensor,
    weight: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if super::fast(x) && x.dtype() == candle_core::DType::F32 {
        let op = AddLayerNorm {
            bias: bias.to_vec1()?,
            weight: weight.to_vec1()?,
            shift: shift.to_vec1()?,
            eps: eps as f32,
        };
        return x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &op);
    }
    candle_nn::ops::layer_norm(&(x + y)?.broadcast_add(bias)?, weight, shift, eps as f32)
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

struct AddLayerNorm {
    bias: Vec<f32>,
    weight: Vec<f32>,
    shift: Vec<f32>,
    eps: f32,
}

impl CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "medmine-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(s1, l1, "add_layer_norm")?;
        let y = cpu_slice::<f32>(s2, l2, "add_layer_norm")?;
        let k = self.bias.len();
        if l1.dims() != l2.dims() || l1.dims().last() != Some(&k) {
            bail!("add_layer_norm: {:?} + {:?} over {k}", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k * ROWS_PER_TASK)
            .zip(x.par_chunks(k * ROWS_PER_TASK))
            .zip(y.par_chunks(k * ROWS_PER_TASK))
            .for_each(|((o, x), y)| {
                for ((o, x), y) in o
                    .chunks_exact_mut(k)
                    .zip(x.chunks_exact(k))
                    .zip(y.chunks_exact(k))
                {
                    for (((o, &x), &y), &b) in o.iter_mut().zip(x).zip(y).zip(&self.bias) {
                        *o = x + y + b;
                    }
                    let (mean, inv) = super::fast_math::mean_inv_std(o, self.eps);
                    for ((o, &g), &s) in o.iter_mut().zip(&self.weight).zip(&self.shift) {
                        *o = (*o - mean) * inv * g + s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn equals_candles_add_and_layer_norm() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 2f32, s, &dev).unwrap();
        let (x, y) = (r(&[3, 70, 24]), r(&[3, 70, 24]));
        let (b, w, s) = (r(&[24]), r(&[24]), r(&[24]));
        let ours = add_layer_norm(&x, &y, &b, &w, &s, 1e-5).unwrap();
        let want = candle_nn::ops::layer_norm(
            &(&x + &y).unwrap().broadcast_add(&b).unwrap(),
            &w,
            &s,
            1e-5,
        )
        .unwrap();
        let d = max_abs_diff(&ours, &want);
        assert!(d < 1e-5, "{d}");
    }
}
