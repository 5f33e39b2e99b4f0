//! SAM's prompt encoder (points, boxes, dense mask input), keys as the official
//! `prompt_encoder.*`. Coordinates are in the 1024-square input space (`point_in_input`).
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use candle_transformers::models::segment_anything::LayerNorm2d;

use super::EMBED_SIZE;

/// `PromptEncoder` of the official code (`PositionEmbeddingRandom` included).
#[derive(Debug)]
pub struct PromptEncoder {
    embed_dim: usize,
    /// `input_image_size` (square): 1024, LiteMedSAM 256.
    image_size: usize,
    /// `[2, C / 2]`
    pe_gaussian: Tensor,
    /// 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right; each `[1, C]`.
    point_embeddings: Vec<Tensor>,
    not_a_point_embed: Tensor,
    no_mask_embed: Tensor,
    mask_conv1: Conv2d,
    mask_ln1: LayerNorm2d,
    mask_conv2: Conv2d,
    mask_ln2: LayerNorm2d,
    mask_conv3: Conv2d,
    /// `dense_pe` of the embedding grid, computed once at load: `[1, C, 64, 64]` contiguous.
    dense_pe: Tensor,
    /// The same channels last, as the decoder's transformer reads it: `[1, 64 * 64, C]`.
    dense_pe_rows: Tensor,
}

impl PromptEncoder {
    pub fn new(
        embed_dim: usize,
        mask_in_chans: usize,
        image_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let pe_gaussian = vb.get(
            (2, embed_dim / 2),
            "pe_layer.positional_encoding_gaussian_matrix",
        )?;
        let point_embeddings = (0..4)
            .map(|i| vb.get((1, embed_dim), &format!("point_embeddings.{i}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let down = vb.pp("mask_downscaling");
        let k2 = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let quarter = mask_in_chans / 4;
        let dense_pe = dense_pe_of(&pe_gaussian)?;
        let dense_pe_rows = dense_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        Ok(Self {
            embed_dim,
            image_size,
            dense_pe,
            dense_pe_rows,
            pe_gaussian,
            point_embeddings,
            not_a_point_embed: vb.get((1, embed_dim), "not_a_point_embed.weight")?,
            no_mask_embed: vb.get((1, embed_dim), "no_mask_embed.weight")?,
            mask_conv1: candle_nn::conv2d(1, quarter, 2, k2, down.pp("0"))?,
            mask_ln1: LayerNorm2d::new(quarter, 1e-6, down.pp("1"))?,
            mask_conv2: candle_nn::conv2d(quarter, mask_in_chans, 2, k2, down.pp("3"))?,
            mask_ln2: LayerNorm2d::new(mask_in_chans, 1e-6, down.pp("4"))?,
            mask_conv3: candle_nn::conv2d(
                mask_in_chans,
                embed_dim,
                1,
                Default::default(),
                down.pp("6"),
            )?,
        })
    }

    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Random Fourier features of coordinates normalised to `[0, 1]`: `[.., 2] -> [.., C]`.
    fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        pe_encoding(&self.pe_gaussian, coords)
    }

    /// Dense positional encoding of the embedding grid: `[1, C, 64, 64]` (cached; the same for
    /// every prompt).
    pub fn dense_pe(&self) -> &Tensor {
        &self.dense_pe
    }

    /// [`Self::dense_pe`] channels last: `[1, 64 * 64, C]` (cached).
    pub fn dense_pe_rows(&self) -> &Tensor {
        &self.dense_pe_rows
    }

    /// `[B, N, 2]` pixel coordinates in the input square -> `[B, N, C]` position encodings.
    fn pe_of_pixels(&self, coords: &Tensor) -> Result<Tensor> {
        let coords = (coords + 0.5)?; // the centre of the pixel
        let coords = (coords / self.image_size as f64)?; // input_image_size is square
        self.pe_encoding(&coords)
    }

    /// Points `[B, N, 2]` with labels `[B, N]` (1 foreground, 0 background, -1 padding).
    /// `pad` appends a padding point (the official code pads when there is no box).
    /// -> `[B, N (+1), C]`
    pub fn embed_points(&self, coords: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        let (b, _, _) = coords.dims3()?;
        let (coords, labels) = if pad {
            let dev = coords.device();
            (
                Tensor::cat(&[coords, &Tensor::zeros((b, 1, 2), DType::F32, dev)?], 1)?,
                Tensor::cat(&[labels, &Tensor::full(-1f32, (b, 1), dev)?], 1)?,
            )
        } else {
            (coords.clone(), labels.clone())
        };
        let pe = self.pe_of_pixels(&coords)?;
        let is = |v: f64| -> Result<Tensor> { labels.eq(v)?.to_dtype(DType::F32)?.unsqueeze(2) };
        let (pad_m, neg_m, pos_m) = (is(-1.0)?, is(0.0)?, is(1.0)?); // [B, N, 1]
                                                                     // point_embedding[labels == -1] = 0; then += the embedding of the label
        let pe = pe.broadcast_mul(&(1.0 - &pad_m)?)?;
        let pe = (pe + pad_m.broadcast_mul(&self.not_a_point_embed)?)?;
        let pe = (pe + neg_m.broadcast_mul(&self.point_embeddings[0])?)?;
        pe + pos_m.broadcast_mul(&self.point_embeddings[1])?
    }

    /// Boxes `[B, 4]` (x0, y0, x1, y1 in the input square) -> corner tokens `[B, 2, C]`.
    pub fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        let b = boxes.dim(0)?;
        let pe = self.pe_of_pixels(&boxes.reshape((b, 2, 2))?)?;
        let corners = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0)?;
        pe.broadcast_add(&corners.unsqueeze(0)?) // [B, 2, C]
    }

