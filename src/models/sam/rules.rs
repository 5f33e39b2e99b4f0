//! How each SAM variant's official inference code turns an image and a prompt into a mask:
//! the ONE place where SAM, MedSAM and LiteMedSAM differ outside the weights. The predictor
//! asks [`InputRules`] for the encoder input, the prompt coordinates and the masks.
//!
//! What the official code does (read in github.com/bowang-lab/MedSAM):
//!
//! - **SAM / MobileSAM** (`segment_anything.SamPredictor`): resize the longest side to 1024
//!   (Pillow bilinear), `(x - mean) / std`, zero-pad to 1024x1024; points and boxes scaled by
//!   the same resize; low-res logits upscaled to 1024, cropped to the resized image, resized to
//!   the original; mask = logits > 0. Points, boxes and mask inputs.
//! - **MedSAM** (`MedSAM_Inference.py`, branch `main`; plain `segment_anything` ViT-B with the
//!   same tensors as SAM vit_b): `skimage.transform.resize(img, (1024, 1024), order=3,
//!   preserve_range=True, anti_aliasing=True).astype(np.uint8)`, i.e. BOTH sides to 1024, no
//!   aspect ratio, no padding ([`super::skimage`]); then min-max to [0, 1] over the whole
//!   image (`(x - min) / max(max - min, 1e-8)`) and `model.image_encoder` called directly (the
//!   model's `preprocess`, mean/std and padding, is bypassed). The box is `box / [W, H, W, H]
//!   * 1024`. The decoder runs with `multimask_output=False`; the mask is
//!   `sigmoid(low_res_logits)` (256x256) resized bilinearly (`align_corners=False`) straight to
//!   (H, W), then `> 0.5`. Box prompts only: the script has no point or mask input.
//! - **LiteMedSAM** (`CVPR24_LiteMedSAM_infer.py`, branch `LiteMedSAM`): a TinyViT whose
//!   patch embedding is two 1x1 convolutions (no downsampling) on a 256x256 input, so the
//!   embedding is still 64x64 and the low-res masks 256x256; the prompt encoder's
//!   `input_image_size` is 256. The image's longest side goes to 256 with
//!   `cv2.resize(INTER_AREA)` (`int(x * scale + 0.5)` sizes), min-max to [0, 1] over the resized
//!   image, zero-padded bottom/right to 256. Each box coordinate becomes
//!   `int(x * 256 / max(H, W))` (truncated). Low-res logits are cropped to the resized image,
//!   resized bilinearly to (H, W), then `sigmoid > 0.5`. Box prompts only.
//!
//! Neither medical script uses the predicted IoU; see `mining` for what replaces it.
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::postprocess::{postprocess_masks_t_n, resize_bilinear_t};
use super::preprocess::{
    input_from_image, normalize_pad, postprocess_mask_n, preprocess_shape, resize_bilinear,
    resize_longest_side,
};
use super::{Result, SamError, IMAGE_SIZE, LOW_RES_SIZE};

/// The pre- and postprocessing of one family of official inference code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InputRules {
    /// Meta's `SamPredictor` (SAM ViT-B/L/H, MobileSAM).
    #[default]
    Sam,
    /// `MedSAM_Inference.py`.
    MedSam,
    /// `CVPR24_LiteMedSAM_infer.py`.
    LiteMedSam,
}

/// LiteMedSAM's input side.
pub const LITE_IMAGE_SIZE: usize = 256;

/// `torch.sigmoid` on f32.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The logit of a probability, finite (MedSAM's masks are probabilities; `Prediction.logits`
/// holds their logits so that `logits > 0` is the mask).
fn logit(p: f32) -> f32 {
    (p / (1.0 - p)).ln().clamp(-40.0, 40.0)
}

impl InputRules {
    /// The rules of an official variant.
    pub fn of_variant(v: super::Variant) -> InputRules {
        match v {
            super::Variant::MedSam => InputRules::MedSam,
            super::Variant::LiteMedSam => InputRules::LiteMedSam,
            _ => InputRules::Sam,
        }
    }

    /// Side of the square the encoder sees.
    pub fn image_size(self) -> usize {
        match self {
            InputRules::Sam | InputRules::MedSam => IMAGE_SIZE,
            InputRules::LiteMedSam => LITE_IMAGE_SIZE,
        }
    }

    /// Whether only box prompts are accepted (the official script has no other input).
    pub fn box_only(self) -> bool {
        self != InputRules::Sam
    }

