//! Training-mode batch normalisation over `[N, C, H, W]` as one op with its own backward pass.
//!
//! Built from candle ops, a BatchNorm costs two `mean_keepdim((0, 2, 3))` in the forward pass
//! and, in the backward pass, one `sum_keepdim` per broadcast operand: candle reduces over
//! non-last dimensions element by element on one thread, and these reductions were 29% of a
//! U-Net++ training step (perf, 128/8/32). Here the per-channel sums run in parallel over
//! channels on contiguous rows, and the gradient is the closed form
//! `dx = w / (M sigma) * (M g - sum g - x_hat * sum(g x_hat))` (M = N H W, biased variance), which
//! includes the dependence of the batch statistics on `x`. Statistics and gradients read the
//! tensors in place (custom ops), never copying activations to host vectors. CPU only; other
//! devices use the candle-op formula in `models::batch_norm`.
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;

/// Per-channel batch mean and biased variance of a `[N, C, H, W]` tensor, as `[C]` tensors
/// (no gradient: [`batch_norm_train`] differentiates through them itself). Read in place.
pub fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.detach();
    if !super::fast(&x) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        // [N, C, H, W] -> [C]
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        return Ok((mean.flatten_all()?, var.flatten_all()?));
    }
    let s = x.contiguous()?.apply_op1_no_bwd(&ChannelStats)?; // [2, C]
    Ok((s.get(0)?, s.get(1)?))
}

struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "medmine-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        fn run<T: WithDType>(
            s: &CpuStorage,
            l: &Layout,
            (n, c, hw): (usize, usize, usize),
        ) -> Result<Vec<T>> {
            let (mean, var) = stats(super::cpu_slice::<T>(s, l, "batch norm")?, n, c, hw);
            Ok(mean.into_iter().chain(var).map(T::from_f64).collect())
        }
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(run(s, l, (n, c, h * w))?),
            DType::F64 => CpuStorage::F64(run(s, l, (n, c, h * w))?),
            dt => bail!("batch norm: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, Shape::from((2, c))))
    }
}

/// Channel `ch`'s rows: `n` slices of `hw` values.
fn rows<T>(data: &[T], n: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[T]> {
    (0..n).map(move |i| &data[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

fn stats<T: WithDType>(x: &[T], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = rows(x, n, c, hw, ch)
                .map(|r| r.iter().map(|v| v.to_f64()).sum::<f64>())
                .sum();
            let mean = sum / m;
            let sq: f64 = rows(x, n, c, hw, ch)
                .map(|r| r.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>())
                .sum();
            (mean, sq / m)
        })
        .unzip()
}

/// `y = (x - mean) * inv_std * weight + bias` with the batch statistics of `x`; `params` is
/// `[4, C]`: weight, bias, mean, inv_std (the last two from [`channel_stats`], detached).
/// Gradients flow to `x` (through the statistics too) and to the weight and bias rows. With
/// `relu`, the op is `max(y, 0)` (one pass and one tensor fewer than a separate ReLU).
///
/// On the device-generic path the same function is composed of candle ops, the statistics
/// recomputed from `x` so that the gradient also flows through them; the epsilon is recovered
/// per channel from the given `inv_std` and the batch variance (`eps = inv_std^-2 - var`), so
/// both paths compute the same values.
pub fn batch_norm_train(x: &Tensor, params: &Tensor, relu: bool) -> Result<Tensor> {
    if !super::fast(x) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return batch_norm_train_generic(x, params, relu);
    }
    x.contiguous()?
        .apply_op2(&params.contiguous()?, BatchNormTrain { relu })
}

fn batch_norm_train_generic(x: &Tensor, params: &Tensor, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let row = |r: usize| params.get(r)?.reshape((1, c, 1, 1)); // [4, C] -> [1, C, 1, 1]
    let (weight, bias, inv_std) = (row(0)?, row(1)?, row(3)?.detach());
    let mean = x.mean_keepdim((0, 2, 3))?; // [1, C, 1, 1]
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let eps = (inv_std.sqr()?.recip()? - var.detach())?;
    let y = centred
        .broadcast_mul(&var.broadcast_add(&eps)?.sqrt()?.recip()?)?
        .broadcast_mul(&weight)?
        .broadcast_add(&bias)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

struct BatchNormTrain {
    relu: bool,
}

/// Per-channel `(scale, shift)` of `y = x * scale + shift`, and the parameters.
struct Params {
    weight: Vec<f64>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    bias: Vec<f64>,
}

impl Params {
    fn read<T: WithDType>(p: &[T], c: usize) -> Self {
        let row = |r: usize| p[r * c..(r + 1) * c].iter().map(|v| v.to_f64()).collect();
        Self {
            weight: row(0),
            bias: row(1),
            mean: row(2),
            inv_std: row(3),
        }
    }
}

fn forward<T: WithDType>(x: &[T], p: &Params, c: usize, hw: usize, relu: bool) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(i, (o, x))| {
            let ch = i % c;
            let scale = p.weight[ch] * p.inv_std[ch];
            let shift = p.bias[ch] - p.mean[ch] * scale;
            let floor = if relu { 0.0 } else { f64::NEG_INFINITY };
            for (o, v) in o.iter_mut().zip(x) {
                *o = T::from_f64((v.to_f64() * scale + shift).max(floor));
            }
        });
    out
}

