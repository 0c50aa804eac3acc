//! Sizes of the CUDA kernels' working buffers, the CPU pool's size, and the
//! NVRTC hooks (library search, compiling without a GPU).

use crate::{cpu, cuda, ops::abi};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// float64 elements of the `scratch` the CUDA loss kernels need for `rows` rows.
#[pyfunction]
pub fn loss_scratch_len(rows: usize) -> usize {
    abi::loss_scratch_len(rows)
}

/// float64 elements of the `scratch` the CUDA advantage kernels need for `rows` rows.
#[pyfunction]
pub fn advantage_scratch_len(rows: usize) -> usize {
    abi::advantage_scratch_len(rows)
}

/// float64 elements of the `scratch` the CUDA scan kernels (GAE,
/// REINFORCE++, ReMax) need for `rows` rows.
#[pyfunction]
pub fn returns_scratch_len(rows: usize) -> usize {
    abi::returns_scratch_len(rows)
}

/// Number of threads the CPU kernels use (this process's pool, see
/// `cpu::pool`; `RAYON_NUM_THREADS` sets it before the first call).
#[pyfunction]
pub fn num_threads() -> usize {
    cpu::pool::pool().current_num_threads()
}

/// Directories searched for NVRTC before the system paths.
#[pyfunction]
pub fn cuda_set_nvrtc_hints(dirs: Vec<std::path::PathBuf>) {
    cuda::set_nvrtc_hints(dirs)
}

fn nvrtc() -> PyResult<std::sync::Arc<cuda::sys::Nvrtc>> {
    cuda::nvrtc().map_err(|e| PyRuntimeError::new_err(format!("luspo_rs CUDA backend: {e}")))
}

/// Loads NVRTC if needed and returns `(path, major, minor)`.
#[pyfunction]
pub fn nvrtc_info() -> PyResult<(String, i32, i32)> {
    let n = nvrtc()?;
    let (a, b) = n.version();
    Ok((n.path.display().to_string(), a, b))
}

/// Compiles the embedded kernels for compute capability `major.minor`
/// (`target` "ptx" or "cubin") and returns the image; no GPU needed.
#[pyfunction]
#[pyo3(signature = (major, minor, target="ptx"))]
pub fn cuda_compile<'py>(py: Python<'py>, major: i32, minor: i32, target: &str) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let t = match target {
        "ptx" => cuda::Target::Ptx,
        "cubin" => cuda::Target::Cubin,
        _ => return Err(PyValueError::new_err(format!("target: expected \"ptx\" or \"cubin\", got {target:?}"))),
    };
    let n = nvrtc()?;
    let img = py.detach(|| cuda::compile(&n, major, minor, t)).map_err(PyRuntimeError::new_err)?;
    Ok(pyo3::types::PyBytes::new(py, &img))
}

/// Compiles the embedded kernels to a cubin for `major.minor` with ptxas's
/// `--verbose` report and returns `(cubin, log)`: the image (for a
/// disassembler) and the log (registers, stack frame and spill bytes per
/// kernel); no GPU needed.
#[pyfunction]
pub fn cuda_ptxas_log(py: Python<'_>, major: i32, minor: i32) -> PyResult<(Py<pyo3::types::PyBytes>, String)> {
    let n = nvrtc()?;
    let (img, log) = py.detach(|| cuda::compile_with_ptxas_log(&n, major, minor)).map_err(PyRuntimeError::new_err)?;
    Ok((pyo3::types::PyBytes::new(py, &img).unbind(), log))
}

/// The normalisers `loss_agg_mode` divides by (`ops::agg_loss::AggMode::divisors`).
#[pyfunction]
pub fn agg_divisors(loss_agg_mode: &str) -> PyResult<Vec<&'static str>> {
    Ok(crate::ops::agg_loss::AggMode::parse(loss_agg_mode).map_err(super::to_py)?.divisors().to_vec())
}

/// The aggregation policy-loss `mode` really uses: LUSPO forces
/// `seq-mean-token-sum` (`ops::policy_loss::LossMode::effective_agg`).
#[pyfunction]
pub fn effective_agg_mode(mode: &str, loss_agg_mode: &str) -> PyResult<&'static str> {
    use crate::ops::{agg_loss::AggMode, policy_loss::LossMode};
    let agg = AggMode::parse(loss_agg_mode).map_err(super::to_py)?;
    Ok(LossMode::parse(mode).map_err(super::to_py)?.effective_agg(agg).name())
}

/// The policy modes by name, and the metrics verl returns for `mode` (as
/// `(name, slot)` pairs: the slot in the metrics buffer the loss writes)
/// (`ops::policy_loss::LossMode::metric_slots`).
#[pyfunction]
pub fn policy_modes() -> Vec<&'static str> {
    crate::ops::policy_loss::POLICY_MODES.iter().map(|(n, _)| *n).collect()
}

#[pyfunction]
pub fn policy_metrics(mode: &str) -> PyResult<Vec<(&'static str, usize)>> {
    use crate::ops::policy_loss::{LossMode, METRIC_SLOTS};
    let m = LossMode::parse(mode).map_err(super::to_py)?;
    Ok(m.metric_slots().iter().map(|&k| (METRIC_SLOTS[k], k)).collect())
}

/// Whether CUDA calls run on the simulator (`LUSPO_RS_CUDA=sim`): CPU
/// tensors are then the simulated `cuda:0` (see `crate::cuda::sim`).
#[pyfunction]
pub fn sim_enabled() -> bool {
    cuda::sim::enabled()
}

/// Turns the simulator on or off for this process (the test suite's switch;
/// users set `LUSPO_RS_CUDA=sim` before the first call).
#[pyfunction]
pub fn sim_set_enabled(on: bool) {
    cuda::sim::set_enabled(on)
}

/// The seed of the next simulated launch's block and thread order (each
/// launch adds 1; `LUSPO_RS_SIM_SEED` sets the first).
#[pyfunction]
pub fn sim_set_seed(seed: u64) {
    cuda::sim::set_seed(seed)
}
