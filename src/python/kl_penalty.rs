//! `kl_penalty`: the estimate into `out` and, when given, `d out / d logprob`
//! into `grad` (`d / d ref_logprob` is its negative), on either device.

use super::args::Call;
use super::to_py;
use crate::ops::kl_penalty::KlProblem;
use crate::{cpu, cuda};
use pyo3::prelude::*;

/// verl's `kl_penalty`, elementwise.
#[pyfunction]
#[pyo3(signature = (logprob, ref_logprob, out, grad, kl_penalty, *, clamp_closed=false, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn kl_penalty(
    py: Python<'_>,
    logprob: &Bound<'_, PyAny>,
    ref_logprob: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    grad: Option<&Bound<'_, PyAny>>,
    kl_penalty: &str,
    clamp_closed: bool,
    stream: Option<usize>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let l = call.import("logprob", logprob, false)?;
    let r = call.import("ref_logprob", ref_logprob, false)?;
    let o = call.import("out", out, true)?;
    let g = call.import_opt("grad", grad, true)?;
    let p = KlProblem::new(&l.tensor, &r.tensor, &o.tensor, g.as_ref().map(|g| &g.tensor), kl_penalty, clamp_closed)
        .map_err(to_py)?;
    call.run(py, l.tensor.device, || cpu::kl_penalty::compute(&p), |stream| cuda::kl_penalty(&p, stream))
}
