//! `policy_loss`: the loss modes (vanilla PPO/GRPO, GSPO, LUSPO — the LUSPO
//! rule is [`LossMode::effective_agg`]), the clip parameters, and the
//! validated, backend-neutral problem both backends start from.
//! The per-token formulas are in `cpu/policy_loss.rs` and, twinned, in
//! `cuda/kernels/loss.cu`.

use super::agg_loss::{AggMode, Normalizers};
use crate::error::{Error, Result};
use crate::tensor::{same_device, Device, Mat, MatMut, Tensor};

/// The policy-loss family: every loss verl 0.9.1 registers (but
/// `bypass_mode`, which the Python layer dispatches to [`LossMode::Vanilla`]
/// or [`LossMode::Reinforce`]), LUSPO, and the value loss.
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
    /// CISPO: `-sg(clip(r)) A lp` (verl `compute_policy_loss_cispo`).
    Cispo,
    /// SAPO: the soft gate `sigmoid(tau (r - 1)) 4 / tau` in place of the
    /// clip, always aggregated `seq-mean-token-mean` (verl `compute_policy_loss_sapo`).
    Sapo,
    /// GMPO: the geometric mean of the token ratios per sequence, clipped in
    /// log space token by token, averaged over the rows (verl
    /// `compute_policy_loss_geo_mean`). Per row `i`, with `d_t = lp_t - old_t`
    /// (not clamped to ±20), `sA_t = sign(A_t)`, `L_i = sum_t m_t` and
    /// `den_i = L_i + 1e-8` (in the mask's sum dtype, see `ops::plus_eps`):
    ///
    /// * `dc_t = clamp(d_t, -clip_ratio_low, clip_ratio_high)`,
    ///   `dmin_t = sA_t min(sA_t d_t, sA_t dc_t)` (torch's `min`: ties split
    ///   the gradient; `clamp` passes it inside its bounds, on them too when
    ///   [`Clip::clamp_closed`]), so `d dmin_t / d d_t` is 0 where `A_t == 0`;
    /// * `ratio_i = exp(sum_t dmin_t m_t / den_i)`, `adv_i = sum_t A_t m_t / den_i`,
    ///   with IS weights `sw_i = exp(sum_t ln(w_t + 1e-10) m_t / den_i)` (else 1);
    /// * `pg_i = -adv_i ratio_i sw_i`, `loss = (1 / B) sum_i pg_i` over all `B`
    ///   rows (an empty row has `pg_i = -0`; a NaN anywhere in a row, masked
    ///   or not, makes its `pg_i` NaN: the row sums are plain products);
    /// * `d loss / d lp_t = (1 / B) pg_i m_t (d dmin_t / d d_t) / den_i`
    ///   (0 at masked tokens, where torch has NaN for a NaN row);
    /// * metrics: `clipped_t = d_t != dc_t` (NaN counts); `pg_clipfrac` and
    ///   `pg_clipfrac_lower` are verl's masked means of `clipped & A > 0` and
    ///   `clipped & A < 0`, `ppo_kl` the masked mean of `-d`.
    ///
    /// As verl, it ignores `loss_agg_mode` and the global-batch normalisers
    /// (`dp_size`, `batch_num_tokens`, ...: not even validated); the `factor`
    /// of [`Normalizers`] still multiplies the
    /// loss and the gradient. The length diagnostics are computed as for the
    /// token modes (the gradient's mass, the `pg_clipfrac` flags).
    GeoMean,
    /// GPG: `-lp A` (verl `compute_policy_loss_gpg`).
    Gpg,
    /// Clip-Cov: the vanilla surrogate without the ±20 clamp or dual clip,
    /// with the tokens chosen by the caller (`picks`) cut out (verl
    /// `compute_policy_loss_clip_cov`).
    ClipCov,
    /// KL-Cov: `-A r`, plus `ppo_kl_coef |lp - old|` on the tokens chosen by the
    /// caller (`picks`) (verl `compute_policy_loss_kl_cov`).
    KlCov,
    /// DPPO-Binary-TV: `-A sg(min(r, c)) lp`, masked where the probability
    /// moved past its bound in the advantage's direction (verl `compute_policy_loss_dppo_tv`).
    DppoTv,
    /// DPPO-Binary-KL: as DPPO-TV with the binary KL as the divergence (verl
    /// `compute_policy_loss_dppo_kl`).
    DppoKl,
    /// DRO: `-(lp A - beta / 2 (lp - old)^2)` (verl `compute_policy_loss_dro`).
    Dro,
    /// REINFORCE: `-A lp`, with the IS weights as constant factors (verl
    /// `compute_policy_loss_reinforce`, bypass mode's `loss_type="reinforce"`).
    Reinforce,
    /// Not a policy loss: verl's clipped critic loss (`compute_value_loss`),
    /// run by the same pipeline (see `ops::value_loss`). Never parsed from a
    /// name: only `value_loss::problem` builds it.
    Value,
}