    /// `MedSAM`, `LiteMedSAM` or `SAM`, for messages.
    pub fn label(self) -> &'static str {
        match self {
            InputRules::Sam => "SAM",
            InputRules::MedSam => "MedSAM",
            InputRules::LiteMedSam => "LiteMedSAM",
        }
    }

    /// Refuses what the official code cannot take (points, mask inputs for the medical
    /// variants; they are box-prompted).
    pub fn check_prompt(self, points: usize, mask_input: bool, has_box: bool) -> Result<()> {
        if !self.box_only() {
            return Ok(());
        }
        if points > 0 || mask_input || !has_box {
            return Err(SamError::Prompt(format!(
                "{} takes one box per prompt and nothing else (its official inference code has \
                 no point or mask input); give --box, or use a SAM or MobileSAM checkpoint for \
                 points",
                self.label()
            )));
        }
        Ok(())
    }

    /// The encoder input `[1, 3, S, S]` of an RGB image and the size (h', w') of the image
    /// inside the square.
    pub fn preprocess(self, image: &RgbImage, device: &Device) -> Result<(Tensor, (usize, usize))> {
        match self {
            InputRules::Sam => {
                let resized = resize_longest_side(image);
                let size = (resized.height() as usize, resized.width() as usize);
                Ok((normalize_pad(&resized, device)?, size))
            }
            InputRules::MedSam => {
                let n = IMAGE_SIZE;
                let bytes = super::skimage::resize_order3_antialiased(image, n, n);
                Ok((min_max_chw(&bytes, (n, n), n, device)?, (n, n)))
            }
            InputRules::LiteMedSam => {
                let n = LITE_IMAGE_SIZE;
                let (h, w) = (image.height() as usize, image.width() as usize);
                // a sliver of an image (e.g. 1x1000) would round a side to 0 pixels
                let (nh, nw) = preprocess_shape(h, w, n);
                let (nh, nw) = (nh.max(1), nw.max(1));
                let bytes = super::cv_area::resize_area_rgb(image, nh, nw);
                Ok((min_max_chw(&bytes, (nh, nw), n, device)?, (nh, nw)))
            }
        }
    }

    /// A point of the original image in the encoder's input frame (SAM's rules; the medical
    /// variants take no points).
    pub fn point_to_input(self, x: f32, y: f32, original: (usize, usize)) -> (f32, f32) {
        input_from_image(x, y, original)
    }

    /// A box (x0, y0, x1, y1) of the original image in the encoder's input frame.
    pub fn box_to_input(self, b: [f32; 4], original: (usize, usize)) -> [f32; 4] {
        let (h, w) = original;
        match self {
            InputRules::Sam => {
                let (a, c) = input_from_image(b[0], b[1], original);
                let (d, e) = input_from_image(b[2], b[3], original);
                [a, c, d, e]
            }
            // box_np / np.array([W, H, W, H]) * 1024 in float64, then float32
            InputRules::MedSam => {
                let s = IMAGE_SIZE as f64;
                let (wf, hf) = (w as f64, h as f64);
                [
                    (b[0] as f64 / wf * s) as f32,
                    (b[1] as f64 / hf * s) as f32,
                    (b[2] as f64 / wf * s) as f32,
                    (b[3] as f64 / hf * s) as f32,
                ]
            }
            // int(x * (256 / max(H, W)))
            InputRules::LiteMedSam => {
                let ratio = LITE_IMAGE_SIZE as f64 / h.max(w) as f64;
                b.map(|v| ((v as f64 * ratio) as i64) as f32)
            }
        }
    }

    /// One low-res mask `[256, 256]` -> (logits `[H, W]`, mask `[H, W]` of 0/1) at the
    /// original size. For MedSAM the logits are those of the resized probabilities.
    pub fn postprocess(
        self,
        low: &[f32],
        input: (usize, usize),
        original: (usize, usize),
    ) -> (Vec<f32>, Vec<u8>) {
        match self {
            InputRules::Sam => {
                let logits = postprocess_mask_n(low, IMAGE_SIZE, input, original);
                let mask = logits.iter().map(|&v| u8::from(v > 0.0)).collect();
                (logits, mask)
            }
            InputRules::MedSam => {
                let n = LOW_RES_SIZE;
                let p: Vec<f32> = low.iter().map(|&v| sigmoid(v)).collect();
                let up = resize_bilinear(&p, n, (n, n), original, original);
                let mask = up.iter().map(|&v| u8::from(v > 0.5)).collect();
                (up.into_iter().map(logit).collect(), mask)
            }
            InputRules::LiteMedSam => {
                let logits = postprocess_mask_n(low, LITE_IMAGE_SIZE, input, original);
                let mask = logits.iter().map(|&v| u8::from(sigmoid(v) > 0.5)).collect();
                (logits, mask)
            }
        }
    }

    /// [`Self::postprocess`] for a batch on the masks' device: `[B, M, 256, 256]` ->
    /// (logits `[B, M, H, W]` f32, masks `[B, M, H, W]` u8).
    pub fn postprocess_t(
        self,
        low: &Tensor,
        input: (usize, usize),
        original: (usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            InputRules::Sam => {
                let logits = postprocess_masks_t_n(low, IMAGE_SIZE, input, original)?;
                let masks = logits.gt(0f32)?;
                (logits, masks)
            }
            InputRules::MedSam => {
                let n = LOW_RES_SIZE;
                let p = candle_nn::ops::sigmoid(&low.to_dtype(DType::F32)?)?;
                let up = resize_bilinear_t(&p, (n, n), original, original)?;
                let masks = up.gt(0.5f32)?;
                let logits = ((&up / (1.0 - &up)?)?.log()?).clamp(-40f32, 40f32)?;
                (logits, masks)
            }
            InputRules::LiteMedSam => {
                let logits = postprocess_masks_t_n(low, LITE_IMAGE_SIZE, input, original)?;
                let masks = candle_nn::ops::sigmoid(&logits)?.gt(0.5f32)?;
                (logits, masks)
            }
        })
    }
}

