//! The SAM checks of `medmine check`: the parity fixtures of `tests/fixtures` (made by
//! `scripts/sam_fixtures.py` and `scripts/sam_fixtures_vit_t.py` with the official PyTorch
//! code and seeded random weights) decoded on the tested side and compared with the official
//! outputs. The reader is shared with the parity tests.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{max_abs_diff, on_tested, timed, CheckError, CheckOptions, CheckRow};
use crate::models::sam::{self, Embedding, Prediction, Prompt, SamPredictor};

/// The prompts of both fixtures (see their manifest.json).
pub const PROMPTS: [&str; 4] = ["box", "points", "box_points", "mask_points"];

/// Absolute tolerance on embeddings, logits and IoU predictions: the outputs spread about 1,
/// the CPU's differences from the official ones are ~1e-6.
pub const TOL: f64 = 1e-3;

/// One fixture folder: `manifest.json`, `<weights>.pth` / `.safetensors`, the image and the
/// official outputs as `.npy` and `.png`.
pub struct SamFixture {
    pub dir: PathBuf,
    /// Stem of `<weights>.pth` / `<weights>.safetensors`.
    pub weights: &'static str,
    manifest: serde_json::Value,
}

impl SamFixture {
    /// The fixture in `dir` with weights `<weights>.safetensors`.
    pub fn open(dir: &Path, weights: &'static str) -> Result<Self, CheckError> {
        let path = dir.join("manifest.json");
        let bad = |reason: String| CheckError::Fixture {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            weights,
            manifest,
        })
    }

    /// Both fixtures under `fixtures` (the repository's `tests/fixtures`): label and fixture.
    pub fn both(fixtures: &Path) -> Result<Vec<(&'static str, Self)>, CheckError> {
        Ok(vec![
            (
                "vit_b-style",
                Self::open(&fixtures.join("sam"), "sam_tiny")?,
            ),
            (
                "vit_t",
                Self::open(&fixtures.join("sam_vit_t"), "sam_vit_t_tiny")?,
            ),
        ])
    }

    pub fn manifest(&self) -> &serde_json::Value {
        &self.manifest
    }

    pub fn pth(&self) -> PathBuf {
        self.dir.join(format!("{}.pth", self.weights))
    }

    pub fn safetensors(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.weights))
    }

    fn err(&self, name: &str, reason: impl ToString) -> CheckError {
        CheckError::Fixture {
            path: self.dir.join(name),
            reason: reason.to_string(),
        }
    }

    pub fn npy(&self, name: &str) -> Result<Tensor, CheckError> {
        Tensor::read_npy(self.dir.join(name)).map_err(|e| self.err(name, e))
    }

    /// The fixture image (the manifest's `image.file`).
    pub fn image(&self) -> Result<image::RgbImage, CheckError> {
        let name = self.manifest["image"]["file"]
            .as_str()
            .unwrap_or("image.png");
        let img = image::open(self.dir.join(name)).map_err(|e| self.err(name, e))?;
        Ok(img.to_rgb8())
    }

    /// The official embedding (decoder checks then run on identical inputs).
    pub fn official_embedding(&self) -> Result<Embedding, CheckError> {
        let m = &self.manifest;
        let size = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as usize;
        let r = &m["resized"]["shape"];
        Ok(Embedding {
            features: self.npy("embedding.npy")?,
            original_size: (size(&m["image"]["height"]), size(&m["image"]["width"])),
            input_size: (size(&r[0]), size(&r[1])),
        })
    }

    pub fn prompt(&self, name: &str) -> Result<Prompt, CheckError> {
        let p = &self.manifest["prompts"][name];
        if p.is_null() {
            return Err(self.err("manifest.json", format!("no prompt {name}")));
        }
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) as f32;
        let mut out = Prompt::default();
        if let Some(b) = p["box"].as_array() {
            out.bbox = Some([f(&b[0]), f(&b[1]), f(&b[2]), f(&b[3])]);
        }
        if let (Some(c), Some(labels)) =
            (p["point_coords"].as_array(), p["point_labels"].as_array())
        {
            for (xy, l) in c.iter().zip(labels) {
                out.points
                    .push((f(&xy[0]), f(&xy[1]), l.as_u64().unwrap_or(0) as u8));
            }
        }
        if p.get("mask_input").is_some() {
            out.mask_input = Some(self.npy("box_single_low.npy")?);
        }
        Ok(out)
    }

    /// The official masks of one prompt (`M` of them), as booleans.
    pub fn official_masks(
        &self,
        name: &str,
        multimask: bool,
    ) -> Result<Vec<Vec<bool>>, CheckError> {
        let (tag, m) = if multimask {
            ("multi", 3)
        } else {
            ("single", 1)
        };
        (0..m)
            .map(|i| {
                let file = format!("{name}_{tag}_mask{i}.png");
                let img = image::open(self.dir.join(&file)).map_err(|e| self.err(&file, e))?;
                Ok(img.to_luma8().pixels().map(|p| p.0[0] > 127).collect())
            })
            .collect()
    }

    /// One prediction against the official outputs: the max abs difference of the IoU
    /// predictions and (sub-sampled) low-res logits, and the smallest mask IoU.
    pub fn compare(
        &self,
        name: &str,
        multimask: bool,
        pred: &Prediction,
    ) -> Result<(f64, f64), CheckError> {
        let tag = if multimask { "multi" } else { "single" };
        let iou = Tensor::new(pred.iou_predictions.as_slice(), &Device::Cpu)?;
        let mut worst = max_abs_diff(&iou, &self.npy(&format!("{name}_{tag}_iou.npy"))?)?;
        let step = if multimask { 8 } else { 4 };
        let ours = subsample(&pred.low_res_logits, step)?;
        let theirs = self.npy(&format!("{name}_{tag}_low_sub{step}.npy"))?;
        worst = worst.max(max_abs_diff(&ours, &theirs)?);
        if name == "box" && !multimask {
            worst = worst.max(max_abs_diff(
                &pred.low_res_logits,
                &self.npy("box_single_low.npy")?,
            )?);
        }
        let ours: Vec<u8> = pred
            .masks
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let official = self.official_masks(name, multimask)?;
        let per = ours.len() / official.len().max(1);
        let mut min_iou = 1f64;
        for (i, theirs) in official.iter().enumerate() {
            let ours: Vec<bool> = ours[i * per..(i + 1) * per]
                .iter()
                .map(|v| *v > 0)
                .collect();
            if ours.len() != theirs.len() {
                return Ok((worst, 0.0));
            }
            min_iou = min_iou.min(mask_iou(&ours, theirs));
        }
        Ok((worst, min_iou))
    }
}

