//! Segmentation metrics on binary masks.
//!
//! Conventions: a ratio whose denominator is zero counts as 1. So an empty prediction of an
//! empty ground truth scores Dice = IoU = precision = recall = 1 (nothing to find, nothing
//! wrongly found); an empty prediction of a non-empty truth scores Dice = IoU = recall = 0 and
//! precision = 1 (no false positive was made); a non-empty prediction of an empty truth scores
//! Dice = IoU = precision = 0 and recall = 1.
use serde::{Deserialize, Serialize};

/// Pixel counts of a binary prediction against a binary truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Confusion {
    /// Counts over two equally long binary sequences.
    pub fn from_pairs(pairs: impl Iterator<Item = (bool, bool)>) -> Self {
        let mut c = Self::default();
        for (pred, truth) in pairs {
            match (pred, truth) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }

    /// `pred` and `truth` are 0/1 (or 0/255) bytes of the same length.
    pub fn from_masks(pred: &[u8], truth: &[u8]) -> Self {
        debug_assert_eq!(pred.len(), truth.len());
        Self::from_pairs(pred.iter().zip(truth).map(|(&p, &t)| (p > 0, t > 0)))
    }

    pub fn scores(&self) -> Scores {
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                1.0
            } else {
                num as f64 / den as f64
            }
        };
        Scores {
            dice: ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_),
            iou: ratio(self.tp, self.tp + self.fp + self.fn_),
            precision: ratio(self.tp, self.tp + self.fp),
            recall: ratio(self.tp, self.tp + self.fn_),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
}

impl Scores {
    /// Mean of per-image scores (each image counts once); all zeros for an empty slice.
    pub fn mean(all: &[Scores]) -> Scores {
        if all.is_empty() {
            return Scores::default();
        }
        let n = all.len() as f64;
        let sum = |f: fn(&Scores) -> f64| all.iter().map(f).sum::<f64>() / n;
        Scores {
            dice: sum(|s| s.dice),
            iou: sum(|s| s.iou),
            precision: sum(|s| s.precision),
            recall: sum(|s| s.recall),
        }
    }
}

/// Mean binary entropy (bits, in `[0, 1]`) of a probability map: 0 where the model is sure
/// (every pixel 0 or 1), 1 where it is undecided everywhere (every pixel 0.5). The U-Net++
/// uncertainty the app sorts by. An empty map gives 0.
pub fn mean_binary_entropy(probs: &[f32]) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let h = |p: f32| {
        let p = f64::from(p.clamp(0.0, 1.0));
        let term = |q: f64| if q > 0.0 { -q * q.log2() } else { 0.0 };
        term(p) + term(1.0 - p)
    };
    probs.iter().map(|&p| h(p)).sum::<f64>() / probs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // truth: 4 pixels; prediction: 3 of them plus 1 false positive
        let truth = [1, 1, 1, 1, 0, 0, 0, 0];
        let pred = [1, 1, 1, 0, 1, 0, 0, 0];
        let c = Confusion::from_masks(&pred, &truth);
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (3, 1, 1, 3));
        let s = c.scores();
        assert!((s.dice - 0.75).abs() < 1e-12);
        assert!((s.iou - 0.6).abs() < 1e-12);
        assert!((s.precision - 0.75).abs() < 1e-12);
        assert!((s.recall - 0.75).abs() < 1e-12);
    }

    #[test]
    fn empty_cases() {
        let s = Confusion::from_masks(&[0, 0], &[0, 0]).scores();
        assert_eq!(
            s,
            Scores {
                dice: 1.,
                iou: 1.,
                precision: 1.,
                recall: 1.
            }
        );
        let s = Confusion::from_masks(&[0, 0], &[1, 0]).scores();
        assert_eq!((s.dice, s.iou, s.precision, s.recall), (0., 0., 1., 0.));
        let s = Confusion::from_masks(&[255, 0], &[0, 0]).scores();
        assert_eq!((s.dice, s.iou, s.precision, s.recall), (0., 0., 0., 1.));
    }

    #[test]
    fn dice_iou_relation_and_mean() {
        let c = Confusion {
            tp: 7,
            fp: 3,
            fn_: 5,
            tn: 1,
        };
        let s = c.scores();
        // Dice = 2 IoU / (1 + IoU)
        assert!((s.dice - 2. * s.iou / (1. + s.iou)).abs() < 1e-12);
        let m = Scores::mean(&[
            s,
            Scores {
                dice: 1.,
                iou: 1.,
                precision: 1.,
                recall: 1.,
            },
        ]);
        assert!((m.dice - (s.dice + 1.) / 2.).abs() < 1e-12);
        assert_eq!(Scores::mean(&[]), Scores::default());
    }

    #[test]
    fn mean_binary_entropy_is_zero_when_sure_and_one_when_undecided() {
        assert_eq!(mean_binary_entropy(&[0.0, 1.0, 1.0]), 0.0);
        assert!((mean_binary_entropy(&[0.5, 0.5]) - 1.0).abs() < 1e-12);
        let h = mean_binary_entropy(&[0.9]);
        assert!((h - 0.468_995_6).abs() < 1e-6, "{h}");
        assert!((mean_binary_entropy(&[0.0, 0.5]) - 0.5).abs() < 1e-12);
        assert_eq!(mean_binary_entropy(&[]), 0.0);
    }
}
