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

/// The image side of the first two-way layer for one embedding and one dense prompt that is
/// the same at every position (no mask input): the image tokens channels last plus the dense
/// prompt, and that plus the positional encoding. Every click on an image without a mask
/// input starts from the same two `[1, HW, C]` tensors.
#[derive(Debug)]
struct ImageSide {
    embedding: candle_core::TensorId,
    /// The dense prompt's value per channel.
    dense: Vec<f32>,
    src: Tensor,
    src_pe: Tensor,
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
    /// The last [`ImageSide`] (one image is clicked many times in a row).
    image_side: std::sync::Mutex<Option<ImageSide>>,
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
            image_side: std::sync::Mutex::new(None),
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
        let (start, len) = if multimask {
            (1, self.num_mask_tokens - 1)
        } else {
            (0, 1)
        };
        self.predict_masks(
            image_embeddings,
            image_pe,
            sparse,
            dense,
            start..start + len,
        )
    }

    /// `src` = the image tokens channels last + the dense prompt `[B, HW, C]`, and `src + pe`
    /// when it comes from the cache (one prompt without a mask input, the image of the last
    /// call).
    fn image_side(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        dense: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let uniform = dense.dim(0)? == 1 && dense.stride()[2..] == [0, 0];
        if !uniform {
            // [1, C, H, W] + [B, C, H, W] -> [B, HW, C]
            return Ok((crate::ops::add_to_rows(image_embeddings, dense)?, None));
        }
        let per_channel: Vec<f32> = dense
            .i((0, .., 0, 0))?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let mut cache = self.image_side.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(side) = cache.as_ref() {
            if side.embedding == image_embeddings.id() && side.dense == per_channel {
                return Ok((side.src.clone(), Some(side.src_pe.clone())));
            }
        }
        let src = crate::ops::add_to_rows(image_embeddings, dense)?;
        let src_pe = (&src + image_pe)?;
        *cache = Some(ImageSide {
            embedding: image_embeddings.id(),
            dense: per_channel,
            src: src.clone(),
            src_pe: src_pe.clone(),
        });
        Ok((src, Some(src_pe)))
    }

    /// The masks and IoU predictions of the mask tokens `masks` (1..4: multimask, 0..1 single).
    fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        masks: std::ops::Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let bs = sparse.dim(0)?;
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?; // [5, C]
        let (t, c) = output_tokens.dims2()?;
        let output_tokens = output_tokens.unsqueeze(0)?.broadcast_as((bs, t, c))?;
        let tokens = Tensor::cat(&[&output_tokens, sparse], 1)?; // [B, 5 + N, C]

        let (_, _, h, w) = image_embeddings.dims4()?;
        let (src, src_pe) = self.image_side(image_embeddings, image_pe, dense)?; // [B, HW, C]
        let (hs, src) = self
            .transformer
            .forward(&src, image_pe, src_pe.as_ref(), &tokens)?; // [B, T, C], [B, HW, C]
        let iou_token_out = hs.i((.., 0))?; // [B, C]

        // only the hypernetworks of the masks asked for
        let hyper_in = masks
            .clone()
            .map(|i| self.hypernetworks[i].forward(&hs.i((.., 1 + i))?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?; // [B, M, C/8]
        let low = self.output_upscaling.masks(&src, &hyper_in, (h, w))?; // [B, M, 4H, 4W]
        let iou = self.iou_head.forward(&iou_token_out)?; // [B, 4]
        let iou = iou.narrow(1, masks.start, masks.len())?;
        Ok((low, iou))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{DType, Device};

    /// A mask decoder of vit_t's sizes with random weights (every tensor: the builder leaves
    /// those it reads with `get` at zero).
    fn random_decoder() -> MaskDecoder {
        let dev = Device::Cpu;
        let cfg = Config::of_variant(super::super::Variant::VitT);
        let varmap = candle_nn::VarMap::new();
        MaskDecoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        for var in varmap.data().lock().unwrap().values() {
            let fan_in = var.dims().iter().skip(1).product::<usize>().max(1);
            let std = (1.0 / fan_in as f32).sqrt();
            var.set(&(Tensor::randn(0f32, std, var.dims(), &dev).unwrap()))
                .unwrap();
        }
        let tensors = crate::models::plain_tensors(&varmap);
        MaskDecoder::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap()
    }

    #[test]
    fn the_cached_image_side_never_serves_another_image_or_dense_prompt() -> Result<()> {
        let dev = Device::Cpu;
        let dec = random_decoder();
        let c = 256;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1f32, shape, &dev);
        let (e1, e2) = (randn(&[1, c, 64, 64])?, randn(&[1, c, 64, 64])?);
        let pe = randn(&[1, 64 * 64, c])?;
        let sparse = randn(&[1, 3, c])?;
        // "no mask": one value per channel, broadcast over the grid (as the prompt encoder)
        let no_mask = |seed: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..c).map(|i| (i as f32 * seed).sin()).collect();
            Tensor::from_vec(v, (1, c, 1, 1), &dev)?.broadcast_as((1, c, 64, 64))
        };
        let (d1, d2) = (no_mask(0.37)?, no_mask(0.11)?);
        // a materialised dense prompt bypasses the cache; the composed ops of other devices
        let uncached = |e: &Tensor, d: &Tensor| -> Result<(Tensor, Tensor)> {
            let _g = crate::ops::force_generic();
            random_decoder_forward(&dec, e, &pe, &sparse, &d.contiguous()?)
        };
        for (e, d) in [(&e1, &d1), (&e1, &d1), (&e2, &d1), (&e1, &d1), (&e1, &d2)] {
            let (masks, iou) = random_decoder_forward(&dec, e, &pe, &sparse, d)?;
            let (want_masks, want_iou) = uncached(e, d)?;
            assert_eq!(masks.dims(), &[1, 3, 256, 256]);
            let scale = f64::from(want_masks.abs()?.max_all()?.to_scalar::<f32>()?).max(1.0);
            let d = max_abs_diff(&masks, &want_masks);
            assert!(d < 1e-5 * scale, "masks {d} of {scale}");
            assert!(max_abs_diff(&iou, &want_iou) < 1e-4);
        }
        Ok(())
    }

    fn random_decoder_forward(
        dec: &MaskDecoder,
        e: &Tensor,
        pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        dec.forward(e, pe, sparse, dense, true)
    }
}
