//! Test references for the convolution kernels: a direct 3x3 convolution in f64 and seeded
//! values.

/// A direct 3x3 convolution with padding 1 (plus `bias` per output channel), in f64:
/// `x: [N, Cin, H, W]`, `w: [Cout, Cin, 3, 3]` -> `[N, Cout, H, W]`.
pub(crate) fn direct3x3(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    (n, cin, h, wd, cout): (usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let mut out = vec![0.; n * cout * h * wd];
    for b in 0..n {
        for co in 0..cout {
            for y in 0..h {
                for xx in 0..wd {
                    let mut s = bias.map_or(0., |b| b[co]);
                    for ci in 0..cin {
                        for kh in 0..3 {
                            for kw in 0..3 {
                                let (iy, ix) = (y + kh, xx + kw);
                                if iy < 1 || ix < 1 || iy > h || ix > wd {
                                    continue;
                                }
                                let v = x[((b * cin + ci) * h + iy - 1) * wd + ix - 1];
                                s += v * w[((co * cin + ci) * 3 + kh) * 3 + kw];
                            }
                        }
                    }
                    out[((b * cout + co) * h + y) * wd + xx] = s;
                }
            }
        }
    }
    out
}

/// The largest `|a - b|`.
pub(crate) fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0., f64::max)
}

/// `len` seeded values in [-0.5, 0.5) (a 64-bit LCG).
pub(crate) fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect()
}
