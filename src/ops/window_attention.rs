//! TinyViT's window attention core in one pass, forward only: from the tokens' `qkv` rows,
//! in their image order, to the heads' outputs in the same order, for every `window` x
//! `window` tile of the zero-padded grid. The official code pads the tokens, cuts the grid into
//! windows (a copy), normalises and projects each window's tokens, splits q, k and v per head
//! (three copies), adds the scaled scores to the relative-position biases, softmaxes, weights
//! v, and puts the windows back (two more copies) before the output projection. Here:
//!
//! - the caller projects the real tokens once (`qkv = Linear(LayerNorm(x))`, no padding: a
//!   padding token is zero, so its projection is the same `Linear(LayerNorm(0))` = `pad_qkv`
//!   row everywhere, computed once per layer);
//! - each (window, head) gathers its q, k and v rows (padding rows from `pad_qkv`), computes
//!   `softmax(scale q k^T + bias) v` with two small gemms and the vectorised `exp`, and writes
//!   the rows of its real tokens straight into the output, in image order.
//!
//! Other devices keep the composition of candle ops in `models::sam::tiny_vit`.
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::SyncPtr;
use super::cpu_slice;
use super::fast_math::exp_slice;

/// The geometry and constants of one attention layer.
#[derive(Clone, Debug)]
pub struct WindowAttention {
    /// The token grid's side (tokens are `side * side`, row-major).
    pub side: usize,
    /// The window's side.
    pub window: usize,
    pub heads: usize,
    /// Width of q, k and v per head.
    pub key_dim: usize,
    pub scale: f32,
    /// `[heads, N, N]` relative-position biases, `N = window^2`.
    pub bias: Vec<f32>,
    /// `[3 * heads * key_dim]`: the projection of a padding token, laid out as a `qkv` row.
    pub pad_qkv: Vec<f32>,
}

impl WindowAttention {
    /// `qkv: [B, side*side, heads * 3 * key_dim]` (per head q, k, v, as the official
    /// `qkv.view(B, N, heads, -1).split([kd, kd, d])`) -> `[B, side*side, heads * key_dim]`.
    pub fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let (_, l, w) = qkv.dims3()?;
        let n = self.window * self.window;
        let row = 3 * self.heads * self.key_dim;
        if l != self.side * self.side
            || w != row
            || self.bias.len() != self.heads * n * n
            || self.pad_qkv.len() != row
            || self.window == 0
        {
            bail!(
                "window_attention: qkv {:?} for a {s}x{s} grid, {h} heads of {kd}, window {ws}",
                qkv.dims(),
                s = self.side,
                h = self.heads,
                kd = self.key_dim,
                ws = self.window
            );
        }
        if !super::fast(qkv) || qkv.dtype() != DType::F32 {
            bail!("window_attention: f32 CPU tensors only (other devices compose candle ops)");
        }
        qkv.contiguous()?.apply_op1_no_bwd(self)
    }

    /// One window of one head of one image: `qkv` the image's rows, `out` the image's output.
    #[allow(clippy::too_many_arguments)]
    fn window_head(
        &self,
        qkv: &[f32],
        out: SyncPtr<f32>,
        (wy, wx): (usize, usize),
        h: usize,
        bufs: &mut Vec<f32>,
    ) {
        let (ws, s, kd) = (self.window, self.side, self.key_dim);
        let n = ws * ws;
        let row = 3 * self.heads * kd;
        let dh = self.heads * kd;
        let len = 3 * n * kd + n * n;
        if bufs.len() < len {
            bufs.resize(len, 0.);
        }
        let (qkv_local, scores) = bufs[..len].split_at_mut(3 * n * kd);
        // gather [q | k | v] of the window's tokens: [N, 3 kd]
        for i in 0..ws {
            for j in 0..ws {
                let (y, x) = (wy * ws + i, wx * ws + j);
                let src = if y < s && x < s {
                    &qkv[(y * s + x) * row..][..row]
                } else {
                    &self.pad_qkv[..]
                };
                let t = i * ws + j;
                qkv_local[t * 3 * kd..(t + 1) * 3 * kd]
                    .copy_from_slice(&src[h * 3 * kd..(h + 1) * 3 * kd]);
            }
        }
        scores.copy_from_slice(&self.bias[h * n * n..(h + 1) * n * n]);
        let ld = (3 * kd) as isize;
        let base = qkv_local.as_ptr();
        // SAFETY: scores [N, N] row-major; q rows at base, k rows at base + kd, stride 3 kd.
        unsafe {
            gemm::gemm(
                n,
                n,
                kd,
                scores.as_mut_ptr(),
                1,
                n as isize,
                true,
                base,
                1,
                ld,
                base.add(kd),
                ld,
                1,
                1f32,
                self.scale,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
        for r in scores.chunks_exact_mut(n) {
            let max = r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            r.iter_mut().for_each(|v| *v -= max);
            exp_slice(r);
            let inv = 1.0 / r.iter().sum::<f32>();
            r.iter_mut().for_each(|v| *v *= inv);
        }
        // out rows of the window's real tokens = scores v
        let rows_here = |i: usize| wy * ws + i < s;
        for i in (0..ws).filter(|&i| rows_here(i)) {
            let cols = (s - (wx * ws).min(s)).min(ws);
            if cols == 0 {
                continue;
            }
            let tok0 = (wy * ws + i) * s + wx * ws;
            // SAFETY: out rows tok0..tok0+cols, columns h kd..(h+1) kd belong to this (window,
            // head) alone; scores rows i*ws.. of N; v rows at base + 2 kd, stride 3 kd.
            unsafe {
                gemm::gemm(
                    cols,
                    kd,
                    n,
                    out.get().add(tok0 * dh + h * kd),
                    1,
                    dh as isize,
                    false,
                    scores.as_ptr().add(i * ws * n),
                    1,
                    n as isize,
                    base.add(2 * kd),
                    1,
                    ld,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        }
    }
}

impl CustomOp1 for WindowAttention {
    fn name(&self) -> &'static str {
        "medmine-window-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = cpu_slice::<f32>(st, l, "window_attention")?;
        let (b, len, row) = l.shape().dims3()?;
        let dh = self.heads * self.key_dim;
        let nw = self.side.div_ceil(self.window);
        let mut out = vec![0f32; b * len * dh];
        let dst = SyncPtr(out.as_mut_ptr());
        let items = b * nw * nw * self.heads;
        (0..items)
            .into_par_iter()
            .for_each_init(Vec::new, |bufs, item| {
                let (img, rest) = (item / (nw * nw * self.heads), item % (nw * nw * self.heads));
                let (win, h) = (rest / self.heads, rest % self.heads);
                let src = &qkv[img * len * row..(img + 1) * len * row];
                // SAFETY: image `img`'s output block; items write disjoint parts of it
                let out_img = SyncPtr(unsafe { dst.get().add(img * len * dh) });
                self.window_head(src, out_img, (win / nw, win % nw), h, bufs);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, len, dh))))
    }
}