/// The output gradient as seen before the ReLU: zero where the forward pass wrote 0 (the
/// output is recomputed from `x` and the parameters exactly as the forward pass computed it).
fn masked<T: WithDType>(g: T, x: T, scale: f64, shift: f64, relu: bool) -> f64 {
    if relu && T::from_f64(x.to_f64() * scale + shift).to_f64() <= 0.0 {
        0.0
    } else {
        g.to_f64()
    }
}

/// Per channel `(sum g x_hat, sum g)`: the weight and bias gradients.
fn grad_sums<T: WithDType>(
    x: &[T],
    g: &[T],
    p: &Params,
    (n, c, hw): (usize, usize, usize),
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mean, is) = (p.mean[ch], p.inv_std[ch]);
            let scale = p.weight[ch] * is;
            let shift = p.bias[ch] - mean * scale;
            rows(x, n, c, hw, ch)
                .zip(rows(g, n, c, hw, ch))
                .fold((0f64, 0f64), |acc, (xr, gr)| {
                    xr.iter().zip(gr).fold(acc, |(sgx, sg), (&xv, &gv)| {
                        let gv = masked(gv, xv, scale, shift, relu);
                        (sgx + gv * (xv.to_f64() - mean) * is, sg + gv)
                    })
                })
        })
        .unzip()
}

/// `dx = w / (M sigma) * (M g - sum g - x_hat * sum(g x_hat))`.
fn grad_input<T: WithDType>(
    x: &[T],
    g: &[T],
    p: &Params,
    (dw, db): (&[f64], &[f64]),
    (n, c, hw): (usize, usize, usize),
    relu: bool,
) -> Vec<T> {
    let m = (n * hw) as f64;
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(hw)
        .zip(x.par_chunks(hw).zip(g.par_chunks(hw)))
        .enumerate()
        .for_each(|(i, (d, (xr, gr)))| {
            let ch = i % c;
            let (mean, is) = (p.mean[ch], p.inv_std[ch]);
            let scale = p.weight[ch] * is;
            let shift = p.bias[ch] - mean * scale;
            let k = scale / m;
            for (d, (&xv, &gv)) in d.iter_mut().zip(xr.iter().zip(gr)) {
                let gv = masked(gv, xv, scale, shift, relu);
                let x_hat = (xv.to_f64() - mean) * is;
                *d = T::from_f64(k * (m * gv - db[ch] - x_hat * dw[ch]));
            }
        });
    dx
}

/// The backward pass, reading `x` and the output gradient in place: `(x, grad, params)` ->
/// `[2, C]` weight and bias gradients (`sums`), or, given `params` with those two rows
/// appended (`[6, C]`), the input gradient.
struct Backward {
    relu: bool,
    sums: bool,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "medmine-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let dims = (n, c, h * w);
        let (relu, sums) = (self.relu, self.sums);
        fn run<T: WithDType>(
            (s1, l1, s2, l2, s3, l3): (
                &CpuStorage,
                &Layout,
                &CpuStorage,
                &Layout,
                &CpuStorage,
                &Layout,
            ),
            dims: (usize, usize, usize),
            relu: bool,
            sums: bool,
        ) -> Result<Vec<T>> {
            let c = dims.1;
            let x = super::cpu_slice::<T>(s1, l1, "batch norm")?;
            let g = super::cpu_slice::<T>(s2, l2, "batch norm")?;
            let raw = super::cpu_slice::<T>(s3, l3, "batch norm")?;
            let p = Params::read(raw, c);
            if sums {
                let (dw, db) = grad_sums(x, g, &p, dims, relu);
                return Ok(dw.into_iter().chain(db).map(T::from_f64).collect());
            }
            let row = |r: usize| -> Vec<f64> {
                raw[r * c..(r + 1) * c].iter().map(|v| v.to_f64()).collect()
            };
            let (dw, db) = (row(4), row(5));
            Ok(grad_input(x, g, &p, (&dw, &db), dims, relu))
        }
        let args = (s1, l1, s2, l2, s3, l3);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(run(args, dims, relu, sums)?),
            DType::F64 => CpuStorage::F64(run(args, dims, relu, sums)?),
            dt => bail!("batch norm: f32 or f64 expected, got {dt:?}"),
        };
        let shape = if sums {
            Shape::from((2, c))
        } else {
            l1.shape().clone()
        };
        Ok((out, shape))
    }
}

