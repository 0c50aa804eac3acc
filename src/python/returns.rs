//! The scan estimators (GAE, REINFORCE++, ReMax): both of verl's outputs.

use super::args::{needed, Call};
use super::to_py;
use crate::ops::abi;
use crate::ops::returns::ReturnsProblem;
use crate::{cpu, cuda};
use pyo3::prelude::*;

/// Writes verl's advantages and returns of the scan estimator `estimator`
/// (`"gae"`, `"reinforce_plus_plus"`, `"remax"`) into `advantages` and
/// `returns`. `values` is GAE's, `reward_baselines` ReMax's. CUDA tensors
/// also need `scratch` (float64, `returns_scratch_len(rows)` values) and
/// `stream`.
#[pyfunction]
#[pyo3(signature = (
    token_level_rewards, response_mask, advantages, returns, *, estimator,
    values=None, reward_baselines=None, gamma=1.0, lam=1.0, scratch=None, stream=None
))]
#[allow(clippy::too_many_arguments)]
pub fn returns(
    py: Python<'_>,
    token_level_rewards: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    advantages: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
    estimator: &str,
    values: Option<&Bound<'_, PyAny>>,
    reward_baselines: Option<&Bound<'_, PyAny>>,
    gamma: f64,
    lam: f64,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let r = call.import("token_level_rewards", token_level_rewards, false)?;
    let m = call.import("response_mask", response_mask, false)?;
    let v = call.import_opt("values", values, false)?;
    let b = call.import_opt("reward_baselines", reward_baselines, false)?;
    let a = call.import("advantages", advantages, true)?;
    let o = call.import("returns", returns, true)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let p = ReturnsProblem::new(
        &r.tensor,
        v.as_ref().map(|v| &v.tensor),
        b.as_ref().map(|b| &b.tensor),
        &m.tensor,
        &a.tensor,
        &o.tensor,
        estimator,
        gamma,
        lam,
    )
    .map_err(to_py)?;
    let rows = p.rewards.rows;
    call.run(
        py,
        r.tensor.device,
        || cpu::returns::compute(&p),
        |stream| {
            let what = format!("float64, {} elements", abi::returns_scratch_len(rows));
            cuda::returns(&p, needed(&sc, "scratch", what)?, stream)
        },
    )
}
