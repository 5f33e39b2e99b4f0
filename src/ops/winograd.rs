//! The forward pass of a 3x3 convolution with padding 1 by Winograd's minimal filtering
//! F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//! every 2x2 block of outputs is `A^T [ (G g G^T) ⊙ (B^T d B) ] A` for its 4x4 input tile
//! `d`, so the products over the channels become 16 gemms
//! `M_xi[Cout, tiles] = U_xi[Cout, Cin] @ V_xi[Cin, tiles]` (xi one of the 4x4 positions) with
//! 16 multiply-adds per 2x2 outputs and channel pair instead of 36: 2.25x fewer FLOPs than
//! `conv3x3`'s shifted-plane gemms, for a few additions per tile in the transforms.
//!
//! Used for every such convolution with enough channels (`pays`): U-Net++ inference (with the
//! eval BatchNorm folded in as a bias), the training forward pass, and the input gradient (a
//! 3x3 convolution of the output gradient with the flipped, transposed kernel, see
//! `conv_grad::forward_adjoint`); the kernel gradient stays on im2col tiles. The result
//! differs from the direct sum only by rounding (the coefficients of `B`, `G` and `A` are 0,
//! ±1 and ±1/2, exact in binary); the tests compare against an f64 direct convolution, and
//! the gradient checks run through it.
//!
//! Work is cut into chunks of whole tile rows (possibly spanning images), sized so that a
//! chunk's transformed input and output stay near the cache but each gemm still sees enough
//! tiles to repay packing its `U_xi`; each chunk transforms its input, runs its 16 gemms and
//! transforms its output straight into the NCHW result, bias and epilogue included.
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{image, Elem, Geom, SyncPtr, TileFn};

/// Transformed input + output bytes aimed at per chunk.
const CHUNK_BYTES: usize = 512 << 10;
/// Fewest tiles per chunk (each gemm packs a `[Cout, Cin]` kernel for them).
const MIN_TILES: usize = 64;

/// Whether [`forward`] should compute this convolution: 3x3, padding 1, stride 1, and enough
/// channels that the 16 gemms (K = Cin) beat the shifted planes' 3 (K = 3 Cin). With a
/// handful of input channels (an RGB stem) the transforms would cost more than they save.
pub(super) fn pays(g: &Geom) -> bool {
    super::conv3x3::applies(g) && g.cin >= 16 && g.cout >= 8 && g.h >= 2 && g.w >= 2
}

/// `w: [Cout, Cin, 3, 3]` -> `U: [16][Cout][Cin]`, `U = G g G^T` with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    let g3 = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    let mut u = vec![T::from_f64(0.); 16 * cout * cin];
    for (oc, g) in w.chunks_exact(9).enumerate() {
        // G g: [4, 3], one column of g at a time
        let cols: [[T; 4]; 3] = std::array::from_fn(|j| g3(g[j], g[3 + j], g[6 + j]));
        for i in 0..4 {
            // (G g) G^T: row i of G g through G
            let row = g3(cols[0][i], cols[1][i], cols[2][i]);
            for (j, &v) in row.iter().enumerate() {
                u[(i * 4 + j) * cout * cin + oc] = v;
            }
        }
    }
    u
}

/// Tiles of a chunk and how the chunks share the threads.
struct Plan {
    tiles_x: usize,
    tiles_y: usize,
    /// Tile rows per chunk.
    rows: usize,
    chunks: usize,
    par: Parallelism,
}

fn plan<T>(g: &Geom) -> Plan {
    let (tiles_x, tiles_y) = (g.w.div_ceil(2), g.h.div_ceil(2));
    let total = g.n * tiles_y;
    let row_bytes = 16 * (g.cin + g.cout) * tiles_x * std::mem::size_of::<T>();
    let threads = rayon::current_num_threads();
    let min_rows = MIN_TILES.div_ceil(tiles_x);
    // cache-sized chunks, but at least MIN_TILES tiles, and split further while every
    // thread still gets two chunks
    let rows = (CHUNK_BYTES / row_bytes)
        .max(min_rows)
        .min(total.div_ceil(2 * threads).max(min_rows))
        .clamp(1, total);
    let chunks = total.div_ceil(rows);
    let par = if chunks < threads {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    Plan {
        tiles_x,
        tiles_y,
        rows,
        chunks,
        par,
    }
}

/// `out: [N, Cout, H, W]` = `epilogue(conv3x3(x, w, padding 1) + bias)`; `x` as channel
/// blocks (see `conv::forward`), `w: [Cout, Cin, 3, 3]`; every element of `out` is written.
pub(super) fn forward<T: Elem>(
    g: &Geom,
    x: &[&[T]],
    w: &[T],
    bias: Option<&[T]>,
    epilogue: Option<TileFn<T>>,
    out: &mut [T],
) {
    debug_assert!(pays(g) && w.len() == 9 * g.cout * g.cin);
    assert_eq!(out.len(), g.n * g.cout * g.h * g.w);
    let u = kernel_transform(w, g.cout, g.cin);
    let p = plan::<T>(g);
    let job = Job {
        g,
        x,
        u: &u,
        bias,
        epilogue,
        p: &p,
        dst: SyncPtr(out.as_mut_ptr()),
    };
    (0..p.chunks).into_par_iter().for_each(|c| {
        let r0 = c * p.rows;
        let nt = ((r0 + p.rows).min(g.n * p.tiles_y) - r0) * p.tiles_x;
        let len = 16 * (g.cin + g.cout) * nt + row_scratch(p.tiles_x);
        T::with_scratch(len, |s| job.chunk(c, s))
    });
}

/// What every chunk of one [`forward`] call shares.
struct Job<'a, T> {
    g: &'a Geom,
    x: &'a [&'a [T]],
    /// [`kernel_transform`]ed kernel.
    u: &'a [T],
    bias: Option<&'a [T]>,
    epilogue: Option<TileFn<'a, T>>,
    p: &'a Plan,
    /// The output.
    dst: SyncPtr<T>,
}

