//! Times candle's `Tensor::conv2d` against `medmine::ops::conv2d` (3x3, padding 1, f32, CPU):
//! forward alone, and forward + backward (input and kernel gradients).
//!
//! Columns: `fwd` forward; `f+b` forward, `(y * r).sum()` and `backward()`; `bwd` = f+b - fwd;
//! `plumbing` the same loss and `backward()` on a leaf of the output's shape (candle's
//! mul/sum/gradient-accumulation cost, common to both); `cbwd` = bwd - plumbing, the
//! convolution's own gradient work; `x` candle time / ours.
//!
//! `cargo run --release --example conv_bench [-- REPS]`
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};

/// Median wall time of `reps` runs of `f` (after one warm-up), in milliseconds.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

type Conv = fn(&Tensor, &Tensor) -> Result<Tensor>;

fn candle_conv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)
}

fn our_conv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    medmine::ops::conv2d(x, w, 1)
}

/// `(forward ms, forward + backward ms)` of one implementation.
fn measure(conv: Conv, x: &Var, w: &Var, r: &Tensor, reps: usize) -> Result<(f64, f64)> {
    let (xt, wt) = (x.as_tensor().detach(), w.as_tensor().detach());
    let fwd = time_ms(reps, || conv(&xt, &wt).map(drop))?;
    let both = time_ms(reps, || {
        let grads = conv(x.as_tensor(), w.as_tensor())?
            .mul(r)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(x).is_some() && grads.get(w).is_some());
        Ok(())
    })?;
    Ok((fwd, both))
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dev = Device::Cpu;
    println!(
        "3x3 conv, padding 1, f32, {} rayon threads, median of {reps} (ms)",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>8} | {:>9} {:>9} {:>6} | {:>8}",
        "N x Cin x H x W -> Cout",
        "fwd cndl",
        "fwd ours",
        "x",
        "f+b cndl",
        "f+b ours",
        "x",
        "bwd cndl",
        "bwd ours",
        "x",
        "plumbing",
        "cbwd cndl",
        "cbwd ours",
        "x",
        "max diff"
    );
    for (n, cin, hw, cout) in [
        (8, 16, 96, 16),
        (8, 32, 48, 32),
        (4, 32, 256, 32),
        (4, 64, 128, 64),
        (4, 3, 256, 32),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, cin, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev)?)?;
        let r = Tensor::randn(0f32, 1., (n, cout, hw, hw), &dev)?;
        let diff = (candle_conv(&x, &w)? - our_conv(&x, &w)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        // autograd plumbing of the loss alone (mul, sum, gradient accumulation), no conv
        let y = Var::from_tensor(&candle_conv(&x, &w)?)?;
        let plumbing = time_ms(reps, || y.mul(&r)?.sum_all()?.backward().map(drop))?;
        let (cf, cb) = measure(candle_conv, &x, &w, &r, reps)?;
        let (of, ob) = measure(our_conv, &x, &w, &r, reps)?;
        println!(
            "{:<22} {cf:>9.1} {of:>9.1} {:>6.2} | {cb:>9.1} {ob:>9.1} {:>6.2} | {:>9.1} {:>9.1} {:>6.2} | {plumbing:>8.1} | {:>9.1} {:>9.1} {:>6.2} | {diff:>8.1e}",
            format!("{n}x{cin}x{hw}x{hw} -> {cout}"),
            cf / of,
            cb / ob,
            cb - cf,
            ob - of,
            (cb - cf) / (ob - of),
            cb - cf - plumbing,
            ob - of - plumbing,
            (cb - cf - plumbing) / (ob - of - plumbing),
        );
    }
    Ok(())
}
