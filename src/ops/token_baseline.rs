//! `token_baseline`: verl's optimal token baseline estimators,
//! `optimal_token_baseline` (OTB) and `tir_optimal_token_baseline` (its
//! multi-turn form). Each writes verl's two B×T outputs, the advantages and
//! the returns. The formulas below are computed in `cpu/token_baseline.rs`
//! and, twinned, in `cuda/kernels/token_baseline.cu`, with verl 0.9.x
//! semantics.
//!
//! Per row `i`, with `m` the mask, `old` the old log-probabilities, `sp` the
//! sum of squared probabilities and `rho` the optional rollout IS weights:
//!
//! * returns `G_it = sum_{s >= t} r_is m_is` (torch's CPU `cumsum`: the
//!   products in the returns' dtype, the running sum in float64);
//! * `w_it = (1 - 2 exp(old_it) + sp_it) [* rho_it^2]`, and the cumulative
//!   path variance `W_it = sum_{s <= t} w_is m_is` (again a float64 running sum);
//! * `optimal_token_baseline`: per group `g` of `index` labels (empty rows
//!   included) and column `t`, `B_t = sum_g(G W m) / (sum_g(W m) + eps)`;
//!   singleton groups keep `B = 0`; the advantages are `(G - B) m`;
//! * `tir_optimal_token_baseline`: the same on the valid tokens only: the
//!   `k`-th valid token (`m != 0`) of every row of a group shares
//!   `B_k = sum_g(G W) / (sum_g W + eps)` over the rows that have a `k`-th
//!   one; rows with no valid token are left out of their group (their
//!   advantages are 0); the advantages are `(G - B) m` at valid tokens and
//!   `0 m` elsewhere. Ranks are those of the `m != 0` tokens whatever the
//!   mask's values (verl takes a row's length as `int(sum m)` and raises
//!   where that differs from the number of such tokens).
//!
//! `handle_zero_tail`: in a group of at least two rows, when exactly one row
//! has the largest length `L` (OTB: `int(sum m)`; TIR: the number of valid
//! tokens) and it exceeds the second largest `L2`, that row's baseline is 0
//! from position `L2` on (OTB: columns, with Python's slice rule for a
//! negative `L2`; TIR: valid-token ranks). verl raises for a non-finite mask
//! sum (`int(nan)`); here the tail is then left as is.
//!
//! Dtypes as torch gives them: the outputs have `promote(rewards, mask)`;
//! when an input is float64 every step is computed in float64 and rounded to
//! float32 wherever torch's intermediate tensor is float32 ([`Rounding`]), so
//! mixed float32/float64 inputs give verl's numbers (for the mixtures where
//! verl raises, "Index put requires the source and destination dtypes
//! match", the baselines are rounded to the dtype verl stores them in).
//! `exp(old)` is correctly rounded (computed in float64), where torch's
//! float32 `exp` is off by an ulp now and then. 16-bit inputs are
//! computed in float32 and rounded once (verl rounds at every step). The sums
//! over a group's rows are float64, in row order (torch's are float32 for
//! float32 inputs).

use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Mat, MatMut, Tensor};

/// Which token baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBaseline {
    /// `optimal_token_baseline`: positions are columns.
    Otb,
    /// `tir_optimal_token_baseline`: positions are valid-token ranks.
    Tir,
}

impl TokenBaseline {
    /// verl's estimator names that this op computes.
    pub const NAMES: [&'static str; 2] = ["optimal_token_baseline", "tir_optimal_token_baseline"];

    /// Parses verl's estimator name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "optimal_token_baseline" => Ok(TokenBaseline::Otb),
            "tir_optimal_token_baseline" => Ok(TokenBaseline::Tir),
            _ => Err(Error::value_error(
                "estimator",
                format!(
                    "unknown token baseline estimator {name:?}; expected \"optimal_token_baseline\" or \
                     \"tir_optimal_token_baseline\""
                ),
            )),
        }
    }
}

/// Which of torch's intermediate tensors are float32 when the op computes in
/// float64 (an input is float64): each such step is rounded to float32 after
/// it is computed in float64 (exactly torch's float32 result for `+ - * /`).
/// All false when the op computes in float32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rounding {
    /// `exp(old)`, `2 pi`, `1 - 2 pi` (the dtype of `old_log_probs`).
    pub pi: bool,
    /// `1 - 2 pi + sp`.
    pub wp: bool,
    /// `rho ** 2`.
    pub q: bool,
    /// `w` after the IS weights.
    pub w: bool,
    /// `w m` and its cumulative sum `W` (and, in TIR, the baselines).
    pub wc: bool,
    /// `r m`, the returns, the baselines as stored and the advantages.
    pub r: bool,
}

impl Rounding {
    /// Rounds `x` through float32 when `narrow`.
    #[inline(always)]
    pub fn rd(narrow: bool, x: f64) -> f64 {
        if narrow {
            x as f32 as f64
        } else {
            x
        }
    }
}

/// A validated token-baseline call.
pub struct TokenBaselineProblem {
    pub rewards: Mat,
    pub mask: Mat,
    pub old_log_probs: Mat,
    pub sum_pi_squared: Mat,
    pub rollout_is_weights: Option<Mat>,
    /// One integer label per row; equal labels form a group.
    pub index: Tensor,
    /// B×T, written by the call.
    pub advantages: MatMut,
    /// B×T, written by the call (and read back for the baselines).
    pub returns: MatMut,
    pub estimator: TokenBaseline,
    pub handle_zero_tail: bool,
    pub epsilon: f64,
}

