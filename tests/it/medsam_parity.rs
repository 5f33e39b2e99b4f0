//! MedSAM and LiteMedSAM parity with their official inference scripts (bowang-lab/MedSAM:
//! `MedSAM_Inference.py`, `CVPR24_LiteMedSAM_infer.py`), fixtures from
//! `scripts/medsam_fixtures.py` (tests/fixtures/medsam, tests/fixtures/litemedsam; each
//! manifest.json says what is there): a portrait image smaller than the input square and a
//! landscape one larger, one box each, small seeded models.
use std::path::PathBuf;

use crate::common::sam_fixture::max_abs_diff;
use candle_core::{DType, Device, IndexOp, Tensor};
use medmine::models::sam::{
    self, checkpoint, EncoderConfig, InputRules, Prompt, SamError, SamPredictor, Variant,
};
use sha2::{Digest, Sha256};

/// The SAM suites' absolute tolerance on embeddings and logits (outputs spread ~1).
const TOL: f32 = 1e-3;
const IMAGES: [&str; 2] = ["portrait", "landscape"];

fn dir(which: &str) -> PathBuf {
    crate::common::root().join("tests/fixtures").join(which)
}

fn manifest(which: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir(which).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn npy(which: &str, name: &str) -> Tensor {
    Tensor::read_npy(dir(which).join(name)).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    image::open(dir("medsam").join(format!("{name}.png")))
        .unwrap()
        .to_rgb8()
}

fn gray(path: PathBuf) -> Vec<u8> {
    image::open(path).unwrap().to_luma8().into_raw()
}

fn box_of(m: &serde_json::Value, name: &str) -> [f32; 4] {
    let b = &m["images"][name]["box"];
    [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32)
}

/// `[.., H, W]` -> `[.., ::step, ::step]`.
fn sub(t: &Tensor, step: usize) -> Tensor {
    let n = t.rank();
    let mut t = t.clone();
    for axis in [n - 2, n - 1] {
        let len = t.dim(axis).unwrap();
        let idx: Vec<u32> = (0..len).step_by(step).map(|i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), t.device()).unwrap();
        t = t.index_select(&idx, axis).unwrap();
    }
    t
}

/// Pixels where two 0/1 masks differ, and their IoU.
fn mask_agreement(ours: &[u8], official: &[u8]) -> (usize, f64) {
    assert_eq!(ours.len(), official.len());
    let (mut inter, mut union, mut differ) = (0usize, 0usize, 0usize);
    for (a, b) in ours.iter().zip(official) {
        let (a, b) = (*a > 0, *b > 0);
        inter += usize::from(a && b);
        union += usize::from(a || b);
        differ += usize::from(a != b);
    }
    (differ, inter as f64 / union.max(1) as f64)
}

/// The image's embedding and the official box's prediction, with their largest differences
/// from the fixture `which`'s (embedding, low-res logits).
fn embed_and_box(
    p: &SamPredictor,
    img: &image::RgbImage,
    which: &str,
    m: &serde_json::Value,
    name: &str,
) -> (medmine::models::sam::Prediction, f32, f32) {
    let emb = p.set_image(img).unwrap();
    let d_emb = max_abs_diff(
        &sub(&emb.features, 4),
        &npy(which, &format!("{name}_embedding_sub4.npy")),
    );
    let prompt = Prompt {
        bbox: Some(box_of(m, name)),
        ..Default::default()
    };
    let pred = p.predict(&emb, &prompt, false).unwrap();
    let d_low = max_abs_diff(
        &sub(&pred.low_res_logits, 4),
        &npy(which, &format!("{name}_low_sub4.npy")),
    );
    (pred, d_emb, d_low)
}

fn medsam() -> SamPredictor {
    let pth = dir("sam").join("sam_tiny.pth"); // the generator checks: the same tensors
    SamPredictor::new(sam::load_sam(&pth, Some(Variant::MedSam), &Device::Cpu).unwrap())
}

