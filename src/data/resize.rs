//! Bilinear resizing of planes, images and masks (PyTorch's `align_corners=False` rule), as
//! training and prediction use it.
use super::{ImageF32, Mask};

/// Source index pair and weight of the second one for each output position,
/// half-pixel centres, PyTorch `align_corners=False` rule.
fn axis_weights(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|d| {
            let s = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, s - i0 as f32)
        })
        .collect()
}

/// Bilinear resize of one row-major plane from `w x h` to `new_w x new_h`
/// with half-pixel centres (PyTorch `interpolate(mode="bilinear",
/// align_corners=False, antialias=False)`).
///
/// An empty target gives an empty vector; an empty source gives zeros.
///
/// # Panics
/// If `plane.len() != w * h` (a programming error, not a data error).
pub fn resize_plane(plane: &[f32], w: usize, h: usize, new_w: usize, new_h: usize) -> Vec<f32> {
    assert_eq!(plane.len(), w * h, "resize_plane: plane is not {w}x{h}");
    if new_w == 0 || new_h == 0 {
        return Vec::new();
    }
    if w == 0 || h == 0 {
        return vec![0.0; new_w * new_h];
    }
    if w == new_w && h == new_h {
        return plane.to_vec();
    }
    let xs = axis_weights(w, new_w);
    let ys = axis_weights(h, new_h);
    let mut out = Vec::with_capacity(new_w * new_h);
    for &(y0, y1, ly) in &ys {
        let r0 = &plane[y0 * w..(y0 + 1) * w];
        let r1 = &plane[y1 * w..(y1 + 1) * w];
        for &(x0, x1, lx) in &xs {
            let top = r0[x0] * (1.0 - lx) + r0[x1] * lx;
            let bot = r1[x0] * (1.0 - lx) + r1[x1] * lx;
            out.push(top * (1.0 - ly) + bot * ly);
        }
    }
    out
}

/// Bilinear resize of all three channels (same rule as [`resize_plane`]).
pub fn resize_image(img: &ImageF32, width: usize, height: usize) -> ImageF32 {
    let n = img.width * img.height;
    let mut data = Vec::with_capacity(3 * width * height);
    for c in 0..3 {
        let plane = &img.data[c * n..(c + 1) * n];
        data.extend(resize_plane(plane, img.width, img.height, width, height));
    }
    ImageF32 {
        width,
        height,
        data,
    }
}