impl CustomOp2 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "medmine-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        fn run<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            (c, hw): (usize, usize),
            relu: bool,
        ) -> Result<Vec<T>> {
            let p = Params::read(super::cpu_slice::<T>(s2, l2, "batch norm")?, c);
            let x = super::cpu_slice::<T>(s1, l1, "batch norm")?;
            Ok(forward(x, &p, c, hw, relu))
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(run(s1, l1, s2, l2, (c, h * w), self.relu)?),
            DType::F64 => CpuStorage::F64(run(s1, l1, s2, l2, (c, h * w), self.relu)?),
            dt => bail!("batch norm: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let relu = self.relu;
        let grad = grad.contiguous()?;
        let sums = x.apply_op3_no_bwd(&grad, params, &Backward { relu, sums: true })?; // [2, C]
        let with_sums = Tensor::cat(&[params, &sums], 0)?; // [6, C]
        let dx = x.apply_op3_no_bwd(&grad, &with_sums, &Backward { relu, sums: false })?;
        // [dweight, dbias, 0, 0]: mean and inv_std are inputs the op differentiates through
        let dp = Tensor::cat(&[&sums, &sums.zeros_like()?], 0)?;
        Ok((Some(dx), Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The candle-op formula (`models::batch_norm`'s generic path) for comparison.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.dim(1)?;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        let scale = w.reshape((1, c, 1, 1))?.broadcast_mul(&inv_std)?;
        let shift = (b.reshape((1, c, 1, 1))? - mean.mul(&scale)?)?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    fn ours(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let (mean, var) = channel_stats(x)?;
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        batch_norm_train(x, &Tensor::stack(&[w, b, &mean, &inv_std], 0)?, false)
    }

    fn ours_relu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let (mean, var) = channel_stats(x)?;
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        batch_norm_train(x, &Tensor::stack(&[w, b, &mean, &inv_std], 0)?, true)
    }

    fn reference_relu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        reference(x, w, b, eps)?.relu()
    }

    #[test]
    fn values_and_gradients_match_the_candle_formula() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev)?.affine(2., 1.)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1., 4, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., 4, &dev)?)?;
        let r = Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev)?;
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>| -> Result<_> {
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
            let grads = (y.mul(&r)?.sum_all()? + y.sqr()?.sum_all()?)?.backward()?;
            let v = |t: Option<&Tensor>| t.unwrap().flatten_all().unwrap().to_vec1::<f64>();
            Ok((
                y.flatten_all()?.to_vec1::<f64>()?,
                v(grads.get(&x))?,
                v(grads.get(&w))?,
                v(grads.get(&b))?,
            ))
        };
        let a = run(&ours)?;
        let e = run(&reference)?;
        let close = |p: &[f64], q: &[f64], what: &str| {
            for (i, (u, v)) in p.iter().zip(q).enumerate() {
                assert!(
                    (u - v).abs() < 1e-9 * (1. + v.abs()),
                    "{what}[{i}]: {u} vs {v}"
                );
            }
        };
        close(&a.0, &e.0, "y");
        close(&a.1, &e.1, "dx");
        close(&a.2, &e.2, "dweight");
        close(&a.3, &e.3, "dbias");
        // fused with the ReLU
        let a = run(&ours_relu)?;
        let e = run(&reference_relu)?;
        assert!(a.0.contains(&0.0) && a.0.iter().any(|&v| v > 0.0));
        close(&a.0, &e.0, "relu y");
        close(&a.1, &e.1, "relu dx");
        close(&a.2, &e.2, "relu dweight");
        close(&a.3, &e.3, "relu dbias");
        // the device-generic path of the same public ops (what a GPU tensor takes)
        let _generic = crate::ops::force_generic();
        for (f, g, what) in [
            (
                &ours as &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
                &reference as &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
                "generic",
            ),
            (&ours_relu, &reference_relu, "generic relu"),
        ] {
            let a = run(f)?;
            let e = run(g)?;
            close(&a.0, &e.0, what);
            close(&a.1, &e.1, what);
            close(&a.2, &e.2, what);
            close(&a.3, &e.3, what);
        }
        Ok(())
    }

    #[test]
    fn input_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1., 2, &dev)?;
        let b = Tensor::randn(0f64, 1., 2, &dev)?;
        crate::ops::gradcheck::check_op(&[2, 2, 3, 3], |x| ours(x, &w, &b, 1e-5))
    }

    #[test]
    fn f32_matches_the_candle_formula() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 17, 9), &dev)?.affine(3., -2.)?;
        let w = Tensor::randn(0f32, 1., 3, &dev)?;
        let b = Tensor::randn(0f32, 1., 3, &dev)?;
        let d = (ours(&x, &w, &b, 1e-5)? - reference(&x, &w, &b, 1e-5)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-4, "max diff {d}");
        Ok(())
    }
}
