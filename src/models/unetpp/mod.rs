//! U-Net++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image
//! Segmentation"): VGG blocks, nested dense skip pathways X(i, j), 2x max-pooling, 2x bilinear
//! upsampling, filters `base * [1, 2, 4, 8, 16]` and four deep-supervision heads.
//!
//! Weight names follow the common PyTorch `NestedUNet` (`conv{i}_{j}.conv1.weight`,
//! `conv{i}_{j}.bn1.running_mean`, `final{k}.weight`), mirrored by `scripts/unetpp_torch.py`.
//!
//! Inference modes: `Accurate` averages the logits of the four heads; `Fast(L)` computes only
//! the nodes X(i, j) with i + j <= L and returns head L (the pruned network of the paper).
//!
//! [`UNetPlusPlus::new`] initialises with candle's generator, which cannot be seeded on the
//! CPU; [`SeededInit`] draws the same distributions from a seed (what training uses).
mod block;
mod init;

pub use block::VggBlock;
pub use init::SeededInit;

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::batch_norm::BatchNormConfig;
use crate::ops::max_pool2x2;

/// Depth of the encoder (number of poolings): the network has nodes X(0..=4, *).
pub const DEPTH: usize = 4;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Input channels (medmine's data layer always gives 3).
    pub in_channels: usize,
    /// Filters of the first level; level i has `base * 2^i`.
    pub base: usize,
    #[serde(default)]
    pub batch_norm: BatchNormConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: 3,
            base: 32,
            batch_norm: BatchNormConfig::default(),
        }
    }
}

impl Config {
    pub fn with_base(base: usize) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// Filters per level: `base * [1, 2, 4, 8, 16]`.
    pub fn filters(&self) -> [usize; DEPTH + 1] {
        let b = self.base;
        [b, 2 * b, 4 * b, 8 * b, 16 * b]
    }
}

/// How to turn the four heads into one prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InferenceMode {
    /// Mean of the four heads' logits.
    #[default]
    Accurate,
    /// Only the sub-network of depth L (1..=4) and its head.
    Fast(usize),
}

