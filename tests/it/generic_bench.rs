//! Timings of the device-generic path on the CPU against the fallbacks it replaced (issue 15,
//! item 2), interleaved (old, new, old, new, ...) in one process because the host's speed
//! drifts. Ignored by default; run with
//! `cargo test --test it generic_bench -- --ignored --nocapture --test-threads 1`.
//! The numbers are in BENCHMARKS.md.
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use medmine::models::sam::postprocess::postprocess_masks_t;
use medmine::models::sam::preprocess::postprocess_mask;
use medmine::ops;

const ROUNDS: usize = 3;

/// Median seconds of `f` over `ROUNDS` runs of each of `fs`, interleaved.
fn interleaved(fs: &[&dyn Fn() -> Result<()>]) -> Result<Vec<f64>> {
    let mut times = vec![Vec::new(); fs.len()];
    for f in fs {
        f()?; // warm-up: allocator, scratch, rayon pool
    }
    for _ in 0..ROUNDS {
        for (f, t) in fs.iter().zip(&mut times) {
            let start = Instant::now();
            f()?;
            t.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// Forward + backward of `sum(conv(x, w) * r)` for the U-Net++ convolutions of
/// `bench train --size 128 --batch 8 --base 32` (3x3 padding 1 per level, the 1x1 head):
/// candle's conv2d and its autograd (the old generic path) vs `ops::conv2d` forced generic.
#[test]
#[ignore]
fn generic_bench_conv_backward() -> Result<()> {
    let dev = Device::Cpu;
    println!("conv2d forward+backward, generic path on the CPU: old (candle autograd) vs new");
    for (n, cin, hw, cout, k, p) in [
        (8, 32, 128, 32, 3, 1),
        (8, 64, 64, 64, 3, 1),
        (8, 128, 32, 128, 3, 1),
        (8, 256, 16, 256, 3, 1),
        (8, 512, 8, 512, 3, 1),
        (8, 32, 128, 1, 1, 0),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, cin, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev)?)?;
        let ho = hw + 2 * p + 1 - k;
        let r = Tensor::randn(0f32, 1., (n, cout, ho, ho), &dev)?;
        let old = || -> Result<()> {
            let g = x.conv2d(&w, p, 1, 1, 1)?.mul(&r)?.sum_all()?.backward()?;
            assert!(g.get(&x).is_some() && g.get(&w).is_some());
            Ok(())
        };
        let new = || -> Result<()> {
            let _g = ops::force_generic();
            let g = ops::conv2d(&x, &w, p)?.mul(&r)?.sum_all()?.backward()?;
            assert!(g.get(&x).is_some() && g.get(&w).is_some());
            Ok(())
        };
        let t = interleaved(&[&old, &new])?;
        println!(
            "  [{n}, {cin}, {hw}, {hw}] {k}x{k} -> {cout}: old {:.3} s, new {:.3} s ({:.2}x)",
            t[0],
            t[1],
            t[0] / t[1]
        );
    }
    Ok(())
}

/// MobileSAM's depthwise 3x3 convolutions (TinyViT MBConv at 256x256, PatchMerging stride 2):
/// candle's grouped convolution, one per channel (the old generic path), vs the new one.
#[test]
#[ignore]
fn generic_bench_depthwise() -> Result<()> {
    let dev = Device::Cpu;
    println!("depthwise conv, generic path on the CPU: old (one conv per channel) vs new");
    for (c, hw, s) in [(256, 256, 1), (128, 256, 2), (320, 64, 2), (640, 64, 1)] {
        let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 1., (c, 1, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., c, &dev)?;
        let old = || -> Result<()> {
            x.conv2d(&w, 1, s, 1, c)?
                .broadcast_add(&b.reshape((1, c, 1, 1))?)
                .map(drop)
        };
        let new = || -> Result<()> {
            let _g = ops::force_generic();
            ops::depthwise_conv2d(&x, &w, &b, s, 1, ops::Epilogue::None).map(drop)
        };
        let t = interleaved(&[&old, &new])?;
        println!(
            "  [1, {c}, {hw}, {hw}] stride {s}: old {:.4} s, new {:.4} s ({:.2}x)",
            t[0],
            t[1],
            t[0] / t[1]
        );
    }
    Ok(())
}

/// SAM's mask postprocessing of one click (3 masks, 256 -> 1024 crop -> original size): the
/// host code with its copies (the old path of every device) vs the tensor ops.
#[test]
#[ignore]
fn generic_bench_postprocess() -> Result<()> {
    let dev = Device::Cpu;
    println!("SAM postprocess of 3 masks: old (host round trip) vs new (tensor ops)");
    let low = Tensor::randn(0f32, 5., (1, 3, 256, 256), &dev)?;
    for (input, original) in [((683, 1024), (1080, 1620)), ((1024, 1024), (512, 512))] {
        let old = || -> Result<()> {
            let host = low.flatten_all()?.to_vec1::<f32>()?;
            let mut logits = Vec::new();
            for plane in host.chunks_exact(256 * 256) {
                logits.extend(postprocess_mask(plane, input, original));
            }
            let masks: Vec<u8> = logits.iter().map(|&v| u8::from(v > 0.)).collect();
            Tensor::from_vec(logits, (3, original.0, original.1), &dev)?;
            Tensor::from_vec(masks, (3, original.0, original.1), &dev).map(drop)
        };
        let new = || -> Result<()> {
            let logits = postprocess_masks_t(&low, input, original)?;
            assert_eq!(logits.dtype(), DType::F32);
            logits.gt(0f32).map(drop)
        };
        let t = interleaved(&[&old, &new])?;
        println!(
            "  {input:?} -> {original:?}: old {:.4} s, new {:.4} s ({:.2}x)",
            t[0],
            t[1],
            t[0] / t[1]
        );
    }
    Ok(())
}
