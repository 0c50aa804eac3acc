//! The scan estimators on the CPU (twin of `cuda/kernels/returns.cu`; the
//! formulas are in `ops/returns.rs`): one backward pass over each row,
//! sixteen rows at a time (one per vector lane: a row's recurrence is a
//! chain of dependent operations, and two AVX2 vectors of eight independent
//! chains fill the pipeline and the vector units), column blocks from the
//! last to the first, moved between rows and lanes by transposes, lane
//! groups in parallel, writing both outputs and each row's whitening
//! moments; then, for GAE and REINFORCE++, the batch statistics and one pass
//! whitening the advantages in place. No B×T buffer besides the outputs.
//!
//! The arithmetic is verl's loop step for step in the compute type (so on
//! float32 and float64 inputs the raw advantages and returns are bitwise
//! verl's; the whitening's sums are float64 here and float32 in torch).

use super::{fold_rows, for_each_row};
use crate::error::Result;
pub use crate::ops::returns::{ReturnsEstimator, ReturnsProblem};
use crate::ops::returns::{whiten_stats, Moments};
use crate::tensor::{piece_scratch, pieces, DType, Mat, MatMut, Real};

/// Rows scanned together, one per lane: their recurrences are independent,
/// so sixteen of them hide each other's latency (a GAE step is a chain of
/// four dependent operations, about 16 cycles; two AVX2 vectors of eight
/// float32 lanes keep two chains in flight) and vectorise across rows.
const LANES: usize = 16;
/// Columns of the rows of a lane group held in scratch at once (the scratch,
/// about 190 KB with float32, stays in L2; larger blocks stream the rows better).
const BLOCK: usize = 512;

/// Computes the advantages and returns into `p.advantages` and `p.returns`;
/// a `MemoryError` if a working buffer cannot be allocated.
pub fn compute(p: &ReturnsProblem) -> Result<()> {
    if p.f64_math() {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

/// The blocks of a row of `cols` columns, last first.
fn blocks_rev(cols: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = cols.div_ceil(BLOCK);
    (0..n).rev().map(move |k| (k * BLOCK, BLOCK.min(cols - k * BLOCK)))
}

/// The [`Moments`] of the rows of a lane group, one per lane, merged block
/// by block in scan order (last block first). A block's moments are sums in
/// float64 about a shift `k` near the block's mean, so they do not cancel
/// when the values sit far from 0 next to their spread: `k` is the block's
/// weighted mean in `F` (any rounding in it only moves the shift), then one
/// float64 pass sums `n = sum m`, `s = sum m (x - k)` and `q = sum m (x - k)^2`.
/// A token with `m = 0` adds nothing (a NaN value there is dropped, as
/// verl's `masked_sum` drops it). Both loops are branch-free and run eight
/// lanes at a time, so they vectorise with their accumulators in registers.
#[derive(Default)]
struct LaneMoments {
    rows: [Moments; LANES],
}

/// Eight lanes of a lane group.
const HALF: usize = 8;

impl LaneMoments {
    /// Adds a block's columns.
    #[inline(always)]
    fn add<F: Real>(&mut self, m: &[Col<F>], x: &[Col<F>]) {
        for h in 0..LANES / HALF {
            let (n, k, s, q) = half_moments(m, x, h * HALF);
            for (l, row) in self.rows[h * HALF..(h + 1) * HALF].iter_mut().enumerate() {
                *row = row.merge(Moments::shifted(n[l], k[l], s[l], q[l]));
            }
        }
    }

    fn rows(&self) -> [Moments; LANES] {
        self.rows
    }
}

/// A block's shifted sums `(n, k, s, q)` (see [`LaneMoments`]) for lanes
/// `at .. at + 8`, each lane's sums in column order: the same IEEE
/// operations in the same order whether or not the loops vectorise.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn half_moments<F: Real>(m: &[Col<F>], x: &[Col<F>], at: usize) -> ([f64; HALF], [f64; HALF], [f64; HALF], [f64; HALF]) {
    #[cfg(target_arch = "x86_64")]
    if F::DTYPE == DType::F32 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; `F` is `f32`, so a column is `LANES` f32s.
        return unsafe { half_moments_avx2(m.as_ptr() as *const f32, x.as_ptr() as *const f32, m.len().min(x.len()), at) };
    }
    half_moments_any(m, x, at)
}

