//! The U-Net++ checks of `medmine check` (see the module above): gradients against finite
//! differences, the tested side against the CPU's fast path, and an overfit run.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{max_abs, max_abs_diff, on_tested, timed, CheckError, CheckOptions, CheckRow};
use crate::metrics::Confusion;
use crate::models::unetpp::{Config, InferenceMode, SeededInit, UNetPlusPlus};
use crate::train::loss::deep_supervision_loss;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::trainable_vars;

/// Steps of the short training run compared step by step with the CPU.
const CURVE_STEPS: usize = 20;
/// Steps of the overfit run (on the CPU's generic path Dice 1.0 after 150 steps).
pub const DEFAULT_OVERFIT_STEPS: usize = 80;

pub fn checks(device: &Device, opts: &CheckOptions) -> Result<Vec<CheckRow>, CheckError> {
    let overfit_steps = if opts.overfit_steps == 0 {
        DEFAULT_OVERFIT_STEPS
    } else {
        opts.overfit_steps
    };
    let mut worst = String::new();
    let mut gradients = timed(
        "U-Net++ train-mode loss and gradients vs CPU",
        "max rel. diff",
        1e-3,
        || {
            let (value, note) = gradients_vs_cpu(device)?;
            worst = note;
            Ok(value)
        },
    )?;
    gradients.note = worst;
    Ok(vec![
        timed(
            "U-Net++ gradients vs finite differences (f64)",
            "max rel. error",
            1e-4,
            || on_tested(device, gradcheck),
        )?,
        gradients,
        timed("U-Net++ inference vs CPU", "max rel. diff", 1e-4, || {
            inference_vs_cpu(device)
        })?,
        timed(
            format!("U-Net++ training loss curve vs CPU ({CURVE_STEPS} AdamW steps)"),
            "max rel. diff",
            1e-2,
            || curve_vs_cpu(device),
        )?,
        timed(
            format!("U-Net++ overfits 4 images ({overfit_steps} steps)"),
            "1 - Dice",
            0.2,
            || on_tested(device, |d| overfit(d, overfit_steps)),
        )?,
    ])
}

fn seeded(
    base: usize,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(VarMap, UNetPlusPlus)> {
    let map = VarMap::new();
    let init = SeededInit {
        seed,
        batch_norm_jitter: 0.1,
    };
    let model = init.model(&Config::with_base(base), &map, dtype, device)?;
    Ok((map, model))
}

fn uniform(
    shape: (usize, usize, usize, usize),
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.7..=1.7)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)
}

fn loss(model: &UNetPlusPlus, x: &Tensor, y: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    deep_supervision_loss(&model.forward_t(x, true)?, y, w)
}

/// Two random entries of every parameter tensor: autograd against central differences.
fn gradcheck(dev: &Device) -> Result<f64, CheckError> {
    let (map, model) = seeded(2, 11, DType::F64, dev)?;
    let x = uniform((2, 3, 16, 16), 12, dev)?;
    let y = uniform((2, 1, 16, 16), 13, dev)?
        .ge(0.)?
        .to_dtype(DType::F64)?;
    let w = Tensor::new(&[1f64, 0.5], dev)?;
    let grads = loss(&model, &x, &y, &w)?.backward()?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let eps = 1e-6;
    let mut worst = 0f64;
    for (name, var) in trainable_vars(&map) {
        let Some(g) = grads.get(var.as_tensor()) else {
            return Err(candle_core::Error::Msg(format!("{name}: no gradient")).into());
        };
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm <= 1e-10 {
            return Ok(f64::INFINITY); // a zero gradient is wrong
        }
        let orig = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let shape = var.as_tensor().dims().to_vec();
        for _ in 0..2 {
            let i = rng.gen_range(0..orig.len());
            let probe = |delta: f64| -> candle_core::Result<f64> {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.as_slice(), dev)?)?;
                loss(&model, &x, &y, &w)?.to_scalar::<f64>()
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2. * eps);
            var.set(&Tensor::from_vec(orig.clone(), shape.as_slice(), dev)?)?;
            let scale = numeric.abs().max(g[i].abs()).max(1e-3 * norm);
            worst = worst.max((numeric - g[i]).abs() / scale);
        }
    }
    Ok(worst)
}

