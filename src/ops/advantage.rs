//! `advantage`: verl's outcome advantage estimators (parsed names), the
//! validated problem, and the dense group ids of the rows. The formulas
//! below are computed in `cpu/advantage.rs` and, twinned, in
//! `cuda/kernels/advantage.cu`, with verl 0.9.x semantics.
//!
//! With `s_i = sum_t r_it` (all positions, as verl) and `g(i)` the group of
//! row `i` (`n_g` rows, mean `mu_g`, unbiased std `sd_g`), the per-row scalar
//! `a_i` is, for groups of `n_g > 1` (singletons in brackets):
//!
//! * `grpo` / `grpo_vectorized`: `(s_i - mu_g) / (sd_g + eps)` [`s_i / f32(1 + eps)`];
//!   without std normalisation (Dr.GRPO) `s_i - mu_g` [`s_i`];
//! * `rloo`: `n_g / (n_g - 1) * (s_i - mu_g)` [`s_i`]; `rloo_vectorized`: the same [`0`];
//! * `opo`: `s_i - sum_g(L s) / sum_g(L)` with `L_i = sum_t m_it` [`s_i`];
//! * `gpg`: `alpha * (s_i - mu_g) / f_norm`, `alpha = B / max(#{s_i != 0}, 1)` (in float32, as verl) [`alpha s_i / f_norm`];
//! * `reinforce_plus_plus_baseline`: `v_it = (s_i - mu_g) m_it` [`s_i m_it`], then
//!   verl's `masked_whiten` over the whole batch:
//!   `(v - mean) / sqrt(var + 1e-8) * m` with `mean`, unbiased `var` over `m`;
//!   with `N = sum m`, verl divides by `N + 1e-8` and multiplies by the Bessel
//!   factor `N / (N - 1)`, both computed in float32 unless the mask is float64
//!   (torch's dtype of `mask.sum()`, see `ops::plus_eps` and `ops::bessel`);
//! * `grpo_passk` (Pass@k): in each group only its best row `i*` gets
//!   `(s_(1) - s_(2)) / (sd_g + eps)` (without std normalisation
//!   `s_(1) - s_(2)`), the two largest scores of the group; every other row
//!   gets 0. NaN counts as the largest score (torch's `topk`), and of tied
//!   maxima the first in row order is `i*` (see [`Estimator::GrpoPassk`]).
//!   Groups of one row are an error (verl's `ValueError`);
//! * `gdpo`: `c_i = sum_k w_k a_ik`, `a_ik` the `grpo` scalar (std
//!   normalisation as asked, singletons `s_ik / f32(1 + eps)`) of key `k`'s
//!   scores `s_ik` ([`KeyScores`]; without them one key, `s_i`, weight 1),
//!   then `c_i m_it` whitened and masked as `reinforce_plus_plus_baseline`.
//!
//! Every other estimator writes `a_i * m_it`.

use crate::error::{try_zeros, Error, Result};
use crate::tensor::{same_device, DType, Mat, MatMut, Tensor};
use std::collections::HashMap;

/// Which estimator; `grpo_vectorized` is `Grpo` (same numbers in verl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimator {
    /// GRPO; `norm_by_std = false` is Dr.GRPO.
    Grpo { norm_by_std: bool },
    Rloo,
    /// RLOO as verl's vectorised version: singletons get 0, not their score.
    RlooVectorized,
    ReinforcePlusPlusBaseline,
    Opo,
    Gpg,
    /// verl's `grpo_passk`. The best row of a group is torch's `topk(., 2)`
    /// index 0 on verl's side; where the maximum is tied, torch's CPU `topk`
    /// picks the first tied row in groups of up to 3 rows and an
    /// implementation-defined one beyond (its selection algorithm is not
    /// stable); we always pick the first. The difference is visible only
    /// where the best row's value is NaN (a tie gives `0 / (sd + eps)`,
    /// which is 0 unless `eps = 0` and the whole group is equal).
    GrpoPassk { norm_by_std: bool },
    /// verl's `gdpo`: per-key GRPO, weighted sum, batch whitening.
    Gdpo { norm_by_std: bool },
}

