//! The `luspo_rs._core` extension module (the `python` feature): the only
//! code that knows Python. It imports tensors through DLPack ([`args`]),
//! builds each op's validated problem (`crate::ops`), and picks the backend
//! once, from the inputs' device ([`args::Call::run`]). One
//! `#[pyfunction]` per op, with the same contract on both devices.

mod advantage;
mod args;
mod kl_penalty;
mod loss;
mod returns;
mod runtime;
mod token_baseline;

use crate::cuda::CudaError;
use crate::error::{Error, Kind};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The Python exception of an [`Error`].
fn to_py(e: Error) -> PyErr {
    match e.kind {
        Kind::Type => PyTypeError::new_err(e.to_string()),
        Kind::Value => PyValueError::new_err(e.to_string()),
        Kind::Memory => PyMemoryError::new_err(e.to_string()),
    }
}

/// The Python exception of a CUDA-side failure.
fn cuda_err(e: CudaError) -> PyErr {
    match e {
        CudaError::Arg(e) => to_py(e),
        CudaError::Runtime(m) => PyRuntimeError::new_err(format!("luspo_rs CUDA backend: {m}")),
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(loss::policy_loss, m)?)?;
    m.add_function(wrap_pyfunction!(loss::value_loss, m)?)?;
    m.add_function(wrap_pyfunction!(loss::agg_loss, m)?)?;
    m.add_function(wrap_pyfunction!(loss::scale_grad, m)?)?;
    m.add_function(wrap_pyfunction!(loss::grad_times, m)?)?;
    m.add_function(wrap_pyfunction!(kl_penalty::kl_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(advantage::advantage, m)?)?;
    m.add_function(wrap_pyfunction!(advantage::group_ids, m)?)?;
    m.add_function(wrap_pyfunction!(returns::returns, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::returns_scratch_len, m)?)?;
    m.add_function(wrap_pyfunction!(token_baseline::token_baseline, m)?)?;
    m.add_function(wrap_pyfunction!(token_baseline::token_baseline_scratch_len, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::loss_scratch_len, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::advantage_scratch_len, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::cuda_set_nvrtc_hints, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::nvrtc_info, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::sim_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::agg_divisors, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::effective_agg_mode, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::policy_modes, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::cuda_ptxas_log, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::policy_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::sim_set_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::sim_set_seed, m)?)?;
    m.add("METRICS_LEN", crate::ops::abi::METRICS_LEN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