#[test]
fn medsam_resize_is_skimage_byte_for_byte() {
    let m = manifest("medsam");
    for name in IMAGES {
        let ours = sam::skimage::resize_order3_antialiased(&image(name), 1024, 1024);
        let rowsum = npy("medsam", &format!("{name}_resized_rowsum.npy"))
            .to_vec1::<i64>()
            .unwrap();
        let rows_differ = ours
            .chunks_exact(1024 * 3)
            .zip(&rowsum)
            .filter(|(r, s)| r.iter().map(|&v| v as i64).sum::<i64>() != **s)
            .count();
        let sub8 = npy("medsam", &format!("{name}_resized_sub8.npy"))
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let mut ours8 = Vec::new();
        for y in (0..1024).step_by(8) {
            for x in (0..1024).step_by(8) {
                ours8.extend_from_slice(&ours[(y * 1024 + x) * 3..][..3]);
            }
        }
        let bytes_differ = ours8.iter().zip(&sub8).filter(|(a, b)| a != b).count();
        let sha = format!("{:x}", Sha256::digest(&ours));
        eprintln!(
            "{name}: rows with another sum {rows_differ}, sampled bytes differing {bytes_differ}"
        );
        assert_eq!(
            sha,
            m["images"][name]["resized_sha256"].as_str().unwrap(),
            "{name}: resized bytes differ from skimage's"
        );
    }
}

#[test]
fn medsam_end_to_end_matches_the_official_script() {
    let m = manifest("medsam");
    let p = medsam();
    assert_eq!(p.sam.config().rules, InputRules::MedSam);
    for name in IMAGES {
        let img = image(name);
        let (input, input_size) = p.preprocess(&img).unwrap();
        assert_eq!(
            input_size,
            (1024, 1024),
            "MedSAM: no aspect ratio, no padding"
        );
        let d_in = max_abs_diff(
            &sub(&input.i(0).unwrap(), 16),
            &npy("medsam", &format!("{name}_input_sub16.npy")),
        );
        let (pred, d_emb, d_low) = embed_and_box(&p, &img, "medsam", &m, name);
        // the probabilities: sigmoid of our logits (the logits of the resized probabilities)
        let prob = candle_nn::ops::sigmoid(&pred.logits.i(0).unwrap()).unwrap();
        let d_prob = max_abs_diff(
            &sub(&prob, 8),
            &npy("medsam", &format!("{name}_prob_sub8.npy")),
        );
        let ours: Vec<u8> = pred.masks.flatten_all().unwrap().to_vec1().unwrap();
        let (differ, iou) =
            mask_agreement(&ours, &gray(dir("medsam").join(format!("{name}_mask.png"))));
        eprintln!(
            "medsam {name}: input {d_in:e}, embedding {d_emb:e}, low-res logits {d_low:e}, \
             probabilities {d_prob:e}, mask pixels differing {differ} (IoU {iou:.6})"
        );
        assert!(d_in < 1e-6, "{name}: input {d_in}");
        assert!(d_emb < TOL, "{name}: embedding {d_emb}");
        assert!(d_low < TOL, "{name}: low-res logits {d_low}");
        assert!(d_prob < TOL, "{name}: probabilities {d_prob}");
        assert!(iou >= 0.999, "{name}: mask IoU {iou}");
    }
}

#[test]
fn medsam_refuses_points_and_mask_inputs() {
    let p = medsam();
    let emb = p.set_image(&image("portrait")).unwrap();
    let points = Prompt {
        points: vec![(50.0, 60.0, 1)],
        ..Default::default()
    };
    let e = p.predict(&emb, &points, false).unwrap_err().to_string();
    assert!(e.contains("MedSAM") && e.contains("box"), "{e}");
    let both = Prompt {
        points: vec![(50.0, 60.0, 1)],
        bbox: Some([20.0, 30.0, 100.0, 120.0]),
        ..Default::default()
    };
    assert!(p.predict(&emb, &both, false).is_err());
    let mask = Prompt {
        bbox: Some([20.0, 30.0, 100.0, 120.0]),
        mask_input: Some(Tensor::zeros((1, 256, 256), DType::F32, &Device::Cpu).unwrap()),
        ..Default::default()
    };
    assert!(p.predict(&emb, &mask, false).is_err());
}

