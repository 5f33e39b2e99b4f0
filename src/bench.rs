//! Benchmarks that make the speed of the pipeline measurable (`medmine bench …`).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::models::unetpp::{Config, InferenceMode, SeededInit, UNetPlusPlus};
use crate::train::loss::deep_supervision_loss;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::trainable_vars;

#[derive(Clone, Debug)]
pub struct TrainBench {
    pub size: usize,
    pub batch: usize,
    pub base: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
}

/// Times full training steps (forward in train mode, loss over the four heads, backward,
/// AdamW) on random data, the same work as `scripts/bench_train_torch.py`. Calls `report`
/// with each step's seconds and returns images per second over the timed steps.
pub fn bench_train(
    b: &TrainBench,
    device: &Device,
    mut report: impl FnMut(usize, f64),
) -> candle_core::Result<f64> {
    let map = VarMap::new();
    let model =
        SeededInit::new(b.seed).model(&Config::with_base(b.base), &map, DType::F32, device)?;
    // the data: candle's generator (the CPU one cannot be seeded in candle 0.11; GPUs can)
    let _ = device.set_seed(b.seed);
    let mut opt = AdamW::new(trainable_vars(&map), AdamWConfig::default())?;
    let x = Tensor::rand(0f32, 1., (b.batch, 3, b.size, b.size), device)?;
    let y = Tensor::rand(0f32, 1., (b.batch, 1, b.size, b.size), device)?
        .ge(0.5)?
        .to_dtype(DType::F32)?;
    let w = Tensor::ones(b.batch, DType::F32, device)?;
    let mut timed = 0.;
    for step in 0..b.warmup + b.steps {
        let t = Instant::now();
        let heads = model.forward_t(&x, true)?;
        let loss = deep_supervision_loss(&heads, &y, &w)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
        device.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        if step >= b.warmup {
            timed += s;
            report(step - b.warmup + 1, s);
        }
    }
    Ok((b.batch * b.steps) as f64 / timed.max(1e-12))
}

#[derive(Clone, Debug)]
pub struct InferBench {
    pub size: usize,
    pub batch: usize,
    pub base: usize,
    pub steps: usize,
    pub warmup: usize,
}

/// Times U-Net++ inference (eval mode, the mean of the four heads: what `predict` and mining
/// run) on a random batch with randomly initialised weights held as plain tensors, as
/// [`crate::predict::Predictor`] holds them; the PyTorch side is
/// `scripts/bench_train_torch.py --infer`. Returns images per second over the timed steps.
pub fn bench_infer(
    b: &InferBench,
    device: &Device,
    mut report: impl FnMut(usize, f64),
) -> candle_core::Result<f64> {
    let cfg = Config::with_base(b.base);
    let map = VarMap::new();
    SeededInit::new(0).model(&cfg, &map, DType::F32, device)?;
    let tensors = crate::models::plain_tensors(&map);
    let model = UNetPlusPlus::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?;
    let x = Tensor::rand(0f32, 1., (b.batch, 3, b.size, b.size), device)?;
    let mut timed = 0.;
    for step in 0..b.warmup + b.steps {
        let t = Instant::now();
        let p = model.infer(&x, InferenceMode::Accurate)?;
        device.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        drop(p);
        if step >= b.warmup {
            timed += s;
            report(step - b.warmup + 1, s);
        }
    }
    Ok((b.batch * b.steps) as f64 / timed.max(1e-12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_bench_reports_every_timed_step() {
        let b = InferBench {
            size: 32,
            batch: 2,
            base: 2,
            steps: 2,
            warmup: 1,
        };
        let mut steps = Vec::new();
        let ips = bench_infer(&b, &Device::Cpu, |i, s| steps.push((i, s))).unwrap();
        assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(ips.is_finite() && ips > 0.0);
    }
}
