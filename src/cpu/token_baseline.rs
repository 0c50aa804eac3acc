//! The optimal token baselines on the CPU (twin of
//! `cuda/kernels/token_baseline.cu`; the formulas are in
//! `ops/token_baseline.rs`). Two passes, no B×T buffer besides the outputs:
//!
//! 1. rows in parallel: each row's returns (a reverse scan, float64 running
//!    sum) into `returns`, and its length;
//! 2. groups in parallel: a group's rows, in row order, walk their columns
//!    again, recomputing `W` on the way (a forward float64 running sum), and
//!    add `G W m` and `W m` into per-position float64 sums (two buffers of
//!    `T` per task); then the baselines, and a second walk of the group's
//!    rows writes the advantages. Each group's sums are taken in row order,
//!    so results do not depend on the thread count.
//!
//! A batch that is a single group runs its second pass on one thread.
//! `exp(old)` is computed in float64 and rounded: the correctly rounded
//! value, which torch's float32 `exp` misses by one ulp now and then (where
//! `1 - 2 pi + sp` cancels, for `pi` near 1, that ulp is all of `w`).

use super::{fold_rows, for_each_row};
use crate::error::{try_zeros, Error, Result};
use crate::ops::advantage::dense_groups;
pub use crate::ops::token_baseline::{TokenBaseline, TokenBaselineProblem};
use crate::ops::token_baseline::{zero_tail, Rounding};
use crate::tensor::{piece_scratch, pieces, Mat, Real, PIECE};

