//! `returns`: verl's estimators that scan each row from its last token to its
//! first: GAE, REINFORCE++ and ReMax. Each writes verl's two B×T outputs, the
//! advantages and the returns. The formulas below are computed in
//! `cpu/returns.rs` and, twinned, in `cuda/kernels/returns.cu`, with verl
//! 0.9.x semantics, in the compute type `F` (float64 when an input is
//! float64, else float32; verl computes 16-bit inputs in 16 bits at every
//! step, we in float32, rounding once).
//!
//! Per row, `t` from `T - 1` down to `0`, with `m = m_t` (any mask values,
//! as verl's arithmetic: observation tokens, `m = 0`, carry the state through):
//!
//! * `gae` (`gamma`, `lam`; state `nv = 0`, `g = 0`):
//!   `delta = r_t + gamma nv - v_t`, `g' = delta + (gamma lam) g`,
//!   `nv = v_t m + (1 - m) nv`, `g = g' m + (1 - m) g`, `adv_t = g`;
//!   returns `adv + v`, advantages `whiten(adv)`;
//! * `reinforce_plus_plus` (`gamma`; state `run = 0`):
//!   `new = r_t + gamma run`, `ret_t = new m`, `run = new m + run (1 - m)`;
//!   advantages `whiten(ret) m`;
//! * `remax` (per-row baselines `b_i`): `ret_t = sum_{s >= t} r_s m_s` (the
//!   products in `F`, the running sum in float64, as torch's CPU `cumsum`),
//!   advantages `ret - b m`.
//!
//! `whiten(x) = (x - mean) / sqrt(var + 1e-8)` is verl's `masked_whiten`:
//! `mean` and the unbiased `var` over the batch, weighted by `m`, with
//! `N = sum m`; verl divides by `N + 1e-8` and multiplies by `N / (N - 1)`,
//! both in float32 unless the mask is float64 (`ops::plus_eps`,
//! `ops::bessel`). verl raises for `N < 2`; here the advantages are then NaN
//! (see [`whiten_stats`]).

use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Mat, MatMut, Tensor};

/// Which scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReturnsEstimator {
    Gae { gamma: f64, lam: f64 },
    ReinforcePlusPlus { gamma: f64 },
    Remax,
}

impl ReturnsEstimator {
    /// verl's estimator names that this op computes.
    pub const NAMES: [&'static str; 3] = ["gae", "reinforce_plus_plus", "remax"];

    /// Parses verl's estimator name with its parameters.
    pub fn parse(name: &str, gamma: f64, lam: f64) -> Result<Self> {
        for (arg, v) in [("gamma", gamma), ("lam", lam)] {
            if !v.is_finite() {
                return Err(Error::value_error(arg, format!("must be finite, got {v}")));
            }
        }
        Ok(match name {
            "gae" => ReturnsEstimator::Gae { gamma, lam },
            "reinforce_plus_plus" => ReturnsEstimator::ReinforcePlusPlus { gamma },
            "remax" => ReturnsEstimator::Remax,
            _ => {
                return Err(Error::value_error(
                    "estimator",
                    format!("unknown scan estimator {name:?}; expected one of \"gae\", \"reinforce_plus_plus\", \"remax\""),
                ))
            }
        })
    }

    /// Whether the advantages are whitened over the batch.
    pub fn whitens(self) -> bool {
        !matches!(self, ReturnsEstimator::Remax)
    }
}

/// A validated scan call.
pub struct ReturnsProblem {
    pub rewards: Mat,
    /// `gae`: the critic's values, B×T.
    pub values: Option<Mat>,
    /// `remax`: one baseline per row, broadcast along it.
    pub baselines: Option<Mat>,
    pub mask: Mat,
    /// B×T, written by the call.
    pub advantages: MatMut,
    /// B×T, written by the call.
    pub returns: MatMut,
    pub estimator: ReturnsEstimator,
}

impl ReturnsProblem {
    /// Checks shapes, dtypes, devices and parameters; errors name the argument.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rewards: &Tensor,
        values: Option<&Tensor>,
        baselines: Option<&Tensor>,
        mask: &Tensor,
        advantages: &Tensor,
        returns: &Tensor,
        estimator: &str,
        gamma: f64,
        lam: f64,
    ) -> Result<Self> {
        let estimator = ReturnsEstimator::parse(estimator, gamma, lam)?;
        rewards.expect_float()?;
        let r = rewards.matrix()?;
        if r.rows == 0 {
            return Err(Error::value_error("token_level_rewards", "empty batch: the batch dimension is 0"));
        }
        if r.cols == 0 {
            return Err(Error::value_error("token_level_rewards", "empty responses: the response_length dimension is 0"));
        }
        mask.expect_shape(&[r.rows, r.cols], "token_level_rewards")?;
        let m = mask.matrix()?;
        let need = |t: Option<&Tensor>, arg: &'static str, what: &str| match t {
            Some(t) => Ok(t.clone()),
            None => Err(Error::value_error(arg, format!("the {what} estimator needs {arg}"))),
        };
        let mut others: Vec<Tensor> = vec![mask.clone(), advantages.clone(), returns.clone()];
        let values = match estimator {
            ReturnsEstimator::Gae { .. } => {
                let v = need(values, "values", "gae")?;
                v.expect_float()?;
                v.expect_shape(&[r.rows, r.cols], "token_level_rewards")?;
                others.push(v.clone());
                Some(v.matrix()?)
            }
            _ => None,
        };
        let baselines = match estimator {
            ReturnsEstimator::Remax => {
                let b = need(baselines, "reward_baselines", "remax")?;
                b.expect_float()?;
                if b.shape != [r.rows] {
                    return Err(Error::value_error(
                        "reward_baselines",
                        format!("expected one baseline per row, shape ({},), got {:?}", r.rows, b.shape),
                    ));
                }
                others.push(b.clone());
                Some(b.matrix_or_per_row(r.rows, r.cols)?)
            }
            _ => None,
        };
        let adv = MatMut::new(advantages, r.rows, r.cols, "token_level_rewards")?;
        let ret = MatMut::new(returns, r.rows, r.cols, "token_level_rewards")?;
        let refs: Vec<&Tensor> = others.iter().collect();
        same_device(rewards.device, &refs)?;
        Ok(ReturnsProblem { rewards: r, values, baselines, mask: m, advantages: adv, returns: ret, estimator })
    }

    /// Whether the scan computes in float64: an input is float64.
    pub fn f64_math(&self) -> bool {
        let f64_in = |m: &Option<Mat>| m.as_ref().is_some_and(|m| m.tensor.dtype == DType::F64);
        self.rewards.tensor.dtype == DType::F64
            || self.mask.tensor.dtype == DType::F64
            || f64_in(&self.values)
            || f64_in(&self.baselines)
    }

    /// The mask is float64 (verl's whitening epsilon and Bessel factor are
    /// then float64 too).
    pub fn mask_f64(&self) -> bool {
        self.mask.tensor.dtype == DType::F64
    }
}

