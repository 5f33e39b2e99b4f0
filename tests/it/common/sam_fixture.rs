//! The SAM parity fixtures made by the official PyTorch code (`scripts/sam_fixtures.py`:
//! tests/fixtures/sam, a small vit_b-style SAM; `scripts/sam_fixtures_vit_t.py`:
//! tests/fixtures/sam_vit_t, a small MobileSAM): one reader for both, and the comparisons the
//! parity tests share.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medmine::models::sam::{self, Embedding, Prediction, Prompt, SamPredictor};

/// The prompts of both fixtures (see their manifest.json).
pub const PROMPTS: [&str; 4] = ["box", "points", "box_points", "mask_points"];

pub struct Fixture {
    pub dir: PathBuf,
    /// Stem of `<weights>.pth` / `<weights>.safetensors`.
    pub weights: &'static str,
}

impl Fixture {
    fn at(dir: &str, weights: &'static str) -> Self {
        Self {
            dir: super::root().join("tests/fixtures").join(dir),
            weights,
        }
    }

    /// The small ViT SAM (`segment_anything`).
    pub fn vit_b() -> Self {
        Self::at("sam", "sam_tiny")
    }

    /// The small MobileSAM (`mobile_sam`, TinyViT encoder).
    pub fn vit_t() -> Self {
        Self::at("sam_vit_t", "sam_vit_t_tiny")
    }

    pub fn pth(&self) -> PathBuf {
        self.dir.join(format!("{}.pth", self.weights))
    }

    pub fn safetensors(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.weights))
    }

    pub fn manifest(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn npy(&self, name: &str) -> Tensor {
        Tensor::read_npy(self.dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub fn predictor(&self, file: &std::path::Path) -> SamPredictor {
        SamPredictor::new(sam::load_sam(file, None, &Device::Cpu).unwrap())
    }

    /// The fixture image (the manifest's `image.file`, relative to the fixture folder).
    pub fn image(&self) -> image::RgbImage {
        let m = self.manifest();
        let file = self.dir.join(m["image"]["file"].as_str().unwrap());
        image::open(file).unwrap().to_rgb8()
    }

    /// The official embedding (the decoder tests then run on identical inputs).
    pub fn official_embedding(&self) -> Embedding {
        let m = self.manifest();
        let size = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        let r = &m["resized"]["shape"];
        Embedding {
            features: self.npy("embedding.npy"),
            original_size: (size(&m["image"]["height"]), size(&m["image"]["width"])),
            input_size: (size(&r[0]), size(&r[1])),
        }
    }

    pub fn prompt(&self, name: &str) -> Prompt {
        let m = self.manifest();
        let p = &m["prompts"][name];
        let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
        let mut out = Prompt::default();
        if let Some(b) = p["box"].as_array() {
            out.bbox = Some([f(&b[0]), f(&b[1]), f(&b[2]), f(&b[3])]);
        }
        if let Some(c) = p["point_coords"].as_array() {
            let labels = p["point_labels"].as_array().unwrap();
            for (xy, l) in c.iter().zip(labels) {
                out.points
                    .push((f(&xy[0]), f(&xy[1]), l.as_u64().unwrap() as u8));
            }
        }
        if p.get("mask_input").is_some() {
            out.mask_input = Some(self.npy("box_single_low.npy"));
        }
        out
    }

    fn official_masks(&self, name: &str, tag: &str, n: usize) -> Vec<Vec<bool>> {
        (0..n)
            .map(|i| {
                let file = self.dir.join(format!("{name}_{tag}_mask{i}.png"));
                let img = image::open(&file).unwrap().to_luma8();
                img.pixels().map(|p| p.0[0] > 127).collect()
            })
            .collect()
    }

    /// Compares one prediction with the official outputs (masks: IoU >= 0.99 each); returns
    /// the max abs logit/IoU-prediction difference.
    pub fn check_prediction(
        &self,
        name: &str,
        multimask: bool,
        pred: &Prediction,
        check_low: bool,
    ) -> f32 {
        let tag = if multimask { "multi" } else { "single" };
        let m = if multimask { 3 } else { 1 };
        let iou = Tensor::new(pred.iou_predictions.as_slice(), &Device::Cpu).unwrap();
        let mut worst = max_abs_diff(&iou, &self.npy(&format!("{name}_{tag}_iou.npy")));
        if check_low {
            let step = if multimask { 8 } else { 4 };
            let ours = subsample(&pred.low_res_logits, step);
            let theirs = self.npy(&format!("{name}_{tag}_low_sub{step}.npy"));
            worst = worst.max(max_abs_diff(&ours, &theirs));
            if name == "box" && !multimask {
                let d = max_abs_diff(&pred.low_res_logits, &self.npy("box_single_low.npy"));
                worst = worst.max(d);
            }
        }
        let ours: Vec<u8> = pred.masks.flatten_all().unwrap().to_vec1().unwrap();
        let per = ours.len() / m;
        for (i, theirs) in self.official_masks(name, tag, m).iter().enumerate() {
            let ours: Vec<bool> = ours[i * per..(i + 1) * per]
                .iter()
                .map(|v| *v > 0)
                .collect();
            let iou = mask_iou(&ours, theirs);
            eprintln!("{name}/{tag} mask {i}: IoU with official {iou:.5}");
            assert!(iou >= 0.99, "{name}/{tag} mask {i}: IoU {iou}");
        }
        worst
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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

/// `x[:, ::step, ::step]` of `[M, 256, 256]`.
pub fn subsample(x: &Tensor, step: usize) -> Tensor {
    let (m, h, w) = x.dims3().unwrap();
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let mut out = Vec::new();
    for k in 0..m {
        for y in (0..h).step_by(step) {
            for xx in (0..w).step_by(step) {
                out.push(v[k * h * w + y * w + xx]);
            }
        }
    }
    Tensor::from_vec(out, (m, h.div_ceil(step), w.div_ceil(step)), &Device::Cpu).unwrap()
}