    /// Low-resolution mask logits `[B, 1, 256, 256]` -> dense embedding `[B, C, 64, 64]`.
    pub fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        masks
            .apply(&self.mask_conv1)? // [B, c/4, 128, 128]
            .apply(&self.mask_ln1)?
            .gelu_erf()?
            .apply(&self.mask_conv2)? // [B, c, 64, 64]
            .apply(&self.mask_ln2)?
            .gelu_erf()?
            .apply(&self.mask_conv3) // [B, C, 64, 64]
    }

    /// The official `forward`: sparse `[B, N, C]` and dense `[B, C, 64, 64]` embeddings.
    /// `points` = (coords `[B, N, 2]`, labels `[B, N]` as f32); `boxes` `[B, 4]`;
    /// `masks` `[B, 1, 256, 256]`. `batch` is used when all three are absent.
    pub fn forward(
        &self,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
        batch: usize,
    ) -> Result<(Tensor, Tensor)> {
        let dev = self.pe_gaussian.device();
        let bs = match (points, boxes, masks) {
            (Some((c, _)), _, _) => c.dim(0)?,
            (None, Some(b), _) => b.dim(0)?,
            (None, None, Some(m)) => m.dim(0)?,
            (None, None, None) => batch,
        };
        let mut sparse = Vec::new();
        if let Some((coords, labels)) = points {
            sparse.push(self.embed_points(coords, labels, boxes.is_none())?);
        }
        if let Some(boxes) = boxes {
            sparse.push(self.embed_boxes(boxes)?);
        }
        let sparse = if sparse.is_empty() {
            Tensor::zeros((bs, 0, self.embed_dim), DType::F32, dev)?
        } else {
            Tensor::cat(&sparse, 1)?
        };
        let dense = match masks {
            Some(m) => self.embed_masks(m)?,
            // a broadcast view: the decoder reads it per channel (`ops::add_to_rows`)
            None => self
                .no_mask_embed
                .reshape((1, self.embed_dim, 1, 1))?
                .broadcast_as((bs, self.embed_dim, EMBED_SIZE, EMBED_SIZE))?,
        };
        Ok((sparse, dense))
    }
}

/// Random Fourier features (`PositionEmbeddingRandom._pe_encoding`) of coordinates normalised to
/// `[0, 1]`: `[.., 2] -> [.., C]`.
fn pe_encoding(gaussian: &Tensor, coords: &Tensor) -> Result<Tensor> {
    let coords = coords.affine(2.0, -1.0)?;
    let coords = coords.broadcast_matmul(gaussian)?;
    let coords = coords.affine(2.0 * std::f64::consts::PI, 0.0)?;
    Tensor::cat(&[coords.sin()?, coords.cos()?], D::Minus1)
}

/// `PositionEmbeddingRandom.forward((64, 64))`: `[1, C, 64, 64]`.
fn dense_pe_of(gaussian: &Tensor) -> Result<Tensor> {
    let dev = gaussian.device();
    let n = EMBED_SIZE;
    // cell centres (i + 0.5) / n, as cumsum(ones) - 0.5 in the official code
    let centres: Vec<f32> = (0..n).map(|i| (i as f32 + 1.0 - 0.5) / n as f32).collect();
    let line = Tensor::from_vec(centres, n, dev)?;
    let x = line.reshape((1, n, 1))?.broadcast_as((n, n, 1))?;
    let y = line.reshape((n, 1, 1))?.broadcast_as((n, n, 1))?;
    let grid = Tensor::cat(&[x, y], 2)?; // [H, W, 2] as (x, y)
    let pe = pe_encoding(gaussian, &grid)?; // [H, W, C]
    pe.permute((2, 0, 1))?.unsqueeze(0)?.contiguous() // [1, C, H, W]
}