/// Every policy mode by name, in the order the README's covers table and docs/formulas.md list them.
pub const POLICY_MODES: [(&str, LossMode); 13] = [
    ("vanilla", LossMode::Vanilla),
    ("gspo", LossMode::Gspo),
    ("luspo", LossMode::Luspo),
    ("cispo", LossMode::Cispo),
    ("sapo", LossMode::Sapo),
    ("geo_mean", LossMode::GeoMean),
    ("gpg", LossMode::Gpg),
    ("clip_cov", LossMode::ClipCov),
    ("kl_cov", LossMode::KlCov),
    ("dppo_tv", LossMode::DppoTv),
    ("dppo_kl", LossMode::DppoKl),
    ("dro", LossMode::Dro),
    ("reinforce", LossMode::Reinforce),
];

/// The metrics buffer's first three slots, by the names verl gives them.
pub const METRIC_SLOTS: [&str; 3] = ["pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"];

impl LossMode {
    /// Parses a policy mode's name (see [`POLICY_MODES`]).
    pub fn parse(s: &str) -> Result<Self> {
        match POLICY_MODES.iter().find(|(n, _)| *n == s) {
            Some((_, m)) => Ok(*m),
            None => {
                let names: Vec<String> = POLICY_MODES.iter().map(|(n, _)| format!("{n:?}")).collect();
                Err(Error::value_error("mode", format!("unknown policy loss mode {s:?}; expected one of {}", names.join(", "))))
            }
        }
    }

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match POLICY_MODES.iter().find(|(_, m)| *m == self) {
            Some((n, _)) => n,
            None => "value",
        }
    }

    /// The aggregation this mode really uses: LUSPO forces
    /// `seq-mean-token-sum`, SAPO `seq-mean-token-mean` (verl passes that
    /// whatever `loss_agg_mode` says). GMPO's mean over rows is not an
    /// `agg_loss` mode: its problem keeps the requested one, unused.
    pub fn effective_agg(self, requested: AggMode) -> AggMode {
        match self {
            LossMode::Luspo => AggMode::SeqMeanTokenSum,
            LossMode::Sapo => AggMode::SeqMeanTokenMean,
            _ => requested,
        }
    }

    /// Which of [`METRIC_SLOTS`] verl returns for this mode (by index), in
    /// its dict's order: none for GPG; `ppo_kl` only for KL-Cov (where it is
    /// the mean `|lp - old|`), DRO and REINFORCE; no `pg_clipfrac_lower` for Clip-Cov.
    pub fn metric_slots(self) -> &'static [usize] {
        match self {
            LossMode::Gpg => &[],
            LossMode::KlCov | LossMode::Dro | LossMode::Reinforce => &[1],
            LossMode::ClipCov => &[0, 1],
            _ => &[0, 1, 2],
        }
    }

    /// Whether the mode reads `picks` (the tokens chosen at random or by
    /// covariance in torch before the fused pass).
    pub fn takes_picks(self) -> bool {
        matches!(self, LossMode::ClipCov | LossMode::KlCov)
    }
}

/// The knobs of the modes that have their own (verl's `ActorConfig` and
/// `policy_loss` config fields), validated for the mode that reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeKnobs {
    /// SAPO's gate temperatures for `A > 0` and `A <= 0` (`tau_pos`, `tau_neg`).
    pub tau_pos: f64,
    pub tau_neg: f64,
    /// DRO's `dro_beta`.
    pub beta: f64,
    /// KL-Cov's `ppo_kl_coef`.
    pub kl_coef: f64,
}

impl Default for ModeKnobs {
    /// verl's defaults (`dro_beta` has none: DRO requires it).
    fn default() -> Self {
        ModeKnobs { tau_pos: 1.0, tau_neg: 1.05, beta: f64::NAN, kl_coef: 0.1 }
    }
}

