//! The policy-loss problem, validated and backend-neutral: which tensors,
//! their views, and the resolved mode / aggregation / clip / normalisers.
//! Both the CPU and the CUDA backends start from a [`PolicyLossProblem`].

use crate::error::{Error, Result};
use crate::spec::{AggMode, Clip, LossMode, Normalizers};
use crate::tensor::{same_device, Desc, Device, Mat, MatMut};

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
}

/// Everything one policy-loss call needs, checked.
#[derive(Debug, Clone)]
pub struct PolicyLossProblem {
    pub old_log_prob: Mat,
    pub log_prob: Mat,
    pub advantages: Mat,
    pub response_mask: Mat,
    pub rollout_is_weights: Option<Mat>,
    /// `d loss / d log_prob`, written by the call.
    pub grad: MatMut,
    pub mode: LossMode,
    /// The aggregation actually applied (LUSPO forces `seq-mean-token-sum`).
    pub agg: AggMode,
    pub clip: Clip,
    pub norm: Normalizers,
    pub device: Device,
}

/// Raw, unchecked arguments of a policy-loss call.
pub struct PolicyLossArgs<'a> {
    pub old_log_prob: &'a Desc,
    pub log_prob: &'a Desc,
    pub advantages: &'a Desc,
    pub response_mask: &'a Desc,
    pub rollout_is_weights: Option<&'a Desc>,
    pub grad: &'a Desc,
    pub mode: &'a str,
    pub loss_agg_mode: &'a str,
    pub clip_ratio: f64,
    pub clip_ratio_low: Option<f64>,
    pub clip_ratio_high: Option<f64>,
    pub clip_ratio_c: f64,
    /// See [`Clip::clamp_closed`].
    pub clamp_closed: bool,
    pub norm: Normalizers,
}

impl PolicyLossProblem {
    /// Validates every argument; errors name the offending one.
    pub fn new(a: &PolicyLossArgs<'_>) -> Result<Self> {
        let mode = LossMode::parse(a.mode)?;
        let requested = AggMode::parse(a.loss_agg_mode)?;
        let agg = mode.effective_agg(requested);
        let mut clip = Clip::new(a.clip_ratio, a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c, mode == LossMode::Vanilla)?;
        clip.clamp_closed = a.clamp_closed;
        a.norm.validate(agg)?;

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
        let grad = MatMut::new(a.grad, rows, cols, "log_prob")?;

        let device = a.log_prob.device;
        let mut all = vec![a.old_log_prob, a.advantages, a.response_mask, a.grad];
        all.extend(a.rollout_is_weights);
        same_device(device, &all)?;

        Ok(PolicyLossProblem {
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            rollout_is_weights,
            grad,
            mode,
            agg,
            clip,
            norm: a.norm,
            device,
        })
    }

    /// Whether any float input is float64, in which case the kernels compute
    /// in f64; otherwise in f32 (the math type of verl for 16/32-bit inputs
    /// is the input type; f32 is at least as precise). A float64 mask counts
    /// for GSPO / LUSPO: verl's sequence mean `sum(d * m) / sum(m)` is then
    /// float64, and so is the sequence ratio and the loss built on it. The
    /// vanilla token ratio does not involve the mask (verl computes it in the
    /// log-probs' type, and so do we; the sums are f64 anyway).
    pub fn wants_f64(&self) -> bool {
        use crate::tensor::DType::F64;
        [&self.old_log_prob, &self.log_prob, &self.advantages]
            .iter()
            .any(|m| m.desc.dtype == F64)
            || self.rollout_is_weights.as_ref().is_some_and(|w| w.desc.dtype == F64)
            || (self.mode != LossMode::Vanilla && self.response_mask.desc.dtype == F64)
    }
}
