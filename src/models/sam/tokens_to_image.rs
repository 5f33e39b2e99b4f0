//! The CPU form of "the tokens attend to the image" in the reassociated form of
//! [`super::two_way`]: `avg = softmax_N(x_pe g^T)^T x`, the attention-weighted image rows per
//! head and token.
//!
//! The softmax runs over all N image rows, so the composed form stores the `[N, HT]` scores,
//! normalises them in a second pass (and transposes them), then multiplies with one gemm whose
//! long axis (N) is the reduction, which two threads share poorly. Here each band of image
//! rows computes its scores, exponentiates them against the band's own column maxima and
//! multiplies, all in cache; the bands' partial sums are rescaled to the global maxima and added
//! (the online softmax: exact algebra, different rounding).
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use crate::ops::cpu_slice;
use crate::ops::fast_math::exp;
use crate::ops::linear::gemm_rows;
use crate::ops::{column_max, column_sum, sub_max_exp};
use gemm::Parallelism;

/// Image rows per band.
const ROWS: usize = 256;

/// x_pe `[B, N, C]`, x `[B, N, C]` -> `[B, HT, C]`, with `g_t` `[B, C, HT]` (the scaled
/// `Wk_h^T q_h` per head and token, transposed).
pub(super) struct TokensToImage {
    pub g_t: Vec<f32>,
    pub ht: usize,
}

/// One band's share: column maxima and sums of its exponentiated scores, and its
/// `[HT, C]` weighted sum of image rows.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl TokensToImage {
    fn band(&self, g_t: &[f32], x_pe: &[f32], x: &[f32], c: usize) -> Partial {
        let ht = self.ht;
        let rows = x.len() / c;
        let mut s = vec![0f32; rows * ht];
        // SAFETY: s [rows, HT], x_pe [rows, C], g_t [C, HT], all row-major.
        unsafe {
            gemm_rows(
                &mut s,
                false,
                x_pe,
                (c as isize, 1),
                g_t,
                (ht as isize, 1),
                (rows, ht, c),
                Parallelism::None,
            )
        };
        // the band's column softmax statistics (ops::softmax_columns_t's steps)
        let max = column_max(&s, ht);
        sub_max_exp(&mut s, &max);
        let sum = column_sum(&s, ht);
        // acc [HT, C] = s^T [HT, rows] x [rows, C]; s^T(j, r) = s[r HT + j]
        let mut acc = vec![0f32; ht * c];
        // SAFETY: acc [HT, C]; s read transposed within its [rows, HT]; x [rows, C].
        unsafe {
            gemm_rows(
                &mut acc,
                false,
                &s,
                (1, ht as isize),
                x,
                (c as isize, 1),
                (ht, c, rows),
                Parallelism::None,
            )
        };
        Partial { max, sum, acc }
    }
}

impl CustomOp2 for TokensToImage {
    fn name(&self) -> &'static str {
        "medmine-sam-tokens-to-image"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x_pe = cpu_slice::<f32>(s1, l1, "tokens_to_image")?;
        let x = cpu_slice::<f32>(s2, l2, "tokens_to_image")?;
        let (b, n, c) = l2.shape().dims3()?;
        let ht = self.ht;
        if l1.dims() != l2.dims() || n == 0 || self.g_t.len() != b * c * ht {
            bail!(
                "tokens_to_image: x_pe {:?}, x {:?}, {} query columns",
                l1.dims(),
                l2.dims(),
                ht
            );
        }
        let mut out = vec![0f32; b * ht * c];
        for (bi, out) in out.chunks_exact_mut(ht * c).enumerate() {
            let plane = bi * n * c..(bi + 1) * n * c;
            let g_t = &self.g_t[bi * c * ht..][..c * ht];
            let parts: Vec<Partial> = x_pe[plane.clone()]
                .par_chunks(ROWS * c)
                .zip(x[plane].par_chunks(ROWS * c))
                .map(|(xp, x)| self.band(g_t, xp, x, c))
                .collect();
            // rescale every band to the global column maxima
            let mut max = vec![f32::NEG_INFINITY; ht];
            for p in &parts {
                max.iter_mut().zip(&p.max).for_each(|(m, &v)| *m = m.max(v));
            }
            let mut sum = vec![0f32; ht];
            for p in &parts {
                for (j, row) in p.acc.chunks_exact(c).enumerate() {
                    let f = exp(p.max[j] - max[j]);
                    sum[j] += f * p.sum[j];
                    out[j * c..][..c]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(o, &v)| *o += f * v);
                }
            }
            for (row, s) in out.chunks_exact_mut(c).zip(&sum) {
                let inv = 1.0 / s;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, ht, c))))
    }
}
