//! `SamPredictor::predict_batch` against one-prompt `predict` calls on the parity fixture.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medmine::models::sam::{self, Embedding, Prompt, SamPredictor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    let d = d.abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn setup() -> (SamPredictor, Embedding) {
    let sam = sam::load_sam(&dir().join("sam_tiny.safetensors"), None, &Device::Cpu).unwrap();
    let emb = Embedding {
        features: Tensor::read_npy(dir().join("embedding.npy")).unwrap(),
        original_size: (136, 160),
        input_size: (870, 1024),
    };
    (SamPredictor::new(sam), emb)
}

/// Boxes, single points, point pairs, box + points, with and without mask inputs, interleaved
/// so that every shape group is non-contiguous and some groups mix mask/no-mask prompts.
fn prompts() -> Vec<Prompt> {
    let low = Tensor::read_npy(dir().join("box_single_low.npy")).unwrap();
    let low2 = (low.clone() * -0.5).unwrap();
    let bx = |x0: f32, y0: f32, x1: f32, y1: f32| Prompt {
        bbox: Some([x0, y0, x1, y1]),
        ..Default::default()
    };
    let pts = |p: &[(f32, f32, u8)]| Prompt {
        points: p.to_vec(),
        ..Default::default()
    };
    let mut with_mask = pts(&[(70.0, 60.0, 1)]);
    with_mask.mask_input = Some(low.clone());
    let mut box_pts = bx(20.0, 15.0, 120.0, 110.0);
    box_pts.points = vec![(60.0, 55.0, 1), (100.0, 30.0, 0)];
    let mut box_mask = bx(10.0, 10.0, 90.0, 80.0);
    box_mask.mask_input = Some(low2);
    vec![
        bx(30.0, 25.0, 110.0, 100.0),
        pts(&[(60.0, 50.0, 1)]),
        bx(5.0, 5.0, 60.0, 70.0),
        with_mask,
        pts(&[(60.0, 50.0, 1), (20.0, 120.0, 0)]),
        box_pts,
        pts(&[(140.0, 30.0, 0)]),
        box_mask,
        bx(0.0, 0.0, 159.0, 135.0),
        pts(&[(10.0, 100.0, 1), (80.0, 80.0, 1)]),
    ]
}

#[test]
fn batched_equals_per_prompt_calls() {
    let (p, emb) = setup();
    let prompts = prompts();
    for multimask in [false, true] {
        let batch = p.predict_batch(&emb, &prompts, multimask).unwrap();
        assert_eq!(batch.len(), prompts.len());
        let mut worst = 0f32;
        for (i, (prompt, b)) in prompts.iter().zip(&batch).enumerate() {
            let one = p.predict(&emb, prompt, multimask).unwrap();
            assert_eq!(
                b.low_res_logits.dims(),
                one.low_res_logits.dims(),
                "prompt {i}"
            );
            let iou = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
            let d = max_abs_diff(&b.low_res_logits, &one.low_res_logits)
                .max(max_abs_diff(&b.logits, &one.logits))
                .max(max_abs_diff(
                    &iou(&b.iou_predictions),
                    &iou(&one.iou_predictions),
                ));
            assert!(d < 1e-5, "prompt {i} multimask={multimask}: max |diff| {d}");
            let flips = max_abs_diff(&b.masks, &one.masks);
            // a logit within 1e-5 of 0 could flip; none does on this fixture
            assert_eq!(flips, 0.0, "prompt {i}: masks differ");
            worst = worst.max(d);
        }
        eprintln!("multimask={multimask}: batched vs per-prompt max |diff| {worst:e}");
    }
}

#[test]
fn uniform_boxes_run_as_one_batch_and_empty_input_is_empty() {
    let (p, emb) = setup();
    let boxes: Vec<Prompt> = (0..6)
        .map(|k| Prompt {
            bbox: Some([5.0 * k as f32, 4.0, 60.0 + 10.0 * k as f32, 120.0]),
            ..Default::default()
        })
        .collect();
    let batch = p.predict_batch(&emb, &boxes, true).unwrap();
    for (b, prompt) in batch.iter().zip(&boxes) {
        let one = p.predict(&emb, prompt, true).unwrap();
        assert!(max_abs_diff(&b.low_res_logits, &one.low_res_logits) < 1e-5);
        assert_eq!(b.masks.dims(), &[3, 136, 160]);
    }
    assert!(p.predict_batch(&emb, &[], false).unwrap().is_empty());
    // a bad label in any prompt is an error, not a panic
    let bad = Prompt {
        points: vec![(1.0, 1.0, 3)],
        ..Default::default()
    };
    assert!(p
        .predict_batch(&emb, &[boxes[0].clone(), bad], false)
        .is_err());
}
