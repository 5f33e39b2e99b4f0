//! SAM's mask decoder, keys as the official `mask_decoder.*` (candle-transformers' fixes the
//! transformer's sizes and uses the tanh GELU in the output upscaling where the official code
//! uses the exact one). Channels last from the image embedding to the masks.
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::TokenLinear as Linear;
use super::two_way::TwoWayTransformer;
use super::upscaling::Upscaling;

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
            .map(|(i, d)| Linear::new(d[0], d[1], vb.pp(format!("layers.{i}"))))
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
    output_upscaling: Upscaling,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
}

impl MaskDecoder {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let num_mask_tokens = 4;
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
            output_upscaling: Upscaling::new(dim, vb.pp("output_upscaling"))?,
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
        // [1, C, H, W] + [B, C, H, W] -> [B, HW, C]
        let src = crate::ops::add_to_rows(image_embeddings, dense)?;
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
        let masks = self.output_upscaling.masks(&src, &hyper_in, (h, w))?; // [B, 4, 4H, 4W]
        let iou = self.iou_head.forward(&iou_token_out)?; // [B, 4]
        Ok((masks, iou))
    }
}
