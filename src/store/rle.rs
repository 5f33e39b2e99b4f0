//! COCO run-length encoding of binary masks (the uncompressed form, `counts` as a list).
//!
//! COCO's rules (pycocotools `maskApi.c`): pixels are visited in **column-major** (Fortran)
//! order, i.e. down each column, left to right; `counts` are the lengths of alternating runs
//! **starting with background (0)**, so a mask whose first pixel is foreground starts with a
//! count of 0. `size` is `[height, width]`.
use serde::{Deserialize, Serialize};

use crate::data::Mask;

/// An uncompressed COCO RLE: `{"size": [h, w], "counts": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    /// `[height, width]`.
    pub size: [usize; 2],
    pub counts: Vec<u64>,
}

/// Encodes a row-major 0/1 mask (any non-zero value is foreground).
pub fn encode(mask: &Mask) -> Rle {
    let (w, h) = (mask.width, mask.height);
    let mut counts = Vec::new();
    let mut current = 0u8;
    let mut run = 0u64;
    for x in 0..w {
        for y in 0..h {
            let v = u8::from(mask.data[y * w + x] != 0);
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    Rle {
        size: [h, w],
        counts,
    }
}

/// Decodes an RLE into a row-major 0/1 mask; `None` when the counts do not add up to
/// `height × width`.
pub fn decode(rle: &Rle) -> Option<Mask> {
    let [h, w] = rle.size;
    let n = h.checked_mul(w)?;
    let mut col_major = Vec::with_capacity(n);
    let mut v = 0u8;
    for &c in &rle.counts {
        let c = usize::try_from(c).ok()?;
        if col_major.len() + c > n {
            return None;
        }
        col_major.extend(std::iter::repeat_n(v, c));
        v ^= 1;
    }
    if col_major.len() != n {
        return None;
    }
    let mut data = vec![0u8; n];
    for x in 0..w {
        for y in 0..h {
            data[y * w + x] = col_major[x * h + y];
        }
    }
    Some(Mask {
        width: w,
        height: h,
        data,
    })
}

/// Foreground pixel count of an RLE (the sum of the odd-indexed counts).
pub fn area(rle: &Rle) -> u64 {
    rle.counts.iter().skip(1).step_by(2).sum()
}

/// Tight bounding box `[x, y, width, height]` of the foreground (COCO's `bbox`), all zero
/// for an empty mask.
pub fn bbox(mask: &Mask) -> [usize; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.data[y * mask.width + x] != 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    if x0 == usize::MAX {
        [0, 0, 0, 0]
    } else {
        [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(w: usize, h: usize, rows: &[u8]) -> Mask {
        Mask {
            width: w,
            height: h,
            data: rows.to_vec(),
        }
    }

    #[test]
    fn known_examples() {
        // rows [0 1 1] / [0 0 1]: columns (0,0) (1,0) (1,1) -> 0 0 1 0 1 1
        let m = mask(3, 2, &[0, 1, 1, 0, 0, 1]);
        let r = encode(&m);
        assert_eq!(r.size, [2, 3]);
        assert_eq!(r.counts, vec![2, 1, 1, 2]);
        assert_eq!(area(&r), 3);
        assert_eq!(bbox(&m), [1, 0, 2, 2]);
        // first pixel foreground: counts start with a zero-length background run
        let m = mask(2, 2, &[1, 0, 1, 0]);
        assert_eq!(encode(&m).counts, vec![0, 2, 2]);
        // empty and full
        assert_eq!(encode(&mask(2, 2, &[0; 4])).counts, vec![4]);
        assert_eq!(encode(&mask(2, 2, &[1; 4])).counts, vec![0, 4]);
    }

    #[test]
    fn decode_rejects_wrong_totals() {
        let r = Rle {
            size: [2, 2],
            counts: vec![1, 1],
        };
        assert!(decode(&r).is_none());
        let r = Rle {
            size: [2, 2],
            counts: vec![3, 3],
        };
        assert!(decode(&r).is_none());
    }
}
