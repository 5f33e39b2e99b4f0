use super::*;

/// A `width x height` map with probability 0.9 inside the discs (cx, cy, r), 0.1 outside.
fn discs(width: usize, height: usize, discs: &[(i64, i64, i64)]) -> Vec<f32> {
    (0..width * height)
        .map(|i| {
            let p = to_point(i, width);
            if discs.iter().any(|&d| in_disc(p, d)) {
                0.9
            } else {
                0.1
            }
        })
        .collect()
}

fn in_disc((x, y): (f32, f32), (cx, cy, r): (i64, i64, i64)) -> bool {
    let (dx, dy) = (x as i64 - cx, y as i64 - cy);
    x.fract() == 0.0 && y.fract() == 0.0 && dx * dx + dy * dy <= r * r
}

fn cfg(min_area: usize, margin: f32, k_pos: usize, k_neg: usize) -> PromptConfig {
    PromptConfig {
        threshold: 0.5,
        min_area,
        box_margin: margin,
        positives_k: k_pos,
        negatives_k: k_neg,
        negative_band: 4,
        strategy: Strategy::BoxPoints,
    }
}

#[test]
fn two_discs_give_two_exact_boxes_and_valid_points() {
    let (w, h) = (64, 48);
    let d = [(15, 20, 6), (45, 25, 8)];
    let probs = discs(w, h, &d);
    let out = prompts_from_probs(&probs, w, h, &cfg(1, 0.0, 3, 3)).expect("valid map");
    assert_eq!(out.components.len(), 2);
    assert_eq!(out.components[0].box_in_image, [9.0, 14.0, 22.0, 27.0]);
    assert_eq!(out.components[1].box_in_image, [37.0, 17.0, 54.0, 34.0]);
    assert!(
        out.components.iter().all(|c| c.mask_prompt.is_none()),
        "box+points builds no mask prompt"
    );
    for (c, &disc) in out.components.iter().zip(&d) {
        let n = (0..w * h)
            .filter(|&i| in_disc(to_point(i, w), disc))
            .count();
        assert_eq!(c.area, n);
        assert_eq!(c.positives_in_image.len(), 3);
        assert_eq!(c.positives_in_image[0], (disc.0 as f32, disc.1 as f32));
        for &p in &c.positives_in_image {
            assert!(in_disc(p, disc), "positive {p:?} outside disc {disc:?}");
        }
        // spread apart: at least max(1, r/2) between positives
        let spacing = (disc.2 as f32 / 2.0).max(1.0);
        for (a, pa) in c.positives_in_image.iter().enumerate() {
            for pb in &c.positives_in_image[a + 1..] {
                let dd = ((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt();
                assert!(dd >= spacing - 0.5, "{pa:?} and {pb:?} too close");
            }
        }
        assert_eq!(c.negatives_in_image.len(), 3);
        for &(x, y) in &c.negatives_in_image {
            assert!(x >= 0.0 && y >= 0.0 && x < w as f32 && y < h as f32);
            assert!(
                d.iter().all(|&dd| !in_disc((x, y), dd)),
                "({x}, {y}) inside"
            );
            // in the band around the box
            let b = c.box_in_image;
            assert!(x >= b[0] - 4.0 && x < b[2] + 4.0 && y >= b[1] - 4.0 && y < b[3] + 4.0);
            assert!(!(x >= b[0] && x < b[2] && y >= b[1] && y < b[3]));
        }
    }
    // The first negative of disc 0: all probabilities 0.1, so the band pixel nearest the
    // box centre (15, 20): the band row just above the box, in the centre column.
    assert_eq!(out.components[0].negatives_in_image[0], (15.0, 13.0));
}

#[test]
fn small_component_is_dropped() {
    let (w, h) = (40, 30);
    let mut probs = discs(w, h, &[(25, 15, 5)]);
    for (x, y) in [(2, 2), (3, 2), (2, 3), (3, 3)] {
        probs[y * w + x] = 1.0;
    }
    let all = prompts_from_probs(&probs, w, h, &cfg(1, 0.0, 1, 1)).expect("valid");
    assert_eq!(all.components.len(), 2);
    assert_eq!(all.components[0].box_in_image, [2.0, 2.0, 4.0, 4.0]);
    assert_eq!(all.components[0].area, 4);
    let kept = prompts_from_probs(&probs, w, h, &cfg(5, 0.0, 1, 4)).expect("valid");
    assert_eq!(kept.components.len(), 1);
    assert_eq!(kept.components[0].box_in_image, [20.0, 10.0, 31.0, 21.0]);
    assert_eq!(kept.components[0].positives_in_image, vec![(25.0, 15.0)]);
}

#[test]
fn diagonal_neighbours_are_one_component() {
    let (w, h) = (6, 6);
    let mut probs = vec![0.0f32; w * h];
    for i in 0..4 {
        probs[(i + 1) * w + i + 1] = 1.0;
    }
    let out = prompts_from_probs(&probs, w, h, &cfg(1, 0.0, 1, 1)).expect("valid");
    assert_eq!(out.components.len(), 1);
    assert_eq!(out.components[0].box_in_image, [1.0, 1.0, 5.0, 5.0]);
}

#[test]
fn margin_expands_and_clamps_at_the_border() {
    let (w, h) = (50, 42);
    let mut probs = vec![0.0f32; w * h];
    for y in 30..40 {
        for x in 2..10 {
            probs[y * w + x] = 0.8;
        }
    }
    let tight = prompts_from_probs(&probs, w, h, &cfg(1, 0.0, 1, 0)).expect("valid");
    assert_eq!(tight.components[0].box_in_image, [2.0, 30.0, 10.0, 40.0]);
    assert!(tight.components[0].negatives_in_image.is_empty());
    // 8 wide, 10 high: margins 2 and 2.5 per side; x0 and y1 clamp to the image.
    let out = prompts_from_probs(&probs, w, h, &cfg(1, 0.25, 1, 2)).expect("valid");
    assert_eq!(out.components[0].box_in_image, [0.0, 27.5, 12.0, 42.0]);
    // depth 4 (set by the 8-pixel width) ties over columns 5..=6, rows 33..=36;
    // raster order picks (5, 33)
    assert_eq!(out.components[0].positives_in_image, vec![(5.0, 33.0)]);
    for &(x, y) in &out.components[0].negatives_in_image {
        assert!(probs[y as usize * w + x as usize] < 0.5);
    }
}

#[test]
fn object_touching_the_border_keeps_its_positive_inside() {
    // A 3-row strip along the top edge: the image edge counts as background, so the
    // deepest row is the middle one, not row 0.
    let (w, h) = (20, 10);
    let mut probs = vec![0.0f32; w * h];
    probs[..3 * w].iter_mut().for_each(|p| *p = 1.0);
    let out = prompts_from_probs(&probs, w, h, &cfg(1, 0.0, 1, 1)).expect("valid");
    let c = &out.components[0];
    assert_eq!(c.box_in_image, [0.0, 0.0, 20.0, 3.0]);
    assert_eq!(c.positives_in_image[0].1, 1.0);
    let (x, y) = c.negatives_in_image[0];
    assert!((3.0..7.0).contains(&y) && x < 20.0);
}

#[test]
fn empty_and_full_maps() {
    let (w, h) = (32, 16);
    let empty = vec![0.0f32; w * h];
    let mut c = cfg(1, 0.0, 2, 2);
    c.strategy = Strategy::BoxPointsMask;
    let out = prompts_from_probs(&empty, w, h, &c).expect("valid");
    assert!(out.components.is_empty());
    assert!(out.owner.iter().all(|&o| o == 0), "no territory");
    // all foreground: one component, no background for negatives, a full mask prompt
    let full = vec![1.0f32; w * h];
    let out = prompts_from_probs(&full, w, h, &c).expect("valid");
    assert_eq!(out.components.len(), 1);
    assert_eq!(out.components[0].box_in_image, [0.0, 0.0, 32.0, 16.0]);
    assert!(out.components[0].negatives_in_image.is_empty());
    let m = out.components[0].mask_prompt.as_ref().expect("mask prompt");
    // 32x16 fills SAM's input 1024x512: the top 128 of the 256 low-res rows
    assert_eq!(m.iter().filter(|&&v| v == LOGIT_CLAMP).count(), 128 * 256);
    let zero = prompts_from_probs(&[], 0, 0, &c).expect("empty image");
    assert!(zero.components.is_empty());
}

#[test]
fn size_mismatch_is_an_error() {
    let err = prompts_from_probs(&[0.5; 10], 4, 3, &PromptConfig::default());
    assert!(matches!(
        err,
        Err(PromptError::SizeMismatch { len: 10, .. })
    ));
    assert!(mask_prompt_from_probs(&[0.5; 10], 4, 3).is_err());
}

#[test]
fn mask_prompt_respects_resize_and_padding() {
    // H = 100, W = 200: scale 5.12, resized (512, 1024): the top 128 of 256 rows.
    let (w, h) = (200, 100);
    let probs: Vec<f32> = (0..w * h)
        .map(|i| if i % w < 100 { 0.9 } else { 0.1 })
        .collect();
    let m = mask_prompt_from_probs(&probs, w, h).expect("valid");
    assert_eq!(m.len(), 256 * 256);
    for i in 0..256 {
        for j in 0..256 {
            let v = m[i * 256 + j];
            if i >= 128 {
                assert_eq!(v, OUTSIDE_LOGIT, "padding at ({i}, {j})");
            } else if j < 128 {
                assert!((v - 9f32.ln()).abs() < 1e-4, "({i}, {j}) = {v}");
            } else {
                assert!((v + 9f32.ln()).abs() < 1e-4, "({i}, {j}) = {v}");
            }
        }
    }
    // H = 300, W = 1000: resized h' = int(307.2 + 0.5) = 307; 307 / 4 = 76.75, so 77 rows
    // have their centre inside (row 76 spans 304..308, centre 306 < 307).
    let (w, h) = (1000, 300);
    let m = mask_prompt_from_probs(&vec![1.0; w * h], w, h).expect("valid");
    assert!(m[76 * 256..77 * 256].iter().all(|&v| v == LOGIT_CLAMP));
    assert!(m[77 * 256..].iter().all(|&v| v == OUTSIDE_LOGIT));
}

#[test]
fn strategy_round_trip() {
    for s in Strategy::ALL {
        assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
    }
    assert_eq!("box+points+mask".parse(), Ok(Strategy::BoxPointsMask));
    assert_eq!(
        "mask".parse::<Strategy>(),
        Err(PromptError::UnknownStrategy("mask".into()))
    );
    assert_eq!(Strategy::default(), Strategy::BoxPoints);
}

#[test]
fn sam_prompt_follows_the_strategy() {
    let comp = ComponentPrompt {
        box_in_image: [1.0, 2.0, 3.0, 4.0],
        positives_in_image: vec![(2.0, 3.0)],
        negatives_in_image: vec![(0.0, 0.0), (5.0, 5.0)],
        area: 4,
        mask_prompt: Some(vec![0.0f32; 256 * 256]),
    };
    let dev = Device::Cpu;
    let p = sam_prompt_for(&comp, Strategy::Box, &dev).expect("box");
    assert_eq!(p.bbox, Some([1.0, 2.0, 3.0, 4.0]));
    assert!(p.points.is_empty() && p.mask_input.is_none());
    let no_mask = ComponentPrompt {
        mask_prompt: None,
        ..comp.clone()
    };
    let p = sam_prompt_for(&no_mask, Strategy::Points, &dev).expect("points");
    assert_eq!(p.bbox, None);
    assert_eq!(p.points, vec![(2.0, 3.0, 1), (0.0, 0.0, 0), (5.0, 5.0, 0)]);
    let p = sam_prompt_for(&comp, Strategy::BoxPointsMask, &dev).expect("all");
    assert_eq!(p.points.len(), 3);
    let m = p.mask_input.expect("mask input");
    assert_eq!(m.dims(), &[1, 256, 256]);
    let short = ComponentPrompt {
        mask_prompt: Some(vec![0.0; 10]),
        ..comp
    };
    assert!(sam_prompt_for(&short, Strategy::BoxPointsMask, &dev).is_err());
}

#[test]
fn territories_split_the_image_between_the_nearest_components() {
    // a 9x1 row: component 0 at x = 1, component 1 at x = 6..8
    let owner = territories(&[&[1], &[6, 7]], 9, 1);
    // x = 3 is 2 from 0 and 3 from 1; x = 4 is 3 from 0, 2 from 1
    assert_eq!(owner, vec![1, 1, 1, 1, 2, 2, 2, 2, 2]);
    // equidistant: the first listed wins; 8-neighbours count as distance 1 (chessboard)
    let owner = territories(&[&[0], &[4]], 5, 1);
    assert_eq!(owner[2], 1);
    let owner = territories(&[&[0]], 3, 3);
    assert!(owner.iter().all(|&o| o == 1));
    assert!(territories(&[], 3, 2).iter().all(|&o| o == 0));
    let probs = [0.9, 0.2, 0.4, 0.8];
    assert_eq!(
        object_probs(&probs, &[1, 1, 2, 2], 2),
        vec![0.0, 0.0, 0.4, 0.8]
    );
}

/// Low-res cells (row, column) whose source pixels all lie in `region` of a `w x h` image
/// whose resized size fills SAM's input exactly 1024/`w` times (`w == h`, a power of two).
fn cells_inside(region: &dyn Fn(usize, usize) -> bool, w: usize) -> Vec<(usize, usize)> {
    let per = w / 256; // image pixels per low-res cell
    let mut cells = Vec::new();
    for i in 0..256 {
        for j in 0..256 {
            let all = (0..per).all(|dy| (0..per).all(|dx| region(j * per + dx, i * per + dy)));
            if all {
                cells.push((i, j));
            }
        }
    }
    cells
}

#[test]
fn each_component_mask_prompt_holds_that_component_only() {
    // 512x512 (2 pixels per low-res cell): disc A at (120, 150) r 60, disc B at (380, 330)
    // r 80, a soft halo of 0.3 around each, background 0.02.
    let w = 512;
    let (a, b) = ((120i64, 150i64, 60i64), (380i64, 330i64, 80i64));
    let d2 = |x: usize, y: usize, (cx, cy, _): (i64, i64, i64)| {
        (x as i64 - cx).pow(2) + (y as i64 - cy).pow(2)
    };
    let in_a = |x: usize, y: usize| d2(x, y, a) <= a.2 * a.2;
    let in_b = |x: usize, y: usize| d2(x, y, b) <= b.2 * b.2;
    let halo =
        |x: usize, y: usize| d2(x, y, a) <= (a.2 + 8).pow(2) || d2(x, y, b) <= (b.2 + 8).pow(2);
    let probs: Vec<f32> = (0..w * w)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            if in_a(x, y) || in_b(x, y) {
                0.95
            } else if halo(x, y) {
                0.3
            } else {
                0.02
            }
        })
        .collect();
    let mut c = cfg(25, 0.05, 1, 1);
    c.strategy = Strategy::BoxPointsMask;
    let out = prompts_from_probs(&probs, w, w, &c).expect("valid");
    assert_eq!(out.components.len(), 2);
    let (ma, mb) = (
        out.components[0]
            .mask_prompt
            .as_ref()
            .expect("A's mask prompt"),
        out.components[1]
            .mask_prompt
            .as_ref()
            .expect("B's mask prompt"),
    );
    let at = |m: &[f32], (i, j): (usize, usize)| m[i * 256 + j];
    // B, and its halo, are pure background in A's prompt (probability 0: the clamp value),
    // and the other way round; each object is foreground in its own prompt.
    let b_halo = |x: usize, y: usize| d2(x, y, b) <= (b.2 + 8).pow(2);
    let a_halo = |x: usize, y: usize| d2(x, y, a) <= (a.2 + 8).pow(2);
    for cell in cells_inside(&|x, y| b_halo(x, y), w) {
        assert_eq!(at(ma, cell), -LOGIT_CLAMP, "A's prompt over B at {cell:?}");
    }
    for cell in cells_inside(&|x, y| a_halo(x, y), w) {
        assert_eq!(at(mb, cell), -LOGIT_CLAMP, "B's prompt over A at {cell:?}");
    }
    let fg = (0.95f32 / 0.05).ln();
    for cell in cells_inside(&|x, y| in_a(x, y), w) {
        assert!(
            (at(ma, cell) - fg).abs() < 1e-4,
            "A in A's prompt at {cell:?}"
        );
    }
    for cell in cells_inside(&|x, y| in_b(x, y), w) {
        assert!(
            (at(mb, cell) - fg).abs() < 1e-4,
            "B in B's prompt at {cell:?}"
        );
    }
    // The prompts differ from the whole-map prompt only by the blanked object.
    let whole = mask_prompt_from_probs(&probs, w, w).expect("valid");
    let differs = |m: &[f32]| m.iter().zip(&whole).filter(|(x, y)| x != y).count();
    assert!(differs(ma) > 0 && differs(mb) > 0);
    assert_eq!(out.owner.len(), w * w);
    assert_eq!(out.owner[150 * w + 120], 1);
    assert_eq!(out.owner[330 * w + 380], 2);
}