#[test]
fn auto_will_not_guess_a_file_named_medsam() {
    let tmp = tempfile::tempdir().unwrap();
    let named = tmp.path().join("medsam_vit_b.pth");
    std::fs::copy(dir("sam").join("sam_tiny.pth"), &named).unwrap();
    match sam::load_sam(&named, None, &Device::Cpu) {
        Err(e @ SamError::Ambiguous { .. }) => {
            assert!(e.to_string().contains("--sam-variant medsam"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("auto loaded a MedSAM-named file"),
    }
    // the flag decides; the same file under SAM's name is SAM
    let s = sam::load_sam(&named, Some(Variant::MedSam), &Device::Cpu).unwrap();
    assert_eq!(s.config().rules, InputRules::MedSam);
    let s = sam::load_sam(&dir("sam").join("sam_tiny.pth"), None, &Device::Cpu).unwrap();
    assert_eq!(s.config().rules, InputRules::Sam);
    // a ViT is not LiteMedSAM
    match sam::load_sam(&named, Some(Variant::LiteMedSam), &Device::Cpu) {
        Err(e @ SamError::WrongVariant { .. }) => assert!(e.to_string().contains("ViT"), "{e}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded a ViT as LiteMedSAM"),
    }
}

#[test]
fn variants_parse_and_name() {
    assert_eq!(Variant::parse("medsam").unwrap(), Some(Variant::MedSam));
    assert_eq!(
        Variant::parse("litemedsam").unwrap(),
        Some(Variant::LiteMedSam)
    );
    let e = Variant::parse("med_sam").unwrap_err().to_string();
    assert!(e.contains("medsam") && e.contains("litemedsam"), "{e}");
    assert_eq!(sam::Config::medsam().name(), "medsam");
    assert_eq!(sam::Config::lite_medsam().name(), "litemedsam");
    assert_eq!(sam::Config::lite_medsam().image_size(), 256);
    // MedSAM's sizes are SAM vit_b's: only the rules differ
    let (a, b) = (sam::Config::medsam(), sam::Config::vit_b());
    assert_eq!(
        (a.encoder, a.prompt_embed_dim),
        (b.encoder, b.prompt_embed_dim)
    );
}

// ---- LiteMedSAM -----------------------------------------------------------------------------

fn lite() -> SamPredictor {
    let pth = dir("litemedsam").join("litemedsam_tiny.pth");
    SamPredictor::new(sam::load_sam(&pth, None, &Device::Cpu).unwrap())
}

#[test]
fn litemedsam_is_detected_from_its_patch_embedding() {
    let pth = dir("litemedsam").join("litemedsam_tiny.pth");
    let cfg = sam::detect_config(&pth, &checkpoint::read_shapes(&pth).unwrap()).unwrap();
    assert_eq!(cfg.rules, InputRules::LiteMedSam);
    assert_eq!(cfg.image_size(), 256);
    match &cfg.encoder {
        EncoderConfig::TinyVit(c) => {
            assert_eq!(c.patch_embed_kernel, 1);
            assert_eq!(c.embed_dims, [16, 32, 48, 320]);
        }
        other => panic!("{other:?}"),
    }
    // and MobileSAM stays MobileSAM
    let mobile = dir("sam_vit_t").join("sam_vit_t_tiny.pth");
    let cfg = sam::detect_config(&mobile, &checkpoint::read_shapes(&mobile).unwrap()).unwrap();
    assert_eq!(cfg.rules, InputRules::Sam);
    // forcing litemedsam on MobileSAM is refused, forcing it on LiteMedSAM is fine
    assert!(sam::load_sam(&mobile, Some(Variant::LiteMedSam), &Device::Cpu).is_err());
    assert!(sam::load_sam(&pth, Some(Variant::LiteMedSam), &Device::Cpu).is_ok());
}

#[test]
fn litemedsam_end_to_end_matches_the_official_script() {
    let m = manifest("litemedsam");
    let p = lite();
    for name in IMAGES {
        let img = image(name);
        let want = image::open(dir("litemedsam").join(format!("{name}_resized.png")))
            .unwrap()
            .to_rgb8();
        let (_, input_size) = p.preprocess(&img).unwrap();
        let r = &m["images"][name]["resized"];
        let (nh, nw) = (
            r[0].as_u64().unwrap() as usize,
            r[1].as_u64().unwrap() as usize,
        );
        assert_eq!(input_size, (nh, nw));
        let ours = sam::cv_area::resize_area_rgb(&img, nh, nw);
        let off_by: Vec<i32> = ours
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| *a as i32 - *b as i32)
            .filter(|d| *d != 0)
            .collect();
        let worst = off_by.iter().map(|d| d.abs()).max().unwrap_or(0);
        let (pred, d_emb, d_low) = embed_and_box(&p, &img, "litemedsam", &m, name);
        let d_logits = max_abs_diff(
            &sub(&pred.logits.i(0).unwrap(), 8),
            &npy("litemedsam", &format!("{name}_logits_sub8.npy")),
        );
        let ours_mask: Vec<u8> = pred.masks.flatten_all().unwrap().to_vec1().unwrap();
        let (differ, iou) = mask_agreement(
            &ours_mask,
            &gray(dir("litemedsam").join(format!("{name}_mask.png"))),
        );
        eprintln!(
            "litemedsam {name}: resized bytes differing {} (by at most {worst}), embedding \
             {d_emb:e}, low-res logits {d_low:e}, logits {d_logits:e}, mask pixels differing \
             {differ} (IoU {iou:.6})",
            off_by.len()
        );
        assert_eq!(off_by.len(), 0, "{name}: cv2 INTER_AREA bytes differ");
        assert!(d_emb < TOL, "{name}: embedding {d_emb}");
        assert!(d_low < TOL, "{name}: low-res logits {d_low}");
        assert!(d_logits < TOL, "{name}: logits {d_logits}");
        assert!(iou >= 0.999, "{name}: mask IoU {iou}");
    }
}

// ---- mining ---------------------------------------------------------------------------------

/// Mining with MedSAM follows its prompt rules whatever the strategy: one box per component,
/// one mask per box, refinement moves only the box, and no IoU-head score.
#[test]
fn mining_with_medsam_uses_boxes_and_no_iou_head() {
    use medmine::mining::{mine_image, MiningConfig};
    use medmine::prompts::Strategy;
    let p = medsam();
    let (w, h) = (64usize, 48usize);
    let (img, probs) = crate::common::two_discs();
    let emb = p.set_image(&img).unwrap();
    for strategy in [Strategy::BoxPointsMask, Strategy::Points, Strategy::Box] {
        let mut cfg = MiningConfig {
            rounds: 3,
            stop_iou: 1.0,
            multimask: true,
            ..MiningConfig::default()
        };
        cfg.prompt.strategy = strategy;
        let mined = mine_image("synthetic", &p, &emb, &probs, w, h, &cfg)
            .unwrap()
            .expect("two components");
        assert_eq!(mined.components, 2);
        for (k, r) in mined.rounds.iter().enumerate() {
            assert_eq!(r.prompts.boxes_in_image.len(), 2, "one box per component");
            assert!(r.prompts.points_in_image.is_empty(), "round {k}: points");
            assert!(!r.prompts.mask_prompt, "round {k}: mask prompt");
            let want = if k == 0 { "box" } else { "refine" };
            let got = r.prompts.strategy.clone().unwrap_or_default();
            assert!(got.starts_with(want), "round {k}: {got}");
            assert_eq!(r.sam_iou, None, "MedSAM's IoU head is not used");
            let stability = r.stability.expect("stability measured");
            assert!((0.0..=1.0).contains(&stability));
            assert!(r.agreement.is_some() && r.quality().is_some());
        }
    }
}

/// `medmine segment` with MedSAM: the flag is required for a MedSAM-named file, the mask is
/// the official script's, points are refused with a message that says why.
#[test]
fn segment_cli_with_medsam() {
    use crate::common::{fails, ok, s};
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("medsam_vit_b.pth");
    std::fs::copy(dir("sam").join("sam_tiny.pth"), &ck).unwrap();
    let img = dir("medsam").join("portrait.png");
    let out = tmp.path().join("mask.png");
    let base = [
        "segment",
        "--sam",
        s(&ck),
        "--image",
        s(&img),
        "--out",
        s(&out),
    ];
    let err = fails(&[&base[..], &["--box", "20,30,100,120"]].concat());
    assert!(err.contains("--sam-variant medsam"), "{err}");
    let flag = ["--sam-variant", "medsam"];
    let said = ok(&[&base[..], &flag, &["--box", "20,30,100,120"]].concat());
    assert!(said.contains("medsam") || said.contains("custom"), "{said}");
    let (differ, iou) = mask_agreement(
        &gray(out.clone()),
        &gray(dir("medsam").join("portrait_mask.png")),
    );
    assert_eq!(differ, 0, "IoU {iou}");
    let err = fails(
        &[
            &base[..],
            &flag,
            &["--box", "20,30,100,120", "--point", "50,60,1"],
        ]
        .concat(),
    );
    assert!(err.contains("MedSAM") && err.contains("box"), "{err}");
}
