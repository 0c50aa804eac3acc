//! The scan estimators on the CPU (twin of `cuda/kernels/returns.cu`; the
//! formulas are in `ops/returns.rs`): one backward pass over each row,
//! sixteen rows at a time (one per vector lane: a row's recurrence is a
//! chain of dependent operations, and two AVX2 vectors of eight independent
//! chains, or one AVX-512 vector of sixteen, fill the pipeline while the
//! moments' sums use the idle vector units), column blocks from the
//! last to the first, moved between rows and lanes by transposes, lane
//! groups in parallel, writing both outputs and each row's whitening
//! moments; then, for GAE and REINFORCE++, the batch statistics and one pass
//! whitening the advantages in place. No B×T buffer besides the outputs.
//!
//! Where the CPU has AVX-512 and the rows are contiguous float32 (rewards,
//! values, outputs) with an int64, one-byte or float32 mask of 0s and 1s,
//! GAE and REINFORCE++ run on tiles of 16 rows × 16 columns instead
//! ([`x512::gae_tiles`]): no scratch, each tile transposed in registers
//! (spread between the steps of the tile before), the mask read as bits.
//! The same operations per column, so the same bits.
//!
//! The arithmetic is verl's loop step for step in the compute type (so on
//! float32 and float64 inputs the raw advantages and returns are bitwise
//! verl's; the whitening's sums are float64 here and float32 in torch).

use super::{fold_rows, for_each_row};
use crate::error::Result;
pub use crate::ops::returns::{ReturnsEstimator, ReturnsProblem};
use crate::ops::returns::{whiten_stats, Moments};
use crate::tensor::{piece_scratch, pieces, DType, Mat, MatMut, Real};

#[cfg(target_arch = "x86_64")]
mod x512;

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

/// The whitening [`Moments`] of the rows of a lane group, one per lane,
/// summed token by token in scan order (last column first) as the scan makes
/// each value, in float64 about a shift `k`: the lane's first kept finite
/// value (0 until there is one), so the sums do not cancel when the values
/// sit far from 0 next to their spread. A shift that is one of the values is
/// near enough: their mean is at most `sqrt(n - 1)` standard deviations away
/// from any of them (Samuelson's inequality), so the variance `q - s^2 / n`
/// loses at most `log2(n)` of float64's 53 bits. A token with weight `m = 0`
/// adds nothing (a NaN value there is dropped, as verl's `masked_sum` drops
/// it). Branch-free lane by lane. With AVX-512 the step runs inside the
/// scan's loop (`x512`), whose chain of dependent operations leaves
/// the vector units idle most of the time, with the sums in registers;
/// elsewhere the sixteen lanes' float64 sums do not fit the registers next
/// to the recurrence's, and [`LaneMoments::add_block`] takes a pass of its
/// own over each block, the same steps in the same order.
struct LaneMoments {
    k: [f64; LANES],
    have: [bool; LANES],
    n: [f64; LANES],
    s: [f64; LANES],
    q: [f64; LANES],
}

impl Default for LaneMoments {
    fn default() -> Self {
        LaneMoments { k: [0.0; LANES], have: [false; LANES], n: [0.0; LANES], s: [0.0; LANES], q: [0.0; LANES] }
    }
}

impl LaneMoments {
    /// Adds one column: weights `w`, values `x`.
    #[inline(always)]
    fn add<F: Real>(&mut self, w: &Col<F>, x: &Col<F>) {
        let zero = F::zero();
        for l in 0..LANES {
            let keep = w[l] != zero;
            let v = if keep { x[l] } else { zero }.f64();
            let newly = keep & !self.have[l] & v.is_finite();
            self.k[l] = if newly { v } else { self.k[l] };
            self.have[l] |= newly;
            let (w, d) = (w[l].f64(), v - self.k[l]);
            let wd = w * d;
            self.n[l] += w;
            self.s[l] += wd;
            self.q[l] += wd * d;
        }
    }

    /// Adds a block's columns, last first, as [`LaneMoments::add`] one by one.
    #[inline(always)]
    fn add_block<F: Real>(&mut self, w: &[Col<F>], x: &[Col<F>]) {
        #[cfg(target_arch = "x86_64")]
        if F::DTYPE == DType::F32 && std::is_x86_feature_detected!("avx2") {
            let n = w.len().min(x.len());
            // SAFETY: AVX2 is present; `F` is `f32`, so a column is `LANES` f32s.
            return unsafe { self.add_block_avx2(w.as_ptr() as *const f32, x.as_ptr() as *const f32, n) };
        }
        let mut m = std::mem::take(self);
        for t in (0..x.len()).rev() {
            m.add(&w[t], &x[t]);
        }
        *self = m;
    }

