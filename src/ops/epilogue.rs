//! What a forward-only op does to each tile of its output while the tile is still in cache:
//! nothing, the exact GELU, a residual add, or both. SAM's TinyViT follows almost every
//! convolution and the MLP's first linear layer with a GELU, and ends each MBConv block with
//! `gelu(conv3(..) + x)`; as separate ops each is another pass over tensors of up to
//! 64 MiB per image (perf: a fifth of the vit_t encoder went to GELU, adds and their page
//! faults).
use candle_core::{bail, Result, Storage, Tensor};

use super::fast_math::gelu_slice;

/// Applied to an op's output: `Gelu` is `gelu(y)`, `Relu` is `max(y, 0)`, `Add(r)` is
/// `y + r`, `AddGelu(r)` is `gelu(y + r)`, with `r` of the output's shape.
#[derive(Clone, Copy, Debug, Default)]
pub enum Epilogue<'a> {
    #[default]
    None,
    Gelu,
    Relu,
    Add(&'a Tensor),
    AddGelu(&'a Tensor),
}

impl<'a> Epilogue<'a> {
    /// The residual operand, if any.
    pub(super) fn residual(self) -> Option<&'a Tensor> {
        match self {
            Epilogue::Add(r) | Epilogue::AddGelu(r) => Some(r),
            _ => None,
        }
    }

    fn gelu(self) -> bool {
        matches!(self, Epilogue::Gelu | Epilogue::AddGelu(_))
    }

    fn relu(self) -> bool {
        matches!(self, Epilogue::Relu)
    }

    /// The candle composition (other devices and dtypes, and the reference in tests).
    pub fn apply_tensor(self, y: Tensor) -> Result<Tensor> {
        let y = match self.residual() {
            Some(r) => (y + r)?,
            None => y,
        };
        if self.gelu() {
            super::gelu_erf(&y)
        } else if self.relu() {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// Whether the fused CPU path can run it: an f32 CPU residual of `dims`, made contiguous.
    pub(super) fn fusable(self, dims: &[usize]) -> Result<Option<FusedEpilogue>> {
        let residual = match self.residual() {
            None => None,
            Some(r) => {
                if !super::fast(r) || r.dtype() != candle_core::DType::F32 {
                    return Ok(None);
                }
                if r.dims() != dims {
                    bail!("epilogue: residual {:?} for an output {dims:?}", r.dims());
                }
                Some(r.contiguous()?)
            }
        };
        Ok(Some(FusedEpilogue {
            gelu: self.gelu(),
            relu: self.relu(),
            residual,
        }))
    }
}

/// An [`Epilogue`] ready for a CPU op: the residual contiguous.
#[derive(Clone, Debug)]
pub(super) struct FusedEpilogue {
    gelu: bool,
    relu: bool,
    residual: Option<Tensor>,
}

impl FusedEpilogue {
    /// Runs `f` with the epilogue as a function of `(offset in the output, output segment)`.
    pub(super) fn with<R>(
        &self,
        f: impl FnOnce(&(dyn Fn(usize, &mut [f32]) + Sync)) -> R,
    ) -> Result<R> {
        let (gelu, relu) = (self.gelu, self.relu);
        match &self.residual {
            None => Ok(f(&|_, seg: &mut [f32]| {
                if gelu {
                    gelu_slice(seg)
                } else if relu {
                    seg.iter_mut().for_each(|v| *v = v.max(0.));
                }
            })),
            Some(r) => {
                let (storage, layout) = r.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    bail!("epilogue: the residual is not on the CPU")
                };
                let res = super::cpu_slice::<f32>(cpu, layout, "epilogue")?;
                Ok(f(&|off, seg: &mut [f32]| {
                    let len = seg.len();
                    for (o, &r) in seg.iter_mut().zip(&res[off..off + len]) {
                        *o += r;
                    }
                    if gelu {
                        gelu_slice(seg)
                    }
                }))
            }
        }
    }
}