impl TokenBaselineProblem {
    /// Checks shapes, dtypes, devices and parameters; errors name the argument.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rewards: &Tensor,
        mask: &Tensor,
        index: &Tensor,
        old_log_probs: &Tensor,
        sum_pi_squared: &Tensor,
        rollout_is_weights: Option<&Tensor>,
        advantages: &Tensor,
        returns: &Tensor,
        estimator: &str,
        handle_zero_tail: bool,
        epsilon: f64,
    ) -> Result<Self> {
        let estimator = TokenBaseline::parse(estimator)?;
        rewards.expect_float()?;
        let r = rewards.matrix()?;
        if r.rows == 0 {
            return Err(Error::value_error("token_level_rewards", "empty batch: the batch dimension is 0"));
        }
        if r.cols == 0 {
            return Err(Error::value_error("token_level_rewards", "empty responses: the response_length dimension is 0"));
        }
        let like = "token_level_rewards";
        mask.expect_shape(&[r.rows, r.cols], like)?;
        let mut inputs = vec![mask, index, old_log_probs, sum_pi_squared, advantages, returns];
        for t in [Some(old_log_probs), Some(sum_pi_squared), rollout_is_weights].into_iter().flatten() {
            t.expect_float()?;
            t.expect_shape(&[r.rows, r.cols], like)?;
        }
        if let Some(t) = rollout_is_weights {
            inputs.push(t);
        }
        if index.dtype.is_float() || index.dtype == DType::Bool {
            return Err(Error::type_error("index", format!("expected integer group labels, got {}", index.dtype.name())));
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
        let adv = MatMut::new(advantages, r.rows, r.cols, like)?;
        let ret = MatMut::new(returns, r.rows, r.cols, like)?;
        same_device(rewards.device, &inputs)?;
        Ok(TokenBaselineProblem {
            rewards: r,
            mask: mask.matrix()?,
            old_log_probs: old_log_probs.matrix()?,
            sum_pi_squared: sum_pi_squared.matrix()?,
            rollout_is_weights: rollout_is_weights.map(|t| t.matrix()).transpose()?,
            index: index.clone(),
            advantages: adv,
            returns: ret,
            estimator,
            handle_zero_tail,
            epsilon,
        })
    }

    /// Whether the op computes in float64: an input is float64.
    pub fn f64_math(&self) -> bool {
        let f64_in = |m: &Mat| m.tensor.dtype == DType::F64;
        [&self.rewards, &self.mask, &self.old_log_probs, &self.sum_pi_squared].into_iter().any(f64_in)
            || self.rollout_is_weights.as_ref().is_some_and(f64_in)
    }

    /// torch's float32 intermediates of a float64 computation (see [`Rounding`]).
    pub fn rounding(&self) -> Rounding {
        if !self.f64_math() {
            return Rounding::default();
        }
        let narrow = |m: &Mat| m.tensor.dtype != DType::F64;
        let pi = narrow(&self.old_log_probs);
        let wp = pi && narrow(&self.sum_pi_squared);
        let q = self.rollout_is_weights.as_ref().is_none_or(narrow);
        let w = wp && q;
        let wc = w && narrow(&self.mask);
        let r = narrow(&self.rewards) && narrow(&self.mask);
        Rounding { pi, wp, q, w, wc, r }
    }

    /// The dtype of verl's mask row sums is float only for float masks
    /// (bool and integer masks sum to int64, exact here).
    pub fn mask_sum_f32(&self) -> bool {
        matches!(self.mask.tensor.dtype, DType::F32 | DType::BF16 | DType::F16)
    }
}

/// The zero tail of one group: the row (a position in the group's member
/// list) whose baseline is 0 from position `start` on, if any. `lengths`
/// are the members' lengths (verl's `mask.sum(-1)`: OTB's may be
/// fractional, then truncated as Python's `int()` does), `cols` the number
/// of positions (Python's slice rule for a negative start).
pub fn zero_tail(lengths: &[f64], cols: usize) -> Option<(usize, usize)> {
    if lengths.len() < 2 || lengths.iter().any(|l| !l.is_finite()) {
        return None;
    }
    let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY); // largest, second largest
    for &l in lengths {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    let (max, second) = (a.trunc(), b.trunc());
    let mut hits = lengths.iter().enumerate().filter(|(_, &l)| l == max);
    let (row, _) = hits.next()?;
    if hits.next().is_some() || max <= second {
        return None;
    }
    let start = if second < 0.0 { (cols as f64 + second).max(0.0) } else { second.min(cols as f64) };
    Some((row, start as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_tail_needs_a_unique_longest_row() {
        assert_eq!(zero_tail(&[3.0, 5.0, 2.0], 8), Some((1, 3)));
        assert_eq!(zero_tail(&[5.0, 5.0, 2.0], 8), None);
        assert_eq!(zero_tail(&[4.0], 8), None);
        assert_eq!(zero_tail(&[4.0, 0.0], 8), Some((0, 0)));
        // int() truncation: 4.5 is not equal to int(4.5), so no row matches
        assert_eq!(zero_tail(&[4.5, 2.0], 8), None);
        assert_eq!(zero_tail(&[4.0, 2.7], 8), Some((0, 2)));
        // a negative second length starts the slice from the end, as Python's
        assert_eq!(zero_tail(&[4.0, -3.0], 8), Some((0, 5)));
        assert_eq!(zero_tail(&[4.0, f64::NAN], 8), None);
    }
}