    /// [`LaneMoments::add_block`] for float32 in AVX2, eight lanes at a
    /// time: the same operations in the same order (no fused multiply-add),
    /// so the same bits.
    ///
    /// # Safety
    /// AVX2 is present; `w` and `x` point at `len` columns of `LANES` f32s.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_block_avx2(&mut self, w: *const f32, x: *const f32, len: usize) {
        use std::arch::x86_64::*;
        const _: () = assert!(LANES.is_multiple_of(8));
        let zs = _mm256_setzero_ps();
        let inf = _mm256_set1_ps(f32::INFINITY);
        let sign = _mm256_set1_ps(-0.0);
        for at in (0..LANES).step_by(8) {
            let ld = |a: &[f64; LANES]| [_mm256_loadu_pd(a.as_ptr().add(at)), _mm256_loadu_pd(a.as_ptr().add(at + 4))];
            let (mut k, mut n, mut s, mut q) = (ld(&self.k), ld(&self.n), ld(&self.s), ld(&self.q));
            let hv: [i32; 8] = std::array::from_fn(|l| -(self.have[at + l] as i32));
            let mut have = _mm256_castsi256_ps(_mm256_loadu_si256(hv.as_ptr() as *const __m256i));
            for t in (0..len).rev() {
                let (wt, xt) = (_mm256_loadu_ps(w.add(t * LANES + at)), _mm256_loadu_ps(x.add(t * LANES + at)));
                let keep = _mm256_cmp_ps::<_CMP_NEQ_UQ>(wt, zs);
                let v = _mm256_and_ps(keep, xt);
                let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, v), inf);
                let newly = _mm256_andnot_ps(have, _mm256_and_ps(keep, finite));
                have = _mm256_or_ps(have, newly);
                let newly = _mm256_castps_si256(newly);
                let wide = [_mm256_cvtepi32_epi64(_mm256_castsi256_si128(newly)), _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(newly))];
                let ws = [_mm256_cvtps_pd(_mm256_castps256_ps128(wt)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(wt))];
                let vs = [_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v))];
                for h in 0..2 {
                    k[h] = _mm256_blendv_pd(k[h], vs[h], _mm256_castsi256_pd(wide[h]));
                    let d = _mm256_sub_pd(vs[h], k[h]);
                    let wd = _mm256_mul_pd(ws[h], d);
                    n[h] = _mm256_add_pd(n[h], ws[h]);
                    s[h] = _mm256_add_pd(s[h], wd);
                    q[h] = _mm256_add_pd(q[h], _mm256_mul_pd(wd, d));
                }
            }
            let st = |a: &mut [f64; LANES], v: [__m256d; 2]| {
                _mm256_storeu_pd(a.as_mut_ptr().add(at), v[0]);
                _mm256_storeu_pd(a.as_mut_ptr().add(at + 4), v[1]);
            };
            st(&mut self.k, k);
            st(&mut self.n, n);
            st(&mut self.s, s);
            st(&mut self.q, q);
            let bits = _mm256_movemask_ps(have);
            for l in 0..8 {
                self.have[at + l] = (bits >> l) & 1 == 1;
            }
        }
    }

    fn rows(&self) -> [Moments; LANES] {
        std::array::from_fn(|l| Moments::shifted(self.n[l], self.k[l], self.s[l], self.q[l]))
    }
}

/// `LANES` values, one per row of a lane group, at one column.
type Col<F> = [F; LANES];

/// A lane group's working buffers, column-major (`[t][lane]`), so each step
/// of the recurrence works on one vector of the group's rows: the inputs of
/// one block, converted to `F`, the outputs before they are stored, and a
/// row buffer for conversions.
struct Scratch<F> {
    /// the argument a `MemoryError` names
    arg: &'static str,
    r: Vec<Col<F>>,
    v: Vec<Col<F>>,
    m: Vec<Col<F>>,
    adv: Vec<Col<F>>,
    ret: Vec<Col<F>>,
    /// `LANES` row buffers of `BLOCK` (conversions of inputs and outputs)
    row: Vec<F>,
    /// `BLOCK` floats which a tile kernel's lanes past the group's rows
    /// write into (they read [`ZERO_ROW`])
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sink: Vec<f32>,
}

impl<F: Real> Scratch<F> {
    /// The tile kernels' few buffers; the column buffers come with
    /// [`Scratch::columns`], where a block needs them (the tile kernels
    /// never do, unless a mask holds a value other than 0 and 1).
    fn new(arg: &'static str) -> Result<Self> {
        Ok(Scratch {
            arg,
            r: Vec::new(),
            v: Vec::new(),
            m: Vec::new(),
            adv: Vec::new(),
            ret: Vec::new(),
            row: Vec::new(),
            sink: crate::error::try_zeros(arg, BLOCK)?,
        })
    }