/// Computes the advantages and returns into `p.advantages` and `p.returns`;
/// a `MemoryError` if a working buffer cannot be allocated.
pub fn compute(p: &TokenBaselineProblem) -> Result<()> {
    if p.f64_math() {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

/// `x` rounded through float32 when `narrow` (see [`Rounding`]).
#[inline(always)]
fn rd<F: Real>(narrow: bool, x: F) -> F {
    if narrow {
        F::of(Rounding::rd(true, x.f64()))
    } else {
        x
    }
}

/// The pieces of a row, last first.
fn pieces_rev(cols: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = cols.div_ceil(PIECE);
    (0..n).rev().map(move |k| (k * PIECE, PIECE.min(cols - k * PIECE)))
}

/// The rows of each group, in row order (`members[offsets[g]..offsets[g + 1]]`).
struct Groups {
    offsets: Vec<usize>,
    members: Vec<u32>,
}

fn groups(p: &TokenBaselineProblem, keep: impl Fn(usize) -> bool) -> Result<Groups> {
    let (gid, n) = dense_groups(&p.index)?;
    let rows = gid.len();
    let mut offsets = try_zeros::<usize>("index", n + 1)?;
    for (i, &g) in gid.iter().enumerate() {
        if keep(i) {
            offsets[g as usize + 1] += 1;
        }
    }
    for g in 0..n {
        offsets[g + 1] += offsets[g];
    }
    let mut fill = offsets.clone();
    let mut members = try_zeros::<u32>("index", offsets[n])?;
    for (i, &g) in gid.iter().enumerate().take(rows) {
        if keep(i) {
            members[fill[g as usize]] = i as u32;
            fill[g as usize] += 1;
        }
    }
    Ok(Groups { offsets, members })
}

fn run<F: Real>(p: &TokenBaselineProblem) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let arg = p.rewards.tensor.arg;
    let rn = p.rounding();
    let tir = p.estimator == TokenBaseline::Tir;
    let mask_f32 = p.mask_sum_f32();

    // 1. returns and lengths, rows in parallel
    let mut lengths = Vec::new();
    lengths.try_reserve_exact(rows).map_err(|_| Error::memory(arg, format!("cannot allocate lengths for {rows} rows")))?;
    let scratch = || -> Result<_> {
        let v = || piece_scratch::<F>(arg, cols);
        Ok((v()?, v()?, v()?))
    };
    fold_rows(
        arg,
        rows,
        cols,
        scratch,
        |(sr, sm, st), i| {
            let (mut acc, mut len) = (0.0f64, 0.0f64);
            for (start, n) in pieces_rev(cols) {
                let r = p.rewards.part::<F>(i, start, n, sr);
                let m = p.mask.part::<F>(i, start, n, sm);
                // SAFETY: row i is written by this task only.
                unsafe {
                    p.returns.with_part(i, start, n, st, |ret| {
                        for t in (0..n).rev() {
                            acc += rd(rn.r, r[t] * m[t]).f64();
                            ret[t] = rd(rn.r, F::of(acc));
                            len += if tir { (m[t] != F::zero()) as u8 as f64 } else { m[t].f64() };
                        }
                    })
                };
            }
            if tir && len == 0.0 {
                // left out of its group: advantages 0 m
                for (start, n) in pieces(cols) {
                    let m = p.mask.part::<F>(i, start, n, sm);
                    // SAFETY: row i is written by this task only.
                    unsafe { p.advantages.with_part(i, start, n, st, |adv| adv.iter_mut().zip(m).for_each(|(a, &m)| *a = F::zero() * m)) };
                }
            }
            if !tir && mask_f32 {
                len = len as f32 as f64; // (torch's float32 row sum)
            }
            len
        },
        |l| lengths.push(l),
    )?;

    // 2. the baselines and the advantages, groups in parallel
    let g = groups(p, |i| !tir || lengths[i] > 0.0)?;
    let returns: Mat = p.returns.tensor.matrix()?;
    let n_groups = g.offsets.len() - 1;
    let init = || -> Result<_> {
        let v = || piece_scratch::<F>(arg, cols);
        Ok((try_zeros::<f64>(arg, cols)?, try_zeros::<f64>(arg, cols)?, [v()?, v()?, v()?, v()?, v()?, v()?]))
    };
    // (each group's rows are written by its task only; a group has a row at least)
    for_each_row(n_groups, cols, init, |(num, den, sc), k| {
        let rows = &g.members[g.offsets[k]..g.offsets[k + 1]];
        group::<F>(p, &returns, rows, &lengths, rn, num, den, sc);
    })
}

/// One group: the per-position sums over its rows, the baselines, and the
/// advantages of its rows.
#[allow(clippy::too_many_arguments)]
fn group<F: Real>(
    p: &TokenBaselineProblem,
    returns: &Mat,
    rows: &[u32],
    lengths: &[f64],
    rn: Rounding,
    num: &mut [f64],
    den: &mut [f64],
    sc: &mut [Vec<F>; 6],
) {
    let cols = p.rewards.cols;
    let tir = p.estimator == TokenBaseline::Tir;
    let many = rows.len() > 1;
    // positions in use: TIR's ranks go up to the longest row's length
    let used = if tir { rows.iter().map(|&i| lengths[i as usize] as usize).max().unwrap_or(0) } else { cols };
    // the baselines' dtype: TIR's are W's, OTB's the promotion of every input
    let nb = if tir { rn.wc } else { false };
    if many {
        num[..used].fill(0.0);
        den[..used].fill(0.0);
        for &i in rows {
            let i = i as usize;
            let (mut acc, mut k) = (0.0f64, 0usize);
            for (start, n) in pieces(cols) {
                let [so, ss, sq, sm, sg, _] = sc;
                let old = p.old_log_probs.part::<F>(i, start, n, so);
                let sp = p.sum_pi_squared.part::<F>(i, start, n, ss);
                let rho = p.rollout_is_weights.as_ref().map(|w| w.part::<F>(i, start, n, sq));
                let m = p.mask.part::<F>(i, start, n, sm);
                let g = returns.part::<F>(i, start, n, sg);
                let (one, two) = (F::one(), F::of(2.0));
                for t in 0..n {
                    let pi = rd(rn.pi, F::of(old[t].f64().exp()));
                    let mut w = rd(rn.wp, rd(rn.pi, one - rd(rn.pi, two * pi)) + sp[t]);
                    if let Some(rho) = rho {
                        w = rd(rn.w, w * rd(rn.q, rho[t] * rho[t]));
                    }
                    acc += rd(rn.wc, w * m[t]).f64();
                    let big_w = rd(rn.wc, F::of(acc));
                    if tir {
                        if m[t] != F::zero() {
                            num[k] += rd(rn.wc, rd(rn.wc, g[t]) * big_w).f64();
                            den[k] += big_w.f64();
                            k += 1;
                        }
                    } else {
                        let c = start + t;
                        num[c] += (g[t] * big_w * m[t]).f64();
                        den[c] += rd(rn.wc, big_w * m[t]).f64();
                    }
                }
            }
        }
        // num becomes the baselines
        let eps = rd(rn.wc, F::of(p.epsilon));
        for (b, &d) in num[..used].iter_mut().zip(den.iter()) {
            let d = rd(rn.wc, rd(rn.wc, F::of(d)) + eps);
            *b = rd(nb, rd(nb, F::of(*b)) / d).f64();
        }
    }
    let lens: Vec<f64> = if p.handle_zero_tail && many { rows.iter().map(|&i| lengths[i as usize]).collect() } else { Vec::new() };
    let tail = zero_tail(&lens, if tir { used } else { cols });
    for (pos, &i) in rows.iter().enumerate() {
        let i = i as usize;
        let from = match tail {
            Some((row, start)) if row == pos => start,
            _ => usize::MAX,
        };
        let baseline = |k: usize| if many && k < from { F::of(num[k]) } else { F::zero() };
        let mut k = 0usize;
        for (start, n) in pieces(cols) {
            let [_, _, _, sm, sg, sa] = sc;
            let m = p.mask.part::<F>(i, start, n, sm);
            let g = returns.part::<F>(i, start, n, sg);
            // SAFETY: row i belongs to this group only, written by this task only.
            unsafe {
                p.advantages.with_part(i, start, n, sa, |adv| {
                    for t in 0..n {
                        adv[t] = if tir {
                            if m[t] != F::zero() {
                                let a = rd(rn.wc, rd(rn.wc, g[t]) - baseline(k));
                                k += 1;
                                rd(rn.r, rd(rn.r, a) * m[t])
                            } else {
                                F::zero() * m[t]
                            }
                        } else {
                            rd(rn.r, rd(rn.r, g[t] - rd(rn.r, baseline(start + t))) * m[t])
                        };
                    }
                })
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn call(est: &str, r: &[f32], m: &[f32], idx: &[i64], old: &[f32], sp: &[f32], b: usize, t: usize, tail: bool) -> (Vec<f32>, Vec<f32>) {
        let (mut adv, mut ret) = (vec![0f32; b * t], vec![0f32; b * t]);
        let s = [b, t];
        let p = TokenBaselineProblem::new(
            &Tensor::from_slice("token_level_rewards", r, &s),
            &Tensor::from_slice("response_mask", m, &s),
            &Tensor::from_slice("index", idx, &[b]),
            &Tensor::from_slice("old_log_probs", old, &s),
            &Tensor::from_slice("sum_pi_squared", sp, &s),
            None,
            &Tensor::from_mut_slice("advantages", &mut adv, &s),
            &Tensor::from_mut_slice("returns", &mut ret, &s),
            est,
            tail,
            1e-8,
        )
        .unwrap();
        compute(&p).unwrap();
        (adv, ret)
    }

    #[test]
    fn otb_two_rows_by_hand() {
        // old = ln(1/2), sp = 1/2: w = 1 - 1 + 1/2 = 1/2 per valid token
        let old = vec![(0.5f32).ln(); 6];
        let sp = vec![0.5f32; 6];
        let r = [0.0, 0.0, 1.0, 0.0, 0.0, 3.0];
        let m = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let (adv, ret) = call("optimal_token_baseline", &r, &m, &[7, 7], &old, &sp, 2, 3, false);
        assert_eq!(ret, vec![1.0, 1.0, 1.0, 3.0, 3.0, 3.0]);
        // equal W in both rows: B_t = mean of the returns = 2
        for (a, want) in adv.iter().zip([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]) {
            assert!((a - want).abs() < 1e-6, "{adv:?}");
        }
        // singletons keep their returns
        let (adv, _) = call("optimal_token_baseline", &r, &m, &[1, 2], &old, &sp, 2, 3, true);
        assert_eq!(adv, vec![1.0, 1.0, 1.0, 3.0, 3.0, 3.0]);
    }

    #[test]
    fn tir_ranks_skip_holes_and_empty_rows() {
        let old = vec![(0.5f32).ln(); 9];
        let sp = vec![0.5f32; 9];
        let r = [0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 5.0, 5.0, 5.0];
        // row 0: tokens at 0 and 2; row 1: at 1 and 2; row 2: none
        let m = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        let (adv, _) = call("tir_optimal_token_baseline", &r, &m, &[4, 4, 4], &old, &sp, 3, 3, true);
        // both rows: W = 1/2, 1 at their two tokens; G = 1, 1 and 3, 3: B = 2
        let want = [-1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        for (a, w) in adv.iter().zip(want) {
            assert!((a - w).abs() < 1e-6, "{adv:?}");
        }
    }
}
