//! Benchmarks that make the speed of the pipeline measurable (`medmine bench …`).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::models::unetpp::{Config, UNetPlusPlus};
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
    // the CPU device cannot be seeded in candle 0.11; GPUs can
    let _ = device.set_seed(b.seed);
    let map = VarMap::new();
    let model = UNetPlusPlus::new(
        &Config::with_base(b.base),
        VarBuilder::from_varmap(&map, DType::F32, device),
    )?;
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