/// [`half_moments`] on any target.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn half_moments_any<F: Real>(m: &[Col<F>], x: &[Col<F>], at: usize) -> ([f64; HALF], [f64; HALF], [f64; HALF], [f64; HALF]) {
    let zero = F::zero();
    let (mut sw, mut sx) = ([zero; HALF], [zero; HALF]);
    for (mt, xt) in m.iter().zip(x) {
        for l in 0..HALF {
            let (w, v) = (mt[at + l], xt[at + l]);
            let v = if w != zero { v } else { zero };
            sw[l] = sw[l] + w;
            sx[l] = sx[l] + w * v;
        }
    }
    // the shift: finite by construction (0 for an empty block, an overflow or a NaN)
    let k: [f64; HALF] = std::array::from_fn(|l| {
        let k = (sx[l] / sw[l]).f64();
        if k.is_finite() {
            k
        } else {
            0.0
        }
    });
    let (mut n, mut s, mut q) = ([0.0f64; HALF], [0.0f64; HALF], [0.0f64; HALF]);
    for (mt, xt) in m.iter().zip(x) {
        for l in 0..HALF {
            let (w, v) = (mt[at + l], xt[at + l]);
            let v = if w != zero { v } else { zero };
            let (w, d) = (w.f64(), v.f64() - k[l]);
            let wd = w * d;
            n[l] += w;
            s[l] += wd;
            q[l] += wd * d;
        }
    }
    (n, k, s, q)
}

/// [`half_moments`] for float32 in AVX2: the same operations in the same
/// order (no fused multiply-add), so the same bits.
///
/// # Safety
/// AVX2 is present; `m` and `x` point at `len` columns of `LANES` f32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::type_complexity)]
unsafe fn half_moments_avx2(m: *const f32, x: *const f32, len: usize, at: usize) -> ([f64; HALF], [f64; HALF], [f64; HALF], [f64; HALF]) {
    use std::arch::x86_64::*;
    const _: () = assert!(HALF == 8);
    let zs = _mm256_setzero_ps();
    let col = |p: *const f32, t: usize| _mm256_loadu_ps(p.add(t * LANES + at));
    // the value where the weight is not 0, else 0
    let kept = |w: __m256, v: __m256| _mm256_and_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(w, zs), v);
    let (mut sw, mut sx) = (zs, zs);
    for t in 0..len {
        let (w, v) = (col(m, t), col(x, t));
        sw = _mm256_add_ps(sw, w);
        sx = _mm256_add_ps(sx, _mm256_mul_ps(w, kept(w, v)));
    }
    let k32 = _mm256_div_ps(sx, sw);
    let fin = |k: __m256d| {
        let abs = _mm256_andnot_pd(_mm256_set1_pd(-0.0), k);
        _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(abs, _mm256_set1_pd(f64::INFINITY)), k)
    };
    let k = [fin(_mm256_cvtps_pd(_mm256_castps256_ps128(k32))), fin(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(k32)))];
    let zd = _mm256_setzero_pd();
    let (mut n, mut s, mut q) = ([zd; 2], [zd; 2], [zd; 2]);
    for t in 0..len {
        let (w, v) = (col(m, t), col(x, t));
        let v = kept(w, v);
        let ws = [_mm256_cvtps_pd(_mm256_castps256_ps128(w)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w))];
        let vs = [_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v))];
        for h in 0..2 {
            let d = _mm256_sub_pd(vs[h], k[h]);
            let wd = _mm256_mul_pd(ws[h], d);
            n[h] = _mm256_add_pd(n[h], ws[h]);
            s[h] = _mm256_add_pd(s[h], wd);
            q[h] = _mm256_add_pd(q[h], _mm256_mul_pd(wd, d));
        }
    }
    let out = |v: [__m256d; 2]| -> [f64; HALF] {
        let mut a = [0.0; HALF];
        _mm256_storeu_pd(a.as_mut_ptr(), v[0]);
        _mm256_storeu_pd(a.as_mut_ptr().add(4), v[1]);
        a
    };
    (out(n), out(k), out(s), out(q))
}