    /// Allocates the column buffers, once; a `MemoryError` if it cannot.
    fn columns(&mut self) -> Result<()> {
        if !self.row.is_empty() {
            return Ok(());
        }
        let arg = self.arg;
        let cols = || -> Result<Vec<Col<F>>> {
            let mut v = Vec::new();
            v.try_reserve_exact(BLOCK).map_err(|_| crate::error::Error::memory(arg, "cannot allocate scan scratch"))?;
            v.resize(BLOCK, [F::zero(); LANES]);
            Ok(v)
        };
        (self.r, self.v, self.m, self.adv, self.ret) = (cols()?, cols()?, cols()?, cols()?, cols()?);
        self.row = crate::error::try_zeros(arg, LANES * BLOCK)?;
        Ok(())
    }
}

/// Loads columns `start .. start + len` of rows `first ..` (`n` of them) of
/// `x` into `dst[t][lane]` (through `rows`, `LANES` row buffers of `BLOCK`,
/// where a row needs converting); lanes past `n` are zero. With `through`,
/// each row, as `F`, is also left in the same columns of that output where
/// its rows are contiguous `F` runs: the conversion is written there instead
/// of into a row buffer, and the transpose reads it back.
///
/// # Safety
/// With `through`, no other task may access these rows of it at the same time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load<F: Real>(x: &Mat, through: Option<&MatMut>, first: usize, n: usize, start: usize, len: usize, rows: &mut [F], dst: &mut [Col<F>]) {
    let mut src = [std::ptr::null::<F>(); LANES];
    for (l, (buf, s)) in rows.chunks_exact_mut(BLOCK).zip(src.iter_mut()).enumerate() {
        if l >= n {
            buf[..len].fill(F::zero());
            *s = buf.as_ptr();
            continue;
        }
        *s = match through.and_then(|out| out.direct_part::<F>(first + l, start, len)) {
            Some(run) => {
                let to = run.as_mut_ptr();
                let got = x.part::<F>(first + l, start, len, run).as_ptr();
                if !std::ptr::eq(got, to) {
                    // `x` already was an `F` run, elsewhere: copy it
                    std::ptr::copy_nonoverlapping(got, to, len);
                }
                to as *const F
            }
            None => x.part::<F>(first + l, start, len, buf).as_ptr(),
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
        const _: () = assert!(LANES.is_multiple_of(8));

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

/// The state a lane group carries from one block to the next (to the left):
/// GAE's next value and advantage, REINFORCE++'s running return, ReMax's
/// float64 running sum, and the whitening moments.
struct Carry<F> {
    nv: Col<F>,
    g: Col<F>,
    run: Col<F>,
    acc: [f64; LANES],
    mom: LaneMoments,
}

impl<F: Real> Default for Carry<F> {
    fn default() -> Self {
        let z = [F::zero(); LANES];
        Carry { nv: z, g: z, run: z, acc: [0.0; LANES], mom: LaneMoments::default() }
    }
}

/// The recurrences over one block of a lane group's columns, last column
/// first, with the whitening moments summed as each value is made: verl's
/// loop step in the compute type, the same IEEE operations in the same order
/// on every path (so the same bits). Float32 runs in AVX-512 where the CPU
/// has it, one vector per column.
mod steps {
    #[cfg(target_arch = "x86_64")]
    use super::x512;
    use super::{Carry, Col};
    use crate::tensor::{DType, Real};

    /// GAE: `adv` gets the raw advantages, `ret` (if any) `adv + v`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn gae<F: Real>(c: &mut Carry<F>, gamma: f64, lam: f64, r: &[Col<F>], m: &[Col<F>], v: &[Col<F>], adv: &mut [Col<F>], ret: Option<&mut [Col<F>]>) {
        #[cfg(target_arch = "x86_64")]
        if F::DTYPE == DType::F32 && avx512() {
            // SAFETY: `F` is `f32`; AVX-512F is present.
            unsafe {
                let ret = ret.map(|x| f32s_mut(x));
                return x512::gae(carry_f32(c), gamma as f32, (gamma * lam) as f32, f32s(r), f32s(m), f32s(v), f32s_mut(adv), ret);
            }
        }
        gae_any(c, gamma, lam, r, m, v, adv, ret)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gae_any<F: Real>(c: &mut Carry<F>, gamma: f64, lam: f64, r: &[Col<F>], m: &[Col<F>], v: &[Col<F>], adv: &mut [Col<F>], mut ret: Option<&mut [Col<F>]>) {
        let one = F::one();
        let (gamma, k) = (F::of(gamma), F::of(gamma * lam));
        let (mut nv, mut g) = (c.nv, c.g);
        for t in (0..adv.len()).rev() {
            let (rt, mt, vt) = (r[t], m[t], v[t]);
            let delta: Col<F> = std::array::from_fn(|l| rt[l] + gamma * nv[l] - vt[l]);
            let g_new: Col<F> = std::array::from_fn(|l| delta[l] + k * g[l]);
            nv = std::array::from_fn(|l| vt[l] * mt[l] + (one - mt[l]) * nv[l]);
            g = std::array::from_fn(|l| g_new[l] * mt[l] + (one - mt[l]) * g[l]);
            adv[t] = g;
            if let Some(ret) = ret.as_deref_mut() {
                ret[t] = std::array::from_fn(|l| g[l] + vt[l]);
            }
        }
        (c.nv, c.g) = (nv, g);
        // (a pass of its own here: the moments' float64 sums of sixteen lanes
        // do not fit the registers next to the recurrence's without AVX-512)
        c.mom.add_block(m, adv);
    }

    /// REINFORCE++: `ret` gets the masked discounted returns.
    #[inline(always)]
    pub fn rfpp<F: Real>(c: &mut Carry<F>, gamma: f64, r: &[Col<F>], m: &[Col<F>], ret: &mut [Col<F>]) {
        #[cfg(target_arch = "x86_64")]
        if F::DTYPE == DType::F32 && avx512() {
            // SAFETY: `F` is `f32`; AVX-512F is present.
            unsafe { return x512::rfpp(carry_f32(c), gamma as f32, f32s(r), f32s(m), f32s_mut(ret)) };
        }
        rfpp_any(c, gamma, r, m, ret)
    }

    #[inline(always)]
    pub(super) fn rfpp_any<F: Real>(c: &mut Carry<F>, gamma: f64, r: &[Col<F>], m: &[Col<F>], ret: &mut [Col<F>]) {
        let one = F::one();
        let gamma = F::of(gamma);
        let mut run = c.run;
        for t in (0..ret.len()).rev() {
            let (rt, mt) = (r[t], m[t]);
            let new: Col<F> = std::array::from_fn(|l| rt[l] + gamma * run[l]);
            ret[t] = std::array::from_fn(|l| new[l] * mt[l]);
            run = std::array::from_fn(|l| new[l] * mt[l] + run[l] * (one - mt[l]));
        }
        c.run = run;
        c.mom.add_block(m, ret);
    }

    // Views at `f32` of what is `f32` already, for the AVX-512 kernels.
    //
    // # Safety
    // `F` is `f32` (the only `Real` of that dtype), so each views the same
    // memory at its own type.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn f32s<F: Real>(x: &[Col<F>]) -> &[Col<f32>] {
        std::slice::from_raw_parts(x.as_ptr() as *const Col<f32>, x.len())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn f32s_mut<F: Real>(x: &mut [Col<F>]) -> &mut [Col<f32>] {
        std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut Col<f32>, x.len())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) unsafe fn carry_f32<F: Real>(c: &mut Carry<F>) -> &mut Carry<f32> {
        &mut *(c as *mut Carry<F> as *mut Carry<f32>)
    }

    /// Whether the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) fn avx512() -> bool {
        std::is_x86_feature_detected!("avx512f")
    }
}

