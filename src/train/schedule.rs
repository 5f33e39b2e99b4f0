//! Learning-rate schedule: linear warm-up, then cosine decay to `min_ratio * lr`.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate for optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.);
        let min = self.lr * self.min_ratio;
        min + (self.lr - min) * 0.5 * (1. + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            min_ratio: 0.01,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-5).abs() < 1e-12);
        assert!((s.lr_at(500) - 1e-5).abs() < 1e-12);
        for i in 10..110 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i));
        }
    }
}