impl<T: Elem> Job<'_, T> {
    /// Chunk `c` (tile rows `c * rows ..`) with scratch `s` for V, M and the transforms' rows.
    fn chunk(&self, c: usize, s: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { self.chunk_avx2(c, s) };
            return;
        }
        self.chunk_body(c, s)
    }

    /// The transforms' loops compiled for AVX2 (the build targets the x86-64 baseline).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_avx2(&self, c: usize, s: &mut [T]) {
        self.chunk_body(c, s)
    }

    #[inline(always)]
    fn chunk_body(&self, c: usize, s: &mut [T]) {
        let (g, p) = (self.g, self.p);
        let r0 = c * p.rows;
        let r1 = (r0 + p.rows).min(g.n * p.tiles_y);
        let nt = (r1 - r0) * p.tiles_x;
        let (v, rest) = s.split_at_mut(16 * g.cin * nt);
        let (m, rows) = rest.split_at_mut(16 * g.cout * nt);
        // per image of the chunk, its tile rows ty0..ty1 (from tile t0 of the chunk)
        let mut gr = r0;
        while gr < r1 {
            let (b, ty0) = (gr / p.tiles_y, gr % p.tiles_y);
            let ty1 = (ty0 + r1 - gr).min(p.tiles_y);
            let t0 = (gr - r0) * p.tiles_x;
            input_transform(g, &image(g, self.x, b), (ty0, ty1), v, nt, t0, rows);
            gr += ty1 - ty0;
        }
        for xi in 0..16 {
            // SAFETY: M_xi [Cout, nt], U_xi [Cout, Cin] and V_xi [Cin, nt] are row-major
            // blocks inside m, u and v.
            unsafe {
                gemm::gemm(
                    g.cout,
                    nt,
                    g.cin,
                    m.as_mut_ptr().add(xi * g.cout * nt),
                    1,
                    nt as isize,
                    false,
                    self.u.as_ptr().add(xi * g.cout * g.cin),
                    1,
                    g.cin as isize,
                    v.as_ptr().add(xi * g.cin * nt),
                    1,
                    nt as isize,
                    T::from_f64(0.),
                    T::from_f64(1.),
                    false,
                    false,
                    false,
                    p.par,
                )
            }
        }
        for (k, gr) in (r0..r1).enumerate() {
            let (b, ty) = (gr / p.tiles_y, gr % p.tiles_y);
            let tiles = OutTiles {
                m,
                nt,
                t0: k * p.tiles_x,
            };
            for co in 0..g.cout {
                let (y0, y1) = (2 * ty, (2 * ty + 2).min(g.h));
                let off = (b * g.cout + co) * g.h * g.w + y0 * g.w;
                // SAFETY: output rows y0..y1 of plane (b, co) belong to tile row gr, which
                // only this chunk handles.
                let seg = unsafe {
                    std::slice::from_raw_parts_mut(self.dst.get().add(off), (y1 - y0) * g.w)
                };
                let b0 = self.bias.map_or(T::from_f64(0.), |bias| bias[co]);
                output_transform(g, &tiles, co, b0, seg, rows);
                if let Some(epi) = self.epilogue {
                    epi(off, seg);
                }
            }
        }
    }
}

/// Scratch elements [`input_transform`] and [`output_transform`] need beside V and M.
fn row_scratch(tiles_x: usize) -> usize {
    16 * (tiles_x + 1)
}

