//! Training loss: binary cross-entropy with logits + soft Dice, per sample, averaged over the
//! deep-supervision heads, with per-sample weights (pseudo-labels can weigh less).
//!
//! The weights are normalised by a fixed number, the batch size `B`, not by their sum:
//! `loss = 1/H Σ_heads 1/B Σ_i w_i l_i`. So a sample's pull on the weights is proportional to
//! its own weight whatever else is in the batch: `w = 0.5` halves a pseudo-label's gradient in
//! every batch (normalising by `Σ w` would give a batch of pseudo-labels alone full strength
//! again), and `w = 0` removes a sample's gradient entirely (a batch of zero weights has loss 0
//! and a zero gradient, not 0/0). With every weight 1 this is the plain batch mean.
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

/// `1/H Σ_heads 1/B Σ_i w_i l_i` (see the module docs: the normaliser is the batch size `B`,
/// never `Σ w`). `heads: H x [B, 1, H, W]`, `weights: [B]`; returns a scalar.
pub fn deep_supervision_loss(
    heads: &[Tensor],
    target: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    if heads.is_empty() {
        candle_core::bail!("no heads to compute a loss on")
    }
    let b = weights.elem_count();
    if b == 0 {
        candle_core::bail!("an empty batch has no loss")
    }
    let mut total: Option<Tensor> = None;
    for head in heads {
        let per = bce_dice_per_sample(head, target)?;
        let l = per.mul(weights)?.sum_all()?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    let n = (heads.len() * b) as f64;
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
        // the normaliser is the batch size (2), not the weights' sum (1)
        assert!((l.to_scalar::<f32>()? - per[0] / 2.).abs() < 1e-6);
        let both = Tensor::new(&[1f32, 1.], &dev)?;
        let l = deep_supervision_loss(&[x.clone()], &t, &both)?;
        assert!((l.to_scalar::<f32>()? - (per[0] + per[1]) / 2.).abs() < 1e-6);
        Ok(())
    }

    /// The gradient of the loss with respect to each sample's logits, `[B][pixels]`, with two
    /// heads over the same logits (one scaled) as the U-Net++'s heads share their inputs.
    fn per_sample_grads(x: &Var, t: &Tensor, w: &[f32]) -> Result<(f32, Vec<Vec<f32>>)> {
        let w = Tensor::new(w, x.device())?;
        let heads = [x.as_tensor().clone(), x.as_tensor().affine(0.7, 0.1)?];
        let loss = deep_supervision_loss(&heads, t, &w)?;
        let g = loss.backward()?;
        let g = g
            .get(x)
            .expect("a gradient")
            .flatten_from(1)?
            .to_vec2::<f32>()?;
        Ok((loss.to_scalar::<f32>()?, g))
    }

    #[test]
    fn a_pseudo_weight_of_one_half_halves_that_samples_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // two labelled samples (weight 1) and a pseudo-label (weight 1, then 0.5)
        let x = Var::from_tensor(&Tensor::randn(0f32, 2., (3, 1, 8, 8), &dev)?)?;
        let t = Tensor::randn(0f32, 1., (3, 1, 8, 8), &dev)?
            .ge(0.)?
            .to_dtype(x.dtype())?;
        let (_, full) = per_sample_grads(&x, &t, &[1., 1., 1.])?;
        let (_, half) = per_sample_grads(&x, &t, &[1., 1., 0.5])?;
        assert!(full[2].iter().any(|&g| g != 0.));
        // exactly half: scaling by a power of two is exact in floating point
        let halved: Vec<f32> = full[2].iter().map(|g| g * 0.5).collect();
        assert_eq!(half[2], halved);
        // the labelled samples' gradients do not move (the normaliser is fixed)
        assert_eq!(half[..2], full[..2]);
        Ok(())
    }

    #[test]
    fn a_batch_of_zero_weights_has_zero_loss_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2., (2, 1, 8, 8), &dev)?)?;
        let t = Tensor::ones((2, 1, 8, 8), candle_core::DType::F32, &dev)?;
        let (loss, g) = per_sample_grads(&x, &t, &[0., 0.])?;
        assert_eq!(loss, 0.);
        assert!(g.iter().flatten().all(|&v| v == 0.), "{g:?}");
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
