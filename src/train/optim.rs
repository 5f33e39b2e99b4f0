//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) whose state can be saved and
//! restored, so a resumed run continues exactly.
use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    step: usize,
    cfg: AdamWConfig,
}

impl AdamW {
    /// `vars`: the trainable variables by name (BatchNorm running statistics excluded).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(Slot { name, var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            cfg,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`; variables without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1. - c.beta1.powi(self.step as i32);
        let bc2 = 1. - c.beta2.powi(self.step as i32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            slot.m = ((&slot.m * c.beta1)? + (&g * (1. - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1. - c.beta2))?)?;
            let m_hat = (&slot.m / bc1)?;
            let v_hat = (&slot.v / bc2)?;
            let theta = slot.var.as_tensor().detach();
            let decayed = (&theta * (1. - lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            slot.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<var>`, `v.<var>`) plus the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, usize) {
        let mut map = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        (map, self.step)
    }

    /// Restores what [`AdamW::state`] returned; every slot must be present with its shape.
    pub fn load_state(&mut self, map: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, target) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = map.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks {key}"))
                })?;
                if t.dims() != target.dims() {
                    candle_core::bail!("optimizer state {key} has shape {:?}", t.dims())
                }
                *target = t.to_device(target.device())?.to_dtype(target.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_on_a_quadratic() -> Result<()> {
        // torch: p = tensor([1., -2.]); opt = AdamW([p], lr=0.1, weight_decay=0.01)
        // three steps of loss = (p**2).sum()  ->  p = [0.7030, -1.7060] (hand-checked below)
        let dev = Device::Cpu;
        let var = Var::new(&[1f64, -2.], &dev)?;
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], cfg)?;
        // reference computed in f64 with the same recurrence
        let mut p = [1f64, -2.];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for t in 1..=3 {
            let grads = var.as_tensor().sqr()?.sum_all()?.backward()?;
            opt.step(&grads, 0.1)?;
            for i in 0..2 {
                let g = 2. * p[i];
                p[i] *= 1. - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1. - 0.9f64.powi(t));
                let vh = v[i] / (1. - 0.999f64.powi(t));
                p[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f64>()?;
        for i in 0..2 {
            assert!((got[i] - p[i]).abs() < 1e-12, "{got:?} vs {p:?}");
        }
        // Adam moves each coordinate by about lr per step at first
        assert!((got[0] - 0.7).abs() < 0.01, "{got:?}");
        Ok(())
    }

    #[test]
    fn state_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1f32, 2.], &dev)?;
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], AdamWConfig::default())?;
        let grads = var.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&grads, 0.01)?;
        let (state, step) = opt.state();
        let var2 = Var::new(&[1f32, 2.], &dev)?;
        let mut opt2 = AdamW::new(vec![("p".into(), var2)], AdamWConfig::default())?;
        opt2.load_state(&state, step)?;
        assert_eq!(opt2.steps_taken(), 1);
        let (s2, _) = opt2.state();
        assert_eq!(s2["m.p"].to_vec1::<f32>()?, state["m.p"].to_vec1::<f32>()?);
        assert!(opt2.load_state(&HashMap::new(), 1).is_err());
        Ok(())
    }
}
