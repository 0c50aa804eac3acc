//! `value_loss`: verl's clipped critic loss (`compute_value_loss`), as a
//! rule of the fused policy-loss pipeline ([`LossMode::Value`]): the same
//! passes, aggregation plans, metrics buffer and gradient buffer, with
//! `vpreds` in the place of `log_prob` (the differentiated input), `values`
//! in that of `old_log_prob` and `returns` in that of `advantages`.
//!
//! Per token, with `c = cliprange_value`:
//!
//! * `vc = max(min(vpreds, values + c), values - c)` (verl's `clip_by_value`,
//!   a `torch.min` / `torch.max` composition: ties split the gradient, so a
//!   prediction exactly on a bound passes half of it);
//! * `l1 = (vpreds - returns)^2`, `l2 = (vc - returns)^2`;
//! * the token loss `0.5 * max(l1, l2)`; verl multiplies the aggregate by
//!   0.5, we multiply each token: a product by 0.5 is exact in binary
//!   floating point (short of subnormals), so both give the same value.
//!
//! The loss is `agg_loss` of those tokens (every `loss_agg_mode`, verl's
//! normalisers); the metric is `vf_clipfrac = masked_mean(l2 > l1)`, written
//! where the policy loss writes `pg_clipfrac` (the other metrics are 0).
//! The token formula is in `cpu/policy_loss.rs` (`Value`) and, twinned, in
//! `cuda/kernels/loss.cu` (`MODE_VALUE`).

use super::agg_loss::{AggMode, Normalizers};
use super::policy_loss::{Clip, LossMode, ModeKnobs, PolicyLossProblem};
use crate::error::{Error, Result};
use crate::tensor::{same_device, MatMut, Tensor};

/// Raw, unchecked arguments of a value-loss call.
pub struct ValueLossArgs<'a> {
    pub vpreds: &'a Tensor,
    pub values: &'a Tensor,
    pub returns: &'a Tensor,
    pub response_mask: &'a Tensor,
    /// `d loss / d vpreds`, written by the call.
    pub grad: &'a Tensor,
    pub cliprange_value: f64,
    pub loss_agg_mode: &'a str,
    pub norm: Normalizers,
}

/// Validates a value-loss call (errors name the offending argument) and
/// returns it as a [`PolicyLossProblem`] in [`LossMode::Value`]: `vpreds`
/// as `log_prob`, `values` as `old_log_prob`, `returns` as `advantages`,
/// `cliprange_value` as `clip.c`; no IS weights, no length diagnostics.
pub fn problem(a: &ValueLossArgs<'_>) -> Result<PolicyLossProblem> {
    let agg = AggMode::parse(a.loss_agg_mode)?;
    let c = a.cliprange_value;
    if !(c.is_finite() && c >= 0.0) {
        return Err(Error::value_error("cliprange_value", format!("must be a finite number >= 0, got {c}")));
    }
    a.norm.validate(agg)?;
    a.vpreds.expect_float()?;
    let vpreds = a.vpreds.matrix()?;
    let (rows, cols) = (vpreds.rows, vpreds.cols);
    if rows == 0 {
        return Err(Error::value_error("vpreds", "empty batch: the batch dimension is 0"));
    }
    if cols == 0 {
        return Err(Error::value_error("vpreds", "empty responses: the response_length dimension is 0"));
    }
    for t in [a.values, a.returns] {
        t.expect_float()?;
        t.expect_shape(&[rows, cols], "vpreds")?;
    }
    a.response_mask.expect_shape(&[rows, cols], "vpreds")?;
    let grad = MatMut::new(a.grad, rows, cols, "vpreds")?;
    same_device(a.vpreds.device, &[a.values, a.returns, a.response_mask, a.grad])?;
    Ok(PolicyLossProblem {
        old_log_prob: a.values.matrix()?,
        log_prob: vpreds,
        advantages: a.returns.matrix()?,
        response_mask: a.response_mask.matrix()?,
        rollout_is_weights: None,
        picks: None,
        grad,
        mode: LossMode::Value,
        agg,
        clip: Clip { low: 0.0, high: 0.0, c, clamp_closed: false },
        knobs: ModeKnobs::default(),
        norm: a.norm,
        device: a.vpreds.device,
        diagnostics: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(c: f64, agg: &str, shape_values: &[usize]) -> Result<PolicyLossProblem> {
        let (vp, r, m) = ([0f32; 6], [0f32; 6], [true; 6]);
        let v = vec![0f32; shape_values.iter().product()];
        let mut g = [0f32; 6];
        let vp = Tensor::from_slice("vpreds", &vp, &[2, 3]);
        let v = Tensor::from_slice("values", &v, shape_values);
        let r = Tensor::from_slice("returns", &r, &[2, 3]);
        let m = Tensor::from_slice("response_mask", &m, &[2, 3]);
        let g = Tensor::from_mut_slice("grad", &mut g, &[2, 3]);
        problem(&ValueLossArgs {
            vpreds: &vp,
            values: &v,
            returns: &r,
            response_mask: &m,
            grad: &g,
            cliprange_value: c,
            loss_agg_mode: agg,
            norm: Normalizers::default(),
        })
    }

    #[test]
    fn checks_name_the_argument() {
        let p = call(0.5, "seq-mean-token-mean", &[2, 3]).unwrap();
        assert_eq!((p.mode, p.agg, p.clip.c), (LossMode::Value, AggMode::SeqMeanTokenMean, 0.5));
        assert_eq!(call(-0.1, "token-mean", &[2, 3]).unwrap_err().arg, "cliprange_value");
        assert_eq!(call(f64::NAN, "token-mean", &[2, 3]).unwrap_err().arg, "cliprange_value");
        assert_eq!(call(0.5, "mean", &[2, 3]).unwrap_err().arg, "loss_agg_mode");
        assert_eq!(call(0.5, "token-mean", &[2]).unwrap_err().arg, "values");
    }
}
