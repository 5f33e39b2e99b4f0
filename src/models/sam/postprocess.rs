//! `Sam.postprocess_masks` on the masks' own device (the path of CUDA and Metal tensors, and
//! of CPU tensors when the generic op path is forced): the same bilinear resizes as
//! [`super::preprocess::postprocess_mask`], as gathers (`index_select`) and per-row/column
//! weights, so the low-res masks never make a device -> host -> device round trip.
//!
//! Each output is `(1 - l) * a + l * b` with `a`, `b` the two gathered source pixels and the
//! weights computed on the host exactly as the CPU code does; the products and the sum are
//! separate candle ops, as in the CPU code (which the compiler does not contract into fused
//! multiply-adds), so the values are the CPU path's, bit for bit on the CPU.
use candle_core::{DType, Result, Tensor};

use super::preprocess::source_index;
use super::{IMAGE_SIZE, LOW_RES_SIZE};

/// Gather indices and weights of one axis: `(first, second, 1 - l, l)` for `keep` of `out`
/// output pixels from `inp` input pixels, the weights shaped `shape` for broadcasting.
fn axis(
    keep: usize,
    inp: usize,
    out: usize,
    shape: &[usize],
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let taps: Vec<_> = (0..keep).map(|d| source_index(d, inp, out)).collect();
    let first: Vec<u32> = taps.iter().map(|t| t.0 as u32).collect();
    let second: Vec<u32> = taps.iter().map(|t| t.1 as u32).collect();
    let w0: Vec<f32> = taps.iter().map(|t| 1.0 - t.2).collect();
    let w1: Vec<f32> = taps.iter().map(|t| t.2).collect();
    Ok((
        Tensor::from_vec(first, keep, dev)?,
        Tensor::from_vec(second, keep, dev)?,
        Tensor::from_vec(w0, shape, dev)?,
        Tensor::from_vec(w1, shape, dev)?,
    ))
}

/// [`super::preprocess::resize_bilinear`] on the last two axes of `src: [B, M, Hs, Ws]` (f32):
/// reads `src[.., ..in_h, ..in_w]`, resizes to `out`, keeps the top-left `keep`
/// -> `[B, M, keep_h, keep_w]`.
pub(super) fn resize_bilinear_t(
    src: &Tensor,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    (keep_h, keep_w): (usize, usize),
) -> Result<Tensor> {
    let dev = src.device();
    let (_, _, hs, ws) = src.dims4()?;
    if in_h > hs || in_w > ws || in_h == 0 || in_w == 0 || keep_h > out_h || keep_w > out_w {
        candle_core::bail!(
            "resize_bilinear: cannot read {in_h}x{in_w} of {:?} into {keep_h}x{keep_w} of \
             {out_h}x{out_w}",
            src.dims()
        )
    }
    if (in_h, in_w) == (out_h, out_w) && (keep_h, keep_w) == (in_h, in_w) {
        // scale 1: the source itself (the CPU code's shortcut)
        return src.narrow(2, 0, in_h)?.narrow(3, 0, in_w);
    }
    // index_select reads contiguous tensors only (a no-op for the usual fresh ones)
    let src = src.contiguous()?;
    // along x: [B, M, Hs, Ws] -> [B, M, Hs, keep_w]
    let (x0, x1, wx0, wx1) = axis(keep_w, in_w, out_w, &[1, 1, 1, keep_w], dev)?;
    let across = (src.index_select(&x0, 3)?.broadcast_mul(&wx0)?
        + src.index_select(&x1, 3)?.broadcast_mul(&wx1)?)?;
    // along y: [B, M, Hs, keep_w] -> [B, M, keep_h, keep_w]
    let (y0, y1, wy0, wy1) = axis(keep_h, in_h, out_h, &[1, 1, keep_h, 1], dev)?;
    across.index_select(&y0, 2)?.broadcast_mul(&wy0)?
        + across.index_select(&y1, 2)?.broadcast_mul(&wy1)?
}

/// `Sam.postprocess_masks` for a batch: low-res logits `[B, M, 256, 256]` -> upscaled to
/// 1024, cropped to `input` (h', w'), resized to `original` (H, W): logits `[B, M, H, W]`
/// (f32) on the same device.
pub fn postprocess_masks_t(
    low: &Tensor,
    input: (usize, usize),
    original: (usize, usize),
) -> Result<Tensor> {
    postprocess_masks_t_n(low, IMAGE_SIZE, input, original)
}

/// [`postprocess_masks_t`] for an input square of side `n`.
pub fn postprocess_masks_t_n(
    low: &Tensor,
    n: usize,
    input: (usize, usize),
    original: (usize, usize),
) -> Result<Tensor> {
    let low_n = LOW_RES_SIZE;
    let low = low.to_dtype(DType::F32)?;
    // only the crop is needed: [B, M, h', w'] of the 1024 square
    let up = resize_bilinear_t(&low, (low_n, low_n), (n, n), input)?;
    resize_bilinear_t(&up, input, original, original) // [B, M, H, W]
}

#[cfg(test)]
mod tests {
    use super::super::preprocess::{postprocess_mask, resize_bilinear};
    use super::*;
    use candle_core::Device;

    #[test]
    fn device_resize_equals_the_host_resize_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let (h, w) = (13, 17);
        let src = Tensor::randn(0f32, 3., (2, 3, h + 2, w + 3), &dev)?;
        let host = src.flatten_all()?.to_vec1::<f32>()?;
        let plane = (h + 2) * (w + 3);
        for (out, keep) in [
            ((52, 68), (52, 68)),
            ((52, 68), (40, 21)),
            ((5, 7), (5, 7)),
            ((13, 40), (13, 40)),
            ((31, 9), (30, 9)),
            ((13, 17), (13, 17)),
        ] {
            let got = resize_bilinear_t(&src, (h, w), out, keep)?;
            assert_eq!(got.dims(), [2, 3, keep.0, keep.1]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let want: Vec<f32> = (0..6)
                .flat_map(|i| resize_bilinear(&host[i * plane..], w + 3, (h, w), out, keep))
                .collect();
            assert_eq!(got, want, "{out:?} keeping {keep:?}");
        }
        assert!(resize_bilinear_t(&src, (h + 3, w), (4, 4), (4, 4)).is_err());
        Ok(())
    }

    #[test]
    fn device_postprocess_equals_the_host_one() -> Result<()> {
        let dev = Device::Cpu;
        let low = Tensor::randn(0f32, 5., (2, 3, LOW_RES_SIZE, LOW_RES_SIZE), &dev)?;
        let host = low.flatten_all()?.to_vec1::<f32>()?;
        let plane = LOW_RES_SIZE * LOW_RES_SIZE;
        // landscape, portrait, an image larger than the input square, a square one
        for (input, original) in [
            ((683, 1024), (300, 450)),
            ((1024, 576), (1280, 720)),
            ((1024, 1024), (1024, 1024)),
            ((1024, 1000), (97, 95)),
        ] {
            let got = postprocess_masks_t(&low, input, original)?;
            assert_eq!(got.dims(), [2, 3, original.0, original.1]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let want: Vec<f32> = (0..6)
                .flat_map(|i| postprocess_mask(&host[i * plane..][..plane], input, original))
                .collect();
            assert_eq!(got, want, "{input:?} -> {original:?}");
        }
        Ok(())
    }
}
