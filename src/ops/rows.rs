//! NCHW feature maps to channels-last rows, for SAM's mask decoder.
//!
//! `image [1, C, H, W] + dense [B, C, H, W]` read as `[B, HW, C]` rows: candle adds two
//! transposed views element by element through strided indices (15% of a decoder click on one
//! thread); here one transpose pass in blocks of rows does the add too.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `image: [1, C, H, W]` (the same for every batch element) plus `dense: [B, C, H, W]` ->
/// `[B, H*W, C]`, contiguous. Forward only.
pub fn add_to_rows(image: &Tensor, dense: &Tensor) -> Result<Tensor> {
    let (one, c, h, w) = image.dims4()?;
    let (_, dc, dh, dw) = dense.dims4()?;
    if one != 1 || (c, h, w) != (dc, dh, dw) {
        bail!(
            "add_to_rows: image {:?} does not fit dense {:?}",
            image.dims(),
            dense.dims()
        )
    }
    let cpu_f32 = super::fast(image) && image.dtype() == DType::F32;
    if !cpu_f32 || dense.dtype() != DType::F32 {
        let image = image.flatten_from(2)?.transpose(1, 2)?; // [1, HW, C]
        let dense = dense.flatten_from(2)?.transpose(1, 2)?; // [B, HW, C]
        return image.broadcast_add(&dense)?.contiguous();
    }
    let image = image.contiguous()?;
    if dense.stride()[2..] == [0, 0] {
        // one value per (batch element, channel) broadcast over the grid (SAM's "no mask"
        // embedding): read as [B, C] instead of materialising [B, C, H, W]
        let per_channel = dense.narrow(2, 0, 1)?.narrow(3, 0, 1)?.contiguous()?;
        return image.apply_op2_no_bwd(&per_channel, &AddToRows { per_channel: true });
    }
    image.apply_op2_no_bwd(&dense.contiguous()?, &AddToRows { per_channel: false })
}

/// With `per_channel`, the dense operand is `[B, C, 1, 1]`.
struct AddToRows {
    per_channel: bool,
}

/// Rows per task of the transpose.
const BLOCK: usize = 32;

impl CustomOp2 for AddToRows {
    fn name(&self) -> &'static str {
        "medmine-add-to-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let (b, ..) = l2.shape().dims4()?;
        let hw = h * w;
        let image = super::cpu_slice::<f32>(s1, l1, "add_to_rows")?;
        let dense = super::cpu_slice::<f32>(s2, l2, "add_to_rows")?;
        let mut out = vec![0f32; b * hw * c];
        let per_channel = self.per_channel;
        // one task per (batch element, block of BLOCK rows): all channels of those rows
        out.par_chunks_mut(hw * c)
            .enumerate()
            .for_each(|(bi, out)| {
                out.par_chunks_mut(BLOCK * c)
                    .enumerate()
                    .for_each(|(block, rows)| {
                        let (p0, n) = (block * BLOCK, rows.len() / c);
                        // the block's rows (BLOCK x C values) stay in L1 while every channel
                        // is read contiguously
                        for ch in 0..c {
                            let src_i = &image[ch * hw + p0..ch * hw + p0 + n];
                            if per_channel {
                                let d = dense[bi * c + ch];
                                for (p, a) in src_i.iter().enumerate() {
                                    rows[p * c + ch] = a + d;
                                }
                            } else {
                                let at = (bi * c + ch) * hw + p0;
                                let src_d = &dense[at..at + n];
                                for (p, (a, d)) in src_i.iter().zip(src_d).enumerate() {
                                    rows[p * c + ch] = a + d;
                                }
                            }
                        }
                    });
            });
        Ok((CpuStorage::F32(out), Shape::from((b, hw, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn equals_the_transposed_broadcast_add() -> Result<()> {
        let dev = Device::Cpu;
        // HW not a multiple of the block, C not a multiple of the block, B > 1
        for (b, c, h, w) in [(2, 40, 7, 9), (1, 256, 8, 8), (3, 5, 33, 2)] {
            let image = Tensor::randn(0f32, 1., (1, c, h, w), &dev)?;
            let dense = Tensor::randn(0f32, 1., (b, c, h, w), &dev)?;
            let want = image
                .flatten_from(2)?
                .transpose(1, 2)?
                .broadcast_add(&dense.flatten_from(2)?.transpose(1, 2)?)?;
            let got = add_to_rows(&image, &dense)?;
            assert_eq!(got.dims(), &[b, h * w, c]);
            assert_eq!(max_abs_diff(&got, &want), 0.);
            // a per-channel value broadcast over the grid (read without materialising it)
            let per_channel = Tensor::randn(0f32, 1., (b, c, 1, 1), &dev)?;
            let dense = per_channel.broadcast_as((b, c, h, w))?;
            let want = image
                .flatten_from(2)?
                .transpose(1, 2)?
                .broadcast_add(&dense.contiguous()?.flatten_from(2)?.transpose(1, 2)?)?;
            let got = add_to_rows(&image, &dense)?;
            assert_eq!(max_abs_diff(&got, &want), 0.);
        }
        let bad = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev)?;
        assert!(add_to_rows(&bad, &Tensor::zeros((1, 3, 4, 5), DType::F32, &dev)?).is_err());
        Ok(())
    }
}
