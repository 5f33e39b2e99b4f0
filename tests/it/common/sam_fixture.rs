//! The SAM parity fixtures made by the official PyTorch code (`scripts/sam_fixtures.py`:
//! tests/fixtures/sam, a small vit_b-style SAM; `scripts/sam_fixtures_vit_t.py`:
//! tests/fixtures/sam_vit_t, a small MobileSAM): the library's reader
//! ([`medmine::check::sam::SamFixture`], also behind `medmine check`) with the tests' panics.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use medmine::check::sam::SamFixture;
use medmine::models::sam::{self, Embedding, Prediction, Prompt, SamPredictor};

pub use medmine::check::sam::PROMPTS;

pub struct Fixture {
    pub dir: PathBuf,
    inner: SamFixture,
}

impl Fixture {
    fn at(dir: &str, weights: &'static str) -> Self {
        let dir = super::root().join("tests/fixtures").join(dir);
        let inner = SamFixture::open(&dir, weights).unwrap();
        Self { dir, inner }
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
        self.inner.pth()
    }

    pub fn safetensors(&self) -> PathBuf {
        self.inner.safetensors()
    }

    pub fn manifest(&self) -> serde_json::Value {
        self.inner.manifest().clone()
    }

    pub fn npy(&self, name: &str) -> Tensor {
        self.inner.npy(name).unwrap()
    }

    pub fn predictor(&self, file: &std::path::Path) -> SamPredictor {
        SamPredictor::new(sam::load_sam(file, None, &Device::Cpu).unwrap())
    }

    pub fn image(&self) -> image::RgbImage {
        self.inner.image().unwrap()
    }

    /// The official embedding (the decoder tests then run on identical inputs).
    pub fn official_embedding(&self) -> Embedding {
        self.inner.official_embedding().unwrap()
    }

    pub fn prompt(&self, name: &str) -> Prompt {
        self.inner.prompt(name).unwrap()
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
        assert!(check_low, "the logits are always compared");
        let (worst, min_iou) = self.inner.compare(name, multimask, pred).unwrap();
        eprintln!("{name} multimask={multimask}: smallest mask IoU with official {min_iou:.5}");
        assert!(
            min_iou >= 0.99,
            "{name} multimask={multimask}: mask IoU {min_iou}"
        );
        worst as f32
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    medmine::check::max_abs_diff(a, b).unwrap() as f32
}