/// The training target: the 0/1 mask resized bilinearly to `size x size`
/// ([`resize_plane`]) and thresholded, `>= 0.5` -> 1.0, else 0.0.
pub fn mask_to_training(mask: &Mask, size: usize) -> Vec<f32> {
    let plane: Vec<f32> = mask.data.iter().map(|&v| f32::from(v != 0)).collect();
    resize_plane(&plane, mask.width, mask.height, size, size)
        .into_iter()
        .map(|v| if v >= 0.5 { 1.0 } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_constant_stays_constant() {
        let plane = vec![0.3f32; 7 * 5];
        for (nw, nh) in [(13, 11), (3, 2), (7, 5), (1, 1), (20, 3)] {
            let out = resize_plane(&plane, 7, 5, nw, nh);
            assert_eq!(out.len(), nw * nh);
            assert!(out.iter().all(|&v| (v - 0.3).abs() < 1e-6), "{nw}x{nh}");
        }
    }

    #[test]
    fn resize_hand_computed_bilinear() {
        // 2x2 -> 4x4, align_corners=False: source coords per output index are
        // max((d + 0.5) * 0.5 - 0.5, 0) = [0, 0.25, 0.75, 1.25 -> clamp to 1].
        let plane = [0.0f32, 1.0, 2.0, 3.0];
        let out = resize_plane(&plane, 2, 2, 4, 4);
        #[rustfmt::skip]
        let expect = [
            0.0, 0.25, 0.75, 1.0,
            0.5, 0.75, 1.25, 1.5,
            1.5, 1.75, 2.25, 2.5,
            2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        // 4x1 -> 2x1 downsample: coords (d + 0.5) * 2 - 0.5 = 0.5, 2.5.
        let out = resize_plane(&[0.0, 1.0, 2.0, 3.0], 4, 1, 2, 1);
        assert_eq!(out, vec![0.5, 2.5]);
        // 3x1 -> 2x1: coords 0.25, 1.75.
        let out = resize_plane(&[0.0, 4.0, 8.0], 3, 1, 2, 1);
        assert!((out[0] - 1.0).abs() < 1e-6 && (out[1] - 7.0).abs() < 1e-6);
    }

    #[test]
    fn resize_up_then_down_of_smooth_ramp() {
        let (w, h) = (16, 12);
        let plane: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                0.5 + 0.3 * (x / w as f32) - 0.2 * (y / h as f32)
            })
            .collect();
        let up = resize_plane(&plane, w, h, 2 * w, 2 * h);
        let back = resize_plane(&up, 2 * w, 2 * h, w, h);
        // Exact 2x factors: interior pixels are reproduced exactly by linear
        // interpolation of a linear ramp; borders differ only by clamping.
        let max_err = plane
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_err < 0.01, "max error {max_err}");
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                assert!((plane[y * w + x] - back[y * w + x]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn resize_image_resizes_each_channel() {
        let img = ImageF32 {
            width: 2,
            height: 1,
            data: vec![0.0, 1.0, 0.5, 0.5, 1.0, 0.0],
        };
        let r = resize_image(&img, 4, 1);
        assert_eq!((r.width, r.height, r.data.len()), (4, 1, 12));
        assert_eq!(r.channel(0), &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(r.channel(1), &[0.5; 4]);
        assert_eq!(r.channel(2), &[1.0, 0.75, 0.25, 0.0]);
    }

    #[test]
    fn mask_to_training_thresholds_at_half() {
        // 4x1 mask [0,1,1,0] -> 2x1: samples at 0.5 and 2.5 -> 0.5, 0.5 -> 1,1.
        let m = Mask {
            width: 4,
            height: 1,
            data: vec![0, 1, 1, 0],
        };
        // Rows: 1 -> 2 both sample row 0.
        assert_eq!(mask_to_training(&m, 2), vec![1.0; 4]);
        // 4x1 [1,0,0,0] -> 2x1 samples 0.5 (0.5 -> 1) and 2.5 (0.0 -> 0).
        let m = Mask {
            width: 4,
            height: 1,
            data: vec![1, 0, 0, 0],
        };
        assert_eq!(mask_to_training(&m, 2), vec![1.0, 0.0, 1.0, 0.0]);
        // Upsampling a centred block keeps it centred and binary.
        let m = Mask {
            width: 4,
            height: 4,
            data: vec![0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        };
        let t = mask_to_training(&m, 8);
        let ones: usize = t.iter().filter(|&&v| v == 1.0).count();
        // Source coordinate of output d is (d + 0.5) / 2 - 0.5; the 0/1 edge
        // is crossed at 1.5, so outputs 2..=5 are foreground in each axis.
        assert_eq!(ones, 16);
        for y in 0..8 {
            for x in 0..8 {
                let fg = (2..=5).contains(&x) && (2..=5).contains(&y);
                assert_eq!(t[y * 8 + x], f32::from(u8::from(fg)), "({x},{y})");
            }
        }
        // A full mask stays full, an empty one stays empty.
        let full = Mask {
            width: 3,
            height: 5,
            data: vec![1; 15],
        };
        assert!(mask_to_training(&full, 7).iter().all(|&v| v == 1.0));
        let empty = Mask {
            width: 3,
            height: 5,
            data: vec![0; 15],
        };
        assert!(mask_to_training(&empty, 7).iter().all(|&v| v == 0.0));
    }
}
