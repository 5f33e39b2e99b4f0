//! Inference-only `nn.Linear` over many rows with its bias and an [`Epilogue`] fused: SAM's
//! TinyViT runs its MLPs and attention projections on up to 16384 tokens per image, where
//! candle multiplies, then adds the bias in a second pass, then the GELU or the residual in a
//! third. Here each band of rows is one gemm accumulated onto the bias it was set to, finished
//! by the epilogue while in cache. Other devices and dtypes compose candle ops.
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::SyncPtr;
use super::cpu_slice;
use super::epilogue::{Epilogue, FusedEpilogue};

/// Output elements per band of rows (about 256 KiB of f32: the band stays in L2 for the
/// epilogue).
const BAND_ELEMS: usize = 1 << 16;

/// `x: [.., in]`, `w_t: [in, out]` (the checkpoint's `[out, in]` transposed), `b: [out]` ->
/// `epilogue(x w_t + b): [.., out]`.
pub fn linear(x: &Tensor, w_t: &Tensor, b: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    let (k, n) = w_t.dims2()?;
    if x.dims().last() != Some(&k) || b.dims() != [n] {
        bail!(
            "linear: input {:?}, weight [in, out] {:?}, bias {:?}",
            x.dims(),
            w_t.dims(),
            b.dims()
        );
    }
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let f32s = [x.dtype(), w_t.dtype(), b.dtype()] == [DType::F32; 3];
    if super::fast(x) && f32s {
        if let Some(epilogue) = epilogue.fusable(&out_dims)? {
            let rows = x.elem_count() / k.max(1);
            let y = x.contiguous()?.reshape((rows, k))?.apply_op3_no_bwd(
                &w_t.contiguous()?,
                &b.contiguous()?,
                &Linear { epilogue },
            )?;
            return y.reshape(out_dims);
        }
    }
    let y = x.broadcast_matmul(w_t)?.broadcast_add(b)?;
    epilogue.apply_tensor(y)
}

/// `dst[rows, n] (+)= lhs rhs` with `dst` row-major, `lhs(i, k)` at
/// `lhs[i * lhs_rs + k * lhs_cs]` and `rhs(k, j)` at `rhs[k * rhs_rs + j * rhs_cs]` (gemm's
/// strides, named by row and column); `read_dst`: accumulate onto what `dst` holds.
///
/// # Safety
/// `dst` holds `rows * n` elements and the operands every element their strides address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    dst: &mut [f32],
    read_dst: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (isize, isize),
    (rows, n, k): (usize, usize, usize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= rows * n);
    gemm::gemm(
        rows,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        read_dst,
        lhs.as_ptr(),
        lhs_cs,
        lhs_rs,
        rhs.as_ptr(),
        rhs_cs,
        rhs_rs,
        1f32,
        1f32,
        false,
        false,
        false,
        par,
    )
}

struct Linear {
    epilogue: FusedEpilogue,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "medmine-linear"
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
        let (rows, k) = l1.shape().dims2()?;
        let (_, n) = l2.shape().dims2()?;
        let x = cpu_slice::<f32>(s1, l1, "linear")?;
        let w = cpu_slice::<f32>(s2, l2, "linear")?;
        let b = cpu_slice::<f32>(s3, l3, "linear")?;
        let mut out = vec![0f32; rows * n];
        let band = (BAND_ELEMS / n.max(1)).clamp(1, rows.max(1));
        // at least ~4 bands per thread so rayon can balance them
        let band = band.min(rows.div_ceil(4 * rayon::current_num_threads()).max(1));
        let bands = rows.div_ceil(band);
        let par = if bands < rayon::current_num_threads() {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        let dst = SyncPtr(out.as_mut_ptr());
        self.epilogue.with(|epi| {
            (0..bands).into_par_iter().for_each(|i| {
                let (r0, r1) = (i * band, ((i + 1) * band).min(rows));
                // SAFETY: rows r0..r1 of `out` belong to this band alone
                let seg =
                    unsafe { std::slice::from_raw_parts_mut(dst.get().add(r0 * n), (r1 - r0) * n) };
                for row in seg.chunks_exact_mut(n) {
                    row.copy_from_slice(b);
                }
                // SAFETY: seg [r1-r0, n], lhs x[r0..r1] [r1-r0, k], rhs w [k, n], all
                // row-major and in bounds.
                unsafe {
                    gemm_rows(
                        seg,
                        true,
                        &x[r0 * k..],
                        (k as isize, 1),
                        w,
                        (n as isize, 1),
                        (r1 - r0, n, k),
                        par,
                    )
                }
                epi(r0 * n, seg);
            })
        })?;
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{Device, Module};

    #[test]
    fn equals_the_candle_composition_with_every_epilogue() -> Result<()> {
        let dev = Device::Cpu;
        // few rows (one band, gemm's own threads), many rows (many bands, a short last one)
        for (shape, k, n) in [(vec![2, 3], 5, 7), (vec![3, 1001], 40, 96)] {
            let mut xd = shape.clone();
            xd.push(k);
            let x = Tensor::randn(0f32, 1., xd, &dev)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1., n, &dev)?;
            let w_t = w.t()?.contiguous()?;
            let want = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
            let mut od = shape.clone();
            od.push(n);
            let r = Tensor::randn(0f32, 1., od, &dev)?;
            for epi in [
                Epilogue::None,
                Epilogue::Gelu,
                Epilogue::Add(&r),
                Epilogue::AddGelu(&r),
            ] {
                let got = linear(&x, &w_t, &b, epi)?;
                let want = epi.apply_tensor(want.clone())?;
                assert_eq!(got.dims(), want.dims());
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{epi:?} {shape:?}: {d}");
                // the generic path (other devices) gives the same
                let _g = crate::ops::force_generic();
                let d = max_abs_diff(&linear(&x, &w_t, &b, epi)?, &want);
                assert!(d < 1e-4, "generic {epi:?}: {d}");
            }
            // a strided input is made contiguous first
            let xt = x.t()?.contiguous()?.t()?;
            assert!(max_abs_diff(&linear(&xt, &w_t, &b, Epilogue::None)?, &want) < 1e-4);
        }
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w_t = Tensor::zeros((4, 5), DType::F32, &dev)?;
        let b = Tensor::zeros(5, DType::F32, &dev)?;
        assert!(linear(&x, &w_t, &b, Epilogue::None).is_err());
        Ok(())
    }
}
