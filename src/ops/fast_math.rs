//! Branch-free `exp`, `erf` and GELU for f32 that the compiler vectorises, for the SAM mask
//! decoder's softmaxes and GELUs (millions of values per click, where libm's scalar `expf` and
//! `erff` were a fifth of the time). `exp`: Cephes' `expf` scheme (range reduction by ln 2,
//! degree-5 polynomial), a few ulp. `erf`: Abramowitz & Stegun 7.1.26, absolute error below
//! 1.5e-7 in exact arithmetic (below 6e-7 in f32), the approximation PyTorch's vectorised CPU
//! `erf` uses too.

/// How `a * b + c` is computed: [`Separate`] (a product and a sum: what every x86-64 CPU runs
/// fast) or [`Fused`] (one FMA instruction, in the functions compiled for CPUs with FMA; without
/// the instruction `mul_add` would be a libm call).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Separate;
struct Fused;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `e^x`, within 2e-7 relative of libm's; inputs are clamped to [-87.3, 88.7] (no
/// infinities, no subnormals).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<Separate>(x)
}

#[inline(always)]
fn exp_with<M: MulAdd>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // n = round(x / ln 2) by adding 1.5 * 2^23 (n then sits in the low mantissa bits; `floor`
    // and float-to-int casts would stop the vectorisation), r = x - n ln 2 in two parts
    const ROUND: f32 = 12_582_912.0;
    let nr = M::mul_add(x, std::f32::consts::LOG2_E, ROUND);
    let n = nr - ROUND;
    let r = M::mul_add(n, 2.121_944_4e-4, M::mul_add(n, -0.693_359_4, x));
    let p = 1.987_569_1e-4_f32;
    let p = M::mul_add(p, r, 1.398_199_9e-3);
    let p = M::mul_add(p, r, 8.333_452e-3);
    let p = M::mul_add(p, r, 4.166_579_6e-2);
    let p = M::mul_add(p, r, 1.666_666_5e-1);
    let p = M::mul_add(p, r, 5e-1);
    let y = M::mul_add(p * r, r, r + 1.0);
    // y * 2^n through the exponent bits
    let n_bits = nr.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(y.to_bits().wrapping_add(n_bits << 23))
}

/// `erf(x)`, absolute error below 6e-7 (tested).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<Separate>(x)
}

#[inline(always)]
fn erf_with<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / M::mul_add(0.327_591_1, a, 1.0);
    let p = 1.061_405_4_f32;
    let p = M::mul_add(p, t, -1.453_152);
    let p = M::mul_add(p, t, 1.421_413_8);
    let p = M::mul_add(p, t, -0.284_496_74);
    let p = M::mul_add(p, t, 0.254_829_6);
    let y = M::mul_add(-(p * t), exp_with::<M>(-a * a), 1.0);
    y.copysign(x)
}

/// The exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, with [`erf`].
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    gelu_with::<Separate>(x)
}

#[inline(always)]
fn gelu_with<M: MulAdd>(x: f32) -> f32 {
    let h = 0.5 * x;
    M::mul_add(h, erf_with::<M>(x * std::f32::consts::FRAC_1_SQRT_2), h)
}

/// `sum_i f(xs[i])` in 16 interleaved partial sums: independent chains the compiler
/// vectorises (a plain `iter().sum()` is one sequential chain of dependent adds).
#[inline(always)]
pub fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum_i a[i] b[i]` over the shorter length, in 8 interleaved partial sums (vectorised, as
/// [`lane_sum`]).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let tail = n - n % 8;
    let rest: f32 = a[tail..].iter().zip(&b[tail..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + rest
}

/// Mean and `1 / sqrt(var + eps)` of a row (the population variance, two passes), as a
/// LayerNorm needs them.
#[inline(always)]
pub fn mean_inv_std(xs: &[f32], eps: f32) -> (f32, f32) {
    let n = xs.len().max(1) as f32;
    let mean = lane_sum(xs, |v| v) / n;
    let var = lane_sum(xs, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `xs[i] = gelu(xs[i])`, 16 lanes at a time where the CPU has AVX-512 (one third less time than
/// AVX2 on the 2-core EPYC, which splits 512-bit operations in two: fewer instructions), 8 with
/// AVX2 and FMA (the build targets the x86-64 baseline, whose SSE2 gives 4).
pub fn gelu_slice(xs: &mut [f32]) {
    map_slice(xs, SliceFn::Gelu)
}

/// `xs[i] = exp(xs[i])`, vectorised as [`gelu_slice`].
pub fn exp_slice(xs: &mut [f32]) {
    map_slice(xs, SliceFn::Exp)
}

/// The functions [`map_slice`] applies.
#[derive(Clone, Copy)]
enum SliceFn {
    Gelu,
    Exp,
}

/// `xs[i] = f(xs[i])` in the widest vectors the CPU has (one dispatch for every function).
fn map_slice(xs: &mut [f32], f: SliceFn) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { map_avx512(xs, f) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { map_avx2(xs, f) };
        return;
    }
    map_with::<Separate>(xs, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map_avx512(xs: &mut [f32], f: SliceFn) {
    map_with::<Fused>(xs, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2(xs: &mut [f32], f: SliceFn) {
    map_with::<Fused>(xs, f)
}

/// The loop of [`map_slice`], one per function (the match is outside the loop).
#[inline(always)]
fn map_with<M: MulAdd>(xs: &mut [f32], f: SliceFn) {
    match f {
        SliceFn::Gelu => xs.iter_mut().for_each(|v| *v = gelu_with::<M>(*v)),
        SliceFn::Exp => xs.iter_mut().for_each(|v| *v = exp_with::<M>(*v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm() {
        let mut worst = (0f32, 0f32, 0f32);
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.004; // -80 .. 80
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst.0 = worst.0.max(rel);
            let y = i as f32 * 0.0005; // -10 .. 10
            worst.1 = worst.1.max((erf(y) - libm::erff(y)).abs());
            let exact = 0.5 * y * (1.0 + libm::erff(y * std::f32::consts::FRAC_1_SQRT_2));
            worst.2 = worst.2.max((gelu(y) - exact).abs() / exact.abs().max(1.0));
        }
        assert!(worst.0 < 1e-6, "exp relative error {}", worst.0);
        assert!(worst.1 < 6e-7, "erf absolute error {}", worst.1);
        assert!(worst.2 < 6e-7, "gelu error {}", worst.2);
        // the slice forms (vectorised where the CPU allows) give the same values
        let xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.003).collect();
        let mut g = xs.clone();
        gelu_slice(&mut g);
        let mut e = xs.clone();
        exp_slice(&mut e);
        for ((&x, &g), &e) in xs.iter().zip(&g).zip(&e) {
            assert!((g - gelu(x)).abs() <= 1e-6 * gelu(x).abs().max(1.0));
            assert!((e - exp(x)).abs() <= 1e-6 * exp(x));
        }
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(-87.3) < 1e-37);
        assert_eq!(erf(0.0), 0.0);
        for n in [0, 3, 8, 35] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 2.0 - i as f32 * 0.25).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - want).abs() < 1e-4 * want.abs().max(1.0),
                "{n}"
            );
        }
        // row statistics: any length (with and without a tail), as the plain sums
        for n in [1, 7, 16, 64, 257] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 4.0).collect();
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let (m, inv) = mean_inv_std(&xs, 1e-5);
            assert!((m as f64 - mean).abs() < 1e-5, "{n}: {m} {mean}");
            assert!((inv as f64 - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-4, "{n}");
        }
        assert_eq!(erf(-3.0), -erf(3.0));
    }
}