impl ModeKnobs {
    fn validate(&self, mode: LossMode) -> Result<()> {
        let positive = |arg: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::value_error(arg, format!("must be a finite number > 0, got {v}")))
            }
        };
        match mode {
            LossMode::Sapo => {
                positive("tau_pos", self.tau_pos)?;
                positive("tau_neg", self.tau_neg)
            }
            // verl: "policy_loss.dro_beta must be a positive value when using DRO"
            LossMode::Dro => positive("dro_beta", self.beta),
            LossMode::KlCov if !self.kl_coef.is_finite() => {
                Err(Error::value_error("ppo_kl_coef", format!("must be a finite number, got {}", self.kl_coef)))
            }
            _ => Ok(()),
        }
    }
}

/// Clip parameters of the surrogate, already resolved and validated:
/// the ratio is clipped to `[1 - low, 1 + high]`; `c` is the dual-clip bound
/// (in [`LossMode::Value`]: `cliprange_value`, and `low`/`high` are unused).
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


/// The loss and verl's three metrics, as one call returns them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyLossOutput {
    /// The aggregated scalar loss.
    pub loss: f64,
    /// Fraction of valid tokens where the clipped branch was taken (`pl2 > pl1`).
    pub pg_clipfrac: f64,
    /// Masked mean of `old_log_prob - log_prob` (clamped to ±20 in vanilla, as verl).
    pub ppo_kl: f64,
    /// Fraction of valid tokens with `A < 0` cut by the dual clip (0 for GSPO/LUSPO).
    pub pg_clipfrac_lower: f64,
    /// How the loss treats long and short responses (see [`LengthDiagnostics`];
    /// NaN unless `PolicyLossProblem::diagnostics`).
    pub length: LengthDiagnostics,
}

/// What one row contributes to [`LengthDiagnostics`]: its length `L_i =
/// sum_t m`, its clipped tokens (as `pg_clipfrac` counts them), its
/// gradient mass `sum_t |d loss / d lp_t|` and `sum_t m A`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowLength {
    pub tokens: f64,
    pub clipped: f64,
    pub grad_mass: f64,
    pub adv: f64,
}

/// Length-bias diagnostics of one batch, computed in the loss's own pass
/// when asked for (two more sums per token: about 10% of the CPU kernel's
/// single-thread time, so they are off by default). Over the rows with `L_i > 0`, with
/// `Lbar` their mean length, a row is *long* if `L_i > Lbar`, else *short*:
///
/// * `long_grad_share`: the long rows' share of the gradient mass `sum |g|`
///   divided by their share of the tokens. 1 when the aggregation weighs
///   every token the same (token-mean, LUSPO) and long and short rows have
///   the same mean per-token `|A dl|`; GSPO's `1 / L_i` pulls it down;
/// * `long_clipfrac`, `short_clipfrac`: clipped tokens / tokens within the
///   long and the short rows;
/// * `adv_corr`: the Pearson correlation over rows of `L_i` and the row's mean
///   advantage `sum_t m A / L_i` (positive: longer responses are rewarded).
///
/// Each is NaN where it is undefined (no long row, no gradient, constant
/// lengths or advantages). The CUDA kernels compute the same (twin:
/// `cuda/kernels/loss.cu`, the token pass's last block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthDiagnostics {
    pub long_grad_share: f64,
    pub long_clipfrac: f64,
    pub short_clipfrac: f64,
    pub adv_corr: f64,
}

impl Default for LengthDiagnostics {
    fn default() -> Self {
        LengthDiagnostics { long_grad_share: f64::NAN, long_clipfrac: f64::NAN, short_clipfrac: f64::NAN, adv_corr: f64::NAN }
    }
}

impl LengthDiagnostics {
    /// The diagnostics of `rows` (in row order; two passes, sums in f64).
    pub fn of(rows: &[RowLength]) -> Self {
        let live = || rows.iter().filter(|r| r.tokens > 0.0);
        let (mut n, mut tokens, mut mean_adv) = (0.0, 0.0, 0.0);
        for r in live() {
            n += 1.0;
            tokens += r.tokens;
            mean_adv += r.adv / r.tokens;
        }
        if n == 0.0 {
            return Self::default();
        }
        let (lbar, abar) = (tokens / n, mean_adv / n);
        let (mut mass_long, mut mass, mut tok_long) = (0.0, 0.0, 0.0);
        let (mut clip_long, mut clip_short) = (0.0, 0.0);
        let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
        for r in live() {
            let long = r.tokens > lbar;
            mass += r.grad_mass;
            if long {
                mass_long += r.grad_mass;
                tok_long += r.tokens;
                clip_long += r.clipped;
            } else {
                clip_short += r.clipped;
            }
            let (x, y) = (r.tokens - lbar, r.adv / r.tokens - abar);
            sxx += x * x;
            syy += y * y;
            sxy += x * y;
        }
        LengthDiagnostics {
            long_grad_share: (mass_long / mass) / (tok_long / tokens),
            long_clipfrac: clip_long / tok_long,
            short_clipfrac: clip_short / (tokens - tok_long),
            adv_corr: sxy / (sxx * syy).sqrt(),
        }
    }
}