/// `LANES` values, one per row of a lane group, at one column.
type Col<F> = [F; LANES];

/// A lane group's working buffers, column-major (`[t][lane]`), so each step
/// of the recurrence works on one vector of the group's rows: the inputs of
/// one block, converted to `F`, the outputs before they are stored, and a
/// row buffer for conversions.
struct Scratch<F> {
    r: Vec<Col<F>>,
    v: Vec<Col<F>>,
    m: Vec<Col<F>>,
    adv: Vec<Col<F>>,
    ret: Vec<Col<F>>,
    /// `LANES` row buffers of `BLOCK` (conversions of inputs and outputs)
    row: Vec<F>,
}

impl<F: Real> Scratch<F> {
    fn new(arg: &'static str) -> Result<Self> {
        let cols = || -> Result<Vec<Col<F>>> {
            let mut v = Vec::new();
            v.try_reserve_exact(BLOCK).map_err(|_| crate::error::Error::memory(arg, "cannot allocate scan scratch"))?;
            v.resize(BLOCK, [F::zero(); LANES]);
            Ok(v)
        };
        Ok(Scratch {
            r: cols()?,
            v: cols()?,
            m: cols()?,
            adv: cols()?,
            ret: cols()?,
            row: crate::error::try_zeros(arg, LANES * BLOCK)?,
        })
    }
}

/// Loads columns `start .. start + len` of rows `first ..` (`n` of them) of
/// `x` into `dst[t][lane]` (through `rows`, `LANES` row buffers of `BLOCK`,
/// where a row needs converting); lanes past `n` are zero.
#[inline(always)]
fn load<F: Real>(x: &Mat, first: usize, n: usize, start: usize, len: usize, rows: &mut [F], dst: &mut [Col<F>]) {
    let mut src = [std::ptr::null::<F>(); LANES];
    for (l, (buf, s)) in rows.chunks_exact_mut(BLOCK).zip(src.iter_mut()).enumerate() {
        *s = if l < n {
            x.part::<F>(first + l, start, len, buf).as_ptr()
        } else {
            buf[..len].fill(F::zero());
            buf.as_ptr()
        };
    }
    // SAFETY: each pointer is `len` readable elements, disjoint from `dst`.
    unsafe { transpose::rows_to_cols(&src, &mut dst[..len]) };
}

/// [`load`] of the mask that also leaves each row's mask, as `F`, in the
/// same columns of `out` (contiguous `F` rows): the conversion is written
/// there instead of into a row buffer, and the transpose reads it back.
///
/// # Safety
/// No other task may access these rows of `out` at the same time.
#[inline(always)]
unsafe fn load_through<F: Real>(x: &Mat, out: &MatMut, first: usize, n: usize, start: usize, len: usize, rows: &mut [F], dst: &mut [Col<F>]) {
    let mut src = [std::ptr::null::<F>(); LANES];
    for (l, (buf, s)) in rows.chunks_exact_mut(BLOCK).zip(src.iter_mut()).enumerate() {
        *s = match (l < n).then(|| out.direct_part::<F>(first + l, start, len)).flatten() {
            Some(run) => {
                let to = run.as_mut_ptr();
                let got = x.part::<F>(first + l, start, len, run).as_ptr();
                if got != to as *const F {
                    // the mask already was an `F` run, elsewhere: copy it
                    std::ptr::copy_nonoverlapping(got, to, len);
                }
                to as *const F
            }
            None => {
                buf[..len].fill(F::zero());
                buf.as_ptr()
            }
        };
    }
    // SAFETY: each pointer is `len` readable elements, disjoint from `dst`.
    transpose::rows_to_cols(&src, &mut dst[..len]);
}

