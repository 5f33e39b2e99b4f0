//! SAM's ViT image encoder (`segment_anything/modeling/image_encoder.py`, `ImageEncoderViT`),
//! keys as the official `image_encoder.*`: `patch_embed.proj`, `pos_embed`, `blocks.{i}.{norm1,
//! attn.{qkv,proj,rel_pos_h,rel_pos_w},norm2,mlp.{lin1,lin2}}`, `neck.{0,1,2,3}`.
//!
//! Ours rather than candle-transformers' for memory: its global-attention blocks hold several
//! `[B * heads, 4096, 4096]` attention matrices at once (805 MB each for vit_b), and vit_b's
//! encoder peaked at 17.8 GB against PyTorch's 3.6 GB, its time dominated by page faults. Here
//! the attention runs over blocks of query rows ([`MAX_CHUNK_BYTES`] of scores at a time); every
//! row's softmax sees all keys, so the result is the same computation. The exact GELU runs on
//! all threads ([`crate::ops::gelu_erf`]).
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::neck::Neck;

/// Bytes of attention scores computed at once (one block of query rows against all keys).
const MAX_CHUNK_BYTES: usize = 64 << 20;

/// `ImageEncoderViT`'s sizes (patch 16, relative positions, absolute `pos_embed`, qkv bias).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VitConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Blocks with global attention; the others attend within `window_size` windows.
    pub global_attn_indexes: Vec<usize>,
    pub window_size: usize,
    /// Channels of the neck's output (the prompt embedding width, 256).
    pub out_chans: usize,
}

/// The relative-position table of one axis: `[n, n, head_dim]`, row `i`, column `j` holding
/// `rel_pos[i - j + n - 1]` (`get_rel_pos` for equal query and key sizes).
fn rel_pos_table(n: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let (len, hd) = rel_pos.dims2()?;
    if len != 2 * n - 1 {
        candle_core::bail!(
            "relative position table of {len} rows for a {n}-wide grid (expected {}); \
             inputs other than 1024x1024 are not supported",
            2 * n - 1
        );
    }
    let idx: Vec<u32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i + n - 1 - j) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, n * n, rel_pos.device())?;
    rel_pos.index_select(&idx, 0)?.reshape((n, n, hd))
}

/// Multi-head attention with decomposed relative positions, over `[B, H, W, C]`.
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, side: usize, vb: VarBuilder) -> Result<Self> {
        let hd = dim / num_heads;
        Ok(Self {
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            scale: 1.0 / (hd as f64).sqrt(),
            rel_pos_h: vb.get((2 * side - 1, hd), "rel_pos_h")?,
            rel_pos_w: vb.get((2 * side - 1, hd), "rel_pos_w")?,
        })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let (heads, hd) = (self.num_heads, c / self.num_heads);
        let bh = b * heads;
        let qkv = self
            .qkv
            .forward(&xs.reshape((b, h * w, c))?)? // [B, HW, 3C]
            .reshape((b, h * w, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))? // [3, B, heads, HW, hd]
            .reshape((3, bh, h * w, hd))?;
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?); // [BH, HW, hd]

        // rel_h[n, y, x, ky] = q[n, y, x, :] . Rh[y, ky, :]; rel_w[n, y, x, kx] = q . Rw[x, kx]
        let r_h = rel_pos_table(h, &self.rel_pos_h)?; // [h, h, hd]
        let r_w = rel_pos_table(w, &self.rel_pos_w)?; // [w, w, hd]
        let qs = q.reshape((bh, h, w, hd))?;
        let rel_h = qs
            .permute((1, 0, 2, 3))? // [h, BH, w, hd]
            .reshape((h, bh * w, hd))?
            .matmul(&r_h.transpose(1, 2)?)? // [h, BH*w, h]
            .reshape((h, bh, w, h))?
            .permute((1, 0, 2, 3))?; // [BH, y, x, ky]
        let rel_w = qs
            .permute((2, 0, 1, 3))? // [w, BH, h, hd]
            .reshape((w, bh * h, hd))?
            .matmul(&r_w.transpose(1, 2)?)? // [w, BH*h, w]
            .reshape((w, bh, h, w))?
            .permute((1, 2, 0, 3))?; // [BH, y, x, kx]

        let k_t = k.t()?; // [BH, hd, HW]
        let q = (q * self.scale)?;
        let row_bytes = bh * w * h * w * std::mem::size_of::<f32>();
        let rows = (MAX_CHUNK_BYTES / row_bytes.max(1)).clamp(1, h);
        let mut outs = Vec::with_capacity(h.div_ceil(rows));
        for y0 in (0..h).step_by(rows) {
            let r = rows.min(h - y0);
            let attn = q.narrow(1, y0 * w, r * w)?.matmul(&k_t)?; // [BH, r*w, HW]
            let attn = attn
                .reshape((bh, r, w, h, w))?
                .broadcast_add(&rel_h.narrow(1, y0, r)?.unsqueeze(4)?)?
                .broadcast_add(&rel_w.narrow(1, y0, r)?.unsqueeze(3)?)?
                .reshape((bh, r * w, h * w))?;
            let attn = candle_nn::ops::softmax_last_dim(&attn)?;
            outs.push(attn.matmul(&v)?); // [BH, r*w, hd]
        }
        let out = Tensor::cat(&outs, 1)? // [BH, HW, hd]
            .reshape((b, heads, h, w, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, h * w, c))?;
        self.proj.forward(&out)?.reshape((b, h, w, c))
    }
}

