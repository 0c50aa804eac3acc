//! The scan estimators on the CPU (twin of `cuda/kernels/returns.cu`; the
//! formulas are in `ops/returns.rs`): one pass per row, from its last piece to
//! its first, rows in parallel, writing both outputs and the row's whitening
//! moments; then, for GAE and REINFORCE++, the batch statistics and one pass
//! whitening the advantages in place. No B×T buffer besides the outputs.
//!
//! The arithmetic is verl's loop step for step in the compute type (so on
//! float32 and float64 inputs the raw advantages and returns are bitwise
//! verl's; the whitening's sums are float64 here and float32 in torch).

use super::{fold_rows, for_each_row};
use crate::error::Result;
pub use crate::ops::returns::{ReturnsEstimator, ReturnsProblem};
use crate::ops::returns::whiten_stats;
use crate::tensor::{piece_scratch, pieces, Mat, Real, PIECE};

/// Row sums for the whitening: `sum m`, `sum m x`, `sum m x^2` over the
/// tokens with `m != 0` (a NaN at a masked position is dropped, as verl's
/// `masked_sum` drops it), `x` the whitened quantity.
#[derive(Clone, Copy, Default)]
struct Moments {
    n: f64,
    sx: f64,
    sx2: f64,
}

impl Moments {
    #[inline(always)]
    fn add<F: Real>(&mut self, m: F, x: F) {
        if m != F::zero() {
            let (m, x) = (m.f64(), x.f64());
            self.n += m;
            self.sx += m * x;
            self.sx2 += m * x * x;
        }
    }
}

/// Computes the advantages and returns into `p.advantages` and `p.returns`;
/// a `MemoryError` if a working buffer cannot be allocated.
pub fn compute(p: &ReturnsProblem) -> Result<()> {
    if p.f64_math() {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

/// The pieces of a row, last first.
fn pieces_rev(cols: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = cols.div_ceil(PIECE);
    (0..n).rev().map(move |k| (k * PIECE, PIECE.min(cols - k * PIECE)))
}

fn run<F: Real>(p: &ReturnsProblem) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let arg = p.rewards.tensor.arg;
    let scratch = || -> Result<_> {
        let v = || piece_scratch::<F>(arg, cols);
        Ok((v()?, v()?, v()?, v()?, v()?))
    };
    let mut total = Moments::default();
    fold_rows(
        arg,
        rows,
        cols,
        scratch,
        |(sr, sv, sm, sa, st), i| scan_row(p, i, sr, sv, sm, sa, st),
        |m| {
            total.n += m.n;
            total.sx += m.sx;
            total.sx2 += m.sx2;
        },
    )?;
    if !p.estimator.whitens() {
        return Ok(());
    }
    let (mean, rstd) = whiten_stats(total.n, total.sx, total.sx2, p.mask_f64());
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
            unsafe { p.advantages.store_part(i, start, out) };
        }
    })
}

/// Scans row `i` backwards, writes its raw advantages and returns, and
/// returns its whitening moments.
#[allow(clippy::too_many_arguments)]
fn scan_row<F: Real>(
    p: &ReturnsProblem,
    i: usize,
    sr: &mut [F],
    sv: &mut [F],
    sm: &mut [F],
    sa: &mut [F],
    st: &mut [F],
) -> Moments {
    let one = F::one();
    let mut mom = Moments::default();
    // the state carried from one piece to the next (to the left)
    let (mut nv, mut g, mut run, mut acc) = (F::zero(), F::zero(), F::zero(), 0.0f64);
    for (start, len) in pieces_rev(p.rewards.cols) {
        let r = p.rewards.part::<F>(i, start, len, sr);
        let m = p.mask.part::<F>(i, start, len, sm);
        // SAFETY: row i is written by this task only; the two outputs are
        // distinct buffers (the Python layer refuses outputs that overlap).
        unsafe {
            p.advantages.with_part(i, start, len, sa, |adv| {
                p.returns.with_part(i, start, len, st, |ret| match p.estimator {
                    ReturnsEstimator::Gae { gamma, lam } => {
                        let v = p.values.as_ref().expect("validated").part::<F>(i, start, len, sv);
                        let (gamma, c) = (F::of(gamma), F::of(gamma * lam));
                        for t in (0..len).rev() {
                            let (mt, vt) = (m[t], v[t]);
                            let delta = r[t] + gamma * nv - vt;
                            let g_new = delta + c * g;
                            nv = vt * mt + (one - mt) * nv;
                            g = g_new * mt + (one - mt) * g;
                            adv[t] = g;
                            ret[t] = g + vt;
                            mom.add(mt, g);
                        }
                    }
                    ReturnsEstimator::ReinforcePlusPlus { gamma } => {
                        let gamma = F::of(gamma);
                        for t in (0..len).rev() {
                            let mt = m[t];
                            let new = r[t] + gamma * run;
                            let rt = new * mt;
                            ret[t] = rt;
                            run = new * mt + run * (one - mt);
                            mom.add(mt, rt);
                        }
                        // (the advantages are written by the whitening pass)
                        adv.fill(F::zero());
                    }
                    ReturnsEstimator::Remax => {
                        let b = p.baselines.as_ref().expect("validated").part::<F>(i, start, len, sv);
                        for t in (0..len).rev() {
                            acc += (r[t] * m[t]).f64();
                            let rt = F::of(acc);
                            ret[t] = rt;
                            adv[t] = rt - b[t] * m[t];
                        }
                    }
                })
            })
        };
    }
    mom
}
