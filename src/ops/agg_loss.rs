//! `agg_loss`: verl's `loss_agg_mode`s, the global-batch normalisers, and
//! the aggregation resolved to a per-row coefficient ([`AggPlan`]) that both
//! backends apply (and the policy loss, which aggregates the same way).

use super::plus_eps;
use crate::error::{Error, Result};
use crate::tensor::{same_device, Mat, MatMut, Tensor};

/// verl's `loss_agg_mode`: how a B×T loss matrix becomes a scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggMode {
    /// `sum(l*m) / batch_num_tokens * dp_size` (default `batch_num_tokens = sum(m)`).
    TokenMean,
    /// `sum(l*m) * dp_size`.
    TokenSum,
    /// `sum_i [L_i>0] sum_t l*m / global_batch_size * dp_size`
    /// (default `global_batch_size` = number of rows with `L_i > 0`).
    SeqMeanTokenSum,
    /// `sum_i [L_i>0] (sum_t l*m)/(L_i + 1e-8) / global_batch_size * dp_size`.
    SeqMeanTokenMean,
    /// `SeqMeanTokenSum / loss_scale_factor` (default `loss_scale_factor = T`).
    SeqMeanTokenSumNorm,
}

impl AggMode {
    /// Parses verl's spelling of a `loss_agg_mode`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "token-mean" => Ok(AggMode::TokenMean),
            "token-sum" => Ok(AggMode::TokenSum),
            "seq-mean-token-sum" => Ok(AggMode::SeqMeanTokenSum),
            "seq-mean-token-mean" => Ok(AggMode::SeqMeanTokenMean),
            "seq-mean-token-sum-norm" => Ok(AggMode::SeqMeanTokenSumNorm),
            _ => Err(Error::value_error(
                "loss_agg_mode",
                format!(
                    "unknown loss_agg_mode {s:?}; expected one of \"token-mean\", \"token-sum\", \
                     \"seq-mean-token-sum\", \"seq-mean-token-mean\", \"seq-mean-token-sum-norm\""
                ),
            )),
        }
    }

    /// verl's spelling.
    pub fn name(self) -> &'static str {
        match self {
            AggMode::TokenMean => "token-mean",
            AggMode::TokenSum => "token-sum",
            AggMode::SeqMeanTokenSum => "seq-mean-token-sum",
            AggMode::SeqMeanTokenMean => "seq-mean-token-mean",
            AggMode::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }

    /// The normalisers this aggregation divides by (`dp_size` always
    /// multiplies; the others are ignored, as verl ignores them).
    pub fn divisors(self) -> &'static [&'static str] {
        match self {
            AggMode::TokenMean => &["batch_num_tokens"],
            AggMode::TokenSum => &[],
            AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenMean => &["global_batch_size"],
            AggMode::SeqMeanTokenSumNorm => &["global_batch_size", "loss_scale_factor"],
        }
    }

    /// Sequence modes sum `l * m` over the whole row with a plain product (as
    /// verl's `torch.sum(loss_mat * loss_mask, -1)` does), so a NaN at a
    /// masked position still poisons its row; token modes use verl's
    /// `masked_sum`, which drops masked positions first.
    pub fn is_seq_mode(self) -> bool {
        !matches!(self, AggMode::TokenMean | AggMode::TokenSum)
    }
}

/// verl's `global_batch_info`: normalisers that make the loss invariant to
/// how the global batch is split over data-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizers {
    pub dp_size: f64,
    pub batch_num_tokens: Option<f64>,
    pub global_batch_size: Option<f64>,
    pub loss_scale_factor: Option<f64>,
    /// A multiplier of the loss and the gradient on the CPU: the value of
    /// the `factor` argument (backward's `grad_output` when a float16
    /// gradient is recomputed). CUDA reads `factor` on the device instead,
    /// and this stays 1 there.
    pub factor: f64,
}

impl Default for Normalizers {
    fn default() -> Self {
        Normalizers { dp_size: 1.0, batch_num_tokens: None, global_batch_size: None, loss_scale_factor: None, factor: 1.0 }
    }
}