/// The whitening statistics of a set of tokens, weighted by the mask `m`
/// over the tokens with `m != 0`: `n = sum m`, `mean = sum m x / n`,
/// `m2 = sum m (x - mean)^2` (all 0 for no token). Kept centred, not as raw
/// sums of `x` and `x^2`: GAE's raw advantages can sit far from 0 next to
/// their spread (a critic off by a constant), and `sum x^2 - n mean^2` then
/// cancels away most of the variance's digits (the fuzz found 1e-8 relative
/// errors in float64). Rows start from sums shifted by their first valid
/// value ([`Moments::shifted`]) and merge pairwise ([`Moments::merge`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// From sums about a shift `k`: `s = sum m (x - k)`, `q = sum m (x - k)^2`.
    #[inline]
    pub fn shifted(n: f64, k: f64, s: f64, q: f64) -> Self {
        if n == 0.0 {
            return Moments::default();
        }
        let d = s / n;
        Moments { n, mean: k + d, m2: q - s * d }
    }

    /// The statistics of both sets (Chan, Golub and LeVeque's pairwise update).
    #[inline]
    pub fn merge(self, o: Moments) -> Self {
        let n = self.n + o.n;
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 || n == 0.0 {
            return o;
        }
        let delta = o.mean - self.mean;
        let r = o.n / n;
        Moments { n, mean: self.mean + delta * r, m2: self.m2 + o.m2 + delta * delta * self.n * r }
    }
}

/// The batch statistics of verl's `masked_whiten` from the batch's
/// [`Moments`]: `(mean, 1 / sqrt(var + 1e-8))`, verl's `mean = sum m x / (N + 1e-8)`
/// (a hair off the true mean) and `var = sum m (x - mean)^2 / (N + 1e-8) * N / (N - 1)`,
/// the sum of squares about verl's mean being `m2 + N (true mean - mean)^2`.
/// With fewer than two valid tokens (`N` is 0 or 1) verl raises, since its
/// Bessel factor divides by `N - 1`; here both are NaN, so the advantages are
/// NaN on both devices (raising on CUDA would need a host sync).
pub fn whiten_stats(m: Moments, mask_is_f64: bool) -> (f64, f64) {
    let n = m.n;
    if n == 0.0 || n == 1.0 {
        return (f64::NAN, f64::NAN);
    }
    let denom = super::plus_eps(n, mask_is_f64);
    let mean = n * m.mean / denom;
    let d = m.mean - mean;
    let ss = m.m2 + n * d * d;
    let var = ss / denom * super::bessel(n, mask_is_f64);
    (mean, 1.0 / (var + 1e-8).sqrt())
}