fn run<F: Real>(p: &ReturnsProblem) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let arg = p.rewards.tensor.arg;
    let groups = rows.div_ceil(LANES);
    let mut total = Moments::default();
    let mut failed = None;
    fold_rows(
        arg,
        groups,
        cols * LANES,
        || Scratch::<F>::new(arg),
        |s, k| scan_group(p, k * LANES, (rows - k * LANES).min(LANES), s),
        |group| match group {
            // row by row, in index order: the same sums whatever the grouping
            Ok((moments, n)) => {
                for &m in &moments[..n] {
                    total = total.merge(m);
                }
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
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

/// A block's row of zeros of 8 bytes, which a tile kernel's lanes past the
/// group's rows read (as any input dtype).
#[cfg(target_arch = "x86_64")]
static ZERO_ROW: [u64; BLOCK] = [0; BLOCK];

/// The mask kinds the AVX-512 tile kernels read as bits.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum TileMask {
    I64,
    Byte,
    F32,
}

/// Whether GAE or REINFORCE++ runs on [`x512::gae_tiles`] /
/// [`x512::rfpp_tiles`] (float32 math; rewards, values and both outputs
/// contiguous float32 rows; a contiguous int64, one-byte or float32 mask;
/// AVX-512 with BW, VL and DQ), and with which mask.
#[cfg(target_arch = "x86_64")]
fn tile_mask<F: Real>(p: &ReturnsProblem) -> Option<TileMask> {
    let cpu = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq");
    let inputs = match p.estimator {
        ReturnsEstimator::Gae { .. } => p.values.as_ref().is_some_and(|v| v.is_direct::<f32>()),
        ReturnsEstimator::ReinforcePlusPlus { .. } => true,
        ReturnsEstimator::Remax => false,
    };
    let direct = p.rewards.is_direct::<f32>() && p.advantages.is_direct::<f32>() && p.returns.is_direct::<f32>();
    if !(cpu && F::DTYPE == DType::F32 && inputs && direct && p.mask.is_contiguous()) {
        return None;
    }
    match p.mask.tensor.dtype {
        DType::I64 => Some(TileMask::I64),
        DType::Bool | DType::U8 | DType::I8 => Some(TileMask::Byte),
        DType::F32 => Some(TileMask::F32),
        _ => None,
    }
}

/// Runs the tile kernel on columns `start .. start + len` of rows `first ..`
/// (`n` of them); returns the columns left at the front for the column
/// kernels (where the mask holds a value other than 0 and 1).
///
/// # Safety
/// [`tile_mask`] gave `mask`; no other task accesses these rows of the outputs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_block(p: &ReturnsProblem, mask: TileMask, first: usize, n: usize, start: usize, len: usize, sink: &mut [f32], c: &mut Carry<f32>) -> usize {
    let zero = ZERO_ROW.as_ptr() as *const u8;
    let sink = sink.as_mut_ptr();
    let input = |x: &Mat, l: usize| if l < n { x.direct::<f32>(first + l, start, len).expect("checked").as_ptr() } else { zero as *const f32 };
    let output = |x: &MatMut, l: usize| if l < n { x.direct_part::<f32>(first + l, start, len).expect("checked").as_mut_ptr() } else { sink };
    let r = std::array::from_fn(|l| input(&p.rewards, l));
    let rows = x512::TileRows {
        r,
        v: match p.values.as_ref() {
            Some(v) if matches!(p.estimator, ReturnsEstimator::Gae { .. }) => std::array::from_fn(|l| input(v, l)),
            _ => r,
        },
        m: std::array::from_fn(|l| if l < n { p.mask.run_ptr(first + l, start) } else { zero }),
        adv: std::array::from_fn(|l| output(&p.advantages, l)),
        ret: std::array::from_fn(|l| output(&p.returns, l)),
    };
    use x512::{gae_tiles, rfpp_tiles, ByteMask, F32Mask, I64Mask};
    match p.estimator {
        ReturnsEstimator::Gae { gamma, lam } => {
            let (gamma, k) = (gamma as f32, (gamma * lam) as f32);
            match mask {
                TileMask::I64 => gae_tiles::<I64Mask>(c, gamma, k, &rows, len),
                TileMask::Byte => gae_tiles::<ByteMask>(c, gamma, k, &rows, len),
                TileMask::F32 => gae_tiles::<F32Mask>(c, gamma, k, &rows, len),
            }
        }
        ReturnsEstimator::ReinforcePlusPlus { gamma } => {
            let gamma = gamma as f32;
            match mask {
                TileMask::I64 => rfpp_tiles::<I64Mask>(c, gamma, &rows, len),
                TileMask::Byte => rfpp_tiles::<ByteMask>(c, gamma, &rows, len),
                TileMask::F32 => rfpp_tiles::<F32Mask>(c, gamma, &rows, len),
            }
        }
        ReturnsEstimator::Remax => unreachable!("no tile kernel for ReMax"),
    }
}

/// Scans rows `first .. first + n` (`n <= LANES`) backwards, one per lane,
/// writes their raw advantages and returns, and returns their whitening
/// moments (lanes past `n` are padding: neither stored nor summed). Compiled
/// twice on x86-64, the second time for AVX2 (the same IEEE operations in
/// the same order, so the same bits: Rust never fuses a multiply and add).
fn scan_group<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> Result<([Moments; LANES], usize)> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { scan_group_avx2(p, first, n, s) };
    }
    scan_group_impl(p, first, n, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_group_avx2<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> Result<([Moments; LANES], usize)> {
    scan_group_impl(p, first, n, s)
}

#[inline(always)]
fn scan_group_impl<F: Real>(p: &ReturnsProblem, first: usize, n: usize, s: &mut Scratch<F>) -> Result<([Moments; LANES], usize)> {
    let mut c = Carry::<F>::default();
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
    #[cfg(target_arch = "x86_64")]
    let tiled = tile_mask::<F>(p);
    for (start, len) in blocks_rev(p.rewards.cols) {
        #[cfg(target_arch = "x86_64")]
        let len = match tiled {
            // SAFETY: checked by `tile_mask`; the rows are this task's.
            Some(mask) => unsafe { tile_block(p, mask, first, n, start, len, &mut s.sink, steps::carry_f32(&mut c)) },
            None => len,
        };
        if len == 0 {
            continue;
        }
        s.columns()?;
        // SAFETY: the rows of this group are written by this task only.
        unsafe {
            load(&p.rewards, None, first, n, start, len, &mut s.row, &mut s.r);
            load(&p.mask, mask_in_adv.then_some(&p.advantages), first, n, start, len, &mut s.row, &mut s.m);
        }
        let (r, m) = (&s.r[..len], &s.m[..len]);
        let (adv, ret) = (&mut s.adv[..len], &mut s.ret[..len]);
        match p.estimator {
            ReturnsEstimator::Gae { gamma, lam } => {
                // SAFETY: no output to write through
                unsafe { load(p.values.as_ref().expect("validated"), None, first, n, start, len, &mut s.row, &mut s.v) };
                let v = &s.v[..len];
                steps::gae(&mut c, gamma, lam, r, m, v, adv, (!ret_by_rows).then_some(ret));
            }
            ReturnsEstimator::ReinforcePlusPlus { gamma } => {
                // (the advantages are written by the whitening pass)
                steps::rfpp(&mut c, gamma, r, m, ret);
            }
            ReturnsEstimator::Remax => {
                // SAFETY: no output to write through
                unsafe { load(p.baselines.as_ref().expect("validated"), None, first, n, start, len, &mut s.row, &mut s.v) };
                let b = &s.v[..len];
                let mut acc = c.acc;
                for t in (0..len).rev() {
                    let (rt, mt, bt) = (r[t], m[t], b[t]);
                    acc = std::array::from_fn(|l| acc[l] + (rt[l] * mt[l]).f64());
                    let x: Col<F> = std::array::from_fn(|l| F::of(acc[l]));
                    ret[t] = x;
                    adv[t] = std::array::from_fn(|l| x[l] - bt[l] * mt[l]);
                }
                c.acc = acc;
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
    Ok((c.mom.rows(), n))
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

    fn bits(m: &LaneMoments) -> Vec<u64> {
        [m.k, m.n, m.s, m.q].iter().flat_map(|a| a.map(|x| if x.is_nan() { u64::MAX } else { x.to_bits() })).chain(m.have.map(|h| h as u64)).collect()
    }

    #[test]
    fn lane_moments_take_the_same_steps_on_every_path_and_keep_their_digits() {
        for (len, seed) in [(1, 1), (7, 2), (64, 3), (BLOCK, 4), (300, 5)] {
            let (m, x) = columns(len, seed);
            // two blocks, as a scan adds them: the second part first
            let cut = len / 3;
            let mut any = LaneMoments::default();
            for t in (0..len).rev() {
                any.add(&m[t], &x[t]);
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut avx = LaneMoments::default();
                for (lo, hi) in [(cut, len), (0, cut)] {
                    // SAFETY: AVX2 is present; the columns are `LANES` f32s.
                    unsafe { avx.add_block_avx2(m[lo..].as_ptr() as *const f32, x[lo..].as_ptr() as *const f32, hi - lo) };
                }
                assert_eq!(bits(&any), bits(&avx));
            }
            // against the two-pass moments in float64 of the kept tokens
            let got = any.rows();
            for l in 0..LANES {
                let kept: Vec<(f64, f64)> =
                    (0..len).filter(|&t| m[t][l] != 0.0).map(|t| (m[t][l] as f64, x[t][l] as f64)).collect();
                let n: f64 = kept.iter().map(|k| k.0).sum();
                assert_eq!(got[l].n, n);
                if n <= 0.0 || kept.iter().any(|k| !k.1.is_finite()) {
                    continue;
                }
                let mean = kept.iter().map(|k| k.0 * k.1).sum::<f64>() / n;
                let m2: f64 = kept.iter().map(|k| k.0 * (k.1 - mean) * (k.1 - mean)).sum();
                let scale = kept.iter().map(|k| k.1.abs()).fold(0.0, f64::max);
                assert!((got[l].mean - mean).abs() <= 1e-12 * scale, "lane {l}: mean {} vs {mean}", got[l].mean);
                assert!((got[l].m2 - m2).abs() <= 1e-9 * m2.abs().max(1e-300), "lane {l}: m2 {} vs {m2}", got[l].m2);
            }
        }
    }

    /// The AVX-512 recurrences against the portable ones, over two blocks
    /// with the carry between them: the same bits in every output, the
    /// carried state and the moments.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_steps_are_the_portable_steps() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        }
        // (a NaN's sign and payload depend on the order of an operation's
        // operands, which the compiler may swap: every NaN counts as one)
        let col_bits =
            |c: &[Col<f32>]| c.iter().flat_map(|c| c.map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })).collect::<Vec<_>>();
        for (len, seed) in [(1, 11), (9, 12), (BLOCK, 13), (333, 14)] {
            let (m, v) = columns(len, seed);
            let (_, r) = columns(len, seed + 100);
            let cut = len / 2;
            for (gamma, lam) in [(1.0, 0.95), (0.99, 1.0), (0.5, 0.25)] {
                let (mut ca, mut cb) = (Carry::<f32>::default(), Carry::<f32>::default());
                let zero = [[0.0f32; LANES]; BLOCK];
                let (mut adv_a, mut ret_a, mut adv_b, mut ret_b) = (zero, zero, zero, zero);
                for (lo, hi) in [(cut, len), (0, cut)] {
                    steps::gae_any(&mut ca, gamma, lam, &r[lo..hi], &m[lo..hi], &v[lo..hi], &mut adv_a[lo..hi], Some(&mut ret_a[lo..hi]));
                    // SAFETY: AVX-512F is present.
                    unsafe {
                        x512::gae(&mut cb, gamma as f32, (gamma * lam) as f32, &r[lo..hi], &m[lo..hi], &v[lo..hi], &mut adv_b[lo..hi], Some(&mut ret_b[lo..hi]))
                    };
                }
                assert_eq!(col_bits(&adv_a[..len]), col_bits(&adv_b[..len]));
                assert_eq!(col_bits(&ret_a[..len]), col_bits(&ret_b[..len]));
                assert_eq!(col_bits(&[ca.nv, ca.g]), col_bits(&[cb.nv, cb.g]));
                assert_eq!(bits(&ca.mom), bits(&cb.mom));

                let (mut ca, mut cb) = (Carry::<f32>::default(), Carry::<f32>::default());
                for (lo, hi) in [(cut, len), (0, cut)] {
                    steps::rfpp_any(&mut ca, gamma, &r[lo..hi], &m[lo..hi], &mut ret_a[lo..hi]);
                    // SAFETY: AVX-512F is present.
                    unsafe { x512::rfpp(&mut cb, gamma as f32, &r[lo..hi], &m[lo..hi], &mut ret_b[lo..hi]) };
                }
                assert_eq!(col_bits(&ret_a[..len]), col_bits(&ret_b[..len]));
                assert_eq!(col_bits(&[ca.run]), col_bits(&[cb.run]));
                assert_eq!(bits(&ca.mom), bits(&cb.mom));
            }
        }
    }

    /// The AVX-512 tile kernels against the column kernels, over two blocks
    /// with the carry between them, for each mask kind they read as bits:
    /// the same bits in every output, the carry and the moments; and where a
    /// mask value is neither 0 nor 1, the tile holding it and all before it
    /// are left to the column kernels (which then give the same bits too).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tile_kernels_are_the_column_kernels() {
        let cpu = ["avx512f", "avx512bw", "avx512vl", "avx512dq"];
        if !(std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq"))
        {
            eprintln!("this CPU lacks one of {cpu:?}: nothing to compare");
            return;
        }
        let key = |x: f32| if x.is_nan() { u32::MAX } else { x.to_bits() };
        let row_bits = |rows: &[Vec<f32>]| rows.iter().flat_map(|r| r.iter().map(|&x| key(x))).collect::<Vec<_>>();
        // (len, seed, a mask value other than 0 and 1 at (lane 5, column))
        for (len, seed, odd) in [(1, 21, None), (16, 22, None), (45, 23, None), (BLOCK, 24, None), (333, 25, Some(170)), (BLOCK, 26, Some(511)), (100, 27, Some(3)), (600, 28, Some(40))] {
            let (mc, vc) = columns(len, seed);
            let (_, rc) = columns(len, seed + 100);
            // 0/1 masks, the odd value where asked
            let mut mc: Vec<Col<f32>> = mc.iter().map(|c| c.map(|m| (m == 1.0) as u8 as f32)).collect();
            for kind in 0..3 {
                let odd_value = [2.0f32, 3.0, 0.5][kind];
                if let Some(t) = odd {
                    mc[t][5] = odd_value;
                }
                let rows = |c: &[Col<f32>]| (0..LANES).map(|l| c.iter().map(|x| x[l]).collect::<Vec<f32>>()).collect::<Vec<_>>();
                let (r, v, m) = (rows(&rc), rows(&vc), rows(&mc));
                let (m64, m8): (Vec<Vec<i64>>, Vec<Vec<u8>>) =
                    (m.iter().map(|x| x.iter().map(|&y| y as i64).collect()).collect(), m.iter().map(|x| x.iter().map(|&y| y as u8).collect()).collect());
                let cut = (len / 2) / 16 * 16 + 5; // blocks need not start on a tile
                for (gamma, lam) in [(1.0f32, 0.95f32), (0.5, 0.25)] {
                    for gae in [true, false] {
                        let zero = vec![[0.0f32; LANES]; len];
                        // the column kernels
                        let (mut ca, mut adv_c, mut ret_c) = (Carry::<f32>::default(), zero.clone(), zero.clone());
                        for (lo, hi) in [(cut.min(len), len), (0, cut.min(len))] {
                            // SAFETY: AVX-512F is present.
                            unsafe {
                                if gae {
                                    x512::gae(&mut ca, gamma, gamma * lam, &rc[lo..hi], &mc[lo..hi], &vc[lo..hi], &mut adv_c[lo..hi], Some(&mut ret_c[lo..hi]));
                                } else {
                                    x512::rfpp(&mut ca, gamma, &rc[lo..hi], &mc[lo..hi], &mut ret_c[lo..hi]);
                                }
                            }
                        }
                        // the tile kernels, the column kernels for what they leave
                        let (mut cb, mut adv_t, mut ret_t) = (Carry::<f32>::default(), vec![vec![9.0f32; len]; LANES], vec![vec![9.0f32; len]; LANES]);
                        for (lo, hi) in [(cut.min(len), len), (0, cut.min(len))] {
                            let at = |x: &Vec<f32>| x[lo..].as_ptr();
                            let tr = x512::TileRows {
                                r: std::array::from_fn(|l| at(&r[l])),
                                v: std::array::from_fn(|l| at(&v[l])),
                                m: std::array::from_fn(|l| match kind {
                                    0 => m64[l][lo..].as_ptr() as *const u8,
                                    1 => m8[l][lo..].as_ptr(),
                                    _ => m[l][lo..].as_ptr() as *const u8,
                                }),
                                adv: std::array::from_fn(|l| adv_t[l][lo..].as_mut_ptr()),
                                ret: std::array::from_fn(|l| ret_t[l][lo..].as_mut_ptr()),
                            };
                            let (g, k) = (gamma, gamma * lam);
                            // SAFETY: the CPU features are present; every pointer is `hi - lo` elements.
                            let left = unsafe {
                                match (gae, kind) {
                                    (true, 0) => x512::gae_tiles::<x512::I64Mask>(&mut cb, g, k, &tr, hi - lo),
                                    (true, 1) => x512::gae_tiles::<x512::ByteMask>(&mut cb, g, k, &tr, hi - lo),
                                    (true, _) => x512::gae_tiles::<x512::F32Mask>(&mut cb, g, k, &tr, hi - lo),
                                    (false, 0) => x512::rfpp_tiles::<x512::I64Mask>(&mut cb, g, &tr, hi - lo),
                                    (false, 1) => x512::rfpp_tiles::<x512::ByteMask>(&mut cb, g, &tr, hi - lo),
                                    (false, _) => x512::rfpp_tiles::<x512::F32Mask>(&mut cb, g, &tr, hi - lo),
                                }
                            };
                            let want_left = match odd {
                                Some(t) if (lo..hi).contains(&t) => (16 * ((t - lo) / 16 + 1)).min(hi - lo),
                                _ => 0,
                            };
                            assert_eq!(left, want_left, "len {len} kind {kind} block {lo}..{hi}");
                            // REINFORCE++'s advantages hold the mask where a tile ran
                            if !gae {
                                for l in 0..LANES {
                                    assert_eq!(adv_t[l][lo + left..hi], m[l][lo + left..hi]);
                                }
                            }
                            let (mut a, mut b) = (zero[..left].to_vec(), zero[..left].to_vec());
                            // SAFETY: AVX-512F is present.
                            unsafe {
                                if gae {
                                    x512::gae(&mut cb, gamma, gamma * lam, &rc[lo..lo + left], &mc[lo..lo + left], &vc[lo..lo + left], &mut a, Some(&mut b));
                                } else {
                                    x512::rfpp(&mut cb, gamma, &rc[lo..lo + left], &mc[lo..lo + left], &mut b);
                                }
                            }
                            for l in 0..LANES {
                                for t in 0..left {
                                    (adv_t[l][lo + t], ret_t[l][lo + t]) = (a[t][l], b[t][l]);
                                }
                            }
                        }
                        assert_eq!(row_bits(&rows(&ret_c)), row_bits(&ret_t), "len {len} kind {kind} gae {gae}");
                        if gae {
                            assert_eq!(row_bits(&rows(&adv_c)), row_bits(&adv_t));
                            assert_eq!([ca.nv, ca.g].map(|c| c.map(key)), [cb.nv, cb.g].map(|c| c.map(key)));
                        } else {
                            assert_eq!(ca.run.map(key), cb.run.map(key));
                        }
                        assert_eq!(bits(&ca.mom), bits(&cb.mom));
                    }
                }
            }
        }
    }
}

