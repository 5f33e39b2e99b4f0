//! The exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, on all CPU threads. candle 0.11's
//! `gelu_erf` computes the same expression with the same `libm::erff` on one thread; SAM's
//! encoders and the mask decoder's upscaling apply it to tens of millions of values per image
//! (perf: an eighth of the vit_t encoder). Forward only (inference); other devices and dtypes
//! use candle's op.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough that scheduling is negligible.
const CHUNK: usize = 1 << 14;

/// `nn.GELU()` of the official code: the erf form.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

pub(crate) fn gelu(v: f32) -> f32 {
    (libm::erff(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
}

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
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = gelu(v);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_values_as_candles_gelu_erf() {
        let x = Tensor::randn(0f32, 3.0, (3, 40_000), &Device::Cpu).unwrap();
        let ours = gelu_erf(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let theirs = x
            .gelu_erf()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ours, theirs);
        // a strided view is made contiguous first
        let t = x.t().unwrap();
        let ours = gelu_erf(&t).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.gelu_erf()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}