/// `V[xi][ci][t0 + tx] = (B^T d B)[xi]` for the tiles of tile rows `ty0..ty1` of one image, with
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`; `rows`: scratch of
/// [`row_scratch`] elements.
///
/// Input rows `2ty-1 .. 2ty+2` are split into their even and odd columns of the zero-padded
/// row (padded column `p` is input column `p - 1`): tile `tx` spans padded columns
/// `2tx .. 2tx+3`, that is `even[tx], odd[tx], even[tx+1], odd[tx+1]`, so every step below is
/// a sum of contiguous slices.
///
/// Each input plane in turn: its rows are then read in order (one stream, which the
/// prefetcher follows, rather than one per channel).
#[inline(always)]
fn input_transform<T: Elem>(
    g: &Geom,
    img: &[&[T]],
    (ty0, ty1): (usize, usize),
    v: &mut [T],
    nt: usize,
    t0: usize,
    rows: &mut [T],
) {
    let (h, w) = (g.h, g.w);
    let tx_n = w.div_ceil(2);
    let n1 = tx_n + 1;
    let zero = T::from_f64(0.);
    // d: rows r = 0..4 as [even, odd] halves; t: B^T d in the same layout
    let (d, t) = rows[..16 * n1].split_at_mut(8 * n1);
    let planes = img.iter().flat_map(|part| part.chunks_exact(h * w));
    for (ci, plane) in planes.enumerate() {
        for ty in ty0..ty1 {
            let t0 = t0 + (ty - ty0) * tx_n;
            for (r, row) in d.chunks_exact_mut(2 * n1).enumerate() {
                let (even, odd) = row.split_at_mut(n1);
                let Some(iy) = (2 * ty + r).checked_sub(1).filter(|&iy| iy < h) else {
                    row.fill(zero);
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                // even[k] = x[2k - 1] (even[0] the left padding), odd[k] = x[2k]
                even[0] = zero;
                let pairs = src.chunks_exact(2);
                let tail = pairs.remainder();
                for ((o, e), pair) in odd.iter_mut().zip(&mut even[1..]).zip(pairs) {
                    *o = pair[0];
                    *e = pair[1];
                }
                // the last column of an odd width, then zeros past the right edge
                let half = w / 2;
                odd[half..].fill(zero);
                even[1 + half..].fill(zero);
                if let [last] = tail {
                    odd[half] = *last;
                }
            }
            // B^T d, row-wise: t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3
            let dr = |r: usize| &d[2 * r * n1..2 * (r + 1) * n1];
            let (d0, d1, d2, d3) = (dr(0), dr(1), dr(2), dr(3));
            for (k, tr) in t.chunks_exact_mut(2 * n1).enumerate() {
                let (a, b, sub) = match k {
                    0 => (d0, d2, true),
                    1 => (d1, d2, false),
                    2 => (d2, d1, true),
                    _ => (d1, d3, true),
                };
                combine(tr, a, b, sub);
            }
            // (B^T d) B per tile, with e = even, o = odd columns of t_i:
            // [e[tx] - e[tx+1], o[tx] + e[tx+1], e[tx+1] - o[tx], o[tx] - o[tx+1]]
            for (i, tr) in t.chunks_exact(2 * n1).enumerate() {
                let (e, o) = tr.split_at(n1);
                for j in 0..4 {
                    let at = (i * 4 + j) * g.cin * nt + ci * nt + t0;
                    let dst = &mut v[at..at + tx_n];
                    let (a, b, sub) = match j {
                        0 => (&e[..tx_n], &e[1..], true),
                        1 => (&o[..tx_n], &e[1..], false),
                        2 => (&e[1..], &o[..tx_n], true),
                        _ => (&o[..tx_n], &o[1..], true),
                    };
                    combine(dst, a, b, sub);
                }
            }
        }
    }
}

/// `dst = a - b` (`sub`) or `a + b`, over the shortest of the three.
#[inline(always)]
fn combine<T: Elem>(dst: &mut [T], a: &[T], b: &[T], sub: bool) {
    let it = dst.iter_mut().zip(a).zip(b);
    if sub {
        it.for_each(|((d, &a), &b)| *d = a - b);
    } else {
        it.for_each(|((d, &a), &b)| *d = a + b);
    }
}

/// `M: [16][Cout][nt]` and the first tile `t0` of one tile row in it.
#[derive(Clone, Copy)]
struct OutTiles<'a, T> {
    m: &'a [T],
    nt: usize,
    t0: usize,
}

/// Output rows `2ty, 2ty+1` (those inside the image) of channel `co` from
/// `M[xi][co][t0 + tx]`: `A^T M A + bias` with `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`;
/// `rows`: scratch of [`row_scratch`] elements.
#[inline(always)]
fn output_transform<T: Elem>(
    g: &Geom,
    tiles: &OutTiles<T>,
    co: usize,
    bias: T,
    seg: &mut [T],
    rows: &mut [T],
) {
    let w = g.w;
    let tx_n = w.div_ceil(2);
    let OutTiles { m, nt, t0 } = *tiles;
    let mm = |xi: usize| &m[xi * g.cout * nt + co * nt + t0..][..tx_n];
    // s = A^T m: s[a][j] over the tiles, a = 0, 1 (output row), j = 0..4 (column)
    let s = &mut rows[..8 * tx_n];
    for (k, sr) in s.chunks_exact_mut(tx_n).enumerate() {
        let (a, j) = (k / 4, k % 4);
        if a == 0 {
            let (p, q, r) = (mm(j), mm(4 + j), mm(8 + j));
            for (((o, &p), &q), &r) in sr.iter_mut().zip(p).zip(q).zip(r) {
                *o = p + q + r;
            }
        } else {
            let (p, q, r) = (mm(4 + j), mm(8 + j), mm(12 + j));
            for (((o, &p), &q), &r) in sr.iter_mut().zip(p).zip(q).zip(r) {
                *o = p - q - r;
            }
        }
    }
    let s: &[T] = s;
    let full = w / 2;
    for (a, row) in seg.chunks_exact_mut(w).enumerate() {
        let sr = |j: usize| &s[(a * 4 + j) * tx_n..(a * 4 + j + 1) * tx_n];
        let (s0, s1, s2, s3) = (sr(0), sr(1), sr(2), sr(3));
        // y = s A: [s0 + s1 + s2, s1 - s2 - s3] per tile
        let pairs = row[..2 * full].chunks_exact_mut(2);
        for ((((y, &p0), &p1), &p2), &p3) in pairs.zip(s0).zip(s1).zip(s2).zip(s3) {
            y[0] = p0 + p1 + p2 + bias;
            y[1] = p1 - p2 - p3 + bias;
        }
        if w % 2 == 1 {
            row[w - 1] = s0[full] + s1[full] + s2[full] + bias;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv_reference::{direct3x3, max_abs_diff, values};

    #[test]
    fn matches_a_direct_convolution() {
        // odd and even sizes (the last tile row / column half outside), chunks spanning
        // images (small planes), many chunks per image (a tall one), two channel blocks
        for &(n, cin, h, wd, cout) in &[
            (2, 16, 5, 4, 8),
            (3, 17, 2, 3, 9),
            (2, 16, 7, 9, 16),
            (1, 20, 300, 6, 8),
            (5, 32, 4, 4, 40),
        ] {
            let x = values(n * cin * h * wd, 1);
            let w = values(cout * cin * 9, 2);
            let bias = values(cout, 3);
            let g = Geom::new(&[n, cin, h, wd], &[cout, cin, 3, 3], 1).unwrap();
            assert!(pays(&g));
            let want = direct3x3(&x, &w, Some(&bias), (n, cin, h, wd, cout));
            let hw = h * wd;
            let (mut a, mut b) = (vec![], vec![]);
            for img in x.chunks_exact(cin * hw) {
                a.extend_from_slice(&img[..3 * hw]);
                b.extend_from_slice(&img[3 * hw..]);
            }
            for parts in [vec![&x[..]], vec![&a[..], &b[..]]] {
                let mut out = vec![f64::NAN; want.len()];
                forward(&g, &parts, &w, Some(&bias), None, &mut out);
                let d = max_abs_diff(&out, &want);
                assert!(d < 1e-12, "{:?}: {d}", (n, cin, h, wd, cout));
            }
            // f32 within rounding of the f64 sum; the epilogue sees every output once, at
            // its offset
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            let b32: Vec<f32> = bias.iter().map(|&v| v as f32).collect();
            let seen = std::sync::Mutex::new(vec![0u8; want.len()]);
            let relu = |off: usize, seg: &mut [f32]| {
                let mut s = seen.lock().unwrap();
                s[off..off + seg.len()].iter_mut().for_each(|c| *c += 1);
                seg.iter_mut().for_each(|v| *v = v.max(0.));
            };
            let mut out = vec![f32::NAN; want.len()];
            forward(&g, &[&x32], &w32, Some(&b32), Some(&relu), &mut out);
            assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
            let d = out
                .iter()
                .zip(&want)
                .map(|(&o, &r)| (o as f64 - r.max(0.)).abs())
                .fold(0., f64::max);
            assert!(d < 1e-5, "f32 {:?}: {d}", (n, cin, h, wd, cout));
        }
    }

    #[test]
    fn kernel_transform_of_a_delta_is_g_times_g() {
        // g = e_(1,1) (the centre tap): U = G e G^T = outer(G[:, 1], G[:, 1])
        let mut w = [0.; 9];
        w[4] = 1.;
        let u = kernel_transform(&w, 1, 1);
        let col = [0., 0.5, -0.5, 0.];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(u[i * 4 + j], col[i] * col[j]);
            }
        }
    }
}
