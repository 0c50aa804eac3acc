//! `policy_loss`, `value_loss`, `agg_loss` and their backward, `scale_grad`. The losses
//! write the final gradient into `grad`, the loss into `loss` (0-d, any
//! float dtype) and, for the policy loss, verl's metrics into `metrics`
//! (float64 `[pg_clipfrac, ppo_kl, pg_clipfrac_lower]`), on either device.
//! CUDA tensors also take `scratch` (float64, `loss_scratch_len(rows)`
//! values) and `stream`.

use super::args::{needed, Call};
use super::to_py;
use crate::ops::abi;
use crate::ops::agg_loss::{AggProblem, Normalizers};
use crate::ops::policy_loss::{ModeKnobs, PolicyLossArgs, PolicyLossProblem};
use crate::ops::value_loss::{problem as value_problem, ValueLossArgs};
use crate::ops::LossOutputs;
use crate::{cpu, cuda};
use pyo3::prelude::*;

/// The value of a CPU `factor`, folded into the aggregation's scale (so it
/// multiplies the gradient before it is rounded to its dtype); 1 for none or
/// a CUDA one (read by the kernels on the device).
fn cpu_factor(f: &Option<super::args::Imported>) -> PyResult<f64> {
    match f {
        Some(f) if f.tensor.device == crate::tensor::Device::Cpu => cpu::outputs::scalar(&f.tensor).map_err(to_py),
        _ => Ok(1.0),
    }
}

fn scratch_what(rows: usize) -> String {
    format!("float64, {} elements", abi::loss_scratch_len(rows))
}

/// The fused policy loss.
#[pyfunction]
#[pyo3(signature = (
    old_log_prob, log_prob, advantages, response_mask, grad, loss, metrics, *,
    mode, loss_agg_mode, clip_ratio, clip_ratio_low=None, clip_ratio_high=None,
    clip_ratio_c=3.0, rollout_is_weights=None, picks=None, tau_pos=1.0, tau_neg=1.05, dro_beta=None,
    ppo_kl_coef=0.1, dp_size=1.0, batch_num_tokens=None,
    global_batch_size=None, loss_scale_factor=None, clamp_closed=false, diagnostics=false, factor=None,
    scratch=None, stream=None
))]
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    py: Python<'_>,
    old_log_prob: &Bound<'_, PyAny>,
    log_prob: &Bound<'_, PyAny>,
    advantages: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    metrics: &Bound<'_, PyAny>,
    mode: &str,
    loss_agg_mode: &str,
    clip_ratio: f64,
    clip_ratio_low: Option<f64>,
    clip_ratio_high: Option<f64>,
    clip_ratio_c: f64,
    rollout_is_weights: Option<&Bound<'_, PyAny>>,
    picks: Option<&Bound<'_, PyAny>>,
    tau_pos: f64,
    tau_neg: f64,
    dro_beta: Option<f64>,
    ppo_kl_coef: f64,
    dp_size: f64,
    batch_num_tokens: Option<f64>,
    global_batch_size: Option<f64>,
    loss_scale_factor: Option<f64>,
    clamp_closed: bool,
    diagnostics: bool,
    factor: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let old = call.import("old_log_prob", old_log_prob, false)?;
    let lp = call.import("log_prob", log_prob, false)?;
    let adv = call.import("advantages", advantages, false)?;
    let mask = call.import("response_mask", response_mask, false)?;
    let w = call.import_opt("rollout_is_weights", rollout_is_weights, false)?;
    let pk = call.import_opt("picks", picks, false)?;
    let g = call.import("grad", grad, true)?;
    let l = call.import("loss", loss, true)?;
    let m = call.import("metrics", metrics, true)?;
    let f = call.import_opt("factor", factor, false)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let p = PolicyLossProblem::new(&PolicyLossArgs {
        old_log_prob: &old.tensor,
        log_prob: &lp.tensor,
        advantages: &adv.tensor,
        response_mask: &mask.tensor,
        rollout_is_weights: w.as_ref().map(|w| &w.tensor),
        picks: pk.as_ref().map(|p| &p.tensor),
        grad: &g.tensor,
        mode,
        loss_agg_mode,
        clip_ratio,
        clip_ratio_low,
        clip_ratio_high,
        clip_ratio_c,
        clamp_closed,
        knobs: ModeKnobs { tau_pos, tau_neg, beta: dro_beta.unwrap_or(f64::NAN), kl_coef: ppo_kl_coef },
        norm: Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, factor: cpu_factor(&f)? },
        diagnostics,
    })
    .map_err(to_py)?;
    let out = LossOutputs { loss: &l.tensor, metrics: Some(&m.tensor), factor: f.as_ref().map(|f| &f.tensor) };
    out.check(p.device, true).map_err(to_py)?;
    call.run(
        py,
        p.device,
        || {
            let r = cpu::policy_loss::policy_loss(&p)?;
            {
                let d = r.length;
                let metrics = [
                    r.pg_clipfrac,
                    r.ppo_kl,
                    r.pg_clipfrac_lower,
                    d.long_grad_share,
                    d.long_clipfrac,
                    d.short_clipfrac,
                    d.adv_corr,
                ];
                cpu::outputs::write(&out, r.loss, Some(&metrics))
            }
        },
        |stream| cuda::policy_loss(&p, &out, needed(&sc, "scratch", scratch_what(p.log_prob.rows))?, stream),
    )
}

