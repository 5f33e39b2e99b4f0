//! `medmine segment`: one image, one prompt, one mask (the logic behind the CLI command).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use super::{load_sam, Prompt, Result, SamError, SamPredictor, Variant};

/// Everything `medmine segment` takes; coordinates are original-image pixels.
#[derive(Clone, Debug, Default)]
pub struct SegmentRequest {
    pub sam: PathBuf,
    /// `None`: detect from the checkpoint's keys (`--sam-variant auto`).
    pub variant: Option<Variant>,
    pub image: PathBuf,
    pub bbox: Option<[f32; 4]>,
    pub points: Vec<(f32, f32, u8)>,
    /// A float32 `.npy` of low-res logits, shape (256, 256), (1, 256, 256) or (1, 1, 256, 256).
    pub mask_input: Option<PathBuf>,
    /// Ask for three masks and keep the one with the highest predicted IoU.
    pub multimask: bool,
    /// 0/255 PNG at the image's size.
    pub out: PathBuf,
    /// The chosen mask's logits at the original size, float32 `.npy` of shape (H, W).
    pub logits: Option<PathBuf>,
}

/// What `segment` did.
#[derive(Clone, Debug)]
pub struct SegmentReport {
    /// `vit_b` … or `custom`.
    pub variant: String,
    pub predicted_iou: f32,
    /// Which of the masks was written (0 without `multimask`).
    pub mask_index: usize,
    pub foreground_fraction: f32,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> SamError {
    SamError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// `X0,Y0,X1,Y1` -> box.
pub fn parse_box(s: &str) -> Result<[f32; 4]> {
    let v = parse_floats(s, 4, "--box X0,Y0,X1,Y1")?;
    if v[2] < v[0] || v[3] < v[1] {
        return Err(SamError::Prompt(format!("--box {s}: X1 < X0 or Y1 < Y0")));
    }
    Ok([v[0], v[1], v[2], v[3]])
}

/// `X,Y,LABEL` -> point (LABEL 1 foreground, 0 background).
pub fn parse_point(s: &str) -> Result<(f32, f32, u8)> {
    let v = parse_floats(s, 3, "--point X,Y,LABEL")?;
    match v[2] {
        l if l == 0.0 || l == 1.0 => Ok((v[0], v[1], l as u8)),
        _ => Err(SamError::Prompt(format!(
            "--point {s}: LABEL must be 1 (foreground) or 0 (background)"
        ))),
    }
}

fn parse_floats(s: &str, n: usize, what: &str) -> Result<Vec<f32>> {
    let v: Vec<f32> = s
        .split(',')
        .map(|t| t.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| SamError::Prompt(format!("{what}: `{s}`: {e}")))?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(SamError::Prompt(format!(
            "{what}: `{s}` is not a finite number"
        )));
    }
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(SamError::Prompt(format!(
            "{what}: `{s}` is not {n} comma-separated numbers"
        )));
    }
    Ok(v)
}

/// Loads SAM, embeds the image, decodes the prompt, writes the mask (and logits).
pub fn segment(req: &SegmentRequest, device: &Device) -> Result<SegmentReport> {
    if req.bbox.is_none() && req.points.is_empty() && req.mask_input.is_none() {
        return Err(SamError::Prompt(
            "give at least one of --box, --point, --mask-input".to_string(),
        ));
    }
    let sam = load_sam(&req.sam, req.variant, device)?;
    let variant = sam.config().name().to_string();
    let predictor = SamPredictor::new(sam);
    // every format the data layer reads (DICOM, 16-bit), decoded as mining decodes it
    let image = crate::data::load_rgb8(&req.image)?;
    // prompts are in the image's pixels: one outside it is a mistake, not a prompt
    let (w, h) = (image.width() as f32, image.height() as f32);
    let inside = |x: f32, y: f32| (0.0..=w).contains(&x) && (0.0..=h).contains(&y);
    if let Some([x0, y0, x1, y1]) = req.bbox {
        if !inside(x0, y0) || !inside(x1, y1) {
            return Err(SamError::Prompt(format!(
                "--box {x0},{y0},{x1},{y1} lies outside the {w}x{h} image {}",
                req.image.display()
            )));
        }
    }
    if let Some((x, y, _)) = req.points.iter().find(|(x, y, _)| !inside(*x, *y)) {
        return Err(SamError::Prompt(format!(
            "--point {x},{y} lies outside the {w}x{h} image {}",
            req.image.display()
        )));
    }
    let mask_input = match &req.mask_input {
        Some(p) => {
            let t = Tensor::read_npy(p).map_err(|e| file_err(p, e))?;
            if t.elem_count() != super::LOW_RES_SIZE * super::LOW_RES_SIZE {
                return Err(file_err(
                    p,
                    format!("shape {:?}; expected (256, 256) low-res logits", t.dims()),
                ));
            }
            Some(t.to_dtype(DType::F32)?)
        }
        None => None,
    };
    let prompt = Prompt {
        points: req.points.clone(),
        bbox: req.bbox,
        mask_input,
    };
    let emb = predictor.set_image(&image)?;
    let pred = predictor.predict(&emb, &prompt, req.multimask)?;
    let k = pred.best();
    let (h, w) = emb.original_size;
    let mask: Vec<u8> = pred.masks.i(k)?.flatten_all()?.to_vec1()?;
    let fg = mask.iter().filter(|v| **v > 0).count() as f32 / mask.len().max(1) as f32;
    let png =
        image::GrayImage::from_raw(w as u32, h as u32, mask.iter().map(|v| v * 255).collect())
            .expect("mask has H x W pixels");
    png.save(&req.out).map_err(|e| file_err(&req.out, e))?;
    if let Some(p) = &req.logits {
        pred.logits.i(k)?.write_npy(p).map_err(|e| file_err(p, e))?; // (H, W) f32
    }
    Ok(SegmentReport {
        variant,
        predicted_iou: pred.iou_predictions[k],
        mask_index: k,
        foreground_fraction: fg,
    })
}
