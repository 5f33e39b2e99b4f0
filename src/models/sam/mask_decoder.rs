//! SAM's mask decoder, keys as the official `mask_decoder.*`. The two-way transformer is
//! candle-transformers'; the rest is ours because candle's decoder fixes the transformer's
//! sizes and uses the tanh GELU in the output upscaling (the official code: exact GELU).
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};
use candle_transformers::models::segment_anything::{transformer::TwoWayTransformer, LayerNorm2d};

use super::Config;

/// The official `MLP` (ReLU between layers, no output activation).
#[derive(Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(dims: &[usize], vb: VarBuilder) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| candle_nn::linear(d[0], d[1], vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i + 1 < self.layers.len() {
                xs = xs.relu()?;
            }
        }
        Ok(xs)
    }
}

/// `MaskDecoder` of the official code (3 multimask outputs + 1 single-mask output).
#[derive(Debug)]
pub struct MaskDecoder {
    iou_token: Tensor,
    mask_tokens: Tensor,
    num_mask_tokens: usize,
    transformer: TwoWayTransformer,
    upscale_conv1: ConvTranspose2d,
    upscale_ln: LayerNorm2d,
    upscale_conv2: ConvTranspose2d,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
}

impl MaskDecoder {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let num_mask_tokens = 4;
        let up = ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        let vb_u = vb.pp("output_upscaling");
        let hypernetworks = (0..num_mask_tokens)
            .map(|i| {
                Mlp::new(
                    &[dim, dim, dim, dim / 8],
                    vb.pp(format!("output_hypernetworks_mlps.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let hidden = cfg.iou_head_hidden_dim;
        Ok(Self {
            iou_token: vb.get((1, dim), "iou_token.weight")?,
            mask_tokens: vb.get((num_mask_tokens, dim), "mask_tokens.weight")?,
            num_mask_tokens,
            transformer: TwoWayTransformer::new(
                2,
                dim,
                cfg.decoder_num_heads,
                cfg.decoder_mlp_dim,
                vb.pp("transformer"),
            )?,
            upscale_conv1: candle_nn::conv_transpose2d(dim, dim / 4, 2, up, vb_u.pp("0"))?,
            upscale_ln: LayerNorm2d::new(dim / 4, 1e-6, vb_u.pp("1"))?,
            upscale_conv2: candle_nn::conv_transpose2d(dim / 4, dim / 8, 2, up, vb_u.pp("3"))?,
            hypernetworks,
            iou_head: Mlp::new(
                &[dim, hidden, hidden, num_mask_tokens],
                vb.pp("iou_prediction_head"),
            )?,
        })
    }

    /// image embedding `[1, C, 64, 64]`, image_pe `[1, C, 64, 64]`, sparse prompts `[B, N, C]`,
    /// dense prompts `[B, C, 64, 64]` -> (low-res logits `[B, M, 256, 256]`, IoU `[B, M]`)
    /// with M = 3 (`multimask`) or 1.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (masks, iou) = self.predict_masks(image_embeddings, image_pe, sparse, dense)?;
        let (start, len) = if multimask {
            (1, self.num_mask_tokens - 1)
        } else {
            (0, 1)
        };
        Ok((masks.narrow(1, start, len)?, iou.narrow(1, start, len)?))
    }

    fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let bs = sparse.dim(0)?;
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?; // [5, C]
        let (t, c) = output_tokens.dims2()?;
        let output_tokens = output_tokens.unsqueeze(0)?.broadcast_as((bs, t, c))?;
        let tokens = Tensor::cat(&[&output_tokens, sparse], 1)?; // [B, 5 + N, C]

        // one copy of the image per prompt (repeat_interleave over a batch of one image)
        let (_, _, h, w) = image_embeddings.dims4()?;
        let src = image_embeddings
            .broadcast_as((bs, c, h, w))?
            .broadcast_add(dense)?; // [B, C, H, W]
        let pos_src = image_pe.broadcast_as((bs, c, h, w))?.contiguous()?;
        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens)?; // [B, T, C], [B, HW, C]
        let iou_token_out = hs.i((.., 0))?; // [B, C]
        let mask_tokens_out = hs.i((.., 1..1 + self.num_mask_tokens))?; // [B, 4, C]

        let src = src.transpose(1, 2)?.reshape((bs, c, h, w))?;
        let up = conv_transpose_2x2(&src, &self.upscale_conv1)? // [B, C/4, 2H, 2W]
            .apply(&self.upscale_ln)?
            .gelu_erf()?;
        let up = conv_transpose_2x2(&up, &self.upscale_conv2)? // [B, C/8, 4H, 4W]
            .gelu_erf()?;
        let hyper_in = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&mask_tokens_out.i((.., i))?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?; // [B, 4, C/8]
        let (b, c8, uh, uw) = up.dims4()?;
        let masks = hyper_in.matmul(&up.reshape((b, c8, uh * uw))?)?; // [B, 4, 4H*4W]
        let masks = masks.reshape((b, self.num_mask_tokens, uh, uw))?;
        let iou = self.iou_head.forward(&iou_token_out)?; // [B, 4]
        Ok((masks, iou))
    }
}

/// A `ConvTranspose2d(kernel 2, stride 2, no padding)` as one matmul: its 2x2 output blocks do
/// not overlap, so `out[b, o, 2i + u, 2j + v] = bias[o] + sum_c x[b, c, i, j] w[c, o, u, v]`.
/// Same values as candle's `conv_transpose2d` up to the order of summation (parity unchanged),
/// but a GEMM: candle's CPU kernel took ~225 ms for the two upscaling layers at the official
/// sizes, and the decoder per prompt went from ~388 to ~220 ms (`bench sam`, vit_t, busy 2-core
/// machine).
fn conv_transpose_2x2(x: &Tensor, conv: &ConvTranspose2d) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let weight = conv.weight(); // [C, O, 2, 2]
    let o = weight.dim(1)?;
    let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?; // [BHW, C]
    let y = rows.matmul(&weight.reshape((c, o * 4))?)?; // [BHW, O*2*2]
    let y = y
        .reshape((b, h, w, o, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))? // [B, O, H, 2, W, 2]
        .reshape((b, o, 2 * h, 2 * w))?;
    match conv.bias() {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}
