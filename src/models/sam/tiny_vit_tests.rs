//! The CPU's fused TinyViT steps (window attention between the projections, depthwise
//! convolution on the tokens, GELUs and residuals in the output tiles) against the official
//! sequence of candle ops that other devices run (`ops::force_generic`).
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::*;
use crate::ops::gradcheck::max_abs_diff;

/// A module built twice on one `VarMap`: first to create its variables, then from random
/// values shaped like a checkpoint's (BatchNorm variances positive).
fn random<M>(build: impl Fn(VarBuilder) -> Result<M>) -> M {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let t = if name.ends_with("running_var") {
            Tensor::rand(0.5f32, 1.5, var.shape(), &dev)
        } else {
            Tensor::randn(0f32, 0.5, var.shape(), &dev)
        };
        var.set(&t.unwrap()).unwrap();
    }
    build(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap()
}

fn fast_and_generic(m: &dyn Module, x: &Tensor) -> (Tensor, Tensor) {
    let fast = m.forward(x).unwrap();
    let _g = crate::ops::force_generic();
    (fast, m.forward(x).unwrap())
}

#[test]
fn fused_attention_block_equals_the_official_sequence() {
    // padded windows (10 = 2 windows of 7 with 4 padding), one window, windows that fit
    for (dim, side, heads, window) in [(16, 10, 2, 7), (12, 7, 3, 7), (8, 9, 2, 3)] {
        let block = random(|vb| TinyViTBlock::new(dim, side, heads, window, 4, vb));
        let x = Tensor::randn(0f32, 1., (2, side * side, dim), &Device::Cpu).unwrap();
        let (fast, generic) = fast_and_generic(&block, &x);
        assert_eq!(fast.dims(), [2, side * side, dim]);
        let d = max_abs_diff(&fast, &generic);
        assert!(d < 1e-4, "{:?}: {d}", (dim, side, heads, window));
        // a strided input (as PatchMerging hands it over) gives the same
        let xt = x
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(max_abs_diff(&block.forward(&xt).unwrap(), &fast) < 1e-6);
    }
}

#[test]
fn fused_convolution_blocks_equal_the_official_sequence() {
    let dev = Device::Cpu;
    let mb = random(|vb| MBConv::new(8, 4, vb));
    let x = Tensor::randn(0f32, 1., (2, 8, 9, 11), &dev).unwrap();
    let (fast, generic) = fast_and_generic(&mb, &x);
    let d = max_abs_diff(&fast, &generic);
    assert!(d < 1e-4, "MBConv: {d}");
    // stride 2 (8 -> 16 channels) and stride 1 (the widths that keep the grid)
    for out in [16, 320] {
        let pm = random(|vb| PatchMerging::new(6, 8, out, vb));
        let x = Tensor::randn(0f32, 1., (1, 36, 8), &dev).unwrap();
        let (fast, generic) = fast_and_generic(&pm, &x);
        let d = max_abs_diff(&fast, &generic);
        assert!(d < 1e-4, "PatchMerging to {out}: {d}");
    }
    for k in [3, 1] {
        let pe = random(|vb| PatchEmbed::new(16, k, vb));
        let x = Tensor::randn(0f32, 1., (1, 3, 17, 12), &dev).unwrap();
        let (fast, generic) = fast_and_generic(&pe, &x);
        let d = max_abs_diff(&fast, &generic);
        assert!(d < 1e-4, "PatchEmbed kernel {k}: {d}");
    }
}