/// GAE's returns `ret = g + v` of columns `start .. start + len` of rows
/// `first ..` (`n` of them), from the advantages `g` just stored (raw, not
/// yet whitened) and the values, all three contiguous `F` runs: the same
/// sums as in the scan, a streaming add instead of a transpose.
///
/// # Safety
/// No other task may access these rows of the outputs at the same time.
#[inline(always)]
unsafe fn gae_returns_by_rows<F: Real>(p: &ReturnsProblem, first: usize, n: usize, start: usize, len: usize) {
    let values = p.values.as_ref().expect("validated");
    for i in first..first + n {
        let (g, ret) = (p.advantages.direct_part::<F>(i, start, len), p.returns.direct_part::<F>(i, start, len));
        let v = values.direct::<F>(i, start, len);
        if let (Some(g), Some(ret), Some(v)) = (g, ret, v) {
            for ((o, &g), &v) in ret.iter_mut().zip(g.iter()).zip(v) {
                *o = g + v;
            }
        }
    }
}

/// Stores lanes `0 .. n` of `src` (`src[t][lane]`) into rows `first ..` of
/// `out` from column `start` on (through `rows` where a row is converted).
///
/// # Safety
/// No other task may access these rows at the same time.
#[inline(always)]
unsafe fn store<F: Real>(out: &MatMut, first: usize, n: usize, start: usize, src: &[Col<F>], rows: &mut [F]) {
    let len = src.len();
    let mut dst = [std::ptr::null_mut::<F>(); LANES];
    let mut direct = [false; LANES];
    for (l, buf) in rows.chunks_exact_mut(BLOCK).enumerate() {
        dst[l] = match (l < n).then(|| out.direct_part::<F>(first + l, start, len)).flatten() {
            Some(run) => {
                direct[l] = true;
                run.as_mut_ptr()
            }
            None => buf.as_mut_ptr(),
        };
    }
    transpose::cols_to_rows(src, &dst);
    for (l, buf) in rows.chunks_exact_mut(BLOCK).enumerate().take(n) {
        if !direct[l] {
            out.store_part(first + l, start, &buf[..len]);
        }
    }
}

/// Moving a block between `LANES` rows and `[t][lane]` columns: 8×8
/// transposes in AVX2 registers for float32 where the CPU has AVX2, else
/// element by element (the same values either way: moves only).
mod transpose {
    use super::{Col, LANES};
    use crate::tensor::{DType, Real};

    /// `dst[t][l] = src[l][t]` for `t < dst.len()`.
    ///
    /// # Safety
    /// Each `src[l]` points at `dst.len()` readable elements.
    #[inline(always)]
    pub unsafe fn rows_to_cols<F: Real>(src: &[*const F; LANES], dst: &mut [Col<F>]) {
        let len = dst.len();
        let mut t = 0;
        #[cfg(target_arch = "x86_64")]
        if F::DTYPE == DType::F32 && std::is_x86_feature_detected!("avx2") {
            t = avx::rows_to_cols(src.map(|p| p as *const f32), dst.as_mut_ptr() as *mut f32, len);
        }
        for (t, d) in dst.iter_mut().enumerate().skip(t) {
            for (l, v) in d.iter_mut().enumerate() {
                *v = *src[l].add(t);
            }
        }
    }

