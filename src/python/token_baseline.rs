//! The optimal token baselines (`optimal_token_baseline`,
//! `tir_optimal_token_baseline`): both of verl's outputs.

use super::args::{needed, Call};
use super::to_py;
use crate::ops::abi;
use crate::ops::token_baseline::TokenBaselineProblem;
use crate::{cpu, cuda};
use pyo3::prelude::*;

/// Writes verl's advantages and returns of the token baseline `estimator`
/// (`"optimal_token_baseline"`, `"tir_optimal_token_baseline"`) into
/// `advantages` and `returns`. `index` is an integer vector of group labels.
/// CUDA tensors also need `order` (a stable argsort of `index`, int64 on the
/// device), `scratch` (float64, `token_baseline_scratch_len(rows)` values)
/// and `stream`.
#[pyfunction]
#[pyo3(signature = (
    token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, advantages, returns, *,
    estimator, rollout_is_weights=None, handle_zero_tail=true, epsilon=1e-8, order=None, scratch=None, stream=None
))]
#[allow(clippy::too_many_arguments)]
pub fn token_baseline(
    py: Python<'_>,
    token_level_rewards: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    old_log_probs: &Bound<'_, PyAny>,
    sum_pi_squared: &Bound<'_, PyAny>,
    advantages: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
    estimator: &str,
    rollout_is_weights: Option<&Bound<'_, PyAny>>,
    handle_zero_tail: bool,
    epsilon: f64,
    order: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let r = call.import("token_level_rewards", token_level_rewards, false)?;
    let m = call.import("response_mask", response_mask, false)?;
    let i = call.import("index", index, false)?;
    let old = call.import("old_log_probs", old_log_probs, false)?;
    let sp = call.import("sum_pi_squared", sum_pi_squared, false)?;
    let w = call.import_opt("rollout_is_weights", rollout_is_weights, false)?;
    let a = call.import("advantages", advantages, true)?;
    let o = call.import("returns", returns, true)?;
    let ord = call.import_opt("order", order, false)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let p = TokenBaselineProblem::new(
        &r.tensor,
        &m.tensor,
        &i.tensor,
        &old.tensor,
        &sp.tensor,
        w.as_ref().map(|w| &w.tensor),
        &a.tensor,
        &o.tensor,
        estimator,
        handle_zero_tail,
        epsilon,
    )
    .map_err(to_py)?;
    let rows = p.rewards.rows;
    call.run(
        py,
        r.tensor.device,
        || cpu::token_baseline::compute(&p),
        |stream| {
            let ord = needed(&ord, "order", "a stable argsort of index, int64".into())?;
            let what = format!("float64, {} elements", abi::token_baseline_scratch_len(rows));
            cuda::token_baseline(&p, ord, needed(&sc, "scratch", what)?, stream)
        },
    )
}

/// float64 elements of the `scratch` the CUDA token baseline kernels need
/// for `rows` rows.
#[pyfunction]
pub fn token_baseline_scratch_len(rows: usize) -> usize {
    abi::token_baseline_scratch_len(rows)
}