/// `[B, H, W, C]` -> `[B * nW, ws, ws, C]` windows (zero padding to a multiple of `ws`).
fn window_partition(xs: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = xs.dims4()?;
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let xs = xs
        .pad_with_zeros(1, 0, hp - h)?
        .pad_with_zeros(2, 0, wp - w)?;
    let windows = xs
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// The inverse of [`window_partition`], cropping the padding: -> `[B, H, W, C]`.
fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let (nw, _, _, c) = windows.dims4()?;
    let b = nw / ((hp / ws) * (wp / ws));
    windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, hp, wp, c))?
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .contiguous()
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    /// 0: global attention.
    window_size: usize,
}

impl Block {
    fn new(cfg: &VitConfig, window_size: usize, grid: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let side = if window_size == 0 { grid } else { window_size };
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-6, vb.pp("norm1"))?,
            attn: Attention::new(dim, cfg.num_heads, side, vb.pp("attn"))?,
            norm2: candle_nn::layer_norm(dim, 1e-6, vb.pp("norm2"))?,
            lin1: candle_nn::linear(dim, 4 * dim, vb.pp("mlp.lin1"))?,
            lin2: candle_nn::linear(4 * dim, dim, vb.pp("mlp.lin2"))?,
            window_size,
        })
    }
}

impl Module for Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = xs.dims4()?;
        let ys = self.norm1.forward(xs)?;
        let ys = if self.window_size > 0 {
            let (win, padded) = window_partition(&ys, self.window_size)?;
            let win = self.attn.forward(&win)?;
            window_unpartition(&win, self.window_size, padded, (h, w))?
        } else {
            self.attn.forward(&ys)?
        };
        let xs = (xs + ys)?;
        let ys = crate::ops::gelu_erf(&self.norm2.forward(&xs)?.apply(&self.lin1)?)?;
        xs + ys.apply(&self.lin2)?
    }
}

/// `LayerNorm2d` on channels-last `[B, H, W, C]`: a layer norm over the last axis.
/// SAM's ViT image encoder: `[B, 3, 1024, 1024]` -> `[B, out_chans, 64, 64]`.
pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    /// `[1, 64, 64, C]`
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck: Neck,
}

impl ImageEncoderViT {
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let patch = super::PATCH_SIZE;
        let grid = super::IMAGE_SIZE / patch;
        let dim = cfg.embed_dim;
        let pcfg = Conv2dConfig {
            stride: patch,
            ..Default::default()
        };
        let patch_embed = candle_nn::conv2d(3, dim, patch, pcfg, vb.pp("patch_embed.proj"))?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let ws = if cfg.global_attn_indexes.contains(&i) {
                    0
                } else {
                    cfg.window_size
                };
                Block::new(cfg, ws, grid, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            pos_embed: vb.get((1, grid, grid, dim), "pos_embed")?,
            blocks,
            neck: Neck::new(dim, cfg.out_chans, vb.pp("neck"))?,
        })
    }
}

impl Module for ImageEncoderViT {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.patch_embed.forward(xs)?.permute((0, 2, 3, 1))?; // [B, 64, 64, C]
        let mut xs = xs.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        self.neck.forward(&xs) // [B, 64, 64, C] -> [B, out, 64, 64]
    }
}
