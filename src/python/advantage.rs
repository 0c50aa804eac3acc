//! The group advantage estimators, and dense group ids of arbitrary Python
//! labels.

use super::args::{needed, Call};
use super::to_py;
use crate::ops::abi;
use crate::ops::advantage::AdvantageProblem;
use crate::tensor::{DType, Device};
use crate::{cpu, cuda};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Writes the B×T advantages of verl's outcome estimator `estimator` into
/// `out`. `index` is an integer vector of group labels (see [`group_ids`]
/// for arbitrary Python labels). CUDA tensors also need `order` (a stable
/// argsort of `index`, int64 on the device), `scratch` (float64,
/// `advantage_scratch_len(rows)` values) and `stream`. `gdpo` also takes
/// `scores` (rows, K), each row's score under K reward keys, with `weights`
/// (float64, K): then the rewards are not read.
#[pyfunction]
#[pyo3(signature = (
    token_level_rewards, response_mask, index, out, *, estimator,
    norm_adv_by_std_in_grpo=true, epsilon=1e-6, f_norm=1.0, order=None, scratch=None, stream=None,
    scores=None, weights=None
))]
#[allow(clippy::too_many_arguments)]
pub fn advantage(
    py: Python<'_>,
    token_level_rewards: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    index: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    estimator: &str,
    norm_adv_by_std_in_grpo: bool,
    epsilon: f64,
    f_norm: f64,
    order: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
    scores: Option<&Bound<'_, PyAny>>,
    weights: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let call = Call::new(stream);
    let r = call.import("token_level_rewards", token_level_rewards, false)?;
    let m = call.import("response_mask", response_mask, false)?;
    let i = call.import("index", index, false)?;
    let o = call.import("out", out, true)?;
    let ord = call.import_opt("order", order, false)?;
    let sc = call.import_opt("scratch", scratch, true)?;
    let ks = call.import_opt("scores", scores, false)?;
    let kw = call.import_opt("weights", weights, false)?;
    let keys = match (&ks, &kw) {
        (None, None) => None,
        (Some(s), Some(w)) => Some((&s.tensor, &w.tensor)),
        _ => return Err(PyValueError::new_err("scores: per-key scores and their weights go together")),
    };
    let p = AdvantageProblem::new(
        &r.tensor, &m.tensor, &i.tensor, &o.tensor, estimator, norm_adv_by_std_in_grpo, epsilon, f_norm, keys,
    )
    .map_err(to_py)?;
    let rows = p.rewards.rows;
    call.run(
        py,
        r.tensor.device,
        || cpu::advantage::compute(&p),
        |stream| {
            let ord = needed(&ord, "order", "a stable argsort of index, int64".into())?;
            let what = format!("float64, {} elements", abi::advantage_scratch_len(rows));
            cuda::advantage(&p, ord, needed(&sc, "scratch", what)?, stream)
        },
    )
}

/// Dense group ids `0..G` (first-appearance order) of arbitrary hashable
/// Python labels, grouped by Python equality as a `dict` does (verl's
/// `id2score[index[i]]`). Writes them into `out` (int64, length `len(index)`,
/// on the CPU) and returns `G`.
#[pyfunction]
pub fn group_ids(index: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<usize> {
    use pyo3::types::{PyDict, PyList};
    let o = Call::host().import("out", out, true)?;
    let list = match index.cast::<PyList>() {
        Ok(l) => l.clone(),
        Err(_) => PyList::new(index.py(), index.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
    };
    let n = list.len();
    let t = &o.tensor;
    if t.device != Device::Cpu || t.dtype != DType::I64 || t.shape != [n] || t.strides[0] != 1 {
        return Err(PyValueError::new_err(format!("out: expected a contiguous int64 CPU tensor of shape ({n},)")));
    }
    if n == 0 {
        return Ok(0); // (an empty tensor's pointer may be null: no slice of it)
    }
    let seen = PyDict::new(index.py());
    // SAFETY: checked above: contiguous int64 of length n, writable.
    let ids = unsafe { std::slice::from_raw_parts_mut(t.ptr as *mut i64, n) };
    for (k, item) in list.iter().enumerate() {
        let id = match seen
            .get_item(&item)
            .map_err(|e| PyTypeError::new_err(format!("index: element {k} is not a hashable group label: {e}")))?
        {
            Some(v) => v.extract::<i64>()?,
            None => {
                let g = seen.len() as i64;
                seen.set_item(&item, g)?;
                g
            }
        };
        ids[k] = id;
    }
    Ok(seen.len())
}