impl std::str::FromStr for InferenceMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "accurate" => Ok(Self::Accurate),
            _ => {
                let depth = s
                    .strip_prefix("fast")
                    .map(|d| d.trim_start_matches([':', '-', 'L', 'l']))
                    .and_then(|d| d.parse::<usize>().ok())
                    .filter(|d| (1..=DEPTH).contains(d));
                depth.map(Self::Fast).ok_or_else(|| {
                    format!("unknown inference mode {s:?}: use accurate or fast:1..fast:4")
                })
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct UNetPlusPlus {
    /// `nodes[i][j]` is the block of node X(i, j), i + j <= DEPTH.
    nodes: Vec<Vec<VggBlock>>,
    /// `heads[k - 1]` is the 1x1 conv on X(0, k).
    heads: Vec<Conv2d>,
    cfg: Config,
}

impl UNetPlusPlus {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let f = cfg.filters();
        let mut nodes = Vec::with_capacity(DEPTH + 1);
        for i in 0..=DEPTH {
            let mut row = Vec::with_capacity(DEPTH + 1 - i);
            for j in 0..=DEPTH - i {
                let in_ch = match (i, j) {
                    (0, 0) => cfg.in_channels,
                    (_, 0) => f[i - 1],
                    // X(i, 0..j) concatenated with up(X(i+1, j-1))
                    _ => f[i] * j + f[i + 1],
                };
                let name = format!("conv{i}_{j}");
                row.push(VggBlock::new(
                    in_ch,
                    f[i],
                    f[i],
                    cfg.batch_norm,
                    vb.pp(name),
                )?);
            }
            nodes.push(row);
        }
        let heads = (1..=DEPTH)
            .map(|k| {
                conv2d(
                    f[0],
                    1,
                    1,
                    Conv2dConfig::default(),
                    vb.pp(format!("final{k}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            nodes,
            heads,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Computes the nodes of the sub-network of depth `depth` in the order of the paper
    /// (diagonal by diagonal) and returns X(0, 1..=depth).
    fn top_row(&self, x: &Tensor, train: bool, depth: usize) -> Result<Vec<Tensor>> {
        let (_, c, h, w) = x.dims4()?;
        let m = 1 << depth;
        if h % m != 0 || w % m != 0 || h == 0 || w == 0 {
            candle_core::bail!("U-Net++ of depth {depth} needs sides divisible by {m}, got {h}x{w}")
        }
        if c != self.cfg.in_channels {
            candle_core::bail!("U-Net++ expects {} channels, got {c}", self.cfg.in_channels)
        }
        let mut grid: Vec<Vec<Tensor>> = vec![Vec::new(); depth + 1];
        for k in 0..=depth {
            // X(k, 0): the encoder
            let input = if k == 0 {
                x.clone()
            } else {
                max_pool2x2(&grid[k - 1][0])? // [N, C, H, W] -> [N, C, H/2, W/2]
            };
            let enc = self.nodes[k][0].forward_t(&input, train)?;
            grid[k].push(enc);
            // X(i, j) on the diagonal i + j = k
            for j in 1..=k {
                let i = k - j;
                // input cat([X(i, 0..j), up(X(i+1, j-1))]): [N, f_i * j + f_{i+1}, H_i, W_i],
                // neither the upsampled part nor (at inference) the concatenation stored
                let skips: Vec<&Tensor> = grid[i][..j].iter().collect();
                let node = self.nodes[i][j].forward_cat_up_t(&skips, &grid[i + 1][j - 1], train)?;
                grid[i].push(node);
            }
        }
        Ok(grid.swap_remove(0).split_off(1))
    }

    /// The four deep-supervision heads' logits, each `[N, 1, H, W]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let top = self.top_row(x, train, DEPTH)?;
        top.iter()
            .zip(&self.heads)
            .map(|(t, head)| head_forward(head, t))
            .collect()
    }

    /// Eval-mode logits `[N, 1, H, W]` in the given mode.
    pub fn infer(&self, x: &Tensor, mode: InferenceMode) -> Result<Tensor> {
        match mode {
            InferenceMode::Accurate => {
                let heads = self.forward_t(x, false)?;
                let n = heads.len() as f64;
                Tensor::stack(&heads, 0)?.sum(0)?.affine(1. / n, 0.)
            }
            InferenceMode::Fast(depth) => {
                if !(1..=DEPTH).contains(&depth) {
                    candle_core::bail!("fast mode depth must be 1..={DEPTH}, got {depth}")
                }
                let top = self.top_row(x, false, depth)?;
                head_forward(&self.heads[depth - 1], &top[depth - 1])
            }
        }
    }
}

/// A 1x1 head through our conv op plus its bias: candle's conv backward computes the input
/// gradient with its direct-loop `conv_transpose2d` (3% of a 128/8/32 training step for the
/// four heads). `[N, C, H, W] -> [N, 1, H, W]`
fn head_forward(head: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let y = crate::ops::conv2d(x, head.weight(), 0)?;
    match head.bias() {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

impl Module for UNetPlusPlus {
    /// Accurate-mode eval logits.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.infer(x, InferenceMode::Accurate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn model(base: usize) -> Result<(VarMap, UNetPlusPlus)> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let m = UNetPlusPlus::new(&Config::with_base(base), vb)?;
        Ok((map, m))
    }

    fn trainable_params(map: &VarMap) -> usize {
        let data = map.data().lock().unwrap();
        data.iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    #[test]
    fn parameter_count_base_32() -> Result<()> {
        let (map, _) = model(32)?;
        let n = trainable_params(&map);
        // 9,159,780 as scripts/unetpp_torch.py NestedUNet(base=32) counts, about the paper's 9.0M
        assert_eq!(n, 9_159_780, "{n}");
        Ok(())
    }

    #[test]
    fn output_shapes_for_several_sizes() -> Result<()> {
        let (_, m) = model(2)?;
        for (h, w) in [(16, 16), (32, 48), (64, 32)] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, w), &Device::Cpu)?;
            let heads = m.forward_t(&x, true)?;
            assert_eq!(heads.len(), 4);
            for head in &heads {
                assert_eq!(head.dims(), &[2, 1, h, w]);
            }
            assert_eq!(m.forward(&x)?.dims(), &[2, 1, h, w]);
            for depth in 1..=4 {
                let y = m.infer(&x, InferenceMode::Fast(depth))?;
                assert_eq!(y.dims(), &[2, 1, h, w]);
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_sizes_and_channels() -> Result<()> {
        let (_, m) = model(2)?;
        let x = Tensor::zeros((1, 3, 24, 16), DType::F32, &Device::Cpu)?;
        assert!(m.forward(&x).is_err());
        // depth-1 fast mode only needs even sides
        assert!(m.infer(&x, InferenceMode::Fast(1)).is_ok());
        let x = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu)?;
        assert!(m.forward(&x).is_err());
        Ok(())
    }

    #[test]
    fn fast_mode_matches_the_matching_head() -> Result<()> {
        let (_, m) = model(2)?;
        let x = Tensor::randn(0f32, 1., (1, 3, 32, 32), &Device::Cpu)?;
        let heads = m.forward_t(&x, false)?;
        for depth in 1..=4 {
            let fast = m.infer(&x, InferenceMode::Fast(depth))?;
            let diff = (fast - &heads[depth - 1])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "depth {depth}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn eval_with_batch_norm_folded_equals_the_layers() -> Result<()> {
        // the CPU folds each eval BatchNorm and ReLU into its convolution; other devices run
        // conv, BatchNorm, ReLU: the same logits, with running statistics away from (0, 1)
        let (map, m) = model(4)?;
        for (name, var) in map.data().lock().unwrap().iter() {
            let t = if name.ends_with("running_var") {
                Tensor::rand(0.5f32, 2.0, var.shape(), &Device::Cpu)?
            } else if name.contains("bn") {
                Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu)?
            } else {
                continue;
            };
            var.set(&t)?;
        }
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 48), &Device::Cpu)?;
        let fast = m.infer(&x, InferenceMode::Accurate)?;
        let generic = {
            let _g = crate::ops::force_generic();
            m.infer(&x, InferenceMode::Accurate)?
        };
        let d = crate::ops::gradcheck::max_abs_diff(&fast, &generic);
        assert!(d < 1e-4, "{d}");
        Ok(())
    }

    #[test]
    fn parses_modes() {
        assert_eq!("accurate".parse(), Ok(InferenceMode::Accurate));
        assert_eq!("fast:2".parse(), Ok(InferenceMode::Fast(2)));
        assert_eq!("fastL3".parse(), Ok(InferenceMode::Fast(3)));
        assert!("fast:5".parse::<InferenceMode>().is_err());
        assert!("slow".parse::<InferenceMode>().is_err());
    }
}