impl Estimator {
    /// Parses verl's estimator name.
    pub fn parse(name: &str, norm_adv_by_std_in_grpo: bool) -> Result<Self> {
        Ok(match name {
            "grpo" | "grpo_vectorized" => Estimator::Grpo { norm_by_std: norm_adv_by_std_in_grpo },
            "rloo" => Estimator::Rloo,
            "rloo_vectorized" => Estimator::RlooVectorized,
            "reinforce_plus_plus_baseline" => Estimator::ReinforcePlusPlusBaseline,
            "opo" => Estimator::Opo,
            "gpg" => Estimator::Gpg,
            "grpo_passk" => Estimator::GrpoPassk { norm_by_std: norm_adv_by_std_in_grpo },
            "gdpo" => Estimator::Gdpo { norm_by_std: norm_adv_by_std_in_grpo },
            _ => {
                return Err(Error::value_error(
                    "estimator",
                    format!(
                        "unknown advantage estimator {name:?}; expected one of \"grpo\", \"grpo_vectorized\", \
                         \"rloo\", \"rloo_vectorized\", \"reinforce_plus_plus_baseline\", \"opo\", \"gpg\", \
                         \"grpo_passk\", \"gdpo\" (with index), or \"gae\", \"reinforce_plus_plus\", \"remax\", \
                         \"optimal_token_baseline\", \"tir_optimal_token_baseline\""
                    ),
                ))
            }
        })
    }

    /// Whether the score pass also needs per-row mask sums.
    pub fn needs_mask_stats(self) -> bool {
        matches!(self, Estimator::Opo | Estimator::ReinforcePlusPlusBaseline | Estimator::Gdpo { .. })
    }

    /// Whether the output is `c_i m_it` whitened over the batch (verl's `masked_whiten`).
    pub fn whitens(self) -> bool {
        matches!(self, Estimator::ReinforcePlusPlusBaseline | Estimator::Gdpo { .. })
    }
}

/// `gdpo`'s per-key scores: `scores` is `(rows, K)`, column `k` the score of
/// every row under reward key `k` (verl's `non_tensor_batch[key]`, float32
/// there), and `weights` a contiguous float64 `(K,)` vector on the same
/// device (verl's float32 `gdpo_reward_weights`, widened).
pub struct KeyScores {
    pub scores: Mat,
    pub weights: Tensor,
}

impl KeyScores {
    /// The weights, on the CPU.
    pub fn host_weights(&self) -> &[f64] {
        debug_assert!(self.weights.device == crate::tensor::Device::Cpu);
        // SAFETY: validated in `AdvantageProblem::new`: a contiguous float64
        // vector of `scores.cols` elements, alive for the call.
        unsafe { std::slice::from_raw_parts(self.weights.ptr as *const f64, self.scores.cols) }
    }
}

/// A validated advantage call.
pub struct AdvantageProblem {
    pub rewards: Mat,
    pub mask: Mat,
    /// One integer label per row; equal labels form a group.
    pub index: Tensor,
    /// B×T advantages (also verl's returns), written by the call.
    pub out: MatMut,
    pub estimator: Estimator,
    pub epsilon: f64,
    pub f_norm: f64,
    /// `gdpo` only: per-key scores in place of the rewards' row sums.
    pub keys: Option<KeyScores>,
}

impl AdvantageProblem {
    /// Checks shapes, dtypes, devices and parameters; errors name the argument.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rewards: &Tensor,
        mask: &Tensor,
        index: &Tensor,
        out: &Tensor,
        estimator: &str,
        norm_adv_by_std_in_grpo: bool,
        epsilon: f64,
        f_norm: f64,
        keys: Option<(&Tensor, &Tensor)>,
    ) -> Result<Self> {
        let estimator = Estimator::parse(estimator, norm_adv_by_std_in_grpo)?;
        rewards.expect_float()?;
        let r = rewards.matrix()?;
        if r.rows == 0 {
            return Err(Error::value_error("token_level_rewards", "empty batch: the batch dimension is 0"));
        }
        if r.cols == 0 {
            return Err(Error::value_error(
                "token_level_rewards",
                "empty responses: the response_length dimension is 0",
            ));
        }
        mask.expect_shape(&[r.rows, r.cols], "token_level_rewards")?;
        let m = mask.matrix()?;
        if index.dtype.is_float() || index.dtype == DType::Bool {
            return Err(Error::type_error(
                "index",
                format!("expected integer group labels, got {}", index.dtype.name()),
            ));
        }
        if index.shape != [r.rows] {
            return Err(Error::value_error(
                "index",
                format!("expected one label per row, shape ({},), got {:?}", r.rows, index.shape),
            ));
        }
        if !epsilon.is_finite() {
            return Err(Error::value_error("epsilon", format!("must be finite, got {epsilon}")));
        }
        if !(f_norm.is_finite() && f_norm != 0.0) {
            return Err(Error::value_error("f_norm", format!("must be finite and non-zero, got {f_norm}")));
        }
        let o = MatMut::new(out, r.rows, r.cols, "token_level_rewards")?;
        same_device(rewards.device, &[mask, index, out])?;
        let keys = match keys {
            None => None,
            Some((scores, weights)) => Some(KeyScores::new(scores, weights, r.rows, rewards, estimator)?),
        };
        Ok(AdvantageProblem { rewards: r, mask: m, index: index.clone(), out: o, estimator, epsilon, f_norm, keys })
    }
}

