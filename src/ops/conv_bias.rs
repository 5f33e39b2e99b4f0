//! Inference-only stride-1 convolution with a per-channel bias, for SAM's TinyViT (its 1x1
//! `Conv2d_BN`s with the BatchNorm folded in). candle's conv2d copies a 1x1 convolution's input
//! into an im2col matrix and its output into NCHW, then the bias is another pass; here gemm
//! reads the image in place and accumulates onto the bias written first, and an [`Epilogue`]
//! (GELU, residual) runs on each tile as soon as it is computed.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::conv::{forward_bias, Geom};
use super::cpu_slice;
use super::epilogue::{Epilogue, FusedEpilogue};

/// `x: [N, Cin, H, W]`, `w: [Cout, Cin, K, K]`, `b: [Cout]` -> `epilogue(conv2d(x, w, padding,
/// stride) + b)` (no gradient). Other devices and dtypes use candle's conv2d and a broadcast
/// add.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    (padding, stride): (usize, usize),
    epilogue: Epilogue,
) -> Result<Tensor> {
    let g = Geom::strided(x.dims(), w.dims(), padding, stride)?;
    if b.dims() != [g.cout] {
        bail!(
            "conv2d_bias: bias {:?} for {} output channels",
            b.dims(),
            g.cout
        )
    }
    let same = x.dtype() == w.dtype() && w.dtype() == b.dtype();
    let fused = match (x.dtype(), epilogue) {
        (DType::F64, Epilogue::None) => Some(None),
        (DType::F32, e) => e.fusable(&[g.n, g.cout, g.ho, g.wo])?.map(Some),
        _ => None,
    };
    match fused {
        Some(epilogue) if super::fast(x) && same => x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &b.contiguous()?,
            &ConvBias {
                padding,
                stride,
                epilogue,
            },
        ),
        _ => {
            let y = x.conv2d(w, padding, stride, 1, 1)?;
            epilogue.apply_tensor(y.broadcast_add(&b.reshape((1, g.cout, 1, 1))?)?)
        }
    }
}

struct ConvBias {
    padding: usize,
    stride: usize,
    /// f32 only.
    epilogue: Option<FusedEpilogue>,
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
        let g = Geom::strided(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let what = "conv2d_bias";
        let out = match s1.dtype() {
            DType::F32 => {
                let (x, w) = (
                    cpu_slice::<f32>(s1, l1, what)?,
                    cpu_slice::<f32>(s2, l2, what)?,
                );
                let b = Some(cpu_slice::<f32>(s3, l3, what)?);
                let y = match &self.epilogue {
                    Some(e) => e.with(|epi| forward_bias(&g, &[x], w, b, Some(epi)))?,
                    None => forward_bias(&g, &[x], w, b, None),
                };
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => f64::to_cpu_storage_owned(forward_bias(
                &g,
                &[cpu_slice::<f64>(s1, l1, what)?],
                cpu_slice::<f64>(s2, l2, what)?,
                Some(cpu_slice::<f64>(s3, l3, what)?),
                None,
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
            let got = conv2d_bias(&x, &w, &b, (p, 1), Epilogue::None)?;
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs_diff(&got, &want) < 1e-4, "{:?}", (cin, cout, k, p));
            // each epilogue equals its composition
            let r = Tensor::randn(0f32, 1., want.dims(), &dev)?;
            for epi in [Epilogue::Gelu, Epilogue::Add(&r), Epilogue::AddGelu(&r)] {
                let got = conv2d_bias(&x, &w, &b, (p, 1), epi)?;
                let want = epi.apply_tensor(want.clone())?;
                assert!(
                    max_abs_diff(&got, &want) < 1e-4,
                    "{epi:?} {:?}",
                    (cin, cout, k, p)
                );
            }
        }
        // many tiles per image (the epilogue per tile), an f64 input on the fast path
        let x = Tensor::randn(0f32, 1., (2, 8, 97, 120), &dev)?;
        let w = Tensor::randn(0f32, 1., (16, 8, 1, 1), &dev)?;
        let b = Tensor::randn(0f32, 1., 16, &dev)?;
        let r = Tensor::randn(0f32, 1., (2, 16, 97, 120), &dev)?;
        let want = x
            .conv2d(&w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 16, 1, 1))?)?;
        let got = conv2d_bias(&x, &w, &b, (0, 1), Epilogue::AddGelu(&r))?;
        assert!(max_abs_diff(&got, &crate::ops::gelu_erf(&(want + &r)?)?) < 1e-4);
        let x64 = x.to_dtype(DType::F64)?;
        let (w64, b64) = (w.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
        let got = conv2d_bias(&x64, &w64, &b64, (0, 1), Epilogue::None)?;
        assert_eq!(got.dtype(), DType::F64);
        // stride 2 (TinyViT's patch embedding), odd sizes and 1x1 stride 2 too
        for (cin, cout, k, p, h, wd) in
            [(3, 8, 3, 1, 33, 20), (4, 5, 1, 0, 9, 8), (2, 3, 3, 0, 8, 9)]
        {
            let x = Tensor::randn(0f32, 1., (2, cin, h, wd), &dev)?;
            let w = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1., cout, &dev)?;
            let want = x
                .conv2d(&w, p, 2, 1, 1)?
                .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
            let got = conv2d_bias(&x, &w, &b, (p, 2), Epilogue::Gelu)?;
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &crate::ops::gelu_erf(&want)?);
            assert!(d < 1e-4, "stride 2 {:?}: {d}", (cin, cout, k, p, h, wd));
        }
        // a residual of another shape is refused
        assert!(conv2d_bias(&x, &w, &b, (0, 1), Epilogue::Add(&b)).is_err());
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 2, 1, 1), DType::F32, &dev)?;
        let b2 = Tensor::zeros(2, DType::F32, &dev)?;
        assert!(conv2d_bias(&x, &w, &b2, (0, 1), Epilogue::None).is_err());
        Ok(())
    }
}
