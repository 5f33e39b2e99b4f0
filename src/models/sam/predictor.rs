//! The `SamPredictor`-like API the mining loop and the GUI use: embed an image once
//! ([`SamPredictor::set_image`] returns a cacheable [`Embedding`]), then decode any number of
//! prompts against it ([`SamPredictor::predict`]). Coordinates are original-image pixels.
use candle_core::{DType, Tensor};
use image::RgbImage;

use super::preprocess::{input_from_image, normalize_pad, postprocess_mask, resize_longest_side};
use super::{Result, Sam, SamError, LOW_RES_SIZE};

/// An image embedding plus the sizes needed to map prompts and masks (`predictor.features`,
/// `original_size`, `input_size` of the official predictor). Cheap to clone; cacheable.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// `[1, C, 64, 64]`
    pub features: Tensor,
    /// (H, W) of the original image.
    pub original_size: (usize, usize),
    /// (h', w') of the resized image inside the 1024 square.
    pub input_size: (usize, usize),
}

/// One prompt, in original-image pixels (as the official `SamPredictor.predict`).
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    /// (x, y, label): label 1 foreground, 0 background.
    pub points: Vec<(f32, f32, u8)>,
    /// (x0, y0, x1, y1)
    pub bbox: Option<[f32; 4]>,
    /// Low-res logits `[1, 256, 256]` (or `[256, 256]`) from an earlier prediction.
    pub mask_input: Option<Tensor>,
}

/// The official predictor's outputs, for one prompt with M = 3 (multimask) or 1 masks.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// `[M, H, W]` logits at the original resolution (`return_logits=True`).
    pub logits: Tensor,
    /// `[M, H, W]` u8 masks (logits > 0), 0 or 1.
    pub masks: Tensor,
    /// `[M]` predicted IoU.
    pub iou_predictions: Vec<f32>,
    /// `[M, 256, 256]` low-resolution logits (a `mask_input` for the next click).
    pub low_res_logits: Tensor,
}

impl Prediction {
    /// Index of the mask with the highest predicted IoU.
    pub fn best(&self) -> usize {
        let mut best = 0;
        for (i, v) in self.iou_predictions.iter().enumerate() {
            if *v > self.iou_predictions[best] {
                best = i;
            }
        }
        best
    }
}

/// `SamPredictor` of the official code, with the embedding held by the caller.
pub struct SamPredictor {
    pub sam: Sam,
}

impl SamPredictor {
    pub fn new(sam: Sam) -> Self {
        Self { sam }
    }

    /// `[1, 3, 1024, 1024]` encoder input of an RGB image, and the resized size (h', w').
    pub fn preprocess(&self, image: &RgbImage) -> Result<(Tensor, (usize, usize))> {
        let resized = resize_longest_side(image);
        let size = (resized.height() as usize, resized.width() as usize);
        Ok((normalize_pad(&resized, self.sam.device())?, size))
    }

    /// Embeds an RGB image (the official `set_image` with `image_format="RGB"`).
    pub fn set_image(&self, image: &RgbImage) -> Result<Embedding> {
        let (input, input_size) = self.preprocess(image)?;
        let features = self.sam.embed(&input)?; // [1, C, 64, 64]
        Ok(Embedding {
            features,
            original_size: (image.height() as usize, image.width() as usize),
            input_size,
        })
    }

    /// Decodes one prompt against an embedding (the official `predict`).
    pub fn predict(&self, emb: &Embedding, prompt: &Prompt, multimask: bool) -> Result<Prediction> {
        let dev = self.sam.device();
        let pe = &self.sam.prompt_encoder;
        let points = if prompt.points.is_empty() {
            None
        } else {
            let mut coords = Vec::with_capacity(2 * prompt.points.len());
            let mut labels = Vec::with_capacity(prompt.points.len());
            for &(x, y, l) in &prompt.points {
                if l > 1 {
                    return Err(SamError::Prompt(format!(
                        "point ({x}, {y}) has label {l}; expected 1 (foreground) or 0 (background)"
                    )));
                }
                let (xi, yi) = input_from_image(x, y, emb.original_size);
                coords.extend([xi, yi]);
                labels.push(l as f32);
            }
            let n = labels.len();
            Some((
                Tensor::from_vec(coords, (1, n, 2), dev)?, // [1, N, 2]
                Tensor::from_vec(labels, (1, n), dev)?,    // [1, N]
            ))
        };
        let boxes = match prompt.bbox {
            Some([x0, y0, x1, y1]) => {
                let (a, b) = input_from_image(x0, y0, emb.original_size);
                let (c, d) = input_from_image(x1, y1, emb.original_size);
                Some(Tensor::from_vec(vec![a, b, c, d], (1, 4), dev)?) // [1, 4]
            }
            None => None,
        };
        let masks = match &prompt.mask_input {
            Some(m) => {
                if m.elem_count() != LOW_RES_SIZE * LOW_RES_SIZE {
                    return Err(SamError::Prompt(format!(
                        "mask_input has shape {:?}; expected [1, 256, 256] low-res logits",
                        m.dims()
                    )));
                }
                let m = m.to_dtype(DType::F32)?.to_device(dev)?;
                Some(m.reshape((1, 1, LOW_RES_SIZE, LOW_RES_SIZE))?)
            }
            None => None,
        };
        let (sparse, dense) = pe.forward(
            points.as_ref().map(|(c, l)| (c, l)),
            boxes.as_ref(),
            masks.as_ref(),
            1,
        )?;
        let (low, iou) = self.sam.mask_decoder.forward(
            &emb.features,
            &pe.dense_pe()?,
            &sparse,
            &dense,
            multimask,
        )?; // [1, M, 256, 256], [1, M]
        let low = low.squeeze(0)?; // [M, 256, 256]
        let iou_predictions = iou.squeeze(0)?.to_vec1::<f32>()?;
        let (h, w) = emb.original_size;
        let m = low.dim(0)?;
        let low_host = low.flatten_all()?.to_vec1::<f32>()?;
        let mut logits = Vec::with_capacity(m * h * w);
        for k in 0..m {
            let plane = &low_host[k * LOW_RES_SIZE * LOW_RES_SIZE..][..LOW_RES_SIZE * LOW_RES_SIZE];
            logits.extend(postprocess_mask(plane, emb.input_size, emb.original_size));
        }
        let masks: Vec<u8> = logits.iter().map(|&v| u8::from(v > 0.0)).collect();
        Ok(Prediction {
            logits: Tensor::from_vec(logits, (m, h, w), dev)?,
            masks: Tensor::from_vec(masks, (m, h, w), dev)?,
            iou_predictions,
            low_res_logits: low,
        })
    }
}
