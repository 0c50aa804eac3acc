//! The group advantage estimators on the CPU (twin of
//! `cuda/kernels/advantage.cu`; the formulas are in `ops/advantage.rs`):
//! one pass over `token_level_rewards` (and the mask where the estimator
//! needs lengths) for the scores, per-group statistics in f64 in row order,
//! one pass writing the B×T advantages. `gdpo` given per-key scores reads
//! them instead of the rewards.

use super::{fold_rows, for_each_row, Sum8};
use crate::error::{try_zeros, Error, Result};
pub use crate::ops::advantage::{dense_groups, AdvantageProblem, Estimator, KeyScores};
use crate::ops::{bessel, plus_eps};
use crate::tensor::{piece_scratch, pieces, DType, MatMut, Real};

/// Per-row statistics of the score pass.
#[derive(Clone, Copy, Default)]
struct RowScore {
    score: f64,
    /// `sum m`, `sum m^2`, `sum m^3` over positions with `m != 0` (only
    /// when the estimator needs them; all equal `L_i` for 0/1 masks).
    m1: f64,
    m2: f64,
    m3: f64,
}

/// Computes the advantages into `p.out`; a `MemoryError` if its working
/// buffers (per-thread pieces of rows, and a few numbers per row) cannot be
/// allocated.
pub fn compute(p: &AdvantageProblem) -> Result<()> {
    if p.rewards.tensor.dtype == DType::F64 || p.out.tensor.dtype == DType::F64 {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

fn run<F: Real>(p: &AdvantageProblem) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let need_mask = p.estimator.needs_mask_stats();
    // gdpo with per-key scores never reads the rewards (verl: only their device)
    let need_score = p.keys.is_none();
    let mut stats = Vec::new();
    stats
        .try_reserve_exact(rows)
        .map_err(|_| Error::memory("token_level_rewards", format!("cannot allocate statistics for {rows} rows")))?;
    let scratch = || -> Result<_> {
        let sm = if need_mask { piece_scratch::<f64>(p.mask.tensor.arg, cols)? } else { Vec::new() };
        Ok((piece_scratch::<F>(p.rewards.tensor.arg, cols)?, sm))
    };
    fold_rows(
        p.rewards.tensor.arg,
        rows,
        cols,
        scratch,
        |(sr, sm), i| {
            let mut score = Sum8::default();
            let mut st = RowScore::default();
            for (start, len) in pieces(cols) {
                if need_score {
                    score.add(p.rewards.part(i, start, len, sr));
                }
                if need_mask {
                    for &m in p.mask.part::<f64>(i, start, len, sm).iter() {
                        if m != 0.0 {
                            st.m1 += m;
                            st.m2 += m * m;
                            st.m3 += m * m * m;
                        }
                    }
                }
            }
            st.score = score.total();
            st
        },
        |st| stats.push(st),
    )?;
    let (gid, n_groups) = dense_groups(&p.index)?;
    let scalars = row_scalars(p, &stats, &gid, n_groups)?;

    // Whitening of reinforce_plus_plus_baseline: v_it = a_i m_it, statistics
    // over all tokens weighted by m (verl's masked_mean / masked_var).
    // (and of gdpo, whose c_i takes the place of a_i)
    let whiten = p.estimator.whitens().then(|| {
        let mask_f64 = p.mask.tensor.dtype == DType::F64;
        let n: f64 = stats.iter().map(|s| s.m1).sum();
        // verl's masked_mean divides by `mask.sum() + 1e-8`, float32 unless the mask is float64.
        let denom = plus_eps(n, mask_f64);
        let sum_v: f64 = stats.iter().zip(&scalars).map(|(s, &a)| a * s.m2).sum();
        let mean = sum_v / denom;
        // sum m (a m - mean)^2 = a^2 m3 - 2 a mean m2 + mean^2 m1
        let ss: f64 = stats
            .iter()
            .zip(&scalars)
            .map(|(s, &a)| a * a * s.m3 - 2.0 * a * mean * s.m2 + mean * mean * s.m1)
            .sum();
        let var = ss / denom * bessel(n, mask_f64);
        (mean, 1.0 / (var + 1e-8).sqrt())
    });

    let scratch = || -> Result<_> {
        let v = |arg| piece_scratch::<F>(arg, cols);
        Ok((v(p.mask.tensor.arg)?, v(p.out.tensor.arg)?, v(p.out.tensor.arg)?))
    };
    for_each_row(rows, cols, scratch, |(sm, so, sw), i| {
        let a = F::of(scalars[i]);
        for (start, len) in pieces(cols) {
            let so = &mut so[..len];
            // (an int64 mask converts eight at a time in AVX2: `Mat::part`)
            let m = p.mask.part::<F>(i, start, len, sm);
            match whiten {
                None => {
                    for (o, &m) in so.iter_mut().zip(m) {
                        *o = a * m;
                    }
                }
                Some((mean, rstd)) => {
                    let (mean, rstd) = (F::of(mean), F::of(rstd));
                    for (o, &m) in so.iter_mut().zip(m) {
                        *o = (a * m - mean) * rstd * m;
                    }
                }
            }
            // SAFETY: row i is written by this task only.
            unsafe { store_run(&p.out, i, start, so, sw) };
        }
    })?;
    fence();
    Ok(())
}

/// Writes a computed run of row `i`, from column `start`, into the output. A
/// contiguous, 16-byte aligned float32 run is written with non-temporal
/// stores: the B×T output is never
/// read back by this kernel, so streaming it past the caches saves the
/// read-for-ownership of every output line (a quarter of the traffic).
///
/// # Safety
/// No other task may write row `i`.
#[inline]
unsafe fn store_run<F: Real>(out: &MatMut, i: usize, start: usize, row: &[F], scratch: &mut [F]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        let d = &out.tensor;
        if F::DTYPE == DType::F32 && d.dtype == DType::F32 && (d.strides[1] == 1 || out.cols == 1) {
            let dst = d.ptr.wrapping_offset((i as isize * d.strides[0] + start as isize) * 4) as *mut f32;
            if (dst as usize) % 16 == 0 {
                let src = row.as_ptr() as *const f32;
                let n = row.len();
                let mut t = 0;
                while t + 4 <= n {
                    _mm_stream_ps(dst.add(t), _mm_loadu_ps(src.add(t)));
                    t += 4;
                }
                for k in t..n {
                    *dst.add(k) = *src.add(k);
                }
                return;
            }
        }
    }
    out.with_part(i, start, row.len(), scratch, |o| o.copy_from_slice(row));
}

