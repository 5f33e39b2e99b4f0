//! The CPU form of the second half of a two-way layer: the image attends to the tokens
//! (`cross_attn_image_to_token`, in the reassociated form of [`super::two_way`]), the residual
//! and `out_proj.bias` are added, `norm4` normalises, and the positional encoding is added for
//! the next attention; per band of image rows, in one pass while the band is in cache.
//!
//! The composed form (other devices, and the test below) is four passes over the `[N, C]`
//! image tokens with three `[N, C]` intermediates: scores and softmax, `p u`, add + LayerNorm,
//! `+ pe`.
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::cpu_slice;
use crate::ops::fast_math::{exp_slice, mean_inv_std};
use crate::ops::linear::gemm_rows;

/// Image rows per task (256 x 256 f32: 256 KiB per operand band).
const ROWS: usize = 256;

/// `keys' = norm4(keys + softmax_g(x_pe m^T + c) u + out_bias)` and `keys' + pe`, with
/// x_pe `[B, N, C]`, keys `[B, N, C]`, pe `[1, N, C]` -> `[2, B, N, C]` (keys', keys' + pe).
///
/// The token-side products come from [`super::two_way`]: `m` `[B, HT, C]` (scaled
/// `Wq_h^T k_h` per head and token), `c` `[B, HT]` (scaled `bq_h . k_h`), `u` `[B, HT, C]`
/// (`v_h Wo_h^T`); the softmax runs over each head's `t` tokens.
pub(super) struct ImageToTokens<'a> {
    /// `m` transposed: `[B, C, HT]`.
    pub m_t: Vec<f32>,
    pub c: Vec<f32>,
    pub u: Vec<f32>,
    pub t: usize,
    pub out_bias: &'a [f32],
    pub ln_w: &'a [f32],
    pub ln_b: &'a [f32],
    pub eps: f32,
}

impl ImageToTokens<'_> {
    /// One band of `rows` image rows of batch element `bi`.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        (bi, ht): (usize, usize),
        x_pe: &[f32],
        keys: &[f32],
        pe: &[f32],
        out_keys: &mut [f32],
        out_keys_pe: &mut [f32],
        c: usize,
    ) {
        let rows = keys.len() / c;
        let m = &self.m_t[bi * ht * c..][..ht * c];
        let bias = &self.c[bi * ht..][..ht];
        let u = &self.u[bi * ht * c..][..ht * c];
        // scores [rows, HT] = x_pe [rows, C] m_t [C, HT]
        let mut p = vec![0f32; rows * ht];
        // SAFETY: p [rows, HT], x_pe [rows, C], m_t [C, HT] row-major.
        unsafe {
            gemm_rows(
                &mut p,
                false,
                x_pe,
                (c as isize, 1),
                m,
                (ht as isize, 1),
                (rows, ht, c),
                Parallelism::None,
            )
        };
        // softmax over each head's t tokens: the group maxima subtracted, one vectorised exp
        // over the band, then the group sums
        for row in p.chunks_exact_mut(ht) {
            for (g, cg) in row.chunks_exact_mut(self.t).zip(bias.chunks_exact(self.t)) {
                g.iter_mut().zip(cg).for_each(|(v, b)| *v += b);
                let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                g.iter_mut().for_each(|v| *v -= max);
            }
        }
        exp_slice(&mut p);
        for g in p.chunks_exact_mut(self.t) {
            let inv = 1.0 / g.iter().sum::<f32>();
            g.iter_mut().for_each(|v| *v *= inv);
        }
        // keys + out_bias + p u, then norm4 in place, then + pe
        for (o, k) in out_keys.chunks_exact_mut(c).zip(keys.chunks_exact(c)) {
            for ((o, &k), &b) in o.iter_mut().zip(k).zip(self.out_bias) {
                *o = k + b;
            }
        }
        // SAFETY: out_keys [rows, C], p [rows, HT], u [HT, C] row-major.
        unsafe {
            gemm_rows(
                out_keys,
                true,
                &p,
                (ht as isize, 1),
                u,
                (c as isize, 1),
                (rows, c, ht),
                Parallelism::None,
            )
        };
        for ((o, ope), pe) in out_keys
            .chunks_exact_mut(c)
            .zip(out_keys_pe.chunks_exact_mut(c))
            .zip(pe.chunks_exact(c))
        {
            let (mean, inv) = mean_inv_std(o, self.eps);
            for ((((o, ope), &g), &s), &pe) in
                o.iter_mut().zip(ope).zip(self.ln_w).zip(self.ln_b).zip(pe)
            {
                *o = (*o - mean) * inv * g + s;
                *ope = *o + pe;
            }
        }
    }
}

impl CustomOp3 for ImageToTokens<'_> {
    fn name(&self) -> &'static str {
        "medmine-sam-image-to-tokens"
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
        let x_pe = cpu_slice::<f32>(s1, l1, "image_to_tokens")?;
        let keys = cpu_slice::<f32>(s2, l2, "image_to_tokens")?;
        let pe = cpu_slice::<f32>(s3, l3, "image_to_tokens")?;
        let (b, n, c) = l2.shape().dims3()?;
        let ht = self.c.len() / b.max(1);
        let fits = l1.dims() == l2.dims()
            && l3.dims() == [1, n, c]
            && self.t > 0
            && ht.is_multiple_of(self.t)
            && self.c.len() == b * ht
            && self.m_t.len() == b * ht * c
            && self.u.len() == b * ht * c
            && [self.out_bias.len(), self.ln_w.len(), self.ln_b.len()] == [c; 3];
        if !fits {
            bail!(
                "image_to_tokens: x_pe {:?}, keys {:?}, pe {:?}, {} token columns of {}",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.c.len(),
                self.t
            );
        }
        let mut out = vec![0f32; 2 * b * n * c];
        let (out_keys, out_keys_pe) = out.split_at_mut(b * n * c);
        for bi in 0..b {
            let plane = bi * n * c..(bi + 1) * n * c;
            out_keys[plane.clone()]
                .par_chunks_mut(ROWS * c)
                .zip(out_keys_pe[plane.clone()].par_chunks_mut(ROWS * c))
                .zip(x_pe[plane.clone()].par_chunks(ROWS * c))
                .zip(keys[plane].par_chunks(ROWS * c))
                .zip(pe.par_chunks(ROWS * c))
                .for_each(|((((ok, okp), xp), k), pe)| self.band((bi, ht), xp, k, pe, ok, okp, c));
        }
        Ok((CpuStorage::F32(out), Shape::from((2, b, n, c))))
    }
}
