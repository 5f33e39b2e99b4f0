//! The `SamPredictor`-like API the mining loop and the GUI use: embed an image once
//! ([`SamPredictor::set_image`] returns a cacheable [`Embedding`]), then decode any number of
//! prompts against it ([`SamPredictor::predict`]). Coordinates are original-image pixels.
use candle_core::{DType, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use super::{Result, Sam, SamError, LOW_RES_SIZE};

/// An image embedding plus the sizes needed to map prompts and masks (`predictor.features`,
/// `original_size`, `input_size` of the official predictor). Cheap to clone; cacheable.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// `[1, C, 64, 64]`
    pub features: Tensor,
    /// (H, W) of the original image.
    pub original_size: (usize, usize),
    /// (h', w') of the resized image inside the input square (MedSAM: the whole 1024x1024).
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
    /// `[M, H, W]` logits at the original resolution (`return_logits=True`; MedSAM: the
    /// logits of its resized probabilities, see [`super::InputRules`]).
    pub logits: Tensor,
    /// `[M, H, W]` u8 masks, 0 or 1 (logits > 0; the medical variants: sigmoid > 0.5).
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

    /// `[1, 3, S, S]` encoder input of an RGB image, and the resized size (h', w'), by the
    /// model's [`super::InputRules`].
    pub fn preprocess(&self, image: &RgbImage) -> Result<(Tensor, (usize, usize))> {
        self.sam.config().rules.preprocess(image, self.sam.device())
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
        let mut out = self.predict_batch(emb, std::slice::from_ref(prompt), multimask)?;
        Ok(out.pop().expect("one prediction per prompt"))
    }

    /// Decodes many prompts against one embedding, batched (the official `predict_torch` with
    /// `B` prompts); the result `i` equals `predict(emb, &prompts[i], multimask)`.
    ///
    /// The official decoder only batches prompts of one shape (`[B, N, 2]` points, `[B, 4]`
    /// boxes): every prompt's sparse tokens attend to each other in the two-way transformer, so
    /// padding a shorter point set with "not a point" (label -1) tokens *changes* its masks
    /// (on the parity fixture one extra -1 point moves the low-res logits by 0.56). The official
    /// code pads only where it always does (one -1 point when there is no box). So prompts are
    /// grouped by (number of points, box or not) and each group is ONE decoder call; mask inputs
    /// may differ within a group (the dense embedding is per prompt). Uniform prompts, e.g. a
    /// list of boxes from the mining loop, therefore run in a single call.
    pub fn predict_batch(
        &self,
        emb: &Embedding,
        prompts: &[Prompt],
        multimask: bool,
    ) -> Result<Vec<Prediction>> {
        let mut groups: Vec<((usize, bool), Vec<usize>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let key = (p.points.len(), p.bbox.is_some());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut out: Vec<Option<Prediction>> = vec![None; prompts.len()];
        for (_, idx) in groups {
            let group: Vec<&Prompt> = idx.iter().map(|&i| &prompts[i]).collect();
            for (i, pred) in idx
                .into_iter()
                .zip(self.decode_group(emb, &group, multimask)?)
            {
                out[i] = Some(pred);
            }
        }
        Ok(out
            .into_iter()
            .map(|p| p.expect("every prompt decoded"))
            .collect())
    }

    /// One decoder call for prompts with the same number of points and all or no boxes.
    fn decode_group(
        &self,
        emb: &Embedding,
        prompts: &[&Prompt],
        multimask: bool,
    ) -> Result<Vec<Prediction>> {
        let dev = self.sam.device();
        let rules = self.sam.config().rules;
        for p in prompts {
            rules.check_prompt(p.points.len(), p.mask_input.is_some(), p.bbox.is_some())?;
        }
        let pe = &self.sam.prompt_encoder;
        let b = prompts.len();
        let n = prompts[0].points.len();
        let points = if n == 0 {
            None
        } else {
            let mut coords = Vec::with_capacity(2 * n * b);
            let mut labels = Vec::with_capacity(n * b);
            for p in prompts {
                for &(x, y, l) in &p.points {
                    if l > 1 {
                        return Err(SamError::Prompt(format!(
                            "point ({x}, {y}) has label {l}; expected 1 (foreground) or 0 (background)"
                        )));
                    }
                    let (xi, yi) = rules.point_to_input(x, y, emb.original_size);
                    coords.extend([xi, yi]);
                    labels.push(l as f32);
                }
            }
            Some((
                Tensor::from_vec(coords, (b, n, 2), dev)?, // [B, N, 2]
                Tensor::from_vec(labels, (b, n), dev)?,    // [B, N]
            ))
        };
        let boxes = if prompts[0].bbox.is_some() {
            let mut v = Vec::with_capacity(4 * b);
            for p in prompts {
                let bbox = p.bbox.expect("grouped by box presence");
                v.extend(rules.box_to_input(bbox, emb.original_size));
            }
            Some(Tensor::from_vec(v, (b, 4), dev)?) // [B, 4]
        } else {
            None
        };
        let masks = prompts
            .iter()
            .map(|p| {
                p.mask_input
                    .as_ref()
                    .map(|m| mask_input(m, dev))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let all_masks = masks.iter().all(Option::is_some);
        let stacked = if all_masks {
            let m: Vec<Tensor> = masks.iter().flatten().cloned().collect();
            Some(Tensor::cat(&m, 0)?) // [B, 1, 256, 256]
        } else {
            None
        };
        let (sparse, mut dense) = pe.forward(
            points.as_ref().map(|(c, l)| (c, l)),
            boxes.as_ref(),
            stacked.as_ref(),
            b,
        )?;
        if !all_masks && masks.iter().any(Option::is_some) {
            // some prompts of the group have a mask input: their own dense embedding
            let rows = masks
                .iter()
                .enumerate()
                .map(|(i, m)| match m {
                    Some(m) => Ok(pe.embed_masks(m)?),
                    None => dense.narrow(0, i, 1),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            dense = Tensor::cat(&rows, 0)?;
        }
        let (low, iou) = self.sam.mask_decoder.forward(
            &emb.features,
            pe.dense_pe_rows(),
            &sparse,
            &dense,
            multimask,
        )?; // [B, M, 256, 256], [B, M]
        let m = low.dim(1)?;
        let iou = iou.to_vec2::<f32>()?;
        if !crate::ops::fast(&low) {
            // on the masks' device (no host round trip): same values as the CPU code below
            let (logits, masks) = rules.postprocess_t(&low, emb.input_size, emb.original_size)?;
            return iou
                .into_iter()
                .enumerate()
                .map(|(j, iou_predictions)| {
                    Ok(Prediction {
                        logits: logits.get(j)?,
                        masks: masks.get(j)?,
                        iou_predictions,
                        low_res_logits: low.get(j)?, // [M, 256, 256]
                    })
                })
                .collect();
        }
        let low_host = low.flatten_all()?.to_vec1::<f32>()?;
        let (h, w) = emb.original_size;
        let plane = LOW_RES_SIZE * LOW_RES_SIZE;
        let mut preds = Vec::with_capacity(b);
        for (j, iou_predictions) in iou.into_iter().enumerate() {
            // the masks of one prompt side by side (each resize is parallel inside too)
            let per_mask: Vec<(Vec<f32>, Vec<u8>)> = (0..m)
                .into_par_iter()
                .map(|k| {
                    let low_k = &low_host[(j * m + k) * plane..][..plane];
                    rules.postprocess(low_k, emb.input_size, emb.original_size)
                })
                .collect();
            let (logits, masks): (Vec<Vec<f32>>, Vec<Vec<u8>>) = per_mask.into_iter().unzip();
            let (logits, masks) = (logits.concat(), masks.concat());
            preds.push(Prediction {
                logits: Tensor::from_vec(logits, (m, h, w), dev)?,
                masks: Tensor::from_vec(masks, (m, h, w), dev)?,
                iou_predictions,
                low_res_logits: low.get(j)?, // [M, 256, 256]
            });
        }
        Ok(preds)
    }
}

/// A `mask_input` as `[1, 1, 256, 256]` f32 on `dev`.
fn mask_input(m: &Tensor, dev: &candle_core::Device) -> Result<Tensor> {
    if m.elem_count() != LOW_RES_SIZE * LOW_RES_SIZE {
        return Err(SamError::Prompt(format!(
            "mask_input has shape {:?}; expected [1, 256, 256] low-res logits",
            m.dims()
        )));
    }
    let m = m.to_dtype(DType::F32)?.to_device(dev)?;
    Ok(m.reshape((1, 1, LOW_RES_SIZE, LOW_RES_SIZE))?)
}