/// Orders the non-temporal stores of every rayon worker before the caller
/// reads the output.
fn fence() {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: sfence has no preconditions (SSE is baseline on x86_64).
        if super::pool::inline() {
            // SAFETY: as below; this thread made every store
            unsafe { std::arch::x86_64::_mm_sfence() };
        } else {
            rayon::broadcast(|_| unsafe { std::arch::x86_64::_mm_sfence() });
        }
    }
}

/// GPG's `alpha = B / max(#{s_i != 0}, 1)` as verl computes it: `bsz /
/// m.clamp(min=1)` with an int64 tensor `m` is torch's float32
/// `reciprocal(m) * bsz`, whatever the rewards' dtype.
fn gpg_alpha(rows: usize, nonzero: usize) -> f64 {
    ((1.0f32 / nonzero.max(1) as f32) * rows as f32) as f64
}

/// Per-row scalar `a_i` (before the broadcast over tokens), from the scores
/// and group statistics accumulated in row order in f64.
fn row_scalars(p: &AdvantageProblem, stats: &[RowScore], gid: &[u32], n_groups: usize) -> Result<Vec<f64>> {
    let n = stats.len();
    let zeros = |k| try_zeros::<f64>("index", k);
    let mut count = try_zeros::<u32>("index", n_groups)?;
    let mut sum = zeros(n_groups)?;
    for (s, &g) in stats.iter().zip(gid) {
        count[g as usize] += 1;
        sum[g as usize] += s.score;
    }
    let scores = || -> Result<Vec<f64>> {
        let mut v = zeros(n)?;
        for (o, s) in v.iter_mut().zip(stats) {
            *o = s.score;
        }
        Ok(v)
    };
    match p.estimator {
        Estimator::Grpo { norm_by_std } | Estimator::Gdpo { norm_by_std } => {
            let Some(keys) = &p.keys else {
                return grpo_scalars(&scores()?, gid, &count, norm_by_std, p.epsilon);
            };
            // gdpo: c_i = sum_k w_k a_ik, in key order (verl's `new_advantage +=`)
            let mut c = zeros(n)?;
            let mut s = zeros(n)?;
            let mut row = piece_scratch::<f64>(keys.scores.tensor.arg, keys.scores.cols)?;
            for (k, &w) in keys.host_weights().iter().enumerate() {
                for (i, o) in s.iter_mut().enumerate() {
                    *o = keys.scores.part::<f64>(i, k, 1, &mut row)[0];
                }
                for (o, a) in c.iter_mut().zip(grpo_scalars(&s, gid, &count, norm_by_std, p.epsilon)?) {
                    *o += w * a;
                }
            }
            return Ok(c);
        }
        Estimator::GrpoPassk { norm_by_std } => {
            return passk_scalars(&scores()?, gid, &count, norm_by_std, p.epsilon);
        }
        _ => {}
    }
    let mut mean = zeros(n_groups)?;
    for ((m, &s), &c) in mean.iter_mut().zip(&sum).zip(&count) {
        *m = if c > 1 { s / c as f64 } else { 0.0 };
    }
    // OPO's length-weighted group mean sum_g(L s) / sum_g(L)
    let mut div = zeros(if p.estimator == Estimator::Opo { n_groups } else { 0 })?;
    if p.estimator == Estimator::Opo {
        let mut l = zeros(n_groups)?;
        for (s, &g) in stats.iter().zip(gid) {
            div[g as usize] += s.m1 * s.score;
            l[g as usize] += s.m1;
        }
        for (d, &l) in div.iter_mut().zip(&l) {
            *d /= l;
        }
    }
    let alpha = match p.estimator {
        Estimator::Gpg => gpg_alpha(n, stats.iter().filter(|s| s.score != 0.0).count()),
        _ => 0.0,
    };
    let mut out = zeros(n)?;
    for (i, o) in out.iter_mut().enumerate() {
        let (s, g) = (stats[i].score, gid[i] as usize);
        let c = count[g] as f64;
        *o = match p.estimator {
            Estimator::ReinforcePlusPlusBaseline => s - mean[g],
            Estimator::Rloo if c > 1.0 => s * c / (c - 1.0) - mean[g] * c / (c - 1.0),
            Estimator::Rloo => s,
            Estimator::RlooVectorized if c > 1.0 => (c * s - sum[g]) / (c - 1.0),
            Estimator::RlooVectorized => 0.0,
            Estimator::Opo if c > 1.0 => s - div[g],
            Estimator::Opo => s,
            Estimator::Gpg => alpha * (s - mean[g]) / p.f_norm,
            // (their scalars are returned above)
            Estimator::Grpo { .. } | Estimator::Gdpo { .. } | Estimator::GrpoPassk { .. } => unreachable!(),
        };
    }
    Ok(out)
}