    /// `dst[l][t] = src[t][l]` for `t < src.len()`.
    ///
    /// # Safety
    /// Each `dst[l]` points at `src.len()` writable elements, disjoint from
    /// `src` and from each other.
    #[inline(always)]
    pub unsafe fn cols_to_rows<F: Real>(src: &[Col<F>], dst: &[*mut F; LANES]) {
        let len = src.len();
        let mut t = 0;
        #[cfg(target_arch = "x86_64")]
        if F::DTYPE == DType::F32 && std::is_x86_feature_detected!("avx2") {
            t = avx::cols_to_rows(src.as_ptr() as *const f32, dst.map(|p| p as *mut f32), len);
        }
        for (t, c) in src.iter().enumerate().skip(t) {
            for (l, &v) in c.iter().enumerate() {
                *dst[l].add(t) = v;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx {
        use super::LANES;
        use std::arch::x86_64::*;
        const _: () = assert!(LANES % 8 == 0);

        /// The 8×8 transpose of eight rows of eight floats.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn t8(r: [__m256; 8]) -> [__m256; 8] {
            let a0 = _mm256_unpacklo_ps(r[0], r[1]);
            let a1 = _mm256_unpackhi_ps(r[0], r[1]);
            let a2 = _mm256_unpacklo_ps(r[2], r[3]);
            let a3 = _mm256_unpackhi_ps(r[2], r[3]);
            let a4 = _mm256_unpacklo_ps(r[4], r[5]);
            let a5 = _mm256_unpackhi_ps(r[4], r[5]);
            let a6 = _mm256_unpacklo_ps(r[6], r[7]);
            let a7 = _mm256_unpackhi_ps(r[6], r[7]);
            let b0 = _mm256_shuffle_ps::<0x44>(a0, a2);
            let b1 = _mm256_shuffle_ps::<0xEE>(a0, a2);
            let b2 = _mm256_shuffle_ps::<0x44>(a1, a3);
            let b3 = _mm256_shuffle_ps::<0xEE>(a1, a3);
            let b4 = _mm256_shuffle_ps::<0x44>(a4, a6);
            let b5 = _mm256_shuffle_ps::<0xEE>(a4, a6);
            let b6 = _mm256_shuffle_ps::<0x44>(a5, a7);
            let b7 = _mm256_shuffle_ps::<0xEE>(a5, a7);
            [
                _mm256_permute2f128_ps::<0x20>(b0, b4),
                _mm256_permute2f128_ps::<0x20>(b1, b5),
                _mm256_permute2f128_ps::<0x20>(b2, b6),
                _mm256_permute2f128_ps::<0x20>(b3, b7),
                _mm256_permute2f128_ps::<0x31>(b0, b4),
                _mm256_permute2f128_ps::<0x31>(b1, b5),
                _mm256_permute2f128_ps::<0x31>(b2, b6),
                _mm256_permute2f128_ps::<0x31>(b3, b7),
            ]
        }

        /// Rows to columns in whole tiles of 16 columns (a whole 64-byte
        /// run of each row at once), then of 8 (an 8×8 transpose per eight
        /// rows); returns the columns done.
        #[target_feature(enable = "avx2")]
        pub unsafe fn rows_to_cols(src: [*const f32; LANES], dst: *mut f32, len: usize) -> usize {
            let put = |t: usize, h: usize, c: [__m256; 8]| {
                for (j, v) in c.into_iter().enumerate() {
                    _mm256_storeu_ps(dst.add((t + j) * LANES + 8 * h), v);
                }
            };
            let mut t = 0;
            while t + 16 <= len {
                for h in 0..LANES / 8 {
                    let rows: [(__m256, __m256); 8] =
                        std::array::from_fn(|l| (_mm256_loadu_ps(src[8 * h + l].add(t)), _mm256_loadu_ps(src[8 * h + l].add(t + 8))));
                    put(t, h, t8(rows.map(|r| r.0)));
                    put(t + 8, h, t8(rows.map(|r| r.1)));
                }
                t += 16;
            }
            while t + 8 <= len {
                for h in 0..LANES / 8 {
                    put(t, h, t8(std::array::from_fn(|l| _mm256_loadu_ps(src[8 * h + l].add(t)))));
                }
                t += 8;
            }
            t
        }

        /// Columns to rows in whole tiles of 16 columns (each row gets a
        /// whole 64-byte run at once), then of 8; returns the columns done.
        #[target_feature(enable = "avx2")]
        pub unsafe fn cols_to_rows(src: *const f32, dst: [*mut f32; LANES], len: usize) -> usize {
            let tile = |t: usize, h: usize| t8(std::array::from_fn(|j| _mm256_loadu_ps(src.add((t + j) * LANES + 8 * h))));
            let mut t = 0;
            while t + 16 <= len {
                for h in 0..LANES / 8 {
                    let (a, b) = (tile(t, h), tile(t + 8, h));
                    for l in 0..8 {
                        _mm256_storeu_ps(dst[8 * h + l].add(t), a[l]);
                        _mm256_storeu_ps(dst[8 * h + l].add(t + 8), b[l]);
                    }
                }
                t += 16;
            }
            while t + 8 <= len {
                for h in 0..LANES / 8 {
                    let r = tile(t, h);
                    for (l, v) in r.into_iter().enumerate() {
                        _mm256_storeu_ps(dst[8 * h + l].add(t), v);
                    }
                }
                t += 8;
            }
            t
        }
    }
}

/// Stores `src` into row `i` of `out` from column `start` on.
///
/// # Safety
/// No other task may access row `i` at the same time.
#[inline]
unsafe fn put<F: Real>(out: &MatMut, i: usize, start: usize, src: &[F]) {
    match out.direct_part::<F>(i, start, src.len()) {
        Some(dst) => dst.copy_from_slice(src),
        None => out.store_part(i, start, src),
    }
}

fn run<F: Real>(p: &ReturnsProblem) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let arg = p.rewards.tensor.arg;
    let groups = rows.div_ceil(LANES);
    let mut total = Moments::default();
    fold_rows(
        arg,
        groups,
        cols * LANES,
        || Scratch::<F>::new(arg),
        |s, k| scan_group(p, k * LANES, (rows - k * LANES).min(LANES), s),
        |(moments, n)| {
            // row by row, in index order: the same sums whatever the grouping
            for &m in &moments[..n] {
                total = total.merge(m);
            }
        },
    )?;
    if !p.estimator.whitens() {
        return Ok(());
    }
    let (mean, rstd) = whiten_stats(total, p.mask_f64());
    let (mean, rstd) = (F::of(mean), F::of(rstd));
    // GAE whitens its raw advantages in place; REINFORCE++ whitens its returns
    // into the advantages, times the mask.
    let times_mask = matches!(p.estimator, ReturnsEstimator::ReinforcePlusPlus { .. });
    let source: Mat = if times_mask { p.returns.tensor.matrix()? } else { p.advantages.tensor.matrix()? };
    let scratch = || -> Result<_> {
        let v = || piece_scratch::<F>(arg, cols);
        Ok((v()?, v()?, v()?))
    };
    for_each_row(rows, cols, scratch, |(sx, sm, out), i| {
        for (start, len) in pieces(cols) {
            // SAFETY: row i is written by this task only.
            if let Some(adv) = unsafe { p.advantages.direct_part::<F>(i, start, len) } {
                // the advantages are a contiguous `F` run: whiten them where they are
                if times_mask {
                    // the scan left the mask here (see scan_group)
                    let x = source.part::<F>(i, start, len, sx);
                    for (o, &x) in adv.iter_mut().zip(x) {
                        *o = (x - mean) * rstd * *o;
                    }
                } else {
                    for o in adv.iter_mut() {
                        *o = (*o - mean) * rstd;
                    }
                }
                continue;
            }
            let out = &mut out[..len];
            {
                let x = source.part::<F>(i, start, len, sx);
                if times_mask {
                    let m = p.mask.part::<F>(i, start, len, sm);
                    for ((o, &x), &m) in out.iter_mut().zip(x).zip(m) {
                        *o = (x - mean) * rstd * m;
                    }
                } else {
                    for (o, &x) in out.iter_mut().zip(x) {
                        *o = (x - mean) * rstd;
                    }
                }
            } // (x may borrow the advantages themselves: read before the store)
            // SAFETY: row i is written by this task only.
            unsafe { put(&p.advantages, i, start, out) };
        }
    })
}

/// Scans rows `first .. first + n` (`n <= LANES`) backwards, one per lane,
/// writes their raw advantages and returns, and returns their whitening
/// moments (lanes past `n` are padding: neither stored nor summed). Compiled
/// twice on x86-64, the second time for AVX2 (the same IEEE operations in
/// the same order, so the same bits: Rust never fuses a multiply and add).
fn scan_group<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> ([Moments; LANES], usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { scan_group_avx2(p, first, n, s) };
    }
    scan_group_impl(p, first, n, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_group_avx2<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> ([Moments; LANES], usize) {
    scan_group_impl(p, first, n, s)
}

#[inline(always)]
fn scan_group_impl<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> ([Moments; LANES], usize) {
    let one = F::one();
    let zero = F::zero();
    let mut mom = LaneMoments::default();
    // the state each lane carries from one block to the next (to the left)
    let (mut nv, mut g, mut run, mut acc) = ([zero; LANES], [zero; LANES], [zero; LANES], [0.0f64; LANES]);
    let rfpp = matches!(p.estimator, ReturnsEstimator::ReinforcePlusPlus { .. });
    // REINFORCE++ writes its advantages in the whitening pass; until then
    // they hold the mask in `F` where they are `F` runs, so that pass reads
    // 4 bytes a token there instead of converting the mask again
    let (stores_adv, mask_in_adv) = (!rfpp, rfpp && p.advantages.is_direct::<F>());
    // GAE's returns `g + v` are summed row by row from the stored advantages
    // and the values where all three are `F` runs: cheaper than a transpose
    let ret_by_rows = matches!(p.estimator, ReturnsEstimator::Gae { .. })
        && p.advantages.is_direct::<F>()
        && p.returns.is_direct::<F>()
        && p.values.as_ref().is_some_and(|v| v.is_direct::<F>());
    for (start, len) in blocks_rev(p.rewards.cols) {
        load(&p.rewards, first, n, start, len, &mut s.row, &mut s.r);
        if mask_in_adv {
            // SAFETY: the rows of this group are written by this task only.
            unsafe { load_through(&p.mask, &p.advantages, first, n, start, len, &mut s.row, &mut s.m) };
        } else {
            load(&p.mask, first, n, start, len, &mut s.row, &mut s.m);
        }
        let (r, m) = (&s.r[..len], &s.m[..len]);
        let (adv, ret) = (&mut s.adv[..len], &mut s.ret[..len]);
        match p.estimator {
            ReturnsEstimator::Gae { gamma, lam } => {
                load(p.values.as_ref().expect("validated"), first, n, start, len, &mut s.row, &mut s.v);
                let v = &s.v[..len];
                let (gamma, c) = (F::of(gamma), F::of(gamma * lam));
                for t in (0..len).rev() {
                    let (rt, mt, vt) = (r[t], m[t], v[t]);
                    let delta: Col<F> = std::array::from_fn(|l| rt[l] + gamma * nv[l] - vt[l]);
                    let g_new: Col<F> = std::array::from_fn(|l| delta[l] + c * g[l]);
                    nv = std::array::from_fn(|l| vt[l] * mt[l] + (one - mt[l]) * nv[l]);
                    g = std::array::from_fn(|l| g_new[l] * mt[l] + (one - mt[l]) * g[l]);
                    adv[t] = g;
                    if !ret_by_rows {
                        ret[t] = std::array::from_fn(|l| g[l] + vt[l]);
                    }
                }
                mom.add(m, adv);
            }
            ReturnsEstimator::ReinforcePlusPlus { gamma } => {
                let gamma = F::of(gamma);
                for t in (0..len).rev() {
                    let (rt, mt) = (r[t], m[t]);
                    let new: Col<F> = std::array::from_fn(|l| rt[l] + gamma * run[l]);
                    ret[t] = std::array::from_fn(|l| new[l] * mt[l]);
                    run = std::array::from_fn(|l| new[l] * mt[l] + run[l] * (one - mt[l]));
                }
                mom.add(m, ret);
                // (the advantages are written by the whitening pass)
            }
            ReturnsEstimator::Remax => {
                load(p.baselines.as_ref().expect("validated"), first, n, start, len, &mut s.row, &mut s.v);
                let b = &s.v[..len];
                for t in (0..len).rev() {
                    let (rt, mt, bt) = (r[t], m[t], b[t]);
                    acc = std::array::from_fn(|l| acc[l] + (rt[l] * mt[l]).f64());
                    let x: Col<F> = std::array::from_fn(|l| F::of(acc[l]));
                    ret[t] = x;
                    adv[t] = std::array::from_fn(|l| x[l] - bt[l] * mt[l]);
                }
            }
        }
        // SAFETY: the rows of this group are written by this task only; the
        // two outputs are distinct buffers (the Python layer refuses outputs
        // that overlap).
        unsafe {
            if stores_adv {
                store(&p.advantages, first, n, start, &s.adv[..len], &mut s.row);
            }
            if ret_by_rows {
                gae_returns_by_rows::<F>(p, first, n, start, len);
            } else {
                store(&p.returns, first, n, start, &s.ret[..len], &mut s.row);
            }
        }
    }
    (mom.rows(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns of a lane group from a seed: masks of 0, 1, fractions and
    /// -0; values near 0, far from 0 next to their spread, huge, and NaN /
    /// inf at masked tokens.
    fn columns(len: usize, seed: u64) -> (Vec<Col<f32>>, Vec<Col<f32>>) {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut m = vec![[0.0f32; LANES]; len];
        let mut x = vec![[0.0f32; LANES]; len];
        for t in 0..len {
            for l in 0..LANES {
                let u = next();
                m[t][l] = match l % 4 {
                    0 => (u < 0.7) as u8 as f32,
                    1 => [0.0, 1.0, 0.5, -0.0][(u * 4.0) as usize],
                    2 => 1.0,
                    _ => (u < 0.05) as u8 as f32,
                };
                let v = next() as f32 - 0.5;
                x[t][l] = match l / 4 {
                    0 => v,
                    1 => 1.0e4 + v * 1.0e-2,
                    2 => v * 3.0e30,
                    _ => -7.0 + v,
                };
                if m[t][l] == 0.0 && u < 0.3 {
                    x[t][l] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(t + l) % 3];
                }
            }
        }
        (m, x)
    }

    #[test]
    fn block_moments_take_the_same_steps_on_every_path_and_keep_their_digits() {
        for (len, seed) in [(1, 1), (7, 2), (64, 3), (BLOCK, 4), (300, 5)] {
            let (m, x) = columns(len, seed);
            for at in [0, HALF] {
                let any = half_moments_any(&m, &x, at);
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present; the columns are `LANES` f32s.
                    let avx = unsafe { half_moments_avx2(m.as_ptr() as *const f32, x.as_ptr() as *const f32, len, at) };
                    let bits = |a: &[f64; HALF]| a.map(f64::to_bits);
                    assert_eq!([any.0, any.1, any.2, any.3].map(|a| bits(&a)), [avx.0, avx.1, avx.2, avx.3].map(|a| bits(&a)));
                }
                // against the two-pass moments in float64 of the kept tokens
                for l in 0..HALF {
                    let kept: Vec<(f64, f64)> = (0..len)
                        .filter(|&t| m[t][at + l] != 0.0)
                        .map(|t| (m[t][at + l] as f64, x[t][at + l] as f64))
                        .collect();
                    let n: f64 = kept.iter().map(|k| k.0).sum();
                    let got = Moments::shifted(any.0[l], any.1[l], any.2[l], any.3[l]);
                    assert_eq!(got.n, n);
                    if n <= 0.0 {
                        continue;
                    }
                    let mean = kept.iter().map(|k| k.0 * k.1).sum::<f64>() / n;
                    let m2: f64 = kept.iter().map(|k| k.0 * (k.1 - mean) * (k.1 - mean)).sum();
                    let scale = kept.iter().map(|k| k.1.abs()).fold(0.0, f64::max);
                    assert!((got.mean - mean).abs() <= 1e-12 * scale, "lane {l}: mean {} vs {mean}", got.mean);
                    assert!((got.m2 - m2).abs() <= 1e-9 * m2.abs().max(1e-300), "lane {l}: m2 {} vs {m2}", got.m2);
                }
            }
        }
    }
}
