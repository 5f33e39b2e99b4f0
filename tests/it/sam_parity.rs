//! SAM parity with Meta's official PyTorch code (fixtures: `scripts/sam_fixtures.py`, a small
//! seeded SAM saved as `torch.save(state_dict)` and `.safetensors`; see
//! tests/fixtures/sam/manifest.json).

use std::path::{Path, PathBuf};

use crate::common::sam_fixture::{max_abs_diff, Fixture, PROMPTS};
use candle_core::{DType, Device, Tensor};
use medmine::models::sam::{self, preprocess, Prediction, Prompt, SamError, SamPredictor, Variant};
use sha2::{Digest, Sha256};

/// Absolute tolerance on embeddings, logits and IoU predictions (f32 on both sides; only the
/// order of accumulation differs). The fixture's outputs have a spread of about 1 (std of the
/// embedding 1.03, of the low-res logits 1.2-1.5), so this is ~1e-3 relative; the observed
/// differences are ~1e-6.
const TOL: f32 = 1e-3;

fn fx() -> Fixture {
    Fixture::vit_b()
}

fn dir() -> PathBuf {
    fx().dir
}

fn manifest() -> serde_json::Value {
    fx().manifest()
}

fn npy(name: &str) -> Tensor {
    fx().npy(name)
}

fn predictor(file: &str) -> SamPredictor {
    fx().predictor(&dir().join(file))
}

fn image() -> image::RgbImage {
    fx().image()
}

fn prompt(name: &str) -> Prompt {
    fx().prompt(name)
}

fn check_prediction(name: &str, multimask: bool, pred: &Prediction, check_low: bool) -> f32 {
    fx().check_prediction(name, multimask, pred, check_low)
}

#[test]
fn resize_is_pillow_bilinear_bit_for_bit() {
    let m = manifest();
    let resized = preprocess::resize_longest_side(&image());
    let shape = &m["resized"]["shape"];
    assert_eq!(resized.height() as u64, shape[0].as_u64().unwrap());
    assert_eq!(resized.width() as u64, shape[1].as_u64().unwrap());
    let sub = npy("resized_sub8.npy"); // [h'/8, w'/8, 3] u8
    let (sh, sw, _) = sub.dims3().unwrap();
    let theirs: Vec<u8> = sub.flatten_all().unwrap().to_vec1().unwrap();
    let mut ours = Vec::new();
    for y in 0..sh {
        for x in 0..sw {
            ours.extend(resized.get_pixel(8 * x as u32, 8 * y as u32).0);
        }
    }
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing, 0,
        "{differing} sub-sampled bytes differ from Pillow"
    );
    let hash = format!("{:x}", Sha256::digest(resized.as_raw()));
    assert_eq!(hash, m["resized"]["sha256"].as_str().unwrap());
}

#[test]
fn input_tensor_matches_sam_preprocess() {
    let p = predictor("sam_tiny.pth");
    let (input, _) = p.preprocess(&image()).unwrap(); // [1, 3, 1024, 1024]
    let sum = input
        .to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want = manifest()["input_sum"].as_f64().unwrap();
    assert!(
        (sum - want).abs() < 1e-3 * want.abs().max(1.0),
        "{sum} vs {want}"
    );
    let v: Vec<f32> = input.flatten_all().unwrap().to_vec1().unwrap();
    let sub: Vec<f32> = (0..3)
        .flat_map(|c| {
            let v = &v;
            (0..64).flat_map(move |y| (0..64).map(move |x| v[(c * 1024 + 16 * y) * 1024 + 16 * x]))
        })
        .collect();
    let sub = Tensor::from_vec(sub, (3, 64, 64), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&sub, &npy("input_sub16.npy")), 0.0);
}

#[test]
fn embedding_matches_official() {
    let p = predictor("sam_tiny.pth");
    let emb = p.set_image(&image()).unwrap();
    let theirs = npy("embedding.npy");
    let d = max_abs_diff(&emb.features, &theirs);
    eprintln!("embedding max |diff| {d:e}");
    assert!(d < TOL, "embedding max |diff| {d}");
}

