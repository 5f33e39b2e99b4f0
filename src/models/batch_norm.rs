//! 2-D batch normalisation with PyTorch semantics and correct gradients.
//!
//! Train mode normalises with the batch statistics (biased variance) and updates the
//! running statistics (unbiased variance, momentum 0.1 by default); eval mode uses the running
//! statistics. The running statistics are variables of the `VarMap` (names `running_mean`,
//! `running_var` as in PyTorch state dicts), so they are saved with the weights; they never
//! receive a gradient, so the optimiser leaves them alone.
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchNormConfig {
    pub eps: f64,
    pub momentum: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    cfg: BatchNormConfig,
}

impl BatchNorm2d {
    pub fn new(channels: usize, cfg: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        // Var::from_tensor shares storage with the VarMap's variable, so updates are saved.
        let running_mean =
            Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.))?)?;
        let running_var =
            Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.))?)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            cfg,
        })
    }

    /// `[N, C, H, W] -> [N, C, H, W]`
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, false)
    }

    /// Eval mode as an affine map per channel, `y = x * scale + shift`: `(scale, shift)`, each
    /// `[C]`, detached (for folding into the convolution before it at inference).
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let mean = self.running_mean.as_tensor().detach();
        let var = self.running_var.as_tensor().detach();
        let scale = (self.weight.detach() * (var + self.cfg.eps)?.sqrt()?.recip()?)?;
        let shift = (self.bias.detach() - (mean * &scale)?)?;
        Ok((scale, shift))
    }

    /// `relu(forward_t(x))`, as one op in training on the CPU.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, true)
    }

    fn forward_impl(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if train && crate::ops::fast(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
            // one op with a closed-form backward (candle's reductions over N, H, W are slow)
            let (mean, var) = crate::ops::channel_stats(x)?; // [C]
            self.update_running(&mean, &var, n * h * w)?;
            let inv_std = (var + self.cfg.eps)?.sqrt()?.recip()?;
            let params = Tensor::stack(&[&self.weight, &self.bias, &mean, &inv_std], 0)?;
            return crate::ops::batch_norm_train(x, &params, relu);
        }
        let (mean, var) = if train {
            // batch statistics, [1, C, 1, 1]
            let mean = x.mean_keepdim((0, 2, 3))?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
            self.update_running(&mean, &var, n * h * w)?;
            (mean, var)
        } else {
            (
                self.running_mean
                    .as_tensor()
                    .detach()
                    .reshape((1, c, 1, 1))?,
                self.running_var
                    .as_tensor()
                    .detach()
                    .reshape((1, c, 1, 1))?,
            )
        };
        let inv_std = (var + self.cfg.eps)?.sqrt()?.recip()?;
        let scale = self.weight.reshape((1, c, 1, 1))?.mul(&inv_std)?;
        let shift = (self.bias.reshape((1, c, 1, 1))? - mean.mul(&scale)?)?;
        let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let m = self.cfg.momentum;
        let unbias = count as f64 / (count.max(2) - 1) as f64;
        let mean = mean.detach().flatten_all()?;
        let var = var.detach().flatten_all()?.affine(unbias, 0.)?;
        let rm = (self.running_mean.as_tensor().affine(1. - m, 0.)? + mean.affine(m, 0.)?)?;
        let rv = (self.running_var.as_tensor().affine(1. - m, 0.)? + var.affine(m, 0.)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn train_normalises_and_updates_running_stats() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let bn = BatchNorm2d::new(2, BatchNormConfig::default(), vb)?;
        let x = Tensor::randn(0f32, 1., (4, 2, 3, 3), &dev)?.affine(3., 5.)?;
        let y = bn.forward_t(&x, true)?;
        let mean = y.mean_keepdim((0, 2, 3))?.flatten_all()?.to_vec1::<f32>()?;
        let var = y
            .sqr()?
            .mean_keepdim((0, 2, 3))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (m, v) in mean.iter().zip(&var) {
            assert!(m.abs() < 1e-4 && (v - 1.).abs() < 1e-3, "{m} {v}");
        }
        // running mean moved 10% of the way from 0 towards the batch mean (about 5)
        let data = map.data().lock().unwrap();
        let rm = data["running_mean"].as_tensor().to_vec1::<f32>()?;
        let bm = x.mean_keepdim((0, 2, 3))?.flatten_all()?.to_vec1::<f32>()?;
        for (r, b) in rm.iter().zip(&bm) {
            assert!((r - 0.1 * b).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn eval_uses_running_stats() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let bn = BatchNorm2d::new(1, BatchNormConfig::default(), vb)?;
        // fresh stats: mean 0, var 1 -> identity up to eps
        let x = Tensor::new(&[[[[2f32, -1.]]]], &dev)?;
        let y = bn.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        assert!((y[0] - 2. / (1f32 + 1e-5).sqrt()).abs() < 1e-6);
        // eval never changes the stats
        bn.forward_t(&x, false)?;
        let data = map.data().lock().unwrap();
        assert_eq!(data["running_mean"].as_tensor().to_vec1::<f32>()?, vec![0.]);
        Ok(())
    }
}
