//! The VGG block of U-Net++: conv3x3-BN-ReLU, twice (convolutions without bias).
use candle_core::{Result, Tensor};
use candle_nn::{conv2d_no_bias, Conv2d, Conv2dConfig, VarBuilder};

use crate::models::batch_norm::{BatchNorm2d, BatchNormConfig};
use crate::ops::{conv2d, conv2d_bias, conv2d_cat_up, conv2d_cat_up_bias, Epilogue};

#[derive(Debug, Clone)]
pub struct VggBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
}

impl VggBlock {
    pub fn new(
        in_channels: usize,
        mid_channels: usize,
        out_channels: usize,
        bn: BatchNormConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        // no conv bias: the BatchNorm right after would cancel it (and it would only ever
        // receive a zero gradient)
        Ok(Self {
            conv1: conv2d_no_bias(in_channels, mid_channels, 3, cfg, vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(mid_channels, bn, vb.pp("bn1"))?,
            conv2: conv2d_no_bias(mid_channels, out_channels, 3, cfg, vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(out_channels, bn, vb.pp("bn2"))?,
        })
    }

    /// `[N, C_in, H, W] -> [N, C_out, H, W]`. In eval mode on the CPU the BatchNorms are
    /// folded into the convolutions (forward only: training always runs `train = true`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some((w1, b1)) = self.folded(&self.conv1, &self.bn1, x, train)? {
            let x = conv2d_bias(x, &w1, &b1, (1, 1), Epilogue::Relu)?;
            return self.second_folded(&x);
        }
        // our conv op: same weights as candle_nn's Conv2d, faster and gradient-checked
        let x = conv2d(x, self.conv1.weight(), 1)?; // [N, C_in, H, W] -> [N, C_mid, H, W]
        self.rest_t(&x, train)
    }

    /// The block on `cat([skips.., up(low)], 1)` (a decoder node: the skip connections and the
    /// 2x bilinear upsampling of the node below) without materialising the upsampled part, nor
    /// at inference the concatenation: `skips [N, C_i, H, W]`, `low [N, Cu, H/2, W/2]` ->
    /// `[N, C_out, H, W]`.
    pub fn forward_cat_up_t(&self, skips: &[&Tensor], low: &Tensor, train: bool) -> Result<Tensor> {
        let first = skips.first().copied().ok_or_else(|| {
            candle_core::Error::Msg("U-Net++ decoder node without skip inputs".into())
        })?;
        if let Some((w1, b1)) = self.folded(&self.conv1, &self.bn1, first, train)? {
            let x = conv2d_cat_up_bias(skips, low, &w1, &b1, 1, Epilogue::Relu)?;
            return self.second_folded(&x);
        }
        let skip = match skips {
            [one] => (*one).clone(),
            _ => Tensor::cat(skips, 1)?, // [N, sum C_i, H, W]
        };
        let x = conv2d_cat_up(&skip, low, self.conv1.weight(), 1)?; // -> [N, C_mid, H, W]
        self.rest_t(&x, train)
    }

    /// At inference on the CPU fast path (f32): `conv`'s kernel with `bn`'s eval affine map
    /// folded in, and the bias it leaves (`w * scale`, `shift`), so that the BatchNorm and the
    /// ReLU run inside the convolution's output tiles instead of as three more passes.
    fn folded(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm2d,
        x: &Tensor,
        train: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if train || !crate::ops::fast(x) || x.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let (scale, shift) = bn.eval_scale_shift()?;
        let w = conv.weight().detach();
        let w = w.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
        Ok(Some((w, shift)))
    }

    /// The second conv-BN-ReLU, folded (see [`Self::folded`]).
    fn second_folded(&self, x: &Tensor) -> Result<Tensor> {
        match self.folded(&self.conv2, &self.bn2, x, false)? {
            Some((w2, b2)) => conv2d_bias(x, &w2, &b2, (1, 1), Epilogue::Relu),
            None => self.rest_t(x, false),
        }
    }

    /// BN-ReLU, conv2, BN-ReLU after the first convolution.
    fn rest_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_relu_t(x, train)?;
        let x = conv2d(&x, self.conv2.weight(), 1)?; // -> [N, C_out, H, W]
        self.bn2.forward_relu_t(&x, train)
    }
}
