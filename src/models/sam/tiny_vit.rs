//! MobileSAM's image encoder, TinyViT (`mobile_sam/modeling/tiny_vit_sam.py`), of any size.
//!
//! Adapted from candle-transformers 0.11.1 `segment_anything::tiny_vit`, which differs from the
//! official code in two ways that this copy fixes:
//! - it uses the tanh approximation of GELU (`Tensor::gelu`) where the official code uses
//!   `nn.GELU()`, the exact erf form (on the parity fixture the approximation moves the image
//!   embedding by more than the 1e-3 tolerance: `tests/it/sam_parity_vit_t.rs`);
//! - it builds only the 5M configuration with a 256-channel neck; here every size is a
//!   [`TinyVitConfig`] (read from a checkpoint's shapes by `checkpoint::detect_config`) and the
//!   neck has as many channels as the prompt embedding.
//!
//! Weight names are the official ones (`patch_embed.seq.0.c.weight`, `layers.1.blocks.0.attn.
//! attention_biases`, `neck.0.weight`, …). BatchNorm runs in inference mode (running
//! statistics). Like the official model after `.eval()`, each attention layer adds the
//! checkpoint's `attention_biases` (see `scripts/sam_fixtures_vit_t.py` for the official
//! code's trap there).
use candle_core::{DType, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use super::linear::TokenLinear;
use super::neck::Neck;
use super::EMBED_SIZE;
use crate::ops::{Epilogue, WindowAttention};

/// TinyViT's sizes, as the official constructor takes them (`layers.0` is convolutional:
/// its `num_heads` / `window_sizes` entries are unused and stored as 0, as are those of a
/// layer without blocks, since a checkpoint does not record them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyVitConfig {
    pub embed_dims: Vec<usize>,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_sizes: Vec<usize>,
    /// Hidden width of the MLPs over the embedding width (4).
    pub mlp_ratio: usize,
    /// Hidden width of the MBConv blocks over their width (4).
    pub mbconv_expand_ratio: usize,
    /// Kernel of the two patch-embedding convolutions: 3 (stride 2 each, MobileSAM: the
    /// image shrinks 4x) or 1 (stride 1, LiteMedSAM's `tiny_vit_sam.py`: the 256 px input keeps
    /// its size, so layer 0 runs at 256x256 and the embedding is again 64x64).
    pub patch_embed_kernel: usize,
}

impl TinyVitConfig {
    /// MobileSAM's encoder (`build_sam_vit_t`: TinyViT-5M).
    pub fn mobile_sam() -> Self {
        Self {
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![0, 4, 5, 10],
            window_sizes: vec![0, 7, 14, 7],
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            patch_embed_kernel: 3,
        }
    }

    /// LiteMedSAM's encoder (`CVPR24_LiteMedSAM_infer.py`): TinyViT-5M's widths, depths and
    /// heads with a 1x1 patch embedding.
    pub fn lite_medsam() -> Self {
        Self {
            patch_embed_kernel: 1,
            ..Self::mobile_sam()
        }
    }

    /// How many times the patch embedding shrinks the image (4 or 1).
    fn patch_stride(&self) -> usize {
        if self.patch_embed_kernel == 1 {
            1
        } else {
            4
        }
    }

    /// Input side (in patches) of layer `i` for an `image_size` input, as the official
    /// constructor computes it.
    fn resolution(&self, image_size: usize, i: usize) -> usize {
        let shift = if i == 3 { i - 1 } else { i };
        (image_size / self.patch_stride()) >> shift
    }
}

/// `Conv2d_BN` in inference mode, the BatchNorm's running statistics folded into the
/// convolution: weight `w * g / sqrt(v + eps)`, bias `b - m * g / sqrt(v + eps)` (one pass over
/// the activations instead of two). Depthwise ones (`groups` = channels) run on
/// [`crate::ops::depthwise_conv2d`] instead of candle's one-convolution-per-group.
struct Conv2dBN {
    weight: Tensor,
    bias: Tensor,
    cfg: Conv2dConfig,
}

