//! Our own tensor ops where candle 0.11.1 is wrong, slow, or lacks a backward pass.
//!
//! Each op with a gradient has a finite-difference test, and the whole model has one in
//! `tests/it/gradcheck.rs`; every CPU op is also checked against the candle composition it
//! replaces or a direct reference (other devices use that composition). `conv2d` is a custom op: 3x3 with padding 1
//! as three gemms over kw-shifted planes (`conv3x3`), other kernels by cache-tiled im2col +
//! gemm; the input gradient is itself such a convolution (instead of candle's direct-loop
//! `conv_transpose2d`) and the kernel gradient is accumulated tile by tile. `conv2d_cat_up`
//! is a U-Net++ decoder node's first convolution over `cat([skips, up(below)])` without
//! building or keeping the concatenation. `max_pool2x2`, the bilinear upsampling and the
//! training BatchNorm are one pass each way. `conv2d_bias`, `depthwise_conv2d`,
//! `depthwise_tokens`, `linear`, [`WindowAttention`], `gelu_erf`, `add_layer_norm`,
//! `add_to_rows` and the two attention softmaxes are forward-only (all threads), for SAM;
//! `conv2d_bias`, `depthwise_conv2d`, `linear` and `conv2d_cat_up_bias` (U-Net++ inference with
//! its BatchNorms folded) run an [`Epilogue`] (GELU, ReLU, residual) on each output tile while
//! it is in cache; `fast_math` holds their vectorised `exp`/`erf`. U-Net++'s 3x3
//! convolutions (all but the RGB stem; forward passes and input gradients) run by Winograd
//! F(2x2, 3x3) (`winograd`), and at inference a decoder node's skip inputs are read in place
//! by `conv2d_cat_up_bias`, never concatenated.
//!
//! Every op takes the CPU fast path only for CPU tensors and only when [`path`] allows it
//! (`MEDMINE_OPS=generic` or [`force_generic`] send CPU tensors down the device-generic path,
//! the candle composition a CUDA or Metal tensor takes). On that path `conv2d` keeps candle's
//! forward but has a backward of forward convolutions and matmuls (`conv_generic`: cuDNN and
//! cuBLAS on CUDA instead of candle's direct `conv_transpose2d` kernel), and
//! `depthwise_conv2d` is `K*K` scaled views of the padded input instead of candle's one
//! convolution per channel.
//!
//! Traps avoided (see `../shared/STACK-NOTES.md`):
//! - `upsample_nearest2d` backward overwrites instead of accumulating;
//! - `upsample_bilinear2d` has no backward at all;
//! - `max_pool2d` backward scales the gradient of the maximum by 1/(k*k) (it multiplies by
//!   the window's average of the max-mask instead of dividing), so it is 4x too small for 2x2.

mod batch_norm;
mod conv;
mod conv3x3;
mod conv_bias;
mod conv_cat_up;
mod conv_generic;
mod conv_grad;
mod depthwise;
mod depthwise_tokens;
mod epilogue;
pub mod fast_math;
mod gelu;
mod im2col;
mod layer_norm;
pub(crate) mod linear;
pub mod path;
mod pool;
mod rows;
mod softmax;
mod upsample;
mod window_attention;
mod winograd;

pub use batch_norm::{batch_norm_train, channel_stats};
pub use conv::conv2d;
pub(crate) use conv::SyncPtr;
pub use conv_bias::conv2d_bias;
pub use conv_cat_up::{conv2d_cat_up, conv2d_cat_up_bias};
pub use depthwise::depthwise_conv2d;
pub use depthwise_tokens::depthwise_tokens;
pub use epilogue::Epilogue;
pub use gelu::gelu_erf;
pub use layer_norm::add_layer_norm;
pub use linear::linear;
pub use path::{fast, force_generic, generic_forced, path_name};
pub use pool::max_pool2x2;
pub use rows::add_to_rows;
pub(crate) use softmax::{column_max, column_sum, sub_max_exp};
pub use softmax::{softmax_columns_t, softmax_groups};
pub use upsample::{upsample_bilinear2x, upsample_nearest2x};
pub use window_attention::WindowAttention;

#[cfg(test)]
mod conv_reference;
#[cfg(test)]
pub(crate) mod gradcheck;

/// The values of a contiguous CPU operand of a custom op (`op` names it in the error).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}