/// verl's GRPO scalar of each row for the scores `s` (in row order), groups
/// `gid` of `count` rows: `(s_i - mu_g) / (sd_g + eps)` (unbiased `sd_g`),
/// or `s_i - mu_g` without std normalisation; a singleton gets verl's mean 0
/// and std 1, i.e. `s_i / f32(1 + eps)` (verl's `tensor(1.0)` is float32, so
/// `std + eps` is rounded to float32 whatever the scores' dtype) or `s_i`.
/// Every sum runs in row order.
fn grpo_scalars(s: &[f64], gid: &[u32], count: &[u32], norm_by_std: bool, epsilon: f64) -> Result<Vec<f64>> {
    let n_groups = count.len();
    let mut mean = try_zeros::<f64>("index", n_groups)?;
    for (&x, &g) in s.iter().zip(gid) {
        mean[g as usize] += x;
    }
    for (m, &c) in mean.iter_mut().zip(count) {
        *m = if c > 1 { *m / c as f64 } else { 0.0 };
    }
    let mut div = try_zeros::<f64>("index", if norm_by_std { n_groups } else { 0 })?;
    if norm_by_std {
        for (&x, &g) in s.iter().zip(gid) {
            let d = x - mean[g as usize];
            div[g as usize] += d * d;
        }
        let single = (1.0f32 + epsilon as f32) as f64;
        for (d, &c) in div.iter_mut().zip(count) {
            *d = if c > 1 { (*d / (c - 1) as f64).sqrt() + epsilon } else { single };
        }
    }
    let mut out = try_zeros::<f64>("index", s.len())?;
    for ((o, &x), &g) in out.iter_mut().zip(s).zip(gid) {
        let g = g as usize;
        *o = if norm_by_std { (x - mean[g]) / div[g] } else { x - mean[g] };
    }
    Ok(out)
}

