use candle_core::{Result, Tensor};

/// Exact 2x nearest-neighbour upsampling whose gradient accumulates correctly.
///
/// `[N, C, H, W] -> [N, C, 2H, 2W]`
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    // [N, C, H, 1, W, 1] -> broadcast [N, C, H, 2, W, 2] -> [N, C, 2H, 2W]
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .reshape((n, c, 2 * h, 2 * w))
}

/// 2x bilinear upsampling with half-pixel centres, identical to PyTorch's
/// `nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)`.
///
/// Separable: along each axis, output `2i` is `0.75 x[i] + 0.25 x[i-1]` and `2i+1` is
/// `0.75 x[i] + 0.25 x[i+1]`, with the border replicated. Built from differentiable
/// primitives (candle's own `upsample_bilinear2d` has no backward).
///
/// `[N, C, H, W] -> [N, C, 2H, 2W]`
pub fn upsample_bilinear2x(x: &Tensor) -> Result<Tensor> {
    let x = upsample_axis(x, 2)?; // [N, C, 2H, W]
    upsample_axis(&x, 3) // [N, C, 2H, 2W]
}

/// Doubles axis `dim` (2 or 3) of a 4-D tensor with the linear stencil above.
fn upsample_axis(x: &Tensor, dim: usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let (prev, next) = if len == 1 {
        (x.clone(), x.clone())
    } else {
        // x[i-1] and x[i+1] with the border replicated
        let prev = Tensor::cat(&[x.narrow(dim, 0, 1)?, x.narrow(dim, 0, len - 1)?], dim)?;
        let next = Tensor::cat(
            &[x.narrow(dim, 1, len - 1)?, x.narrow(dim, len - 1, 1)?],
            dim,
        )?;
        (prev, next)
    };
    let centre = x.affine(0.75, 0.)?;
    let even = (&centre + prev.affine(0.25, 0.)?)?;
    let odd = (&centre + next.affine(0.25, 0.)?)?;
    // stack a new axis right after `dim`, then merge: out[2i + k] = stacked[i, k]
    let stacked = Tensor::stack(&[even, odd], dim + 1)?;
    let mut dims = x.dims().to_vec();
    dims[dim] *= 2;
    stacked.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check_op;
    use candle_core::{Device, Tensor};

    #[test]
    fn nearest_forward() -> Result<()> {
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu)?;
        let y = upsample_nearest2x(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(
            y,
            vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
        Ok(())
    }

    #[test]
    fn bilinear_matches_pytorch_values() -> Result<()> {
        // torch.nn.functional.interpolate(torch.tensor([[[[1., 2.], [3., 4.]]]]),
        //     scale_factor=2, mode="bilinear", align_corners=False)
        let expected = [
            1.0f32, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75,
            4.0,
        ];
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu)?;
        let y = upsample_bilinear2x(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y.len(), 16);
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        Ok(())
    }

    #[test]
    fn bilinear_preserves_constants_and_shapes() -> Result<()> {
        let x = Tensor::full(0.3f32, (2, 3, 1, 5), &Device::Cpu)?;
        let y = upsample_bilinear2x(&x)?;
        assert_eq!(y.dims(), &[2, 3, 2, 10]);
        let max = (y - 0.3)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max < 1e-6);
        Ok(())
    }

    #[test]
    fn bilinear_gradient_matches_finite_differences() -> Result<()> {
        check_op(&[2, 2, 3, 4], upsample_bilinear2x)
    }

    #[test]
    fn nearest_gradient_matches_finite_differences() -> Result<()> {
        check_op(&[1, 2, 3, 3], upsample_nearest2x)
    }
}
