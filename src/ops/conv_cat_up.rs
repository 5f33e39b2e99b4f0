//! The first convolution of a U-Net++ decoder node, `conv2d(cat([skip, up(low)], 1), w)` with
//! `up` the 2x bilinear upsampling, as one op that keeps neither the upsampled tensor nor the
//! concatenation for the backward pass: the concatenation is never built (im2col reads the two
//! parts in turn), and the upsampled part lives only inside the forward pass and the kernel
//! gradient, rebuilt from `low`, which the graph holds anyway. With candle's `cat` both stayed alive until the end of the backward pass
//! (at 256x256, batch 4, base 32 about a third of the training step's activations), and the
//! gradient of the concatenation was materialised whole before being split.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::conv::{forward, forward_bias, Elem, Geom};
use super::conv_grad::{input_grad, weight_grad};
use super::epilogue::{Epilogue, FusedEpilogue};
use super::upsample::{bilinear_planes, Bilinear2x};
use super::{conv2d, cpu_slice, upsample_bilinear2x};

/// `conv2d(cat([skip, upsample_bilinear2x(low)], 1), w, padding)`: `skip [N, Cs, H, W]`,
/// `low [N, Cu, H/2, W/2]`, `w [Cout, Cs + Cu, K, K]` -> `[N, Cout, Ho, Wo]`. Same values and
/// gradients as the composition; other devices compose the ops.
pub fn conv2d_cat_up(skip: &Tensor, low: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (n, cs, h, wd) = skip.dims4()?;
    let (nl, cu, hl, wl) = low.dims4()?;
    if nl != n || 2 * hl != h || 2 * wl != wd {
        bail!(
            "conv2d_cat_up: low {:?} is not half of skip {:?}",
            low.dims(),
            skip.dims()
        )
    }
    Geom::new(&[n, cs + cu, h, wd], w.dims(), padding)?;
    let same = skip.dtype() == low.dtype() && low.dtype() == w.dtype();
    if !super::fast(skip) || !same || !matches!(skip.dtype(), DType::F32 | DType::F64) {
        let cat = Tensor::cat(&[skip, &upsample_bilinear2x(low)?], 1)?;
        return conv2d(&cat, w, padding);
    }
    skip.contiguous()?
        .apply_op3(&low.contiguous()?, &w.contiguous()?, ConvCatUp { padding })
}

/// [`conv2d_cat_up`] on `cat([skips.., up(low)], 1)` plus a per-channel `bias: [Cout]` and an
/// [`Epilogue`], forward only (inference: U-Net++'s eval BatchNorm and ReLU folded into the
/// convolution). The skips `[N, C_i, H, W]` are read in place: a decoder node's earlier
/// nodes are never concatenated either.
pub fn conv2d_cat_up_bias(
    skips: &[&Tensor],
    low: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    padding: usize,
    epilogue: Epilogue,
) -> Result<Tensor> {
    let [first, rest @ ..] = skips else {
        bail!("conv2d_cat_up: no skip input")
    };
    let (n, _, h, wd) = first.dims4()?;
    let mut cs = 0;
    for s in skips {
        let (sn, c, sh, sw) = s.dims4()?;
        if (sn, sh, sw) != (n, h, wd) {
            bail!(
                "conv2d_cat_up: skip {:?} does not match {:?}",
                s.dims(),
                first.dims()
            )
        }
        cs += c;
    }
    let cu = low.dim(1)?;
    let g = Geom::new(&[n, cs + cu, h, wd], w.dims(), padding)?;
    if bias.dims() != [g.cout] {
        bail!(
            "conv2d_cat_up: bias {:?} for {} channels",
            bias.dims(),
            g.cout
        )
    }
    let f32s = [low.dtype(), w.dtype(), bias.dtype()] == [DType::F32; 3]
        && skips
            .iter()
            .all(|s| s.dtype() == DType::F32 && super::fast(s));
    if f32s {
        if let Some(epilogue) = epilogue.fusable(&[g.n, g.cout, g.ho, g.wo])? {
            let op = ConvCatUpBias {
                padding,
                bias: bias.to_vec1()?,
                epilogue,
                rest: rest.iter().map(|s| s.contiguous()).collect::<Result<_>>()?,
            };
            return first
                .contiguous()?
                .apply_op3_no_bwd(&low.contiguous()?, &w.contiguous()?, &op);
        }
    }
    let skip = match rest {
        [] => (*first).clone(),
        _ => Tensor::cat(skips, 1)?,
    };
    let y =
        conv2d_cat_up(&skip, low, w, padding)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
    epilogue.apply_tensor(y)
}

struct ConvCatUpBias {
    padding: usize,
    bias: Vec<f32>,
    epilogue: FusedEpilogue,
    /// The skips after the first (contiguous f32 CPU tensors), read in place.
    rest: Vec<Tensor>,
}