/// torch's `topk` order: NaN above every number.
#[inline]
fn topk_greater(x: f64, y: f64) -> bool {
    (x.is_nan() && !y.is_nan()) || x > y
}

/// verl's Pass@k scalars for the scores `s`: in each group (of at least 2
/// rows, else a `ValueError` naming `index`, as verl raises) the best row --
/// the first in row order of the tied maxima, NaN the largest -- gets
/// `(s_(1) - s_(2)) / (sd_g + eps)` (or `s_(1) - s_(2)`), the rest 0. Scan
/// in row order, as `advantage_groups` in the CUDA twin.
fn passk_scalars(s: &[f64], gid: &[u32], count: &[u32], norm_by_std: bool, epsilon: f64) -> Result<Vec<f64>> {
    if let Some(i) = gid.iter().position(|&g| count[g as usize] < 2) {
        return Err(Error::value_error(
            "index",
            format!(
                "grpo_passk (Pass@k) needs at least 2 responses per group, as verl requires; \
                 the group of row {i} has {}",
                count[gid[i] as usize]
            ),
        ));
    }
    let n_groups = count.len();
    let zeros = |k| try_zeros::<f64>("index", k);
    let (mut best, mut second, mut sum) = (zeros(n_groups)?, zeros(n_groups)?, zeros(n_groups)?);
    let mut best_row = try_zeros::<u32>("index", n_groups)?;
    let mut seen = try_zeros::<u32>("index", n_groups)?;
    for (i, (&x, &g)) in s.iter().zip(gid).enumerate() {
        let g = g as usize;
        sum[g] += x;
        if seen[g] == 0 || topk_greater(x, best[g]) {
            if seen[g] > 0 {
                second[g] = best[g];
            }
            best[g] = x;
            best_row[g] = i as u32;
        } else if seen[g] == 1 || topk_greater(x, second[g]) {
            second[g] = x;
        }
        seen[g] += 1;
    }
    let mut value = zeros(n_groups)?;
    for (g, v) in value.iter_mut().enumerate() {
        *v = best[g] - second[g];
    }
    if norm_by_std {
        let mut ss = zeros(n_groups)?;
        for (&x, &g) in s.iter().zip(gid) {
            let d = x - sum[g as usize] / count[g as usize] as f64;
            ss[g as usize] += d * d;
        }
        for (g, v) in value.iter_mut().enumerate() {
            *v /= (ss[g] / (count[g] - 1) as f64).sqrt() + epsilon;
        }
    }
    let mut out = zeros(s.len())?;
    for (g, &i) in best_row.iter().enumerate() {
        out[i as usize] = value[g];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn run_est(est: &str, norm: bool, r: &[f64], m: &[f64], idx: &[i64], cols: usize) -> Vec<f64> {
        let rows = idx.len();
        let mut out = vec![0.0f64; rows * cols];
        let rd = Tensor::from_slice("token_level_rewards", r, &[rows, cols]);
        let md = Tensor::from_slice("response_mask", m, &[rows, cols]);
        let id = Tensor::from_slice("index", idx, &[rows]);
        let od = Tensor::from_mut_slice("out", &mut out, &[rows, cols]);
        let p = AdvantageProblem::new(&rd, &md, &id, &od, est, norm, 1e-6, 1.0, None).unwrap();
        compute(&p).unwrap();
        out
    }

    #[test]
    fn grpo_normalises_within_groups_and_singletons_keep_score() {
        // rows 0,1 in group 7 (scores 1, 3); row 2 alone (score 2).
        let r = [1.0, 0.0, 2.0, 1.0, 2.0, 0.0];
        let m = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        let out = run_est("grpo", true, &r, &m, &[7, 7, 9], 2);
        let sd = 2.0f64.sqrt();
        let single = (1.0f32 + 1e-6f32) as f64;
        let want = [-1.0 / (sd + 1e-6), -1.0 / (sd + 1e-6), 1.0 / (sd + 1e-6), 0.0, 2.0 / single, 2.0 / single];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{out:?}");
        }
        let out = run_est("grpo", false, &r, &m, &[7, 7, 9], 2);
        assert_eq!(out, vec![-1.0, -1.0, 1.0, 0.0, 2.0, 2.0]);
    }

    #[test]
    fn rloo_and_opo_and_gpg() {
        let r = [1.0, 0.0, 3.0, 0.0, 5.0, 0.0];
        let m = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        // RLOO: n=3 mean 3 -> 1.5*(s-3)
        assert_eq!(run_est("rloo", true, &r, &m, &[1, 1, 1], 2), vec![-3.0, 0.0, 0.0, 0.0, 3.0, 3.0]);
        // OPO: lengths 1,2,2 -> baseline (1+6+10)/5 = 3.4
        let o = run_est("opo", true, &r, &m, &[1, 1, 1], 2);
        assert!((o[0] + 2.4).abs() < 1e-12 && (o[4] - 1.6).abs() < 1e-12 && o[1] == 0.0);
        // GPG: all scores non-zero -> alpha 1 -> s - mean
        assert_eq!(run_est("gpg", true, &r, &m, &[1, 1, 1], 2), vec![-2.0, 0.0, 0.0, 0.0, 2.0, 2.0]);
    }

    #[test]
    fn rfpp_baseline_output_is_whitened() {
        let r = [1.0, 0.0, 3.0, 0.0, 5.0, 0.0, 2.0, 0.0];
        let m = [1.0; 8];
        let o = run_est("reinforce_plus_plus_baseline", true, &r, &m, &[1, 1, 1, 2], 2);
        let mean: f64 = o.iter().sum::<f64>() / 8.0;
        assert!(mean.abs() < 1e-9);
        let var: f64 = o.iter().map(|v| v * v).sum::<f64>() / 7.0;
        assert!((var - 1.0).abs() < 1e-6, "{var}");
    }

    #[test]
    fn rfpp_whitening_counts_in_float32_unless_the_mask_is_f64() {
        // N = 7 valid tokens: verl's Bessel factor 7/6 rounds in float32 and its
        // `7 + 1e-8` is 7 there, for a float32 mask; a float64 mask keeps both.
        let r = [0.3, 1.7, -2.2, 0.9, 4.1, -0.6, 2.5];
        let idx = [1i64, 1, 2, 2, 2, 3, 3];
        let est = "reinforce_plus_plus_baseline";
        let out64 = run_est(est, true, &r, &[1.0f64; 7], &idx, 1);
        let m32 = [1.0f32; 7];
        let mut out32 = vec![0.0f64; 7];
        let rd = Tensor::from_slice("token_level_rewards", &r, &[7, 1]);
        let md = Tensor::from_slice("response_mask", &m32, &[7, 1]);
        let id = Tensor::from_slice("index", &idx, &[7]);
        let od = Tensor::from_mut_slice("out", &mut out32, &[7, 1]);
        compute(&AdvantageProblem::new(&rd, &md, &id, &od, est, true, 1e-6, 1.0, None).unwrap()).unwrap();
        let mut a = [0.0f64; 7];
        for g in [1, 2, 3] {
            let rows: Vec<usize> = (0..7).filter(|&i| idx[i] == g).collect();
            let mu = rows.iter().map(|&i| r[i]).sum::<f64>() / rows.len() as f64;
            for &i in &rows {
                a[i] = r[i] - mu;
            }
        }
        let want = |eps: f64, bessel: f64| -> Vec<f64> {
            let mean = a.iter().sum::<f64>() / (7.0 + eps);
            let ss: f64 = a.iter().map(|x| (x - mean) * (x - mean)).sum();
            let rstd = 1.0 / (ss / (7.0 + eps) * bessel + 1e-8).sqrt();
            a.iter().map(|x| (x - mean) * rstd).collect()
        };
        let (w32, w64) = (want(0.0, (7.0f32 / 6.0f32) as f64), want(1e-8, 7.0 / 6.0));
        for i in 0..7 {
            assert!((out32[i] - w32[i]).abs() < 1e-12, "{out32:?} vs {w32:?}");
            assert!((out64[i] - w64[i]).abs() < 1e-12, "{out64:?} vs {w64:?}");
        }
        assert!(out32.iter().zip(&out64).any(|(x, y)| (x - y).abs() > 1e-9));
    }

    #[test]
    fn passk_rewards_only_the_first_best_row_of_each_group() {
        // group 1: scores 1, 3, 3, 2 (tied best: the first, row 1); group 2: 5, -1.
        let r = [1.0, 3.0, 5.0, 3.0, 2.0, -1.0];
        let m = [1.0; 6];
        let idx = [1i64, 1, 2, 1, 1, 2];
        assert_eq!(run_est("grpo_passk", false, &r, &m, &idx, 1), vec![0.0, 0.0, 6.0, 0.0, 0.0, 0.0]);
        let out = run_est("grpo_passk", true, &r, &m, &idx, 1);
        let sd2 = 18.0f64.sqrt(); // group 2: unbiased std of (5, -1)
        assert_eq!(out, vec![0.0, 0.0, 6.0 / (sd2 + 1e-6), 0.0, 0.0, 0.0]);
        // a NaN score is the largest
        let r = [1.0, f64::NAN, 2.0, 0.5];
        let out = run_est("grpo_passk", false, &r, &[1.0; 4], &[0, 0, 1, 1], 1);
        assert!(out[0] == 0.0 && out[1].is_nan() && out[2] == 1.5 && out[3] == 0.0, "{out:?}");
    }

    #[test]
    fn passk_refuses_a_group_of_one_row() {
        let (r, m) = ([1.0f64, 2.0, 3.0], [1.0f64; 3]);
        let mut out = [0.0f64; 3];
        let rd = Tensor::from_slice("token_level_rewards", &r, &[3, 1]);
        let md = Tensor::from_slice("response_mask", &m, &[3, 1]);
        let idx = [4i64, 4, 9];
        let id = Tensor::from_slice("index", &idx, &[3]);
        let od = Tensor::from_mut_slice("out", &mut out, &[3, 1]);
        let p = AdvantageProblem::new(&rd, &md, &id, &od, "grpo_passk", true, 1e-6, 1.0, None).unwrap();
        let e = compute(&p).err().unwrap();
        assert_eq!(e.arg, "index");
    }

    #[test]
    fn gdpo_sums_the_weighted_per_key_grpo_then_whitens() {
        // two keys; the rewards are not read (NaN here)
        let r = [f64::NAN; 4];
        let m = [1.0f64; 4];
        let keys = [1.0f64, 0.0, 3.0, 1.0, 2.0, 5.0, 0.0, 2.0]; // (4, 2) row-major
        let w = [1.0f64, -0.5];
        let idx = [0i64, 0, 1, 1];
        let mut out = [0.0f64; 4];
        let rd = Tensor::from_slice("token_level_rewards", &r, &[4, 1]);
        let md = Tensor::from_slice("response_mask", &m, &[4, 1]);
        let id = Tensor::from_slice("index", &idx, &[4]);
        let sd = Tensor::from_slice("scores", &keys, &[4, 2]);
        let wd = Tensor::from_slice("weights", &w, &[2]);
        let od = Tensor::from_mut_slice("out", &mut out, &[4, 1]);
        let p = AdvantageProblem::new(&rd, &md, &id, &od, "gdpo", false, 1e-6, 1.0, Some((&sd, &wd))).unwrap();
        compute(&p).unwrap();
        // Dr.GRPO per key: key 0 (1,3 | 2,0) -> (-1, 1 | 1, -1); key 1 (0,1 | 5,2) -> (-.5, .5 | 1.5, -1.5)
        let c = [-1.0 + 0.25, 1.0 - 0.25, 1.0 - 0.75, -1.0 + 0.75];
        // (a float64 mask: verl's N + 1e-8 and N / (N - 1) in float64)
        let mean = c.iter().sum::<f64>() / (4.0 + 1e-8);
        let var = c.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (4.0 + 1e-8) * (4.0 / 3.0);
        for (o, x) in out.iter().zip(c) {
            assert!((o - (x - mean) / (var + 1e-8).sqrt()).abs() < 1e-12, "{out:?}");
        }
        // per-key scores are gdpo's only
        let e = AdvantageProblem::new(&rd, &md, &id, &od, "grpo", false, 1e-6, 1.0, Some((&sd, &wd)));
        assert_eq!(e.err().unwrap().arg, "scores");
        let w3 = [1.0f64; 3];
        let wd3 = Tensor::from_slice("weights", &w3, &[3]);
        let e = AdvantageProblem::new(&rd, &md, &id, &od, "gdpo", false, 1e-6, 1.0, Some((&sd, &wd3)));
        assert_eq!(e.err().unwrap().arg, "weights");
    }

    #[test]
    fn bad_input_names_the_argument() {
        let r = [0.0f32; 4];
        let m = [1u8; 4];
        let mut out = [0.0f32; 4];
        let rd = Tensor::from_slice("token_level_rewards", &r, &[2, 2]);
        let md = Tensor::from_slice("response_mask", &m, &[2, 2]);
        let od = Tensor::from_mut_slice("out", &mut out, &[2, 2]);
        let bad = [0i64; 3];
        let e = AdvantageProblem::new(&rd, &md, &Tensor::from_slice("index", &bad, &[3]), &od, "grpo", true, 1e-6, 1.0, None);
        assert_eq!(e.err().unwrap().arg, "index");
        let idx = [0i64; 2];
        let id = Tensor::from_slice("index", &idx, &[2]);
        let e = AdvantageProblem::new(&rd, &md, &id, &od, "ppo", true, 1e-6, 1.0, None);
        assert_eq!(e.err().unwrap().arg, "estimator");
        let md3 = Tensor::from_slice("response_mask", &m[..2], &[1, 2]);
        let e = AdvantageProblem::new(&rd, &md3, &id, &od, "grpo", true, 1e-6, 1.0, None);
        assert_eq!(e.err().unwrap().arg, "response_mask");
        let empty: [f32; 0] = [];
        let ed = Tensor::from_slice("token_level_rewards", &empty, &[0, 2]);
        let e = AdvantageProblem::new(&ed, &md, &id, &od, "grpo", true, 1e-6, 1.0, None);
        assert_eq!(e.err().unwrap().arg, "token_level_rewards");
    }
}
