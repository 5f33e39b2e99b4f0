//! SAM's mask decoder, keys as the official `mask_decoder.*` (candle-transformers' fixes the
//! transformer's sizes and uses the tanh GELU in the output upscaling where the official code
//! uses the exact one). Channels last from the image embedding to the masks.
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};

use super::two_way::TwoWayTransformer;

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
    /// `output_upscaling.1`, a `LayerNorm2d` over the channels: `(weight, bias)`, each `[C/4]`.
    upscale_ln: (Tensor, Tensor),
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
            upscale_ln: (
                vb_u.pp("1").get(dim / 4, "weight")?,
                vb_u.pp("1").get(dim / 4, "bias")?,
            ),
            upscale_conv2: candle_nn::conv_transpose2d(dim / 4, dim / 8, 2, up, vb_u.pp("3"))?,
            hypernetworks,
            iou_head: Mlp::new(
                &[dim, hidden, hidden, num_mask_tokens],
                vb.pp("iou_prediction_head"),
            )?,
        })
    }

    /// image embedding `[1, C, 64, 64]`, image_pe channels last `[1, 64 * 64, C]`
    /// ([`super::PromptEncoder::dense_pe_rows`]), sparse prompts `[B, N, C]`,
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

        // the image tokens channels last, plus the dense prompt: [B, HW, C]
        let (_, _, h, w) = image_embeddings.dims4()?;
        let image = image_embeddings.flatten_from(2)?.transpose(1, 2)?; // [1, HW, C]
        let dense = dense.flatten_from(2)?.transpose(1, 2)?; // [B, HW, C]
        let src = image.broadcast_add(&dense)?.contiguous()?;
        let (hs, src) = self.transformer.forward(&src, image_pe, &tokens)?; // [B, T, C], [B, HW, C]
        let iou_token_out = hs.i((.., 0))?; // [B, C]
        let mask_tokens_out = hs.i((.., 1..1 + self.num_mask_tokens))?; // [B, 4, C]

        let hyper_in = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&mask_tokens_out.i((.., i))?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?; // [B, 4, C/8]
        let masks = self.upscale_and_mask(&src, &hyper_in, (h, w))?; // [B, 4, 4H, 4W]
        let iou = self.iou_head.forward(&iou_token_out)?; // [B, 4]
        Ok((masks, iou))
    }
}

/// `ConvTranspose2d(kernel 2, stride 2, no padding)` on channels-last rows as one matmul: the
/// 2x2 output blocks do not overlap, so `out[(p, u, v), o] = bias[o] + sum_c x[p, c] w[c, o, u, v]`.
/// `[N, C] -> [N, 4, O]`: each input pixel's four output pixels (u, v) with their channels
/// last. candle's CPU `conv_transpose2d` took ~225 ms for the two upscaling layers.
fn conv_transpose_2x2_rows(rows: &Tensor, conv: &ConvTranspose2d) -> Result<Tensor> {
    let (n, c) = rows.dims2()?;
    let weight = conv.weight(); // [C, O, 2, 2]
    let o = weight.dim(1)?;
    let y = rows.matmul(&weight.reshape((c, o * 4))?)?; // [N, O*2*2]
    let y = y.reshape((n, o, 4))?.transpose(1, 2)?.contiguous()?; // [N, 4, O]
    match conv.bias() {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

impl MaskDecoder {
    /// `output_upscaling` and the hypernetwork product, channels-last throughout: the
    /// transformer's image tokens `[B, HW, C]` and `hyper_in` `[B, M, C/8]` -> masks
    /// `[B, M, 4H, 4W]`. The LayerNorm2d over channels becomes a last-axis layer norm and the
    /// pixels are put in raster order once, on the M mask planes instead of the C/8 channels.
    fn upscale_and_mask(
        &self,
        tokens: &Tensor,
        hyper_in: &Tensor,
        (h, w): (usize, usize),
    ) -> Result<Tensor> {
        let (b, hw, c) = tokens.dims3()?;
        let m = hyper_in.dim(1)?;
        let rows = tokens.contiguous()?.reshape((b * hw, c))?; // [BHW, C]
        let up = conv_transpose_2x2_rows(&rows, &self.upscale_conv1)?; // [BHW, 4, C/4]
        let (ln_w, ln_b) = &self.upscale_ln;
        let up = crate::ops::gelu_erf(&candle_nn::ops::layer_norm(&up, ln_w, ln_b, 1e-6)?)?;
        let c4 = up.dim(2)?;
        let up = crate::ops::gelu_erf(&conv_transpose_2x2_rows(
            &up.reshape((b * hw * 4, c4))?,
            &self.upscale_conv2,
        )?)?; // [BHW*4, 4, C/8]; pixel order (b, h, w, u1, v1, u2, v2)
        let c8 = up.dim(2)?;
        // [B, P, C/8] -> masks [B, M, P], then pixel (h, w, u1, v1, u2, v2) goes to
        // (4h + 2 u1 + u2, 4w + 2 v1 + v2)
        let up = up.reshape((b, hw * 16, c8))?;
        let masks = hyper_in.matmul(&up.t()?)?;
        masks
            .reshape(vec![b, m, h, w, 2, 2, 2, 2])?
            .permute(vec![0, 1, 2, 4, 6, 3, 5, 7])?
            .reshape((b, m, 4 * h, 4 * w))
    }
}
