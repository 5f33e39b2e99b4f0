//! Finite-difference gradient check over a whole (tiny) U-Net++ in train mode with the real
//! training loss: every trainable parameter tensor must receive a non-zero gradient that
//! matches central differences. This is what guards against candle's silent gradient traps
//! (overwriting nearest-upsample backward, bilinear without backward, fused ops without
//! gradients, max-pool's scaled gradient).
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use medmine::models::unetpp::{Config, SeededInit, UNetPlusPlus};
use medmine::train::loss::deep_supervision_loss;
use medmine::train::trainable_vars;
use rand::{Rng, SeedableRng};

/// Deterministic weights (candle cannot seed its CPU generator): the training init, with
/// BatchNorm scales 1 +- 0.1 and shifts +-0.1 so that none sits at a symmetric point.
fn seeded_init(map: &VarMap, seed: u64) {
    SeededInit {
        seed,
        batch_norm_jitter: 0.1,
    }
    .apply(map)
    .unwrap();
}

fn seeded_input(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.7..=1.7)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn loss(model: &UNetPlusPlus, x: &Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor> {
    let heads = model.forward_t(x, true)?;
    deep_supervision_loss(&heads, y, w)
}

#[test]
fn whole_unetpp_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let model = UNetPlusPlus::new(
        &Config::with_base(2),
        VarBuilder::from_varmap(&map, DType::F64, &dev),
    )?;
    seeded_init(&map, 11);
    let x = seeded_input((2, 3, 16, 16), 12);
    let y = seeded_input((2, 1, 16, 16), 13)
        .ge(0.)?
        .to_dtype(DType::F64)?;
    let w = Tensor::new(&[1f64, 0.5], &dev)?;

    let vars = trainable_vars(&map);
    // 15 nodes x (2 convs + 2 BN x {weight, bias}) + 4 heads x {weight, bias}
    assert_eq!(vars.len(), 15 * 6 + 8);
    let grads = loss(&model, &x, &y, &w)?.backward()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient at all"));
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        let norm: f64 = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm > 1e-10, "{name}: gradient is zero");
        let orig = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let shape = var.as_tensor().dims().to_vec();
        for _ in 0..2 {
            let i = rng.gen_range(0..orig.len());
            let probe = |delta: f64| -> Result<f64> {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.as_slice(), &dev)?)?;
                loss(&model, &x, &y, &w)?.to_scalar::<f64>()
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2. * eps);
            var.set(&Tensor::from_vec(orig.clone(), shape.as_slice(), &dev)?)?;
            let scale = numeric.abs().max(g[i].abs()).max(1e-3 * norm);
            let err = (numeric - g[i]).abs() / scale;
            assert!(
                err < 1e-4,
                "{name}[{i}]: autograd {} vs finite difference {numeric} (rel. err {err:.2e})",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * vars.len());
    Ok(())
}

#[test]
fn gradient_of_a_shared_input_accumulates() -> Result<()> {
    // every U-Net++ node feeds several others; the input of the network must see the sum
    let dev = Device::Cpu;
    let map = VarMap::new();
    let model = UNetPlusPlus::new(
        &Config::with_base(2),
        VarBuilder::from_varmap(&map, DType::F64, &dev),
    )?;
    seeded_init(&map, 21);
    let x = Var::from_tensor(&seeded_input((2, 3, 16, 16), 22))?;
    let y = Tensor::zeros((2, 1, 16, 16), DType::F64, &dev)?;
    let w = Tensor::ones(2, DType::F64, &dev)?;
    let g = loss(&model, x.as_tensor(), &y, &w)?.backward()?;
    let gx = g
        .get(x.as_tensor())
        .expect("input gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let norm = gx.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(norm > 1e-10, "input gradient is zero");
    let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    for i in [0usize, 100, 777, 1535] {
        let mut p = base.clone();
        p[i] += eps;
        let lp = loss(&model, &Tensor::from_vec(p, (2, 3, 16, 16), &dev)?, &y, &w)?
            .to_scalar::<f64>()?;
        let mut m = base.clone();
        m[i] -= eps;
        let lm = loss(&model, &Tensor::from_vec(m, (2, 3, 16, 16), &dev)?, &y, &w)?
            .to_scalar::<f64>()?;
        let numeric = (lp - lm) / (2. * eps);
        // relative to the larger of the two, floored at 1e-3 of the gradient's norm (the
        // finite difference itself is only good to about 1e-10 absolute)
        let scale = numeric.abs().max(gx[i].abs()).max(1e-3 * norm);
        assert!(
            (numeric - gx[i]).abs() <= 1e-4 * scale,
            "x[{i}]: {} vs {numeric}",
            gx[i]
        );
        assert!(
            (numeric - gx[i]).abs() <= 1e-5 * numeric.abs().max(1e-6),
            "x[{i}]: {} vs {numeric}",
            gx[i]
        );
    }
    Ok(())
}