impl Normalizers {
    /// Checks values and, as verl does, refuses `dp_size > 1` without the
    /// global count the chosen aggregation divides by.
    pub fn validate(&self, agg: AggMode) -> Result<()> {
        if !(self.dp_size.is_finite() && self.dp_size >= 1.0) {
            return Err(Error::value_error("dp_size", format!("must be >= 1, got {}", self.dp_size)));
        }
        for (arg, v) in [
            ("batch_num_tokens", self.batch_num_tokens),
            ("global_batch_size", self.global_batch_size),
            ("loss_scale_factor", self.loss_scale_factor),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::value_error(arg, format!("must be a finite number > 0, got {v}")));
                }
            }
        }
        if self.dp_size > 1.0 {
            match agg {
                AggMode::TokenMean if self.batch_num_tokens.is_none() => {
                    return Err(Error::value_error(
                        "batch_num_tokens",
                        "the global token count is required for token-mean when dp_size > 1",
                    ))
                }
                AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenMean | AggMode::SeqMeanTokenSumNorm
                    if self.global_batch_size.is_none() =>
                {
                    return Err(Error::value_error(
                        "global_batch_size",
                        "the global sequence count is required for seq-mean-* modes when dp_size > 1",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether [`AggPlan::new`] needs the batch's own mask totals, i.e. a
    /// normaliser that verl would derive from the local mask is missing.
    pub fn needs_mask_totals(&self, agg: AggMode) -> bool {
        match agg {
            AggMode::TokenMean => self.batch_num_tokens.is_none(),
            AggMode::TokenSum => false,
            _ => self.global_batch_size.is_none(),
        }
    }
}

/// Totals of the local mask: `tokens = sum(m)`, `rows = #{i : L_i > 0}`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MaskTotals {
    pub tokens: f64,
    pub rows: f64,
}

/// A validated `agg_loss` call.
pub struct AggProblem {
    pub loss_mat: Mat,
    pub loss_mask: Mat,
    /// `d loss / d loss_mat`, written by the call.
    pub grad: MatMut,
    pub agg: AggMode,
    pub norm: Normalizers,
}

impl AggProblem {
    /// Checks shapes, dtypes, devices, mode and normalisers.
    pub fn new(loss_mat: &Tensor, loss_mask: &Tensor, grad: &Tensor, loss_agg_mode: &str, norm: Normalizers) -> Result<Self> {
        let agg = AggMode::parse(loss_agg_mode)?;
        norm.validate(agg)?;
        loss_mat.expect_float()?;
        let m = loss_mat.matrix()?;
        if m.rows == 0 || m.cols == 0 {
            return Err(crate::error::Error::value_error(
                "loss_mat",
                format!("empty loss matrix of shape {:?}", loss_mat.shape),
            ));
        }
        loss_mask.expect_shape(&[m.rows, m.cols], "loss_mat")?;
        let mask = loss_mask.matrix()?;
        let g = MatMut::new(grad, m.rows, m.cols, "loss_mat")?;
        same_device(loss_mat.device, &[loss_mask, grad])?;
        Ok(AggProblem { loss_mat: m, loss_mask: mask, grad: g, agg, norm })
    }
}

/// The aggregation resolved to numbers: the loss is
/// `sum_i coef(L_i) * sum_t m_it * l_it` (rows with `L_i = 0` dropped in
/// sequence modes), so `d loss / d l_it = coef(L_i) * m_it`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggPlan {
    pub mode: AggMode,
    /// The factor every row shares (`dp / N`, `dp`, `dp / G`, `dp / G / lsf`).
    scale: f64,
    /// Whether the mask is float64 (see [`plus_eps`]).
    mask_is_f64: bool,
}

impl AggPlan {
    /// Resolves the normalisers; `totals` must be given when
    /// [`Normalizers::needs_mask_totals`] says so, `cols` is `T`.
    pub fn new(mode: AggMode, norm: &Normalizers, totals: Option<MaskTotals>, cols: usize, mask_is_f64: bool) -> Self {
        let t = totals.unwrap_or_default();
        let scale = match mode {
            AggMode::TokenMean => norm.dp_size / norm.batch_num_tokens.unwrap_or(t.tokens),
            AggMode::TokenSum => norm.dp_size,
            AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenMean => {
                norm.dp_size / norm.global_batch_size.unwrap_or(t.rows)
            }
            AggMode::SeqMeanTokenSumNorm => {
                norm.dp_size / norm.global_batch_size.unwrap_or(t.rows) / norm.loss_scale_factor.unwrap_or(cols as f64)
            }
        };
        AggPlan { mode, scale: scale * norm.factor, mask_is_f64 }
    }

    /// The per-row factor before the shared scale: 1, or `1 / (L_i + 1e-8)`
    /// for `seq-mean-token-mean`, and 0 for empty rows in sequence modes.
    #[inline]
    fn row_weight(&self, row_tokens: f64) -> f64 {
        match self.mode {
            AggMode::TokenMean | AggMode::TokenSum => 1.0,
            // (a NaN mask sum counts as empty: verl's `sum(m) > 0` is false)
            _ if !(row_tokens > 0.0) => 0.0,
            AggMode::SeqMeanTokenMean => 1.0 / plus_eps(row_tokens, self.mask_is_f64),
            _ => 1.0,
        }
    }

    /// `coef(L_i)`: the weight of `m_it * l_it` in the loss for a row whose
    /// mask sums to `row_tokens`, hence the gradient factor of its tokens.
    #[inline]
    pub fn row_coef(&self, row_tokens: f64) -> f64 {
        let w = self.row_weight(row_tokens);
        if w == 0.0 {
            0.0
        } else {
            self.scale * w
        }
    }

    /// A row's share of the loss before the shared scale, given `sum_t m*l`
    /// and `L_i`: sequence modes drop empty rows even when their sum is NaN
    /// (verl's `masked_sum` over the sequence mask).
    #[inline]
    pub fn row_contribution(&self, row_sum: f64, row_tokens: f64) -> f64 {
        if self.mode.is_seq_mode() && !(row_tokens > 0.0) {
            0.0
        } else {
            self.row_weight(row_tokens) * row_sum
        }
    }

    /// The loss from the sum of [`AggPlan::row_contribution`]s, in row
    /// order. Applying the shared scale last keeps verl's `0 / 0 = NaN` when
    /// every row is empty and the count was taken from the mask.
    #[inline]
    pub fn finish(&self, total: f64) -> f64 {
        total * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_and_rejects_unknown() {
        for s in ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] {
            AggMode::parse(s).unwrap();
        }
        assert_eq!(AggMode::parse("mean").unwrap_err().arg, "loss_agg_mode");
    }

    #[test]
    fn normalisers_required_with_dp() {
        let n = Normalizers { dp_size: 2.0, ..Default::default() };
        assert_eq!(n.validate(AggMode::TokenMean).unwrap_err().arg, "batch_num_tokens");
        assert_eq!(n.validate(AggMode::SeqMeanTokenMean).unwrap_err().arg, "global_batch_size");
        assert!(n.validate(AggMode::TokenSum).is_ok());
    }

    #[test]
    fn row_coefficients() {
        let n = Normalizers::default();
        let t = Some(MaskTotals { tokens: 10.0, rows: 4.0 });
        assert_eq!(AggPlan::new(AggMode::TokenMean, &n, t, 8, false).row_coef(3.0), 0.1);
        assert_eq!(AggPlan::new(AggMode::SeqMeanTokenSum, &n, t, 8, false).row_coef(3.0), 0.25);
        assert_eq!(AggPlan::new(AggMode::SeqMeanTokenSum, &n, t, 8, false).row_coef(0.0), 0.0);
        assert_eq!(AggPlan::new(AggMode::SeqMeanTokenSumNorm, &n, t, 8, false).row_coef(3.0), 0.25 / 8.0);
        let p = AggPlan::new(AggMode::SeqMeanTokenMean, &n, t, 8, false);
        assert_eq!(p.row_coef(2.0), 0.125);
        let p64 = AggPlan::new(AggMode::SeqMeanTokenMean, &n, t, 8, true);
        assert_eq!(p64.row_coef(2.0), 0.25 / (2.0 + 1e-8));
        assert_eq!(p.row_contribution(f64::NAN, 0.0), 0.0);
    }
}
