//! `nn.Linear`, keys `weight` and `bias` as the official checkpoints. The weight is kept
//! transposed, `[in, out]` contiguous, so the product reads it row-major: candle's `Linear`
//! multiplies by a transposed view, and for a handful of rows (prompt tokens, hypernetwork
//! inputs) the matmul spent its time re-packing that strided weight on every call (perf: most
//! of the decoder transformer's token-side time). Many rows (TinyViT's tokens) go through
//! [`crate::ops::linear`], with the bias and an epilogue (GELU, residual) fused.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug)]
pub(super) struct TokenLinear {
    /// `weight` as in the checkpoint: `[out, in]`.
    weight: Tensor,
    /// `[in, out]` contiguous.
    weight_t: Tensor,
    /// `[out]`
    bias: Tensor,
}

impl TokenLinear {
    pub(super) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            weight,
            bias: vb.get(out_dim, "bias")?,
        })
    }

    /// `[out, in]`, as in the checkpoint.
    pub(super) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out]`
    pub(super) fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl TokenLinear {
    /// `epilogue(x W^T + b)`: `[.., in]` -> `[.., out]`, for many rows.
    pub(super) fn forward_with(
        &self,
        x: &Tensor,
        epilogue: crate::ops::Epilogue,
    ) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight_t, &self.bias, epilogue)
    }
}

impl Module for TokenLinear {
    /// `[.., in]` -> `[.., out]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = self.weight_t.dim(0)?;
        let rows = x.elem_count() / in_dim;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight_t.dim(1)?;
        }
        x.contiguous()?
            .reshape((rows, in_dim))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?
            .reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn equals_candles_linear() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (5, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1f32, 5, &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ]
            .into(),
            DType::F32,
            &dev,
        );
        let ours = TokenLinear::new(3, 5, vb).unwrap();
        let theirs = candle_nn::Linear::new(w, Some(b));
        let x = Tensor::randn(0f32, 1f32, (2, 4, 3), &dev).unwrap();
        let d = max_abs_diff(&ours.forward(&x).unwrap(), &theirs.forward(&x).unwrap());
        assert!(d < 1e-6, "{d}");
        assert_eq!(ours.forward(&x).unwrap().dims(), &[2, 4, 5]);
    }
}
