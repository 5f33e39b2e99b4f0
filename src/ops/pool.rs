use candle_core::{Result, Tensor};

/// 2x2 max pooling with stride 2, with a correct gradient (flows to the maximum of each
/// window; ties, which do not occur with real-valued activations, all receive it).
///
/// `[N, C, H, W] -> [N, C, H/2, W/2]`; H and W must be even.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("max_pool2x2 needs even height and width, got {h}x{w}")
    }
    // [N, C, H, W] -> [N, C, H/2, 2, W/2, 2] -> max over the two window axes
    x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
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
