//! The two softmaxes of SAM's decoder attention between a few prompt tokens and 4096 image
//! tokens, with the vectorised `exp` of [`super::fast_math`] (candle's `softmax_last_dim` with
//! libm's `expf` took 0.7 ms for either shape on 2 cores, five times per click):
//! - [`softmax_columns_t`]: tokens attending to the image, a softmax over the N image rows of
//!   `[B, N, K]` scores, returned transposed `[B, K, N]` (ready to weight the image rows);
//! - [`softmax_groups`]: the image attending to the tokens, a softmax over each group of T
//!   consecutive values of a row (one group per head), after adding a per-column bias.
//!
//! Forward only; other devices compose candle ops.
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_slice;
use super::fast_math::exp_slice;

/// `softmax(x, dim=1)` transposed: `[B, N, K] -> [B, K, N]`.
pub fn softmax_columns_t(x: &Tensor) -> Result<Tensor> {
    if super::fast(x) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&ColumnsT);
    }
    candle_nn::ops::softmax(x, 1)?.transpose(1, 2)?.contiguous()
}

/// Softmax over each group of `t` consecutive values along the last axis of `x + bias`:
/// `x [B, N, G*T]`, `bias [B, G*T]` -> `[B, N, G*T]`.
pub fn softmax_groups(x: &Tensor, bias: &Tensor, t: usize) -> Result<Tensor> {
    let (b, n, k) = x.dims3()?;
    if t == 0 || k % t != 0 || bias.dims() != [b, k] {
        bail!(
            "softmax_groups: x {:?}, bias {:?}, groups of {t}",
            x.dims(),
            bias.dims()
        );
    }
    if super::fast(x) && x.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&bias.contiguous()?, &Groups { t });
    }
    let y = x.broadcast_add(&bias.reshape((b, 1, k))?)?;
    candle_nn::ops::softmax_last_dim(&y.reshape((b, n, k / t, t))?)?.reshape((b, n, k))
}

/// The maxima of the columns of `x: [rows, k]`, row by row (vectorised over the columns).
pub(crate) fn column_max(x: &[f32], k: usize) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; k];
    for row in x.chunks_exact(k) {
        max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    max
}

/// `x[r, c] = exp(x[r, c] - max[c])` for `x: [rows, k]`, `max: [k]`.
pub(crate) fn sub_max_exp(x: &mut [f32], max: &[f32]) {
    for row in x.chunks_exact_mut(max.len()) {
        row.iter_mut().zip(max).for_each(|(v, m)| *v -= m);
    }
    exp_slice(x);
}

/// The sums of the columns of `x: [rows, k]`.
pub(crate) fn column_sum(x: &[f32], k: usize) -> Vec<f32> {
    let mut sum = vec![0f32; k];
    for row in x.chunks_exact(k) {
        sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
    }
    sum
}

struct ColumnsT;

impl CustomOp1 for ColumnsT {
    fn name(&self) -> &'static str {
        "medmine-softmax-columns-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(s, l, "softmax_columns_t")?;
        let (b, n, k) = l.shape().dims3()?;
        let mut out = vec![0f32; x.len()];
        for (x, out) in x.chunks_exact(n * k).zip(out.chunks_exact_mut(n * k)) {
            let max = column_max(x, k);
            // e = exp(x - max) in row blocks on all threads, then the column sums
            let mut e = x.to_vec();
            e.par_chunks_mut(k * ROWS_PER_TASK)
                .for_each(|block| sub_max_exp(block, &max));
            let sum = column_sum(&e, k);
            // transposed and normalised: out[c, r] = e[r, c] / sum[c]
            out.par_chunks_mut(n).enumerate().for_each(|(c, col)| {
                let inv = 1.0 / sum[c];
                for (o, row) in col.iter_mut().zip(e.chunks_exact(k)) {
                    *o = row[c] * inv;
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, k, n))))
    }
}

struct Groups {
    t: usize,
}

/// Rows per parallel task of [`Groups`].
const ROWS_PER_TASK: usize = 256;

impl CustomOp2 for Groups {
    fn name(&self) -> &'static str {
        "medmine-softmax-groups"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(s1, l1, "softmax_groups")?;
        let bias = cpu_slice::<f32>(s2, l2, "softmax_groups")?;
        let (_, n, k) = l1.shape().dims3()?;
        let t = self.t;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k * ROWS_PER_TASK)
            .zip(x.par_chunks(k * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (o, x))| {
                let first = task * ROWS_PER_TASK;
                for (r, (o, x)) in o.chunks_exact_mut(k).zip(x.chunks_exact(k)).enumerate() {
                    let bi = (first + r) / n;
                    let bias = &bias[bi * k..][..k];
                    for ((o, &x), &c) in o.iter_mut().zip(x).zip(bias) {
                        *o = x + c;
                    }
                    for g in o.chunks_exact_mut(t) {
                        let m = g.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                        g.iter_mut().for_each(|v| *v -= m);
                    }
                    exp_slice(o);
                    for g in o.chunks_exact_mut(t) {
                        let inv = 1.0 / g.iter().sum::<f32>();
                        g.iter_mut().for_each(|v| *v *= inv);
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
    fn equal_candles_softmax() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3f32, (2, 301, 21), &dev).unwrap() - 40.0).unwrap();
        let want = candle_nn::ops::softmax(&x, 1)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let got = softmax_columns_t(&x).unwrap();
        assert_eq!(got.dims(), &[2, 21, 301]);
        assert!(max_abs_diff(&got, &want) < 1e-6);

        let bias = Tensor::randn(0f32, 3f32, (2, 21), &dev).unwrap();
        let y = x.broadcast_add(&bias.reshape((2, 1, 21)).unwrap()).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&y.reshape((2, 301, 3, 7)).unwrap())
            .unwrap()
            .reshape((2, 301, 21))
            .unwrap();
        let got = softmax_groups(&x, &bias, 7).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        assert!(softmax_groups(&x, &bias, 5).is_err());
    }
}
