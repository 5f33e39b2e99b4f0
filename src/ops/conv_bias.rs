//! Inference-only stride-1 convolution with a per-channel bias, for SAM's TinyViT (its 1x1
//! `Conv2d_BN`s with the BatchNorm folded in). candle's conv2d copies a 1x1 convolution's input
//! into an im2col matrix and its output into NCHW, then the bias is another pass; here gemm
//! reads the image in place and accumulates onto the bias written first.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::conv::{forward_bias, Geom};
use super::cpu_slice;

/// `x: [N, Cin, H, W]`, `w: [Cout, Cin, K, K]`, `b: [Cout]` -> `conv2d(x, w, padding) + b`
/// (stride 1, no gradient). Other devices and dtypes use candle's conv2d and a broadcast add.
pub fn conv2d_bias(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Result<Tensor> {
    let g = Geom::new(x.dims(), w.dims(), padding)?;
    if b.dims() != [g.cout] {
        bail!(
            "conv2d_bias: bias {:?} for {} output channels",
            b.dims(),
            g.cout
        )
    }
    let same = x.dtype() == w.dtype() && w.dtype() == b.dtype();
    if !super::fast(x) || !same || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = x.conv2d(w, padding, 1, 1, 1)?;
        return y.broadcast_add(&b.reshape((1, g.cout, 1, 1))?);
    }
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &ConvBias { padding })
}

struct ConvBias {
    padding: usize,
}

impl CustomOp3 for ConvBias {
    fn name(&self) -> &'static str {
        "medmine-conv2d-bias"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.padding)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let what = "conv2d_bias";
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(forward_bias(
                &g,
                &[cpu_slice::<f32>(s1, l1, what)?],
                cpu_slice::<f32>(s2, l2, what)?,
                Some(cpu_slice::<f32>(s3, l3, what)?),
            )),
            DType::F64 => f64::to_cpu_storage_owned(forward_bias(
                &g,
                &[cpu_slice::<f64>(s1, l1, what)?],
                cpu_slice::<f64>(s2, l2, what)?,
                Some(cpu_slice::<f64>(s3, l3, what)?),
            )),
            dt => bail!("{what}: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn matches_candle_conv_plus_bias() -> Result<()> {
        let dev = Device::Cpu;
        // 1x1 (the pointwise path), 3x3 padding 1 (shifted planes), 3x3 padding 0 (im2col)
        for (cin, cout, k, p) in [(5, 7, 1, 0), (4, 3, 3, 1), (3, 2, 3, 0)] {
            let x = Tensor::randn(0f32, 1., (2, cin, 9, 6), &dev)?;
            let w = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1., cout, &dev)?;
            let want = x
                .conv2d(&w, p, 1, 1, 1)?
                .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
            let got = conv2d_bias(&x, &w, &b, p)?;
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs_diff(&got, &want) < 1e-4, "{:?}", (cin, cout, k, p));
        }
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 2, 1, 1), DType::F32, &dev)?;
        assert!(conv2d_bias(&x, &w, &Tensor::zeros(2, DType::F32, &dev)?, 0).is_err());
        Ok(())
    }
}