impl CustomOp3 for ConvCatUpBias {
    fn name(&self) -> &'static str {
        "medmine-conv2d-cat-up-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cs, cu, h, w) = cat_dims(l1, l2)?;
        let cs = cs + self.rest.iter().map(|t| t.dim(1)).sum::<Result<usize>>()?;
        let g = Geom::new(&[n, cs + cu, h, w], l3.dims(), self.padding)?;
        let what = "conv2d_cat_up";
        let up = bilinear_planes(cpu_slice::<f32>(s2, l2, what)?, (h / 2, w / 2), false);
        let guards: Vec<_> = self.rest.iter().map(|t| t.storage_and_layout()).collect();
        let mut x = vec![cpu_slice::<f32>(s1, l1, what)?];
        for (storage, layout) in &guards {
            let Storage::Cpu(cpu) = &**storage else {
                bail!("{what}: a skip input is not on the CPU")
            };
            x.push(cpu_slice::<f32>(cpu, layout, what)?);
        }
        x.push(&up);
        let k = cpu_slice::<f32>(s3, l3, what)?;
        let y = self
            .epilogue
            .with(|epi| forward_bias(&g, &x, k, Some(&self.bias), Some(epi)))?;
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }
}

/// (N, Cs, Cu, H, W) of the two inputs.
fn cat_dims(skip: &Layout, low: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, cs, h, w) = skip.shape().dims4()?;
    let (_, cu, _, _) = low.shape().dims4()?;
    Ok((n, cs, cu, h, w))
}

/// A CPU operand of the ops below: storage and layout.
type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// The forward pass in one element type: (skip, low, kernel) -> output.
fn forward_typed<T: Elem>(g: &Geom, skip: Operand, low: Operand, k: Operand) -> Result<CpuStorage> {
    let what = "conv2d_cat_up";
    let (h, w) = (g.h, g.w);
    let up = bilinear_planes(cpu_slice::<T>(low.0, low.1, what)?, (h / 2, w / 2), false);
    let x = [cpu_slice::<T>(skip.0, skip.1, what)?, &up];
    Ok(T::to_cpu_storage_owned(forward(
        g,
        &x,
        cpu_slice(k.0, k.1, what)?,
    )))
}

/// The kernel gradient in one element type: (skip, up, output gradient) -> kernel gradient.
fn weight_grad_typed<T: Elem>(
    g: &Geom,
    skip: Operand,
    up: Operand,
    grad: Operand,
) -> Result<CpuStorage> {
    let what = "conv2d_cat_up weight grad";
    let x = [
        cpu_slice::<T>(skip.0, skip.1, what)?,
        cpu_slice(up.0, up.1, what)?,
    ];
    Ok(T::to_cpu_storage_owned(weight_grad(
        g,
        &x,
        cpu_slice(grad.0, grad.1, what)?,
    )))
}

struct ConvCatUp {
    padding: usize,
}

impl CustomOp3 for ConvCatUp {
    fn name(&self) -> &'static str {
        "medmine-conv2d-cat-up"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cs, cu, h, w) = cat_dims(l1, l2)?;
        let g = Geom::new(&[n, cs + cu, h, w], l3.dims(), self.padding)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let out = match s1.dtype() {
            DType::F32 => forward_typed::<f32>(&g, (s1, l1), (s2, l2), (s3, l3))?,
            DType::F64 => forward_typed::<f64>(&g, (s1, l1), (s2, l2), (s3, l3))?,
            dt => bail!("conv2d_cat_up: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        skip: &Tensor,
        low: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, k, _) = w.dims4()?;
        let grad = grad.contiguous()?;
        let grad_w = if w.track_op() {
            // the upsampled part rebuilt (dropped right after); the skip part read in place
            let up = low.apply_op1_no_bwd(&Bilinear2x { adjoint: false })?;
            let op = WeightGradParts {
                k,
                padding: self.padding,
            };
            Some(skip.apply_op3_no_bwd(&up, &grad, &op)?)
        } else {
            None
        };
        if !skip.track_op() && !low.track_op() {
            return Ok((None, None, grad_w));
        }
        let gx = input_grad(&grad, w, self.padding)?; // [N, Cs + Cu, H, W]
        let cs = skip.dim(1)?;
        let cu = low.dim(1)?;
        let grad_skip = if skip.track_op() {
            // a view: the autograd sum that receives it copies it anyway
            Some(gx.narrow(1, 0, cs)?)
        } else {
            None
        };
        let grad_low = if low.track_op() {
            // the upsampling is linear: the adjoint of the gradient of its output
            let g_up = gx.narrow(1, cs, cu)?.contiguous()?;
            Some(g_up.apply_op1_no_bwd(&Bilinear2x { adjoint: true })?)
        } else {
            None
        };
        Ok((grad_skip, grad_low, grad_w))
    }
}