/// verl's clipped value loss (`compute_value_loss`), fused with
/// `d loss / d vpreds`: the policy-loss pipeline in `LossMode::Value`;
/// `metrics` gets `vf_clipfrac` first (the other values are 0 or NaN).
#[pyfunction]
#[pyo3(signature = (
    vpreds, values, returns, response_mask, grad, loss, metrics, *, cliprange_value, loss_agg_mode,
    dp_size=1.0, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None, factor=None,
    scratch=None, stream=None
))]
#[allow(clippy::too_many_arguments)]
pub fn value_loss(
    py: Python<'_>,
    vpreds: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    metrics: &Bound<'_, PyAny>,
    cliprange_value: f64,
    loss_agg_mode: &str,
    dp_size: f64,
    batch_num_tokens: Option<f64>,
    global_batch_size: Option<f64>,
    loss_scale_factor: Option<f64>,
    factor: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let vp = call.import("vpreds", vpreds, false)?;
    let v = call.import("values", values, false)?;
    let r = call.import("returns", returns, false)?;
    let mask = call.import("response_mask", response_mask, false)?;
    let g = call.import("grad", grad, true)?;
    let l = call.import("loss", loss, true)?;
    let m = call.import("metrics", metrics, true)?;
    let f = call.import_opt("factor", factor, false)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let p = value_problem(&ValueLossArgs {
        vpreds: &vp.tensor,
        values: &v.tensor,
        returns: &r.tensor,
        response_mask: &mask.tensor,
        grad: &g.tensor,
        cliprange_value,
        loss_agg_mode,
        norm: Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, factor: cpu_factor(&f)? },
    })
    .map_err(to_py)?;
    let out = LossOutputs { loss: &l.tensor, metrics: Some(&m.tensor), factor: f.as_ref().map(|f| &f.tensor) };
    out.check(p.device, true).map_err(to_py)?;
    call.run(
        py,
        p.device,
        || {
            let r = cpu::policy_loss::policy_loss(&p)?;
            let nan = f64::NAN;
            let metrics = [r.pg_clipfrac, r.ppo_kl, r.pg_clipfrac_lower, nan, nan, nan, nan];
            cpu::outputs::write(&out, r.loss, Some(&metrics))
        },
        |stream| cuda::policy_loss(&p, &out, needed(&sc, "scratch", scratch_what(p.log_prob.rows))?, stream),
    )
}

/// verl's `agg_loss` of a loss matrix.
#[pyfunction]
#[pyo3(signature = (
    loss_mat, loss_mask, grad, loss, *, loss_agg_mode, dp_size=1.0, batch_num_tokens=None,
    global_batch_size=None, loss_scale_factor=None, factor=None, scratch=None, stream=None
))]
#[allow(clippy::too_many_arguments)]
pub fn agg_loss(
    py: Python<'_>,
    loss_mat: &Bound<'_, PyAny>,
    loss_mask: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    loss_agg_mode: &str,
    dp_size: f64,
    batch_num_tokens: Option<f64>,
    global_batch_size: Option<f64>,
    loss_scale_factor: Option<f64>,
    factor: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let lm = call.import("loss_mat", loss_mat, false)?;
    let m = call.import("loss_mask", loss_mask, false)?;
    let g = call.import("grad", grad, true)?;
    let l = call.import("loss", loss, true)?;
    let f = call.import_opt("factor", factor, false)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let norm = Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, factor: cpu_factor(&f)? };
    let p = AggProblem::new(&lm.tensor, &m.tensor, &g.tensor, loss_agg_mode, norm).map_err(to_py)?;
    let out = LossOutputs { loss: &l.tensor, metrics: None, factor: f.as_ref().map(|f| &f.tensor) };
    let device = lm.tensor.device;
    out.check(device, false).map_err(to_py)?;
    call.run(
        py,
        device,
        || cpu::outputs::write(&out, cpu::agg_loss::agg_loss(&p)?, None),
        |stream| cuda::agg_loss(&p, &out, needed(&sc, "scratch", scratch_what(p.loss_mat.rows))?, stream),
    )
}

/// Writes `grad * grad_output` into `out` (CPU tensors of `grad`'s shape and
/// dtype), out of place: the backward of the losses' `torch.library` ops
/// (no OpenMP team and no fresh pages, unlike a torch multiply into a new
/// tensor).
#[pyfunction]
pub fn grad_times(py: Python<'_>, grad: &Bound<'_, PyAny>, grad_output: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let call = Call::host();
    let g = call.import("grad", grad, false)?;
    let go = call.import("grad_output", grad_output, false)?;
    let o = call.import("out", out, true)?;
    call.run(
        py,
        crate::tensor::Device::Cpu,
        || cpu::outputs::grad_times(&g.tensor, &go.tensor, &o.tensor),
        |_| unreachable!("a host call"),
    )
}

/// Backward of both losses: `grad *= grad_output` in place. Returns whether
/// `grad` may have changed: on the CPU, a `grad_output` of 1 is seen and
/// skipped (False); on CUDA the kernel skips it on the device, without a
/// sync, so the answer is always True.
#[pyfunction]
#[pyo3(signature = (grad, grad_output, stream=None))]
pub fn scale_grad(py: Python<'_>, grad: &Bound<'_, PyAny>, grad_output: &Bound<'_, PyAny>, stream: Option<usize>) -> PyResult<bool> {
    let call = Call::new(stream);
    let g = call.import("grad", grad, true)?;
    let go = call.import("grad_output", grad_output, false)?;
    call.run(
        py,
        g.tensor.device,
        || cpu::outputs::scale_grad(&g.tensor, &go.tensor),
        |stream| cuda::scale_grad(&g.tensor, &go.tensor, stream).map(|_| true),
    )
}
