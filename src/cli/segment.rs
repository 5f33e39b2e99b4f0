//! `medmine segment`: one SAM prediction from the command line (a contract for scripts).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::models::sam::segment::{parse_box, parse_point, segment, SegmentRequest};
use crate::models::sam::Variant;

#[derive(Args)]
pub struct SegmentArgs {
    /// SAM checkpoint (.pth/.pt as published, or .safetensors).
    #[arg(long)]
    sam: PathBuf,
    /// auto | vit_b | vit_l | vit_h | vit_t | medsam | litemedsam (auto: detected from the
    /// checkpoint's keys; MedSAM has SAM vit_b's keys and needs `medsam`).
    #[arg(long, default_value = "auto")]
    sam_variant: String,
    #[arg(long)]
    image: PathBuf,
    /// Box prompt X0,Y0,X1,Y1 in original-image pixels.
    #[arg(long = "box", allow_hyphen_values = true)]
    bbox: Option<String>,
    /// Point prompt X,Y,LABEL (LABEL 1 = foreground, 0 = background); repeatable.
    #[arg(long = "point", allow_hyphen_values = true)]
    points: Vec<String>,
    /// Low-res mask logits (1x256x256 or 256x256 float32 .npy), e.g. a previous --logits of SAM.
    #[arg(long)]
    mask_input: Option<PathBuf>,
    /// Ask SAM for three masks and keep the one with the highest predicted IoU.
    #[arg(long)]
    multimask: bool,
    /// Output mask PNG (0/255) at the image's original size.
    #[arg(long)]
    out: PathBuf,
    /// Also write the chosen mask's logits at original resolution (float32 .npy, (H, W)).
    #[arg(long)]
    logits: Option<PathBuf>,
}

pub fn segment_cmd(a: SegmentArgs, device: candle_core::Device) -> Result<()> {
    // a mask is exact only in a lossless file (the data layer writes PNG whatever the name)
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if ext.as_deref() != Some("png") {
        anyhow::bail!(
            "--out {}: masks are written as PNG (lossless); give a .png file name",
            a.out.display()
        );
    }
    let variant = Variant::parse(&a.sam_variant)?;
    let req = SegmentRequest {
        sam: a.sam,
        variant,
        image: a.image,
        bbox: a.bbox.as_deref().map(parse_box).transpose()?,
        points: a
            .points
            .iter()
            .map(|p| parse_point(p))
            .collect::<Result<_, _>>()?,
        mask_input: a.mask_input,
        multimask: a.multimask,
        out: a.out,
        logits: a.logits,
    };
    let report =
        segment(&req, &device).with_context(|| format!("segmenting {}", req.image.display()))?;
    println!("sam variant: {}", report.variant);
    println!(
        "mask: {} ({:.1}% foreground)",
        req.out.display(),
        100. * report.foreground_fraction
    );
    println!("predicted_iou {:.4}", report.predicted_iou);
    Ok(())
}