/// Everything one policy-loss call needs, checked.
#[derive(Debug, Clone)]
pub struct PolicyLossProblem {
    pub old_log_prob: Mat,
    pub log_prob: Mat,
    pub advantages: Mat,
    pub response_mask: Mat,
    pub rollout_is_weights: Option<Mat>,
    /// Clip-Cov: the tokens cut out; KL-Cov: the tokens given the KL term
    /// (nonzero = chosen). `None`: no token chosen.
    pub picks: Option<Mat>,
    /// `d loss / d log_prob`, written by the call.
    pub grad: MatMut,
    pub mode: LossMode,
    /// The aggregation actually applied (LUSPO forces `seq-mean-token-sum`).
    pub agg: AggMode,
    pub clip: Clip,
    pub knobs: ModeKnobs,
    pub norm: Normalizers,
    pub device: Device,
    /// Whether to compute the [`LengthDiagnostics`] (a few more sums per token).
    pub diagnostics: bool,
}

/// Raw, unchecked arguments of a policy-loss call.
pub struct PolicyLossArgs<'a> {
    pub old_log_prob: &'a Tensor,
    pub log_prob: &'a Tensor,
    pub advantages: &'a Tensor,
    pub response_mask: &'a Tensor,
    pub rollout_is_weights: Option<&'a Tensor>,
    /// See [`PolicyLossProblem::picks`].
    pub picks: Option<&'a Tensor>,
    pub grad: &'a Tensor,
    pub mode: &'a str,
    pub loss_agg_mode: &'a str,
    pub clip_ratio: f64,
    pub clip_ratio_low: Option<f64>,
    pub clip_ratio_high: Option<f64>,
    pub clip_ratio_c: f64,
    /// See [`Clip::clamp_closed`].
    pub clamp_closed: bool,
    pub knobs: ModeKnobs,
    pub norm: Normalizers,
    /// See [`PolicyLossProblem::diagnostics`].
    pub diagnostics: bool,
}

impl PolicyLossProblem {
    /// Validates every argument; errors name the offending one.
    pub fn new(a: &PolicyLossArgs<'_>) -> Result<Self> {
        let mode = LossMode::parse(a.mode)?;
        let requested = AggMode::parse(a.loss_agg_mode)?;
        let agg = mode.effective_agg(requested);
        let mut clip = Clip::new(a.clip_ratio, a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c, mode == LossMode::Vanilla)?;
        clip.clamp_closed = a.clamp_closed;
        if mode == LossMode::DppoTv || mode == LossMode::DppoKl {
            // DPPO's clip_ratio_c truncates the ratio: any bound but NaN
            if a.clip_ratio_c.is_nan() {
                return Err(Error::value_error("clip_ratio_c", "must be a number, got NaN"));
            }
        }
        a.knobs.validate(mode)?;
        if mode != LossMode::GeoMean {
            // (GMPO reads none of them, as verl: see LossMode::GeoMean)
            a.norm.validate(agg)?;
        }

        let log_prob = a.log_prob.matrix()?;
        a.log_prob.expect_float()?;
        let (rows, cols) = (log_prob.rows, log_prob.cols);
        if rows == 0 {
            return Err(Error::value_error("log_prob", "empty batch: the batch dimension is 0"));
        }
        if cols == 0 {
            return Err(Error::value_error("log_prob", "empty responses: the response_length dimension is 0"));
        }
        a.old_log_prob.expect_float()?;
        a.old_log_prob.expect_shape(&[rows, cols], "log_prob")?;
        let old_log_prob = a.old_log_prob.matrix()?;
        a.response_mask.expect_shape(&[rows, cols], "log_prob")?;
        let response_mask = a.response_mask.matrix()?;
        a.advantages.expect_float()?;
        let advantages = a.advantages.matrix_or_per_row(rows, cols)?;
        let rollout_is_weights = match a.rollout_is_weights {
            Some(w) => {
                w.expect_float()?;
                Some(w.matrix_or_per_row(rows, cols)?)
            }
            None => None,
        };
        let picks = match a.picks {
            Some(_) if !mode.takes_picks() => {
                return Err(Error::value_error("picks", format!("only clip_cov and kl_cov take picks, not {:?}", mode.name())))
            }
            Some(p) => {
                p.expect_shape(&[rows, cols], "log_prob")?;
                Some(p.matrix()?)
            }
            None => None,
        };
        let grad = MatMut::new(a.grad, rows, cols, "log_prob")?;

        let device = a.log_prob.device;
        let mut all = vec![a.old_log_prob, a.advantages, a.response_mask, a.grad];
        all.extend(a.rollout_is_weights);
        all.extend(a.picks);
        same_device(device, &all)?;

        Ok(PolicyLossProblem {
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            rollout_is_weights,
            picks,
            grad,
            mode,
            agg,
            clip,
            knobs: a.knobs,
            norm: a.norm,
            device,
            diagnostics: a.diagnostics,
        })
    }