impl KeyScores {
    fn new(scores: &Tensor, weights: &Tensor, rows: usize, rewards: &Tensor, estimator: Estimator) -> Result<Self> {
        if !matches!(estimator, Estimator::Gdpo { .. }) {
            return Err(Error::value_error("scores", "per-key scores are read by the gdpo estimator only"));
        }
        scores.expect_float()?;
        let s = scores.matrix()?;
        if s.rows != rows || s.cols == 0 {
            return Err(Error::value_error(
                "scores",
                format!("expected (batch, keys) = ({rows}, K >= 1) per-key scores, got shape {:?}", scores.shape),
            ));
        }
        if weights.dtype != DType::F64 || weights.shape != [s.cols] || !weights.is_contiguous() {
            return Err(Error::value_error(
                "weights",
                format!(
                    "expected a contiguous float64 tensor of shape ({},), one weight per key, got {} {:?}",
                    s.cols,
                    weights.dtype.name(),
                    weights.shape
                ),
            ));
        }
        same_device(rewards.device, &[scores, weights])?;
        Ok(KeyScores { scores: s, weights: weights.clone() })
    }
}

/// Dense group ids `0..G` in order of first appearance, and `G`; a
/// `MemoryError` if the ids cannot be allocated.
pub fn dense_groups(index: &Tensor) -> Result<(Vec<u32>, usize)> {
    let n = index.shape[0];
    let stride = index.strides[0];
    let size = index.dtype.size() as isize;
    let read = |i: usize| -> i64 {
        let p = index.ptr.wrapping_offset(i as isize * stride * size);
        // SAFETY: i < n, the view is validated as an integer vector of length n.
        unsafe {
            match index.dtype {
                DType::I64 => *(p as *const i64),
                DType::I32 => *(p as *const i32) as i64,
                DType::I16 => *(p as *const i16) as i64,
                DType::I8 => *(p as *const i8) as i64,
                DType::U8 | DType::Bool => *p as i64,
                _ => unreachable!("index is validated to be an integer vector"),
            }
        }
    };
    let oom = |_| Error::memory("index", format!("cannot allocate group ids for {n} rows"));
    let mut ids = Vec::new();
    ids.try_reserve_exact(n).map_err(oom)?;
    // Labels that already are small non-negative ints take a table, not a hash.
    let (lo, hi) = (0..n).map(read).fold((i64::MAX, i64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo >= 0 && hi < (4 * n as i64).max(1024) {
        let mut table = try_zeros::<u32>("index", hi as usize + 1)?;
        table.fill(u32::MAX);
        let mut g = 0u32;
        for i in 0..n {
            let slot = &mut table[read(i) as usize];
            if *slot == u32::MAX {
                *slot = g;
                g += 1;
            }
            ids.push(*slot);
        }
        return Ok((ids, g as usize));
    }
    let mut map: HashMap<i64, u32> = HashMap::new();
    map.try_reserve(n).map_err(oom)?;
    for i in 0..n {
        let next = map.len() as u32;
        ids.push(*map.entry(read(i)).or_insert(next));
    }
    let g = map.len();
    Ok((ids, g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn dense_groups_first_appearance_order() {
        let idx = [10i64, -5, 10, 99_999_999, -5];
        let (g, n) = dense_groups(&Tensor::from_slice("index", &idx, &[5])).unwrap();
        assert_eq!((g, n), (vec![0, 1, 0, 2, 1], 3));
        let idx = [3i32, 0, 3];
        let (g, n) = dense_groups(&Tensor::from_slice("index", &idx, &[3])).unwrap();
        assert_eq!((g, n), (vec![0, 1, 0], 2));
    }
}
