//! What a call asks for — loss mode, aggregation, clip parameters and the
//! global-batch normalisers — parsed and validated once, shared by every
//! backend.

use crate::error::{Error, Result};

/// The policy-loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// PPO/GRPO token-level clipped surrogate with dual clip where `A < 0`
    /// (verl `compute_policy_loss_vanilla`).
    Vanilla,
    /// GSPO: sequence-level ratio with the token-level stop-gradient
    /// construction (verl `compute_policy_loss_gspo`).
    Gspo,
    /// LUSPO: GSPO's per-token loss aggregated `seq-mean-token-sum`, whatever
    /// `loss_agg_mode` says, so each sequence is weighted by its length.
    Luspo,
}

impl LossMode {
    /// Parses `"vanilla"`, `"gspo"` or `"luspo"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "vanilla" => Ok(LossMode::Vanilla),
            "gspo" => Ok(LossMode::Gspo),
            "luspo" => Ok(LossMode::Luspo),
            _ => Err(Error::value_error(
                "mode",
                format!("unknown policy loss mode {s:?}; expected one of \"vanilla\", \"gspo\", \"luspo\""),
            )),
        }
    }

    /// The aggregation this mode really uses: LUSPO forces `seq-mean-token-sum`.
    pub fn effective_agg(self, requested: AggMode) -> AggMode {
        match self {
            LossMode::Luspo => AggMode::SeqMeanTokenSum,
            _ => requested,
        }
    }
}

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

    /// Sequence modes sum `l * m` over the whole row with a plain product (as
    /// verl's `torch.sum(loss_mat * loss_mask, -1)` does), so a NaN at a
    /// masked position still poisons its row; token modes use verl's
    /// `masked_sum`, which drops masked positions first.
    pub fn is_seq_mode(self) -> bool {
        !matches!(self, AggMode::TokenMean | AggMode::TokenSum)
    }
}

/// Clip parameters of the surrogate, already resolved and validated:
/// the ratio is clipped to `[1 - low, 1 + high]`; `c` is the dual-clip bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    pub low: f64,
    pub high: f64,
    pub c: f64,
    /// torch's clamp convention for a value exactly on a bound: torch 2.11
    /// passes the gradient there (closed interval), 2.15 does not. The
    /// Python layer measures the installed torch once and says which.
    pub clamp_closed: bool,
}

impl Clip {
    /// `clip_ratio_low`/`clip_ratio_high` default to `clip_ratio` as in verl;
    /// the clamp convention starts open (set `clamp_closed` after).
    /// All must be finite and non-negative; `clip_ratio_c` must be `> 1`
    /// (verl asserts it for the dual clip) — only checked when `check_c`.
    pub fn new(clip_ratio: f64, low: Option<f64>, high: Option<f64>, c: f64, check_c: bool) -> Result<Self> {
        fn ratio(arg: &'static str, v: f64) -> Result<f64> {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(Error::value_error(arg, format!("must be a finite number >= 0, got {v}")))
            }
        }
        let base = ratio("clip_ratio", clip_ratio)?;
        let low = ratio("clip_ratio_low", low.unwrap_or(base))?;
        let high = ratio("clip_ratio_high", high.unwrap_or(base))?;
        if check_c && !(c.is_finite() && c > 1.0) {
            return Err(Error::value_error(
                "clip_ratio_c",
                format!("the dual-clip bound must be a finite number > 1.0, got {c}"),
            ));
        }
        Ok(Clip { low, high, c, clamp_closed: false })
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
}

impl Default for Normalizers {
    fn default() -> Self {
        Normalizers { dp_size: 1.0, batch_num_tokens: None, global_batch_size: None, loss_scale_factor: None }
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

/// `sum + 1e-8` as verl computes it: torch adds the epsilon in the mask's
/// float type, which is float32 (the default dtype) for bool and integer
/// masks, so only a float64 mask keeps the epsilon of a large count.
#[inline]
pub fn plus_eps(sum: f64, mask_is_f64: bool) -> f64 {
    if mask_is_f64 {
        sum + 1e-8
    } else {
        ((sum as f32) + 1e-8f32) as f64
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
        AggPlan { mode, scale, mask_is_f64 }
    }

    /// The per-row factor before the shared scale: 1, or `1 / (L_i + 1e-8)`
    /// for `seq-mean-token-mean`, and 0 for empty rows in sequence modes.
    #[inline]
    fn row_weight(&self, row_tokens: f64) -> f64 {
        match self.mode {
            AggMode::TokenMean | AggMode::TokenSum => 1.0,
            _ if row_tokens <= 0.0 => 0.0,
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
        if self.mode.is_seq_mode() && row_tokens <= 0.0 {
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
        assert_eq!(LossMode::parse("luspo").unwrap(), LossMode::Luspo);
        assert_eq!(LossMode::parse("gspo").unwrap(), LossMode::Gspo);
        assert_eq!(LossMode::parse("vanilla").unwrap(), LossMode::Vanilla);
        let e = LossMode::parse("ppo").unwrap_err();
        assert_eq!(e.arg, "mode");
        for s in ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] {
            AggMode::parse(s).unwrap();
        }
        assert_eq!(AggMode::parse("mean").unwrap_err().arg, "loss_agg_mode");
    }

    #[test]
    fn clip_defaults_and_validation() {
        let c = Clip::new(0.2, None, Some(0.28), 3.0, true).unwrap();
        assert_eq!((c.low, c.high), (0.2, 0.28));
        assert_eq!(Clip::new(-0.1, None, None, 3.0, true).unwrap_err().arg, "clip_ratio");
        assert_eq!(Clip::new(0.2, Some(f64::NAN), None, 3.0, true).unwrap_err().arg, "clip_ratio_low");
        assert_eq!(Clip::new(0.2, None, None, 1.0, true).unwrap_err().arg, "clip_ratio_c");
        assert!(Clip::new(0.2, None, None, 1.0, false).is_ok());
    }

    #[test]
    fn normalisers_required_with_dp() {
        let n = Normalizers { dp_size: 2.0, ..Default::default() };
        assert_eq!(n.validate(AggMode::TokenMean).unwrap_err().arg, "batch_num_tokens");
        assert_eq!(n.validate(AggMode::SeqMeanTokenMean).unwrap_err().arg, "global_batch_size");
        assert!(n.validate(AggMode::TokenSum).is_ok());
    }

    #[test]
    fn luspo_forces_seq_mean_token_sum() {
        assert_eq!(LossMode::Luspo.effective_agg(AggMode::TokenMean), AggMode::SeqMeanTokenSum);
        assert_eq!(LossMode::Gspo.effective_agg(AggMode::TokenMean), AggMode::TokenMean);
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
