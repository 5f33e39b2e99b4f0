//! The MedSAM and LiteMedSAM checks of `medmine check`: the fixtures of
//! `scripts/medsam_fixtures.py` (bowang-lab's inference scripts with seeded random weights:
//! `tests/fixtures/medsam`, `tests/fixtures/litemedsam`), a portrait and a landscape image with
//! one box each, embedded and decoded on the tested side (on the CPU: the device-generic path,
//! so the masks come from the on-device postprocessing) and compared with the official outputs.
use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};

use super::sam::{mask_iou, TOL};
use super::{max_abs_diff, on_tested, timed, CheckError, CheckRow};
use crate::models::sam::{self, Prompt, SamPredictor, Variant};

const IMAGES: [&str; 2] = ["portrait", "landscape"];

fn fixture_err(path: &Path, reason: impl ToString) -> CheckError {
    CheckError::Fixture {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// `[.., H, W]` -> `[.., ::step, ::step]` (on the CPU).
fn sub(t: &Tensor, step: usize) -> Result<Tensor, CheckError> {
    let t = t.to_device(&Device::Cpu)?;
    let n = t.rank();
    let mut t = t;
    for axis in [n - 2, n - 1] {
        let idx: Vec<u32> = (0..t.dim(axis)?).step_by(step).map(|i| i as u32).collect();
        t = t.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, axis)?;
    }
    Ok(t)
}

/// One variant's rows: embeddings, low-res logits, masks of both images.
fn variant_rows(
    device: &Device,
    label: &str,
    dir: &Path,
    weights: &Path,
    variant: Option<Variant>,
) -> Result<Vec<CheckRow>, CheckError> {
    let manifest: serde_json::Value = {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).map_err(|e| fixture_err(&p, e))?;
        serde_json::from_str(&text).map_err(|e| fixture_err(&p, e))?
    };
    let npy = |name: String| {
        let p = dir.join(&name);
        Tensor::read_npy(&p).map_err(|e| fixture_err(&p, e))
    };
    let image_dir = dir.parent().unwrap_or(dir).join("medsam");
    let p = SamPredictor::new(on_tested(device, |d| sam::load_sam(weights, variant, d))?);
    let (mut d_emb, mut d_low, mut min_iou) = (0f64, 0f64, 1f64);
    let row = timed(
        format!("{label} embeddings vs official (2 images)"),
        "max abs. diff",
        TOL,
        || {
            for name in IMAGES {
                let path = image_dir.join(format!("{name}.png"));
                let img = image::open(&path)
                    .map_err(|e| fixture_err(&path, e))?
                    .to_rgb8();
                let emb = on_tested(device, |_| p.set_image(&img))?;
                let want = npy(format!("{name}_embedding_sub4.npy"))?;
                d_emb = d_emb.max(max_abs_diff(&sub(&emb.features, 4)?, &want)?);
                let b = &manifest["images"][name]["box"];
                let coord = |i: usize| b[i].as_f64().unwrap_or(f64::NAN) as f32;
                let prompt = Prompt {
                    bbox: Some([coord(0), coord(1), coord(2), coord(3)]),
                    ..Default::default()
                };
                let pred = on_tested(device, |_| p.predict(&emb, &prompt, false))?;
                let want = npy(format!("{name}_low_sub4.npy"))?;
                d_low = d_low.max(max_abs_diff(&sub(&pred.low_res_logits, 4)?, &want)?);
                let ours: Vec<u8> = pred.masks.i(0)?.flatten_all()?.to_vec1()?;
                let mpath = dir.join(format!("{name}_mask.png"));
                let theirs = image::open(&mpath)
                    .map_err(|e| fixture_err(&mpath, e))?
                    .to_luma8()
                    .into_raw();
                if ours.len() != theirs.len() {
                    min_iou = 0.0;
                    continue;
                }
                let a: Vec<bool> = ours.iter().map(|&v| v > 0).collect();
                let b: Vec<bool> = theirs.iter().map(|&v| v > 127).collect();
                min_iou = min_iou.min(mask_iou(&a, &b));
            }
            Ok(d_emb)
        },
    )?;
    Ok(vec![
        row,
        CheckRow {
            name: format!("{label} low-res logits vs official (one box per image)"),
            measure: "max abs. diff",
            value: d_low,
            limit: TOL,
            seconds: 0.0,
            note: String::new(),
        },
        CheckRow {
            name: format!("{label} masks vs official"),
            measure: "1 - min IoU",
            value: 1.0 - min_iou,
            limit: 0.01,
            seconds: 0.0,
            note: String::new(),
        },
    ])
}

pub fn checks(device: &Device, opts: &super::CheckOptions) -> Result<Vec<CheckRow>, CheckError> {
    let Some(fixtures) = &opts.fixtures else {
        return Ok(Vec::new());
    };
    let mut rows = variant_rows(
        device,
        "MedSAM",
        &fixtures.join("medsam"),
        &fixtures.join("sam").join("sam_tiny.safetensors"),
        Some(Variant::MedSam),
    )?;
    rows.extend(variant_rows(
        device,
        "LiteMedSAM",
        &fixtures.join("litemedsam"),
        &fixtures.join("litemedsam").join("litemedsam_tiny.pth"),
        None,
    )?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generic_path_matches_the_official_medical_outputs() {
        let opts = super::super::CheckOptions {
            fixtures: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")),
            overfit_steps: 0,
        };
        let rows = checks(&Device::Cpu, &opts).unwrap();
        assert_eq!(rows.len(), 6);
        for r in &rows {
            eprintln!("{}: {:.3e}", r.name, r.value);
            assert!(r.passed(), "{r:?}");
        }
    }
}
