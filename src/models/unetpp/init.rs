//! Seeded initialisation of a U-Net++'s variables: candle cannot seed its CPU random generator,
//! so every run that must be reproducible (training with `--seed`, fresh checkpoints, benches,
//! gradient checks) draws its initial weights here, from `ChaCha8Rng::seed_from_u64(seed)`.
//!
//! The distributions follow candle's (and PyTorch's) defaults, drawn uniformly:
//! - convolution weights `[out, in, k, k]`: Kaiming-uniform for ReLU, fan-in `in * k * k`:
//!   `U(-b, b)` with `b = sqrt(6 / fan_in)` (the variance of candle's default Kaiming-normal);
//! - convolution biases (the four heads): `U(-1/sqrt(in), 1/sqrt(in))` as candle's `conv2d`;
//! - BatchNorm scale 1, shift 0 (plus an optional jitter, see [`SeededInit::batch_norm_jitter`]);
//! - BatchNorm running mean 0, running variance 1.
//!
//! Variables are filled in the order of their sorted names, each from the same generator, so
//! the weights depend on the seed and the model's shape only, never on hash-map order, the
//! device or the dtype (values are drawn in f64 and converted).
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Config, UNetPlusPlus};

/// How to draw a U-Net++'s initial weights from a seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeededInit {
    pub seed: u64,
    /// BatchNorm scales drawn from `1 ± j` and shifts from `± j` instead of exactly 1 and 0.
    /// 0 (the default) for training; gradient checks use 0.1 so that no parameter sits at a
    /// symmetric point where a wrong gradient could still look right.
    pub batch_norm_jitter: f64,
}

impl SeededInit {
    /// The training initialisation for `seed` (no BatchNorm jitter).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            batch_norm_jitter: 0.,
        }
    }

    /// Overwrites every variable of `map` (a U-Net++'s, as [`UNetPlusPlus::new`] created them)
    /// with seeded values, on the variables' own device and dtype.
    pub fn apply(&self, map: &VarMap) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let data = map.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            // a convolution bias: its bound comes from the input channels of its kernel
            let kernel_in = name
                .strip_suffix(".bias")
                .and_then(|conv| data.get(&format!("{conv}.weight")))
                .filter(|w| w.rank() == 4)
                .map(|w| w.dims()[1]);
            let (centre, half) = self.range(name, &dims, kernel_in);
            let n: usize = dims.iter().product();
            let values: Vec<f64> = if half == 0. {
                vec![centre; n]
            } else {
                (0..n)
                    .map(|_| centre + rng.gen_range(-half..=half))
                    .collect()
            };
            let t = Tensor::from_vec(values, dims, &Device::Cpu)?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// A U-Net++ whose variables live in `map`, initialised from this seed.
    pub fn model(
        &self,
        cfg: &Config,
        map: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<UNetPlusPlus> {
        let model = UNetPlusPlus::new(cfg, VarBuilder::from_varmap(map, dtype, device))?;
        self.apply(map)?;
        Ok(model)
    }

    /// `(centre, half width)` of the uniform distribution of the variable `name`;
    /// `kernel_in`: the input channels of the convolution whose bias `name` is.
    fn range(&self, name: &str, dims: &[usize], kernel_in: Option<usize>) -> (f64, f64) {
        let j = self.batch_norm_jitter;
        if name.ends_with("running_mean") {
            (0., 0.)
        } else if name.ends_with("running_var") {
            (1., 0.)
        } else if dims.len() == 4 {
            // a convolution kernel [out, in, k, k]
            let fan_in = (dims[1] * dims[2] * dims[3]).max(1) as f64;
            (0., (6. / fan_in).sqrt())
        } else if let Some(c) = kernel_in {
            (0., 1. / (c.max(1) as f64).sqrt())
        } else if name.ends_with("weight") {
            // a BatchNorm scale
            (1., j)
        } else {
            // a BatchNorm shift
            (0., j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(map: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = map.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, t)| {
                let t = t.as_tensor().to_dtype(DType::F32).unwrap();
                (
                    k.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn seeded(seed: u64, dtype: DType) -> VarMap {
        let map = VarMap::new();
        SeededInit::new(seed)
            .model(&Config::with_base(2), &map, dtype, &Device::Cpu)
            .unwrap();
        map
    }

    #[test]
    fn the_seed_alone_decides_the_weights() {
        let a = values(&seeded(7, DType::F32));
        assert_eq!(a, values(&seeded(7, DType::F32)));
        // drawn in f64: the f64 model holds the same values
        assert_eq!(a, values(&seeded(7, DType::F64)));
        let b = values(&seeded(8, DType::F32));
        let name = "conv0_0.conv1.weight";
        let get = |v: &[(String, Vec<f32>)]| v.iter().find(|(k, _)| k == name).unwrap().1.clone();
        assert_ne!(get(&a), get(&b));
    }

    #[test]
    fn distributions_follow_the_defaults() {
        let v = values(&seeded(3, DType::F32));
        let get = |name: &str| v.iter().find(|(k, _)| k == name).unwrap().1.clone();
        assert!(get("conv1_0.bn1.running_mean").iter().all(|&x| x == 0.));
        assert!(get("conv1_0.bn1.running_var").iter().all(|&x| x == 1.));
        assert!(get("conv1_0.bn1.weight").iter().all(|&x| x == 1.));
        assert!(get("conv1_0.bn2.bias").iter().all(|&x| x == 0.));
        // conv1_1.conv1: in 4 * 1 + 8 = 12 channels, out 4, 3x3: fan-in 108
        let w = get("conv1_1.conv1.weight");
        let bound = (6f32 / 108.).sqrt();
        assert_eq!(w.len(), 4 * 12 * 9);
        assert!(w.iter().all(|x| x.abs() <= bound));
        assert!(w.iter().any(|x| x.abs() > 0.9 * bound));
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        let expected = 2. / 108.; // Kaiming: 2 / fan_in
        assert!((var / expected - 1.).abs() < 0.2, "{var} vs {expected}");
        // a head's bias: 1x1 conv on 2 channels, bound 1/sqrt(2)
        let b = get("final1.bias");
        assert!(b[0] != 0. && b[0].abs() <= 0.5f32.sqrt());
    }

    #[test]
    fn batch_norm_jitter_moves_scales_and_shifts() {
        let map = seeded(1, DType::F32);
        SeededInit {
            seed: 1,
            batch_norm_jitter: 0.1,
        }
        .apply(&map)
        .unwrap();
        let v = values(&map);
        let get = |name: &str| v.iter().find(|(k, _)| k == name).unwrap().1.clone();
        let w = get("conv0_0.bn1.weight");
        assert!(w.iter().all(|x| (x - 1.).abs() <= 0.1) && w.iter().any(|&x| x != 1.));
        let b = get("conv0_0.bn1.bias");
        assert!(b.iter().all(|x| x.abs() <= 0.1) && b.iter().any(|&x| x != 0.));
        assert!(get("conv0_0.bn1.running_var").iter().all(|&x| x == 1.));
    }
}
