//! Mask edits of the brush, the eraser and "fill holes" (pure functions on a [`Mask`]).
use image::GrayImage;
use imageproc::region_labelling::{connected_components, Connectivity};

use crate::data::Mask;

/// Paints (value 1) or erases (value 0) a disc of `radius` image pixels around
/// `point_in_image`; returns whether any pixel changed.
pub fn paint_disc(mask: &mut Mask, point_in_image: (f32, f32), radius: f32, value: u8) -> bool {
    let (cx, cy) = point_in_image;
    let r = radius.max(0.5);
    let x0 = (cx - r).floor().max(0.) as usize;
    let y0 = (cy - r).floor().max(0.) as usize;
    let x1 = ((cx + r).ceil().max(0.) as usize).min(mask.width);
    let y1 = ((cy + r).ceil().max(0.) as usize).min(mask.height);
    let mut changed = false;
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if dx * dx + dy * dy <= r * r {
                let px = &mut mask.data[y * mask.width + x];
                changed |= *px != value;
                *px = value;
            }
        }
    }
    changed
}

/// Paints discs along the segment `from`..`to` (a brush stroke between two pointer samples).
pub fn paint_segment(
    mask: &mut Mask,
    from: (f32, f32),
    to: (f32, f32),
    radius: f32,
    value: u8,
) -> bool {
    let len = ((to.0 - from.0).powi(2) + (to.1 - from.1).powi(2)).sqrt();
    let steps = (len / (radius.max(0.5) * 0.5)).ceil().max(1.) as usize;
    let mut changed = false;
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let p = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
        changed |= paint_disc(mask, p, radius, value);
    }
    changed
}

/// Fills every background region that does not touch the image border (4-connected holes);
/// returns the number of pixels filled.
pub fn fill_holes(mask: &mut Mask) -> usize {
    let (w, h) = (mask.width, mask.height);
    if w == 0 || h == 0 {
        return 0;
    }
    let background = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([u8::from(mask.data[y as usize * w + x as usize] == 0) * 255])
    });
    let labels = connected_components(&background, Connectivity::Four, image::Luma([0u8]));
    let mut touches_border =
        vec![false; labels.pixels().map(|p| p[0]).max().unwrap_or(0) as usize + 1];
    for (x, y, l) in labels.enumerate_pixels() {
        if x == 0 || y == 0 || x as usize == w - 1 || y as usize == h - 1 {
            touches_border[l[0] as usize] = true;
        }
    }
    let mut filled = 0;
    for (x, y, l) in labels.enumerate_pixels() {
        let l = l[0] as usize;
        if l != 0 && !touches_border[l] {
            mask.data[y as usize * w + x as usize] = 1;
            filled += 1;
        }
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty(w: usize, h: usize) -> Mask {
        Mask {
            width: w,
            height: h,
            data: vec![0; w * h],
        }
    }

    #[test]
    fn disc_paints_inside_radius_only() {
        let mut m = empty(20, 20);
        assert!(paint_disc(&mut m, (10., 10.), 3., 1));
        assert_eq!(m.data[10 * 20 + 10], 1);
        assert_eq!(m.data[10 * 20 + 12], 1);
        assert_eq!(m.data[10 * 20 + 14], 0);
        assert_eq!(m.data[0], 0);
        let area = m.data.iter().filter(|&&v| v == 1).count();
        assert!((24..=32).contains(&area), "area {area} of a radius-3 disc");
        // painting again changes nothing; erasing clears it
        assert!(!paint_disc(&mut m, (10., 10.), 3., 1));
        assert!(paint_disc(&mut m, (10., 10.), 5., 0));
        assert!(m.data.iter().all(|&v| v == 0));
    }

    #[test]
    fn disc_at_the_border_is_clipped() {
        let mut m = empty(8, 8);
        assert!(paint_disc(&mut m, (0., 0.), 3., 1));
        assert!(!paint_disc(&mut m, (-10., -10.), 3., 1));
        assert_eq!(m.data[0], 1);
    }

    #[test]
    fn segment_leaves_no_gaps() {
        let mut m = empty(40, 10);
        paint_segment(&mut m, (2., 5.), (37., 5.), 1.5, 1);
        for x in 2..37 {
            assert_eq!(m.data[5 * 40 + x], 1, "gap at x={x}");
        }
    }

    #[test]
    fn fill_holes_fills_enclosed_background_only() {
        // a ring with a hole, and a C shape open to the border
        let mut m = empty(12, 12);
        for y in 2..7 {
            for x in 2..7 {
                m.data[y * 12 + x] = 1;
            }
        }
        m.data[4 * 12 + 4] = 0; // hole
        for y in 8..12 {
            m.data[y * 12 + 9] = 1;
        }
        let before = m.data.clone();
        assert_eq!(fill_holes(&mut m), 1);
        assert_eq!(m.data[4 * 12 + 4], 1);
        let changed: usize = before.iter().zip(&m.data).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 1);
        assert_eq!(fill_holes(&mut m), 0);
    }
}