/// The kernel gradient of the convolution of `cat([skip, up], 1)`: `(skip [N, Cs, H, W], up
/// [N, Cu, H, W], grad [N, Cout, Ho, Wo]) -> [Cout, Cs + Cu, K, K]`.
struct WeightGradParts {
    k: usize,
    padding: usize,
}

impl CustomOp3 for WeightGradParts {
    fn name(&self) -> &'static str {
        "medmine-conv2d-cat-up-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cs, h, w) = l1.shape().dims4()?;
        let (nu, cu, hu, wu) = l2.shape().dims4()?;
        let (gn, cout, gh, gw) = l3.shape().dims4()?;
        let g = Geom::new(
            &[n, cs + cu, h, w],
            &[cout, cs + cu, self.k, self.k],
            self.padding,
        )?;
        if (nu, hu, wu) != (n, h, w) || (gn, gh, gw) != (n, g.ho, g.wo) {
            bail!(
                "conv2d_cat_up weight grad: shapes {:?}, {:?}, {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let shape = Shape::from((cout, cs + cu, self.k, self.k));
        let out = match s1.dtype() {
            DType::F32 => weight_grad_typed::<f32>(&g, (s1, l1), (s2, l2), (s3, l3))?,
            DType::F64 => weight_grad_typed::<f64>(&g, (s1, l1), (s2, l2), (s3, l3))?,
            dt => bail!("conv2d_cat_up weight grad: f32 or f64 expected, got {dt:?}"),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{Device, Var};

    /// Values and all three gradients equal those of candle's cat of our upsampling, fed to our
    /// convolution (each of which has its own finite-difference test).
    #[test]
    fn equals_the_composition_values_and_gradients() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Var::from_tensor(&Tensor::randn(0f64, 1., s, &dev).unwrap()).unwrap();
        for (n, cs, cu, h, w, co) in [(2, 3, 4, 6, 8, 5), (1, 1, 2, 4, 2, 3)] {
            let skip = r(&[n, cs, h, w]);
            let low = r(&[n, cu, h / 2, w / 2]);
            let k = r(&[co, cs + cu, 3, 3]);
            let probe = Tensor::randn(0f64, 1., (n, co, h, w), &dev).unwrap();
            let fused = conv2d_cat_up(&skip, &low, &k, 1).unwrap();
            let cat =
                Tensor::cat(&[skip.as_tensor(), &upsample_bilinear2x(&low).unwrap()], 1).unwrap();
            let composed = conv2d(&cat, &k, 1).unwrap();
            assert!(max_abs_diff(&fused, &composed) < 1e-12);
            let g1 = fused
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = composed
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&skip, &low, &k] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(max_abs_diff(a, b) < 1e-10, "{:?}", v.dims());
            }
        }
    }

    /// The inference op with several skips (read in place, never concatenated) equals the
    /// composition, small channel counts (shifted planes) and large ones (Winograd).
    #[test]
    fn bias_op_with_several_skips_equals_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &dev);
        for (n, cs, parts, cu, h, w, co) in [(2, 2, 3, 4, 6, 8, 5), (2, 16, 2, 32, 10, 6, 24)] {
            let skips = (0..parts)
                .map(|_| r(&[n, cs, h, w]))
                .collect::<Result<Vec<_>>>()?;
            let skips: Vec<&Tensor> = skips.iter().collect();
            let low = r(&[n, cu, h / 2, w / 2])?;
            let k = r(&[co, parts * cs + cu, 3, 3])?;
            let b = r(&[co])?;
            let fused = conv2d_cat_up_bias(&skips, &low, &k, &b, 1, Epilogue::Relu)?;
            let mut all = skips.clone();
            let up = upsample_bilinear2x(&low)?;
            all.push(&up);
            let want = Tensor::cat(&all, 1)?
                .conv2d(&k, 1, 1, 1, 1)?
                .broadcast_add(&b.reshape((1, co, 1, 1))?)?
                .relu()?;
            let d = max_abs_diff(&fused, &want);
            assert!(d < 1e-4, "{:?}: {d}", (cs, parts, cu, co));
        }
        let low = r(&[1, 2, 3, 3])?;
        let (a, b) = (r(&[1, 2, 6, 6])?, r(&[1, 2, 6, 4])?);
        let (k, bias) = (r(&[3, 6, 3, 3])?, r(&[3])?);
        assert!(conv2d_cat_up_bias(&[&a, &b], &low, &k, &bias, 1, Epilogue::None).is_err());
        assert!(conv2d_cat_up_bias(&[], &low, &k, &bias, 1, Epilogue::None).is_err());
        Ok(())
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let dev = Device::Cpu;
        let skip = Tensor::zeros((1, 2, 6, 6), DType::F32, &dev).unwrap();
        let low = Tensor::zeros((1, 2, 2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 4, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d_cat_up(&skip, &low, &w, 1).is_err());
    }
}
