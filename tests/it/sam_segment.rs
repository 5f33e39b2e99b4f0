//! The logic of `medmine segment` on the parity fixtures (tests/fixtures/sam).
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use medmine::models::sam::segment::{parse_box, parse_point};
use medmine::models::sam::{segment, SegmentRequest};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam")
}

fn luma(path: &Path) -> Vec<bool> {
    let img = image::open(path).unwrap().to_luma8();
    img.pixels().map(|p| p.0[0] > 127).collect()
}

#[test]
fn segment_writes_the_official_mask_and_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut req = SegmentRequest {
        sam: dir().join("sam_tiny.pth"),
        image: dir().join("image.png"),
        bbox: Some(parse_box("30,25,110,100").unwrap()),
        out: tmp.path().join("mask.png"),
        logits: Some(tmp.path().join("logits.npy")),
        ..Default::default()
    };
    let rep = segment(&req, &Device::Cpu).unwrap();
    assert_eq!((rep.variant.as_str(), rep.mask_index), ("custom", 0));
    let want = luma(&dir().join("box_single_mask0.png"));
    assert_eq!(luma(&req.out), want);
    let logits = Tensor::read_npy(tmp.path().join("logits.npy")).unwrap();
    assert_eq!(logits.dims(), &[136, 160]);
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().zip(&want).all(|(l, m)| (*l > 0.0) == *m));

    // --multimask keeps the mask with the highest predicted IoU
    req.multimask = true;
    req.bbox = None;
    req.points = vec![
        parse_point("70,60,1").unwrap(),
        parse_point("140,20,0").unwrap(),
    ];
    let rep = segment(&req, &Device::Cpu).unwrap();
    let iou = Tensor::read_npy(dir().join("points_multi_iou.npy")).unwrap();
    let iou: Vec<f32> = iou.to_vec1().unwrap();
    let best = (0..3).fold(0, |b, i| if iou[i] > iou[b] { i } else { b });
    assert_eq!(rep.mask_index, best);
    assert!((rep.predicted_iou - iou[best]).abs() < 1e-3);
    let want = luma(&dir().join(format!("points_multi_mask{best}.png")));
    assert_eq!(luma(&req.out), want);

    // mask input from a .npy of low-res logits
    req.multimask = false;
    req.points.truncate(1);
    req.mask_input = Some(dir().join("box_single_low.npy"));
    segment(&req, &Device::Cpu).unwrap();
    assert_eq!(
        luma(&req.out),
        luma(&dir().join("mask_points_single_mask0.png"))
    );
}

#[test]
fn bad_prompts_are_clear_errors() {
    assert!(parse_box("1,2,3")
        .unwrap_err()
        .to_string()
        .contains("--box"));
    assert!(parse_box("5,5,1,1").is_err());
    assert!(parse_point("1,2,3")
        .unwrap_err()
        .to_string()
        .contains("LABEL"));
    assert!(parse_point("a,2,1").is_err());
    let tmp = tempfile::tempdir().unwrap();
    let req = SegmentRequest {
        sam: dir().join("sam_tiny.pth"),
        image: dir().join("image.png"),
        out: tmp.path().join("m.png"),
        ..Default::default()
    };
    let e = segment(&req, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("--box"), "{e}");
    let req = SegmentRequest {
        mask_input: Some(dir().join("embedding.npy")),
        ..req
    };
    let e = segment(&req, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("embedding.npy") && e.contains("256"), "{e}");
}