    /// Whether the rows need the sequence log-ratio `sum_t m (lp - old)`
    /// before their token pass (GSPO, LUSPO; GMPO has its own row sums).
    pub fn with_seq(&self) -> bool {
        matches!(self.mode, LossMode::Gspo | LossMode::Luspo)
    }

    /// GMPO in float64 math (a float64 mask) with 32- or 16-bit log-probs:
    /// verl takes `d = lp - old` and its clamp in the log-probs' float32 (only
    /// the mask products are float64), so the kernels round `d` to `f32`
    /// ([`Lane::narrow`](crate::cpu::lane::Lane)) and the clip bounds too ([`Self::geo_clip`]).
    pub fn geo_narrow(&self) -> bool {
        use crate::tensor::DType::F64;
        self.mode == LossMode::GeoMean
            && self.wants_f64()
            && self.log_prob.tensor.dtype != F64
            && self.old_log_prob.tensor.dtype != F64
    }

    /// GMPO's clip, with its bounds rounded to `f32` where [`Self::geo_narrow`].
    pub fn geo_clip(&self) -> Clip {
        let mut c = self.clip;
        if self.geo_narrow() {
            c.low = c.low as f32 as f64;
            c.high = c.high as f32 as f64;
        }
        c
    }

    /// Whether any float input is float64, in which case the kernels compute
    /// in f64; otherwise in f32 (the math type of verl for 16/32-bit inputs
    /// is the input type; f32 is at least as precise). A float64 mask counts
    /// for GSPO / LUSPO: verl's sequence mean `sum(d * m) / sum(m)` is then
    /// float64, and so is the sequence ratio and the loss built on it. The
    /// vanilla token ratio and the value loss do not involve the mask (verl
    /// computes them in the inputs' type, and so do we; the sums are f64 anyway).
    /// GMPO's row means `sum(x * m) / (sum(m) + 1e-8)` are float64 with a
    /// float64 mask too, and so are its ratio and loss.
    pub fn wants_f64(&self) -> bool {
        use crate::tensor::DType::F64;
        [&self.old_log_prob, &self.log_prob, &self.advantages]
            .iter()
            .any(|m| m.tensor.dtype == F64)
            || self.rollout_is_weights.as_ref().is_some_and(|w| w.tensor.dtype == F64)
            || ((self.with_seq() || self.mode == LossMode::GeoMean) && self.response_mask.tensor.dtype == F64)
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
        for (n, m) in POLICY_MODES {
            assert_eq!(LossMode::parse(n).unwrap(), m);
            assert_eq!(m.name(), n);
        }
        assert!(LossMode::parse("value").is_err() && LossMode::parse("bypass_mode").is_err());
    }

    #[test]
    fn knobs_are_checked_for_the_mode_that_reads_them() {
        let k = ModeKnobs::default();
        assert_eq!(k.validate(LossMode::Dro).unwrap_err().arg, "dro_beta");
        assert!(k.validate(LossMode::Vanilla).is_ok());
        let k = ModeKnobs { tau_neg: 0.0, ..ModeKnobs::default() };
        assert_eq!(k.validate(LossMode::Sapo).unwrap_err().arg, "tau_neg");
        assert_eq!(LossMode::Sapo.effective_agg(AggMode::TokenMean), AggMode::SeqMeanTokenMean);
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
    fn luspo_forces_seq_mean_token_sum() {
        assert_eq!(LossMode::Luspo.effective_agg(AggMode::TokenMean), AggMode::SeqMeanTokenSum);
        assert_eq!(LossMode::Gspo.effective_agg(AggMode::TokenMean), AggMode::TokenMean);
    }
}