/// The medical variants' input: `[h, w, 3]` bytes min-max normalised over the whole image
/// (f64, as numpy; stored f32 as `torch.tensor(..).float()`), channels first, zero-padded
/// bottom/right to the `n` square -> `[1, 3, n, n]`.
fn min_max_chw(bytes: &[u8], (h, w): (usize, usize), n: usize, dev: &Device) -> Result<Tensor> {
    let lo = bytes.iter().copied().min().unwrap_or(0) as f64;
    let hi = bytes.iter().copied().max().unwrap_or(0) as f64;
    let range = (hi - lo).max(1e-8);
    let mut data = vec![0f32; 3 * n * n];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = bytes[(y * w + x) * 3 + c] as f64;
                data[c * n * n + y * n + x] = ((v - lo) / range) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, n, n), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_map_as_the_official_scripts_do() {
        let b = [95.0, 255.0, 190.0, 350.0];
        // MedSAM_Inference.py's demo box on a 512x400 (WxH) image
        let m = InputRules::MedSam.box_to_input(b, (400, 512));
        assert_eq!(m, [190.0, 652.8, 380.0, 896.0]);
        let l = InputRules::LiteMedSam.box_to_input(b, (400, 512));
        assert_eq!(l, [47.0, 127.0, 95.0, 175.0]);
    }

    #[test]
    fn medical_variants_take_boxes_only() {
        assert!(InputRules::Sam.check_prompt(2, true, false).is_ok());
        for r in [InputRules::MedSam, InputRules::LiteMedSam] {
            assert!(r.check_prompt(0, false, true).is_ok());
            let e = r.check_prompt(1, false, true).unwrap_err().to_string();
            assert!(e.contains(r.label()) && e.contains("box"), "{e}");
            assert!(r.check_prompt(0, true, true).is_err());
            assert!(r.check_prompt(0, false, false).is_err());
        }
    }

    #[test]
    fn slivers_and_single_pixels_go_through() {
        for (w, h) in [(600, 1), (1, 300), (1, 1), (3, 2000)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([9, 99, 200]));
            for r in [InputRules::MedSam, InputRules::LiteMedSam] {
                let (t, size) = r.preprocess(&img, &Device::Cpu).unwrap();
                let n = r.image_size();
                assert_eq!(t.dims(), [1, 3, n, n], "{r:?} {w}x{h}");
                assert!(size.0 >= 1 && size.1 >= 1 && size.0 <= n && size.1 <= n);
            }
        }
    }

    #[test]
    fn host_and_device_postprocessing_agree() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let n = LOW_RES_SIZE;
        let low = Tensor::randn(0f32, 4., (1, 1, n, n), &dev)?;
        let host = low.flatten_all()?.to_vec1::<f32>()?;
        for (rules, input) in [
            (InputRules::MedSam, (1024, 1024)),
            (InputRules::LiteMedSam, (200, 256)),
            (InputRules::Sam, (800, 1024)),
        ] {
            let original = (150, 190);
            let (logits, mask) = rules.postprocess(&host, input, original);
            let (lt, mt) = rules.postprocess_t(&low, input, original).unwrap();
            let lt = lt.flatten_all()?.to_vec1::<f32>()?;
            let mt = mt.flatten_all()?.to_vec1::<u8>()?;
            let d = logits
                .iter()
                .zip(&lt)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{rules:?}: {d}");
            let differ = mask.iter().zip(&mt).filter(|(a, b)| a != b).count();
            assert!(differ <= 2, "{rules:?}: {differ} mask pixels differ");
            assert!(mask
                .iter()
                .zip(&logits)
                .all(|(m, l)| (*m == 1) == (*l > 0.0)));
        }
        Ok(())
    }
}