impl Conv2dBN {
    fn new(in_: usize, out: usize, ks: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Self> {
        let conv = candle_nn::conv2d_no_bias(in_, out, ks, cfg, vb.pp("c"))?;
        // the loads and initialisations of `candle_nn::batch_norm`
        let bn = vb.pp("bn");
        let gamma = bn.get_with_hints(out, "weight", candle_nn::Init::Const(1.))?;
        let beta = bn.get_with_hints(out, "bias", candle_nn::Init::Const(0.))?;
        let mean = bn.get_with_hints(out, "running_mean", candle_nn::Init::Const(0.))?;
        let var = bn.get_with_hints(out, "running_var", candle_nn::Init::Const(1.))?;
        let scale = (gamma / (var + 1e-5)?.sqrt()?)?; // [O]
        let weight = conv
            .weight()
            .broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?
            .contiguous()?;
        let bias = (beta - (mean * &scale)?)?;
        Ok(Self { weight, bias, cfg })
    }
}

impl Conv2dBN {
    /// `epilogue(conv(xs))`, the epilogue fused into the convolution's output tiles.
    fn forward_with(&self, xs: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let c = &self.cfg;
        let (w, b) = (&self.weight, &self.bias);
        let out = w.dim(0)?;
        if c.groups > 1 && c.groups == out && w.dim(1)? == 1 && c.dilation == 1 {
            return crate::ops::depthwise_conv2d(xs, w, b, c.stride, c.padding, epilogue);
        }
        if c.groups == 1 && c.dilation == 1 {
            // the 1x1s: gemm on the image in place, onto the bias; the patch embedding's
            // stride-2 3x3s: im2col tiles
            return crate::ops::conv2d_bias(xs, w, b, (c.padding, c.stride), epilogue);
        }
        let y = xs
            .conv2d(w, c.padding, c.stride, c.dilation, c.groups)?
            .broadcast_add(&b.reshape((1, out, 1, 1))?)?;
        epilogue.apply_tensor(y)
    }

    /// `gelu(conv(xs))`
    fn gelu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Epilogue::Gelu)
    }
}

impl Module for Conv2dBN {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Epilogue::None)
    }
}

fn conv_cfg(padding: usize, stride: usize, groups: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        groups,
        ..Default::default()
    }
}

struct PatchEmbed {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
}

impl PatchEmbed {
    /// `kernel` 3: stride 2, padding 1 (MobileSAM); 1: stride 1, no padding (LiteMedSAM).
    fn new(embed_dim: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = if kernel == 1 {
            conv_cfg(0, 1, 1)
        } else {
            conv_cfg(1, 2, 1)
        };
        Ok(Self {
            conv1: Conv2dBN::new(3, embed_dim / 2, kernel, cfg, vb.pp("seq.0"))?,
            conv2: Conv2dBN::new(embed_dim / 2, embed_dim, kernel, cfg, vb.pp("seq.2"))?,
        })
    }
}

impl Module for PatchEmbed {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv2.forward(&self.conv1.gelu(xs)?)
    }
}

struct MBConv {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
    conv3: Conv2dBN,
}

impl MBConv {
    fn new(dim: usize, expand_ratio: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = dim * expand_ratio;
        Ok(Self {
            conv1: Conv2dBN::new(dim, hidden, 1, conv_cfg(0, 1, 1), vb.pp("conv1"))?,
            conv2: Conv2dBN::new(hidden, hidden, 3, conv_cfg(1, 1, hidden), vb.pp("conv2"))?,
            conv3: Conv2dBN::new(hidden, dim, 1, conv_cfg(0, 1, 1), vb.pp("conv3"))?,
        })
    }
}

impl Module for MBConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // gelu(conv3(gelu(conv2(gelu(conv1(x))))) + x), each GELU and the residual fused
        let ys = self.conv2.gelu(&self.conv1.gelu(xs)?)?;
        self.conv3.forward_with(&ys, Epilogue::AddGelu(xs))
    }
}

/// `[B, L, C]` tokens (or `[B, C, H, W]`) at `side` x `side` -> `[B, L', out]` tokens.
struct PatchMerging {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
    conv3: Conv2dBN,
    side: usize,
}

impl PatchMerging {
    fn new(side: usize, dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        // the official rule: these widths keep the grid (MobileSAM's last stage stays 64x64)
        let stride = if [320, 448, 576].contains(&out) { 1 } else { 2 };
        Ok(Self {
            conv1: Conv2dBN::new(dim, out, 1, conv_cfg(0, 1, 1), vb.pp("conv1"))?,
            conv2: Conv2dBN::new(out, out, 3, conv_cfg(1, stride, out), vb.pp("conv2"))?,
            conv3: Conv2dBN::new(out, out, 1, conv_cfg(0, 1, 1), vb.pp("conv3"))?,
            side,
        })
    }
}

impl Module for PatchMerging {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = if xs.rank() == 3 {
            let b = xs.dim(0)?;
            xs.reshape((b, self.side, self.side, ()))?
                .permute((0, 3, 1, 2))?
        } else {
            xs.clone()
        };
        let xs = self.conv2.gelu(&self.conv1.gelu(&xs)?)?;
        xs.apply(&self.conv3)?.flatten_from(2)?.transpose(1, 2)
    }
}

struct Mlp {
    norm: LayerNorm,
    fc1: TokenLinear,
    fc2: TokenLinear,
}

