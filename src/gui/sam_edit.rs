//! SAM corrections that edit the draft instead of replacing it (pure logic, tested here).
//!
//! The clicks since the last "new object" (Esc, a second box, another image) are one object:
//! the draft as it was before that object's first click is its `base`, and every SAM answer
//! for the object is combined with that base:
//! - **add** (the object started with a positive click or a box): `base ∪ answer`, so
//!   correcting one lung of a two-lung mask keeps the other;
//! - **remove** (the object started with a negative click): SAM is asked for the region under
//!   that click (the point labels flipped: a negative click marks the region to remove, a
//!   positive one what to keep) and the draft is `base \ answer`.
//!
//! Follow-up clicks on the same object pass the previous answer's low-res logits back as
//! SAM's mask input (the official interactive flow).
use std::sync::Arc;

use super::worker::ClickPrompt;
use crate::data::Mask;

/// How an object's SAM answer changes the draft.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamOp {
    Add,
    Remove,
}

/// The object being corrected.
#[derive(Clone, Debug)]
pub struct SamObject {
    /// The draft before the object's first click.
    pub base: Mask,
    pub op: SamOp,
    /// Low-res logits (`256 x 256`) of the last answer, for the next click.
    pub low_res: Option<Arc<Vec<f32>>>,
}

impl SamObject {
    /// A new object starting from `base` with its first click (`positive` for points; a box
    /// counts as positive).
    pub fn new(base: Mask, positive: bool) -> Self {
        Self {
            base,
            op: if positive { SamOp::Add } else { SamOp::Remove },
            low_res: None,
        }
    }

    /// What SAM is asked: the object's `clicks` as the user made them (labels flipped when
    /// removing) and the last answer's low-res logits.
    pub fn prompt(&self, clicks: &ClickPrompt) -> ClickPrompt {
        let flip = self.op == SamOp::Remove;
        ClickPrompt {
            points_in_image: clicks
                .points_in_image
                .iter()
                .map(|&(x, y, pos)| (x, y, pos != flip))
                .collect(),
            box_in_image: clicks.box_in_image,
            mask_input: self.low_res.clone(),
        }
    }

    /// The draft after SAM answered `answer` (same size as the base) for this object.
    pub fn apply(&self, answer: &Mask) -> Mask {
        let mut out = self.base.clone();
        if answer.width != out.width || answer.height != out.height {
            return out;
        }
        for (o, &a) in out.data.iter_mut().zip(&answer.data) {
            if a != 0 {
                *o = u8::from(self.op == SamOp::Add);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10 x 4 mask with the given columns set.
    fn mask(cols: std::ops::Range<usize>) -> Mask {
        let mut m = Mask {
            width: 10,
            height: 4,
            data: vec![0; 40],
        };
        for y in 0..4 {
            for x in cols.clone() {
                m.data[y * 10 + x] = 1;
            }
        }
        m
    }

    fn ones(m: &Mask) -> usize {
        m.data.iter().filter(|&&v| v == 1).count()
    }

    #[test]
    fn adding_keeps_the_other_object() {
        // two "lungs": columns 0..3 and 6..9; SAM answers a corrected right lung 5..10
        let base = mask(0..3);
        let mut base2 = base.clone();
        for y in 0..4 {
            for x in 6..9 {
                base2.data[y * 10 + x] = 1;
            }
        }
        let obj = SamObject::new(base2, true);
        let out = obj.apply(&mask(5..10));
        assert_eq!(ones(&out), 4 * (3 + 5));
        assert!((0..3).all(|x| out.data[x] == 1), "the left lung survives");
    }

    #[test]
    fn removing_cuts_only_the_answer() {
        let obj = SamObject::new(mask(0..8), false);
        let out = obj.apply(&mask(6..10));
        assert_eq!(out, mask(0..6));
        // the question flips the labels: the negative click asks for the region under it
        let clicks = ClickPrompt {
            points_in_image: vec![(7.0, 1.0, false), (2.0, 1.0, true)],
            ..ClickPrompt::default()
        };
        let p = obj.prompt(&clicks);
        assert_eq!(p.points_in_image, vec![(7.0, 1.0, true), (2.0, 1.0, false)]);
    }

    #[test]
    fn follow_up_clicks_carry_the_last_logits() {
        let mut obj = SamObject::new(mask(0..0), true);
        let mut clicks = ClickPrompt::default();
        clicks.points_in_image.push((1.0, 1.0, true));
        assert!(
            obj.prompt(&clicks).mask_input.is_none(),
            "first click: no mask input"
        );
        obj.low_res = Some(Arc::new(vec![0.5; 256 * 256]));
        clicks.points_in_image.push((2.0, 1.0, false));
        let p = obj.prompt(&clicks);
        assert_eq!(p.mask_input.as_ref().map(|v| v.len()), Some(256 * 256));
        assert_eq!(p.points_in_image.len(), 2);
        assert!(p.points_in_image[0].2 && !p.points_in_image[1].2);
    }

    #[test]
    fn an_answer_of_another_size_changes_nothing() {
        let obj = SamObject::new(mask(0..3), true);
        let other = Mask {
            width: 3,
            height: 3,
            data: vec![1; 9],
        };
        assert_eq!(obj.apply(&other), mask(0..3));
    }
}