pub fn mask_iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// `x[:, ::step, ::step]` of `[M, H, W]`, on the CPU.
pub fn subsample(x: &Tensor, step: usize) -> Result<Tensor, CheckError> {
    let (m, h, w) = x.dims3()?;
    let v: Vec<f32> = x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(m * h.div_ceil(step) * w.div_ceil(step));
    for k in 0..m {
        for y in (0..h).step_by(step) {
            for xx in (0..w).step_by(step) {
                out.push(v[k * h * w + y * w + xx]);
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (m, h.div_ceil(step), w.div_ceil(step)),
        &Device::Cpu,
    )?)
}

pub fn checks(device: &Device, opts: &CheckOptions) -> Result<Vec<CheckRow>, CheckError> {
    let Some(fixtures) = &opts.fixtures else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for (label, fx) in SamFixture::both(fixtures)? {
        let p = on_tested(device, |d| sam::load_sam(&fx.safetensors(), None, d))?;
        let p = SamPredictor::new(p);
        let image = fx.image()?;
        let mut emb = None;
        rows.push(timed(
            format!("SAM {label} embedding vs official"),
            "max abs. diff",
            TOL,
            || {
                let e = on_tested(device, |_| p.set_image(&image))?;
                let d = max_abs_diff(&e.features, &fx.npy("embedding.npy")?)?;
                emb = Some(e);
                Ok(d)
            },
        )?);
        let Some(emb) = emb else { continue };
        let mut min_iou = 1f64;
        rows.push(timed(
            format!(
                "SAM {label} logits and IoU predictions vs official (4 prompts x 1 and 3 masks)"
            ),
            "max abs. diff",
            TOL,
            || {
                let mut worst = 0f64;
                for name in PROMPTS {
                    for multimask in [false, true] {
                        let prompt = fx.prompt(name)?;
                        let pred = on_tested(device, |_| p.predict(&emb, &prompt, multimask))?;
                        let (d, iou) = fx.compare(name, multimask, &pred)?;
                        worst = worst.max(d);
                        min_iou = min_iou.min(iou);
                    }
                }
                Ok(worst)
            },
        )?);
        rows.push(CheckRow {
            name: format!("SAM {label} masks vs official"),
            measure: "1 - min IoU",
            value: 1.0 - min_iou,
            limit: 0.01,
            seconds: 0.0,
            note: String::new(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[test]
    fn the_generic_path_matches_the_official_sam_outputs() {
        let opts = CheckOptions {
            fixtures: Some(fixtures()),
            overfit_steps: 0,
        };
        let rows = checks(&Device::Cpu, &opts).unwrap();
        assert_eq!(rows.len(), 6);
        for r in &rows {
            eprintln!("{}: {:.3e}", r.name, r.value);
            assert!(r.passed(), "{r:?}");
        }
    }

    #[test]
    fn a_missing_fixture_folder_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = SamFixture::both(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("manifest.json"), "{err}");
    }

    #[test]
    fn subsample_and_iou() {
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 4))
            .unwrap();
        let s: Vec<f32> = subsample(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(s, vec![0., 2., 8., 10.]);
        assert_eq!(mask_iou(&[true, true, false], &[true, false, false]), 0.5);
        assert_eq!(mask_iou(&[false], &[false]), 1.0);
    }
}
