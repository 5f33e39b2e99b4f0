//! Training loss: binary cross-entropy with logits + soft Dice, per sample, averaged over the
//! deep-supervision heads, with per-sample weights (pseudo-labels can weigh less).
use candle_core::{Result, Tensor};

/// Numerically stable sigmoid with a well-behaved gradient: `(tanh(x / 2) + 1) / 2`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    x.affine(0.5, 0.)?.tanh()?.affine(0.5, 0.5)
}

/// Per-sample BCE-with-logits (mean over pixels) + soft Dice loss (smoothing 1).
///
/// `logits, target: [B, 1, H, W] -> [B]`
pub fn bce_dice_per_sample(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    // stable BCE: relu(x) - x t + log(1 + exp(-|x|))
    let bce = (logits.relu()? - logits.mul(target)?)?;
    let bce = (bce + (logits.abs()?.neg()?.exp()? + 1.)?.log()?)?;
    let bce = bce.mean((1, 2, 3))?; // [B]
    let p = sigmoid(logits)?;
    let inter = p.mul(target)?.sum((1, 2, 3))?; // [B]
    let denom = (p.sum((1, 2, 3))? + target.sum((1, 2, 3))?)?;
    let dice = ((inter.affine(2., 1.)? / (denom + 1.)?)?.neg()? + 1.)?;
    bce + dice
}

/// Weighted mean over samples, mean over heads. `weights: [B]`; returns a scalar.
pub fn deep_supervision_loss(
    heads: &[Tensor],
    target: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    if heads.is_empty() {
        candle_core::bail!("no heads to compute a loss on")
    }
    let wsum = weights.sum_all()?;
    let mut total: Option<Tensor> = None;
    for head in heads {
        let per = bce_dice_per_sample(head, target)?;
        let l = per.mul(weights)?.sum_all()?.div(&wsum)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    let n = heads.len() as f64;
    total.expect("non-empty").affine(1. / n, 0.)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn bce_matches_the_naive_formula_and_stays_finite() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.3f32, -2.0, 4.0, -200.0], &dev)?.reshape((1, 1, 2, 2))?;
        let t = Tensor::new(&[1f32, 0., 0., 1.], &dev)?.reshape((1, 1, 2, 2))?;
        let l = bce_dice_per_sample(&x, &t)?.to_vec1::<f32>()?[0];
        assert!(l.is_finite());
        let xs = [0.3f64, -2.0, 4.0, -200.0];
        let ts = [1f64, 0., 0., 1.];
        let bce: f64 = xs
            .iter()
            .zip(ts)
            .map(|(&x, t)| x.max(0.) - x * t + (1. + (-x.abs()).exp()).ln())
            .sum::<f64>()
            / 4.;
        let p: Vec<f64> = xs.iter().map(|x| 1. / (1. + (-x).exp())).collect();
        let inter: f64 = p.iter().zip(ts).map(|(p, t)| p * t).sum();
        let dice = 1. - (2. * inter + 1.) / (p.iter().sum::<f64>() + ts.iter().sum::<f64>() + 1.);
        assert!(
            (l as f64 - (bce + dice)).abs() < 1e-4,
            "{l} vs {}",
            bce + dice
        );
        Ok(())
    }

    #[test]
    fn weights_select_samples() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 1, 4, 4), &dev)?;
        let t = Tensor::randn(0f32, 1., (2, 1, 4, 4), &dev)?
            .ge(0.)?
            .to_dtype(x.dtype())?;
        let per = bce_dice_per_sample(&x, &t)?.to_vec1::<f32>()?;
        let only_first = Tensor::new(&[1f32, 0.], &dev)?;
        let l = deep_supervision_loss(&[x.clone(), x.clone()], &t, &only_first)?;
        assert!((l.to_scalar::<f32>()? - per[0]).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn gradient_is_finite_for_extreme_logits() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[[[-500f32, 500.], [0., 30.]]]], &dev)?;
        let t = Tensor::new(&[[[[1f32, 0.], [1., 1.]]]], &dev)?;
        let w = Tensor::new(&[1f32], &dev)?;
        let g = deep_supervision_loss(&[x.as_tensor().clone()], &t, &w)?.backward()?;
        let g = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        Ok(())
    }
}
