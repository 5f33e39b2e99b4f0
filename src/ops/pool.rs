use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// 2x2 max pooling with stride 2, with a correct gradient (flows to the maximum of each
/// window; ties, which do not occur with real-valued activations, all receive it).
///
/// `[N, C, H, W] -> [N, C, H/2, W/2]`; H and W must be even. On the CPU one pass each way
/// (candle's two max-reductions and their masked backward were ~1% of a training step);
/// elsewhere candle's reductions.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("max_pool2x2 needs even height and width, got {h}x{w}")
    }
    if super::fast(x) && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(MaxPool2x2);
    }
    // [N, C, H, W] -> [N, C, H/2, 2, W/2, 2] -> max over the two window axes
    x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

struct MaxPool2x2;

/// Rows of 2W input values per task.
const ROWS: usize = 16;

/// `x: [.., H, W]` -> `[.., H/2, W/2]`.
fn pool<T: WithDType>(x: &[T], w: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() / 4];
    let wo = w / 2;
    out.par_chunks_mut(ROWS * wo)
        .zip(x.par_chunks(ROWS * 2 * w))
        .for_each(|(out, x)| {
            for (o, pair) in out.chunks_exact_mut(wo).zip(x.chunks_exact(2 * w)) {
                let (r0, r1) = pair.split_at(w);
                for (j, o) in o.iter_mut().enumerate() {
                    let a = r0[2 * j].max(r0[2 * j + 1]);
                    *o = a.max(r1[2 * j].max(r1[2 * j + 1]));
                }
            }
        });
    out
}

/// The gradient of [`pool`]: `x: [.., H, W]`, `y = pool(x)`, `g: [.., H/2, W/2]` -> `[.., H, W]`,
/// each window's gradient to every element equal to its maximum.
fn pool_grad<T: WithDType>(x: &[T], y: &[T], g: &[T], w: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    let wo = w / 2;
    dx.par_chunks_mut(ROWS * 2 * w)
        .zip(x.par_chunks(ROWS * 2 * w))
        .zip(y.par_chunks(ROWS * wo).zip(g.par_chunks(ROWS * wo)))
        .for_each(|((dx, x), (y, g))| {
            let rows = dx.chunks_exact_mut(2 * w).zip(x.chunks_exact(2 * w));
            for ((dx, x), (y, g)) in rows.zip(y.chunks_exact(wo).zip(g.chunks_exact(wo))) {
                for j in 0..wo {
                    for i in [2 * j, 2 * j + 1, w + 2 * j, w + 2 * j + 1] {
                        if x[i] == y[j] {
                            dx[i] = g[j];
                        }
                    }
                }
            }
        });
    dx
}

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "medmine-max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(pool(super::cpu_slice(s, l, "max pool")?, w)),
            DType::F64 => f64::to_cpu_storage_owned(pool(super::cpu_slice(s, l, "max pool")?, w)),
            dt => bail!("max pool: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, Shape::from((n, c, h / 2, w / 2))))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op3_no_bwd(res, &grad, &MaxPoolGrad)?))
    }
}

/// `(x, y, grad) -> dx` of [`MaxPool2x2`], `y` its output.
struct MaxPoolGrad;

impl CustomOp3 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "medmine-max-pool-2x2-grad"
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
        let (_, _, h, w) = l1.shape().dims4()?;
        if l2.dims() != l3.dims()
            || 4 * l3.shape().elem_count() != l1.shape().elem_count()
            || h % 2 != 0
        {
            bail!(
                "max pool grad: gradient {:?} does not fit input {:?}",
                l3.dims(),
                l1.dims()
            )
        }
        let what = "max pool grad";
        let dx = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(pool_grad(
                super::cpu_slice(s1, l1, what)?,
                super::cpu_slice(s2, l2, what)?,
                super::cpu_slice(s3, l3, what)?,
                w,
            )),
            DType::F64 => f64::to_cpu_storage_owned(pool_grad(
                super::cpu_slice(s1, l1, what)?,
                super::cpu_slice(s2, l2, what)?,
                super::cpu_slice(s3, l3, what)?,
                w,
            )),
            dt => bail!("max pool grad: f32 or f64 expected, got {dt:?}"),
        };
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check_op;
    use candle_core::{Device, Tensor};

    #[test]
    fn forward_matches_definition() -> Result<()> {
        let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let y = max_pool2x2(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![5., 7., 13., 15.]);
        Ok(())
    }

    #[test]
    fn cpu_op_matches_the_candle_composition_with_ties() -> Result<()> {
        let dev = Device::Cpu;
        // random values, then values rounded to a few levels (ties in most windows)
        let r = Tensor::randn(0f32, 1., (2, 3, 6, 8), &dev)?;
        for x in [r.clone(), (r * 1.5)?.round()?.clamp(-1f32, 1f32)?] {
            let x = candle_core::Var::from_tensor(&x)?;
            let weights = Tensor::randn(0f32, 1., (2, 3, 3, 4), &dev)?;
            let ours = max_pool2x2(x.as_tensor())?;
            let theirs = x.as_tensor().reshape((2, 3, 3, 2, 4, 2))?.max(5)?.max(3)?;
            let (o, t) = (ours.flatten_all()?, theirs.flatten_all()?);
            assert_eq!(o.to_vec1::<f32>()?, t.to_vec1::<f32>()?);
            let g_ours = ours.mul(&weights)?.sum_all()?.backward()?;
            let g_theirs = theirs.mul(&weights)?.sum_all()?.backward()?;
            let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        check_op(&[2, 3, 4, 6], max_pool2x2)
    }

    #[test]
    fn candle_max_pool_gradient_is_wrong() -> Result<()> {
        // Documents the trap this op avoids: candle's max_pool2d gradient is 1/4 of the truth.
        let x = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?,
        )?;
        let ours = max_pool2x2(x.as_tensor())?.sum_all()?.backward()?;
        let theirs = x.as_tensor().max_pool2d(2)?.sum_all()?.backward()?;
        let g_ours = ours.get(&x).unwrap().sum_all()?.to_scalar::<f32>()?;
        let g_theirs = theirs.get(&x).unwrap().sum_all()?.to_scalar::<f32>()?;
        assert_eq!(g_ours, 4.0);
        assert_eq!(g_theirs, 1.0);
        Ok(())
    }
}
