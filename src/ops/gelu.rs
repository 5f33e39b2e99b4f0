//! The exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, on all CPU threads with the vectorised
//! erf of [`super::fast_math`] (within 6e-7 of libm's; PyTorch's CPU kernel uses the same
//! approximation). candle 0.11's `gelu_erf` calls the scalar `libm::erff` on one thread; SAM's
//! encoders apply the GELU to tens of millions of values per image (perf: an eighth of the vit_t
//! encoder on one thread, then 6% with libm on all threads). Forward only (inference); other
//! devices and dtypes use candle's op.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough that scheduling is negligible.
const CHUNK: usize = 1 << 14;

/// `nn.GELU()` of the official code: the erf form.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fast(x) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

use super::fast_math::gelu_slice;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "medmine-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if s.dtype() != DType::F32 {
            bail!("gelu_erf: f32 expected, got {:?}", s.dtype());
        }
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("gelu_erf: a contiguous input expected");
        };
        let src = &s.as_slice::<f32>()?[a..b];
        let mut out = src.to_vec();
        out.par_chunks_mut(CHUNK).for_each(gelu_slice);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0., f32::max)
    }

    #[test]
    fn close_to_candles_gelu_erf() {
        let x = Tensor::randn(0f32, 3.0, (3, 40_000), &Device::Cpu).unwrap();
        let d = max_rel_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap());
        assert!(d < 1e-6, "{d}");
        // a strided view is made contiguous first
        let t = x.t().unwrap();
        let d = max_rel_diff(&gelu_erf(&t).unwrap(), &t.gelu_erf().unwrap());
        assert!(d < 1e-6, "{d}");
    }
}