/// Loss and every gradient of one train-mode step, f32, relative to the CPU's largest; and
/// which of them differs most.
fn gradients_vs_cpu(device: &Device) -> Result<(f64, String), CheckError> {
    let step = |dev: &Device| -> Result<(Tensor, Vec<(String, Tensor)>), CheckError> {
        let (map, model) = seeded(4, 21, DType::F32, dev)?;
        let x = uniform((2, 3, 32, 32), 22, dev)?.to_dtype(DType::F32)?;
        let y = uniform((2, 1, 32, 32), 23, dev)?
            .ge(0.)?
            .to_dtype(DType::F32)?;
        let w = Tensor::new(&[1f32, 0.5], dev)?;
        let l = loss(&model, &x, &y, &w)?;
        let grads = l.backward()?;
        let mut out = Vec::new();
        for (name, var) in trainable_vars(&map) {
            let g = grads.get(var.as_tensor()).cloned();
            let g = g.ok_or_else(|| candle_core::Error::Msg(format!("{name}: no gradient")))?;
            out.push((name, g));
        }
        Ok((l, out))
    };
    let (l_ref, g_ref) = step(&Device::Cpu)?;
    let (l, g) = on_tested(device, step)?;
    let loss_diff = max_abs_diff(&l, &l_ref)? / max_abs(&l_ref)?.max(1e-12);
    let (mut worst, mut worst_name) = (loss_diff, "the loss".to_string());
    for ((name, a), (_, b)) in g.iter().zip(&g_ref) {
        let scale = max_abs(b)?;
        if scale == 0.0 {
            return Err(
                candle_core::Error::Msg(format!("{name}: zero gradient on the CPU")).into(),
            );
        }
        let d = max_abs_diff(a, b)? / scale;
        if d > worst {
            (worst, worst_name) = (d, name.clone());
        }
    }
    Ok((
        worst,
        format!("largest: {worst_name}; loss {loss_diff:.1e}"),
    ))
}

/// Eval-mode logits (mean of the heads) of both inference modes.
fn inference_vs_cpu(device: &Device) -> Result<f64, CheckError> {
    let run = |dev: &Device| -> Result<Vec<Tensor>, CheckError> {
        let (_map, model) = seeded(4, 31, DType::F32, dev)?;
        let x = uniform((2, 3, 48, 32), 32, dev)?.to_dtype(DType::F32)?;
        let modes = [InferenceMode::Accurate, InferenceMode::Fast(2)];
        Ok(modes
            .iter()
            .map(|m| model.infer(&x, *m))
            .collect::<candle_core::Result<_>>()?)
    };
    let reference = run(&Device::Cpu)?;
    let tested = on_tested(device, run)?;
    let mut worst = 0f64;
    for (a, b) in tested.iter().zip(&reference) {
        worst = worst.max(max_abs_diff(a, b)? / max_abs(b)?.max(1e-12));
    }
    Ok(worst)
}

/// Four 32x32 images, each a bright disk (its mask) on a noisy background.
fn disks(dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, s) = (4usize, 32usize);
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut img = vec![0f32; n * 3 * s * s];
    let mut mask = vec![0f32; n * s * s];
    for k in 0..n {
        let (cx, cy) = (rng.gen_range(9.0..23.0f32), rng.gen_range(9.0..23.0f32));
        let r = rng.gen_range(5.0..8.0f32);
        for y in 0..s {
            for x in 0..s {
                let inside = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r;
                mask[k * s * s + y * s + x] = inside as u8 as f32;
                for c in 0..3 {
                    let v = if inside { 0.7 } else { 0.3 } + rng.gen_range(-0.15..0.15f32);
                    img[((k * 3 + c) * s + y) * s + x] = v;
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(img, (n, 3, s, s), dev)?,
        Tensor::from_vec(mask, (n, 1, s, s), dev)?,
    ))
}

/// Losses of `steps` AdamW steps on the disks, and the model.
fn train_disks(dev: &Device, steps: usize) -> Result<(Vec<f64>, UNetPlusPlus), CheckError> {
    let (map, model) = seeded(4, 42, DType::F32, dev)?;
    let (x, y) = disks(dev)?;
    let w = Tensor::ones(4, DType::F32, dev)?;
    let mut opt = AdamW::new(trainable_vars(&map), AdamWConfig::default())?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let l = loss(&model, &x, &y, &w)?;
        losses.push(l.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        opt.step(&l.backward()?, 3e-3)?;
    }
    Ok((losses, model))
}

fn curve_vs_cpu(device: &Device) -> Result<f64, CheckError> {
    let (reference, _) = train_disks(&Device::Cpu, CURVE_STEPS)?;
    let (tested, _) = on_tested(device, |d| train_disks(d, CURVE_STEPS))?;
    Ok(tested
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
        .fold(0f64, f64::max))
}

/// `1 - Dice` of the eval-mode masks on the training images after `steps` steps.
fn overfit(dev: &Device, steps: usize) -> Result<f64, CheckError> {
    let (losses, model) = train_disks(dev, steps)?;
    if losses.iter().any(|l| !l.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let (x, y) = disks(dev)?;
    let prob = model.infer(&x, InferenceMode::Accurate)?;
    let pred: Vec<u8> = prob
        .ge(0.)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let truth: Vec<u8> = y
        .ge(0.5)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let dice = Confusion::from_masks(&pred, &truth).scores().dice;
    Ok(1.0 - dice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generic_path_passes_every_unetpp_check() {
        let rows = checks(
            &Device::Cpu,
            &CheckOptions {
                fixtures: None,
                overfit_steps: 0,
            },
        )
        .unwrap();
        assert_eq!(rows.len(), 5);
        for r in &rows {
            eprintln!(
                "{}: {:.3e} (limit {:.1e}) {:.1} s",
                r.name, r.value, r.limit, r.seconds
            );
            assert!(r.passed(), "{r:?}");
        }
    }
}
