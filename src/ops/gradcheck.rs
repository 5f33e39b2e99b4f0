//! Finite-difference gradient checking for single ops (f64, central differences).
use candle_core::{DType, Device, Result, Tensor, Var};

/// Checks the autograd gradient of `sum(op(x) * r)` (r a fixed random tensor, and `op`
/// applied twice to exercise accumulation) against central differences, for every input
/// element.
pub(crate) fn check_op(shape: &[usize], op: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1., shape, &dev)?)?;
    let out_shape = op(x.as_tensor())?.dims().to_vec();
    let r1 = Tensor::randn(0f64, 1., out_shape.as_slice(), &dev)?;
    let r2 = Tensor::randn(0f64, 1., out_shape.as_slice(), &dev)?;
    // the input feeds two consumers: gradients must add up
    let loss = |t: &Tensor| -> Result<Tensor> {
        (op(t)?.mul(&r1)?.sum_all()? + op(t)?.mul(&r2)?.sum_all()?)?.to_dtype(DType::F64)
    };
    let grads = loss(x.as_tensor())?.backward()?;
    let g = grads
        .get(&x)
        .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let g_max = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let lp = loss(&Tensor::from_vec(plus, shape, &dev)?)?.to_scalar::<f64>()?;
        let lm = loss(&Tensor::from_vec(minus, shape, &dev)?)?.to_scalar::<f64>()?;
        let numeric = (lp - lm) / (2. * eps);
        // relative to the larger of the two, floored at 1e-3 of the largest gradient element:
        // central differences are only good to about 1e-9 absolute here
        let err = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1e-3 * g_max);
        assert!(
            err < 1e-5,
            "element {i}: autograd {} vs finite difference {numeric}",
            g[i]
        );
    }
    assert!(g.iter().any(|v| v.abs() > 0.), "gradient is all zero");
    Ok(())
}

/// Like [`check_op`], for the second operand `w` of `op(x, w)` (a convolution's kernel):
/// `sum(op(x1, w) * r1) + sum(op(x2, w) * r2)`, so that the kernel gradient accumulates.
pub(crate) fn check_kernel(
    x_shape: &[usize],
    w_shape: &[usize],
    op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let dev = Device::Cpu;
    let x1 = Tensor::randn(0f64, 1., x_shape, &dev)?;
    let x2 = Tensor::randn(0f64, 1., x_shape, &dev)?;
    let w = Var::from_tensor(&Tensor::randn(0f64, 1., w_shape, &dev)?)?;
    let out_shape = op(&x1, &w)?.dims().to_vec();
    let r1 = Tensor::randn(0f64, 1., out_shape.as_slice(), &dev)?;
    let r2 = Tensor::randn(0f64, 1., out_shape.as_slice(), &dev)?;
    let loss = |w: &Tensor| -> Result<Tensor> {
        op(&x1, w)?.mul(&r1)?.sum_all()? + op(&x2, w)?.mul(&r2)?.sum_all()?
    };
    let grads = loss(w.as_tensor())?.backward()?;
    let g = grads
        .get(&w)
        .ok_or_else(|| candle_core::Error::Msg("no kernel gradient".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let g_max = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let base = w.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    for i in 0..base.len() {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[i] += eps;
        minus[i] -= eps;
        let lp = loss(&Tensor::from_vec(plus, w_shape, &dev)?)?.to_scalar::<f64>()?;
        let lm = loss(&Tensor::from_vec(minus, w_shape, &dev)?)?.to_scalar::<f64>()?;
        let numeric = (lp - lm) / (2. * eps);
        // floored at 1e-3 of the largest element: differences are good to ~1e-9 absolute
        let err = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1e-3 * g_max);
        assert!(err < 1e-5, "element {i}: autograd {} vs {numeric}", g[i]);
    }
    assert!(
        g.iter().any(|v| v.abs() > 0.),
        "kernel gradient is all zero"
    );
    Ok(())
}

/// `max |a - b|` over all elements, as f64 (any float dtype).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("max_abs_diff: tensors of one shape and dtype")
}