impl Mlp {
    /// `xs + mlp(xs)`: the block's residual update, the GELU and the residual fused.
    fn residual(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self
            .fc1
            .forward_with(&xs.apply(&self.norm)?, Epilogue::Gelu)?;
        self.fc2.forward_with(&hidden, Epilogue::Add(xs))
    }
}

/// Window attention with learned relative-position biases (`attn_ratio` 1 in TinyViT blocks).
struct Attention {
    norm: LayerNorm,
    qkv: TokenLinear,
    proj: TokenLinear,
    /// `attention_biases[:, idxs]`: `[heads, N, N]`.
    ab: Tensor,
    key_dim: usize,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, window: usize, vb: VarBuilder) -> Result<Self> {
        let key_dim = dim / num_heads;
        let dh = key_dim * num_heads;
        let norm = candle_nn::layer_norm(dim, 1e-5, vb.pp("norm"))?;
        let qkv = TokenLinear::new(dim, 3 * dh, vb.pp("qkv"))?;
        let proj = TokenLinear::new(dh, dim, vb.pp("proj"))?;
        // offsets (|dx|, |dy|) numbered in order of first appearance, as the official code does
        let points: Vec<(i64, i64)> = (0..window as i64)
            .flat_map(|x| (0..window as i64).map(move |y| (x, y)))
            .collect();
        let mut offsets: Vec<(i64, i64)> = Vec::new();
        let mut idxs = Vec::with_capacity(points.len() * points.len());
        for &(x1, y1) in &points {
            for &(x2, y2) in &points {
                let off = ((x1 - x2).abs(), (y1 - y2).abs());
                let i = match offsets.iter().position(|o| *o == off) {
                    Some(i) => i,
                    None => {
                        offsets.push(off);
                        offsets.len() - 1
                    }
                };
                idxs.push(i as u32);
            }
        }
        let biases = vb.get((num_heads, offsets.len()), "attention_biases")?;
        let idxs = Tensor::new(idxs, biases.device())?;
        let n = points.len();
        let ab = biases.index_select(&idxs, 1)?.reshape((num_heads, n, n))?;
        Ok(Self {
            norm,
            qkv,
            proj,
            ab,
            key_dim,
            num_heads,
            scale: 1.0 / (key_dim as f64).sqrt(),
        })
    }

    /// The fused CPU kernel's constants for a `side` x `side` grid in `window` tiles.
    fn fused(&self, side: usize, window: usize) -> Result<WindowAttention> {
        // a padding token is zero: its qkv row is qkv(norm(0)), the same everywhere
        let dim = self.norm.weight().dim(0)?;
        let zero = Tensor::zeros((1, dim), self.ab.dtype(), self.ab.device())?;
        let pad_qkv = self.qkv.forward(&zero.apply(&self.norm)?)?;
        Ok(WindowAttention {
            side,
            window,
            heads: self.num_heads,
            key_dim: self.key_dim,
            scale: self.scale as f32,
            bias: self.ab.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            pad_qkv: pad_qkv.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let qkv = self
            .qkv
            .forward_with(&xs.apply(&self.norm)?, Epilogue::None)?
            .reshape((b, n, self.num_heads, ()))?;
        let part = |start: usize| {
            qkv.narrow(D::Minus1, start, self.key_dim)?
                .permute((0, 2, 1, 3))?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(self.key_dim)?, part(2 * self.key_dim)?);
        let attn = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.ab)?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let ys = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, ()))?;
        self.proj.forward_with(&ys, Epilogue::None)
    }
}

struct TinyViTBlock {
    attn: Attention,
    fused: WindowAttention,
    local_conv: Conv2dBN,
    mlp: Mlp,
    window: usize,
    side: usize,
}

impl TinyViTBlock {
    fn new(
        dim: usize,
        side: usize,
        heads: usize,
        window: usize,
        mlp_ratio: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb_m = vb.pp("mlp");
        let hidden = dim * mlp_ratio;
        let mlp = Mlp {
            norm: candle_nn::layer_norm(dim, 1e-5, vb_m.pp("norm"))?,
            fc1: TokenLinear::new(dim, hidden, vb_m.pp("fc1"))?,
            fc2: TokenLinear::new(hidden, dim, vb_m.pp("fc2"))?,
        };
        let attn = Attention::new(dim, heads, window, vb.pp("attn"))?;
        Ok(Self {
            fused: attn.fused(side, window)?,
            attn,
            local_conv: Conv2dBN::new(dim, dim, 3, conv_cfg(1, 1, dim), vb.pp("local_conv"))?,
            mlp,
            window,
            side,
        })
    }