#[test]
fn decoder_matches_official_on_identical_embedding() {
    let p = predictor("sam_tiny.pth");
    let emb = fx().official_embedding();
    for name in PROMPTS {
        for multimask in [false, true] {
            let pred = p.predict(&emb, &prompt(name), multimask).unwrap();
            let d = check_prediction(name, multimask, &pred, true);
            eprintln!("{name} multimask={multimask}: logits/IoU max |diff| {d:e}");
            assert!(d < TOL, "{name} multimask={multimask}: max |diff| {d}");
        }
    }
}

#[test]
fn end_to_end_from_image_file() {
    let p = predictor("sam_tiny.safetensors");
    let img = image::open(dir().join("image.png")).unwrap().to_rgb8();
    let emb = p.set_image(&img).unwrap();
    for name in PROMPTS {
        for multimask in [false, true] {
            let pred = p.predict(&emb, &prompt(name), multimask).unwrap();
            let (m, h, w) = pred.masks.dims3().unwrap();
            assert_eq!((m, h, w), (if multimask { 3 } else { 1 }, 136, 160));
            let d = check_prediction(name, multimask, &pred, true);
            eprintln!("end-to-end {name} multimask={multimask}: max |diff| {d:e}");
            assert!(d < TOL, "{name} multimask={multimask}: max |diff| {d}");
        }
    }
}

#[test]
fn pth_and_safetensors_give_identical_outputs() {
    let a = predictor("sam_tiny.pth");
    let b = predictor("sam_tiny.safetensors");
    let ea = a.set_image(&image()).unwrap();
    let eb = b.set_image(&image()).unwrap();
    assert_eq!(max_abs_diff(&ea.features, &eb.features), 0.0);
    let pa = a.predict(&ea, &prompt("box_points"), true).unwrap();
    let pb = b.predict(&ea, &prompt("box_points"), true).unwrap();
    assert_eq!(max_abs_diff(&pa.low_res_logits, &pb.low_res_logits), 0.0);
    assert_eq!(pa.iou_predictions, pb.iou_predictions);
}

#[test]
fn detects_the_fixture_config_from_keys() {
    let path = dir().join("sam_tiny.pth");
    let shapes = sam::checkpoint::read_shapes(&path).unwrap();
    let cfg = sam::detect_config(&path, &shapes).unwrap();
    assert_eq!(
        cfg.encoder,
        sam::EncoderConfig::Vit {
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            global_attn_indexes: vec![1],
            window_size: 14
        }
    );
    assert_eq!((cfg.prompt_embed_dim, cfg.decoder_mlp_dim), (32, 64));
    assert_eq!(cfg.name(), "custom");
    assert_eq!(sam::Config::vit_b().name(), "vit_b");
    assert_eq!(sam::Config::vit_t().variant(), Some(Variant::VitT));
}

fn load_err(path: &Path, variant: Option<Variant>) -> String {
    match sam::load_sam(path, variant, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_or_damaged_checkpoints_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // a medmine U-Net++ checkpoint (keys as NestedUNet's state dict)
    let unet = tmp.path().join("best.safetensors");
    let w = Tensor::zeros((16, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("conv0_0.conv1.weight".to_string(), w)]),
        &unet,
    )
    .unwrap();
    let e = load_err(&unet, None);
    assert!(
        e.contains("expected a SAM checkpoint") && e.contains("U-Net++"),
        "{e}"
    );
    assert!(e.contains("best.safetensors"), "{e}");
    let e = load_err(&unet, Some(Variant::VitB));
    assert!(e.contains("expected a SAM checkpoint"), "{e}");

    // truncated downloads, both formats
    for name in ["sam_tiny.pth", "sam_tiny.safetensors"] {
        let bytes = std::fs::read(dir().join(name)).unwrap();
        let cut = tmp.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_err(&cut, None);
        assert!(
            e.contains("cannot read the checkpoint") && e.contains(name),
            "{e}"
        );
    }
    // a forced variant that does not fit
    let e = load_err(&dir().join("sam_tiny.pth"), Some(Variant::VitB));
    assert!(e.contains("does not match SAM vit_b"), "{e}");
    let e = load_err(&dir().join("sam_tiny.pth"), Some(Variant::VitT));
    assert!(e.contains("does not match SAM vit_t"), "{e}");
    assert!(matches!(
        Variant::parse("vit_x"),
        Err(SamError::UnknownVariant(_))
    ));
}
