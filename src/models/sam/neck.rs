//! The image encoders' neck (`neck.{0,1,2,3}` in both official encoders): a 1x1 convolution
//! without bias, LayerNorm2d, a 3x3 convolution without bias, LayerNorm2d (eps 1e-6).
//!
//! Both encoders end with tokens in channels-last order, so the 1x1 convolution is a matrix
//! product on the tokens and the first LayerNorm2d a LayerNorm over their last axis; the 3x3
//! runs on [`crate::ops::conv2d`] (three gemms over shifted planes on the CPU instead of
//! candle's im2col, which copies the 64x64x256 input nine times).
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub(super) struct Neck {
    /// `neck.0.weight` `[out, C, 1, 1]` as a `[C, out]` matrix.
    conv1: Tensor,
    ln1: (Tensor, Tensor),
    /// `neck.2.weight` `[out, out, 3, 3]`.
    conv2: Tensor,
    ln2: (Tensor, Tensor),
}

fn layer_norm_last(xs: &Tensor, (weight, bias): &(Tensor, Tensor)) -> Result<Tensor> {
    candle_nn::ops::layer_norm(&xs.contiguous()?, weight, bias, 1e-6)
}

impl Neck {
    /// `dim`: the encoder's token width; `out`: the embedding's channels (256).
    pub(super) fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        let ln = |i: usize| -> Result<(Tensor, Tensor)> {
            let vb = vb.pp(i.to_string());
            Ok((vb.get(out, "weight")?, vb.get(out, "bias")?))
        };
        let conv1 = vb.pp("0").get((out, dim, 1, 1), "weight")?;
        Ok(Self {
            conv1: conv1.reshape((out, dim))?.t()?.contiguous()?,
            ln1: ln(1)?,
            conv2: vb.pp("2").get((out, out, 3, 3), "weight")?,
            ln2: ln(3)?,
        })
    }

    /// Tokens `[B, H, W, C]` -> the embedding `[B, out, H, W]`.
    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let out = self.conv1.dim(1)?;
        let xs = xs
            .contiguous()?
            .reshape((b * h * w, c))?
            .matmul(&self.conv1)?; // [BHW, out]
        let xs = layer_norm_last(&xs, &self.ln1)?
            .reshape((b, h, w, out))?
            .permute((0, 3, 1, 2))?
            .contiguous()?; // [B, out, H, W]
        let xs = crate::ops::conv2d(&xs, &self.conv2, 1)?;
        let xs = layer_norm_last(&xs.permute((0, 2, 3, 1))?, &self.ln2)?;
        xs.permute((0, 3, 1, 2))?.contiguous()
    }
}