    /// Attention in `window` x `window` tiles of the zero-padded `side` x `side` grid.
    fn windowed(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        let (s, ws) = (self.side, self.window);
        if s == ws {
            return self.attn.forward(xs);
        }
        let pad = (ws - s % ws) % ws;
        let mut x = xs.reshape((b, s, s, c))?;
        if pad > 0 {
            x = x.pad_with_zeros(1, 0, pad)?.pad_with_zeros(2, 0, pad)?;
        }
        let p = s + pad;
        let n = p / ws;
        let x =
            x.reshape((b, n, ws, n, ws, c))?
                .transpose(2, 3)?
                .reshape((b * n * n, ws * ws, c))?;
        let x = self
            .attn
            .forward(&x)?
            .reshape((b, n, n, ws, ws, c))?
            .transpose(2, 3)?
            .reshape((b, p, p, c))?;
        let x = if pad > 0 {
            x.i((.., ..s, ..s, ..))?.contiguous()?
        } else {
            x
        };
        x.reshape((b, l, c))
    }
}

impl TinyViTBlock {
    /// `xs + attention(xs)`, windowed. On the CPU one fused kernel between the projections
    /// (`ops::WindowAttention`), the residual fused into the output projection; elsewhere the
    /// official sequence of candle ops ([`Self::windowed`]).
    fn attention_residual(&self, xs: &Tensor) -> Result<Tensor> {
        if crate::ops::fast(xs) && xs.dtype() == DType::F32 {
            let a = &self.attn;
            let qkv = a.qkv.forward_with(&xs.apply(&a.norm)?, Epilogue::None)?;
            let heads = self.fused.forward(&qkv)?;
            return a.proj.forward_with(&heads, Epilogue::Add(xs));
        }
        self.windowed(xs)? + xs
    }
}

impl Module for TinyViTBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let xs = self.attention_residual(&xs)?;
        // the depthwise local convolution on the tokens in place (no transposes)
        let lc = &self.local_conv;
        let xs =
            crate::ops::depthwise_tokens(&xs, self.side, &lc.weight, &lc.bias, lc.cfg.padding)?;
        self.mlp.residual(&xs)
    }
}

/// One stage: convolutional (`layers.0`) or attention blocks, then an optional PatchMerging.
struct Layer {
    blocks: Vec<Box<dyn Module + Send + Sync>>,
    downsample: Option<PatchMerging>,
}

impl Module for Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        match &self.downsample {
            Some(d) => d.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// The encoder: `[1, 3, 1024, 1024]` -> `[1, out_chans, 64, 64]`.
pub struct TinyViT {
    patch_embed: PatchEmbed,
    layers: Vec<Layer>,
    neck: Neck,
}

impl TinyViT {
    /// `out_chans`: the neck's channels (the prompt embedding's, 256 in MobileSAM);
    /// `image_size`: the input's side (1024, LiteMedSAM 256).
    pub fn new(
        cfg: &TinyVitConfig,
        out_chans: usize,
        image_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let n = cfg.embed_dims.len();
        let sizes_ok = n >= 2
            && [
                cfg.depths.len(),
                cfg.num_heads.len(),
                cfg.window_sizes.len(),
            ] == [n; 3];
        if !sizes_ok {
            candle_core::bail!("TinyViT config with inconsistent lengths: {cfg:?}");
        }
        let patch_embed = PatchEmbed::new(
            cfg.embed_dims[0],
            cfg.patch_embed_kernel,
            vb.pp("patch_embed"),
        )?;
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let vb_l = vb.pp(format!("layers.{i}"));
            let (dim, side) = (cfg.embed_dims[i], cfg.resolution(image_size, i));
            let blocks = (0..cfg.depths[i])
                .map(|j| -> Result<Box<dyn Module + Send + Sync>> {
                    let vb_b = vb_l.pp(format!("blocks.{j}"));
                    Ok(if i == 0 {
                        Box::new(MBConv::new(dim, cfg.mbconv_expand_ratio, vb_b)?)
                    } else {
                        let (heads, window) = (cfg.num_heads[i], cfg.window_sizes[i]);
                        Box::new(TinyViTBlock::new(
                            dim,
                            side,
                            heads,
                            window,
                            cfg.mlp_ratio,
                            vb_b,
                        )?)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < n {
                let out = cfg.embed_dims[i + 1];
                Some(PatchMerging::new(side, dim, out, vb_l.pp("downsample"))?)
            } else {
                None
            };
            layers.push(Layer { blocks, downsample });
        }
        let last = cfg.embed_dims[n - 1];
        Ok(Self {
            patch_embed,
            layers,
            neck: Neck::new(last, out_chans, vb.pp("neck"))?,
        })
    }
}

impl Module for TinyViT {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.patch_embed.forward(xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        let (b, _, c) = xs.dims3()?;
        self.neck
            .forward(&xs.reshape((b, EMBED_SIZE, EMBED_SIZE, c))?)
    }
}

#[cfg(test)]
#[path = "tiny_vit_tests.rs"]
mod tests;
