//! luspo-rs: fused LUSPO / GSPO / GRPO policy losses, their gradients and
//! the aggregation verl uses, over caller memory shared through DLPack.
//!
//! The numerical core (`spec`, `tensor`, `policy`, `cpu`) has no Python in
//! it and is tested with `cargo test`. With the `python` feature (turned on
//! by maturin) this file also defines the `luspo_rs._core` extension module;
//! it is the only place that knows PyO3.

pub mod cpu;
pub mod error;
pub mod policy;
pub mod spec;
pub mod tensor;

#[cfg(feature = "python")]
mod python {
    use crate::cpu;
    use crate::error::{Error, Kind};
    use crate::policy::{PolicyLossArgs, PolicyLossProblem};
    use crate::spec::Normalizers;
    use crate::tensor::{Desc, Device, DType};
    use dlpark::python::from_dlpack;
    use dlpark::python::ImportedDlpack;
    use pyo3::exceptions::{PyTypeError, PyValueError};
    use pyo3::prelude::*;

    fn to_py(e: Error) -> PyErr {
        match e.kind {
            Kind::Type => PyTypeError::new_err(e.to_string()),
            Kind::Value => PyValueError::new_err(e.to_string()),
        }
    }

    /// An imported DLPack tensor and its validated description; the import
    /// keeps the producer's memory alive until it is dropped.
    struct Imported {
        _owner: ImportedDlpack,
        desc: Desc,
    }

    fn import(arg: &'static str, obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Imported> {
        if !obj.hasattr("__dlpack__")? {
            return Err(PyTypeError::new_err(format!(
                "{arg}: expected a tensor or array supporting DLPack (__dlpack__), got {}",
                obj.get_type().name()?
            )));
        }
        let owner = from_dlpack(obj.as_borrowed(), None, Some(false))
            .map_err(|e| PyValueError::new_err(format!("{arg}: DLPack import failed: {e}")))?;
        let t = owner
            .validate()
            .map_err(|e| PyValueError::new_err(format!("{arg}: invalid DLPack tensor: {e}")))?;
        let read_only = owner.flags().contains(dlpark::DlpackFlags::READ_ONLY);
        let desc = Desc::from_dlpack(arg, &t, read_only).map_err(to_py)?;
        if writable && read_only {
            return Err(PyValueError::new_err(format!("{arg}: the output buffer is read-only")));
        }
        drop(t);
        Ok(Imported { _owner: owner, desc })
    }

    fn import_opt(arg: &'static str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Imported>> {
        obj.filter(|o| !o.is_none()).map(|o| import(arg, o, false)).transpose()
    }

    fn cpu_only(desc: &Desc) -> PyResult<()> {
        match desc.device {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(PyValueError::new_err(format!(
                "{}: CUDA tensors are not supported by this build of luspo_rs (CPU only)",
                desc.arg
            ))),
        }
    }

    /// Writes the four f64 results into `out` (a contiguous float64 CPU
    /// tensor of at least `values.len()` elements).
    fn write_out(out: &Desc, values: &[f64]) -> PyResult<()> {
        if out.dtype != DType::F64 || out.shape.iter().product::<usize>() < values.len() || out.read_only {
            return Err(PyValueError::new_err(format!(
                "out: expected a writable float64 tensor with at least {} elements",
                values.len()
            )));
        }
        if out.shape.len() != 1 || out.strides[0] != 1 {
            return Err(PyValueError::new_err("out: expected a contiguous 1-D tensor"));
        }
        // SAFETY: checked above: f64, contiguous, long enough, writable.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out.ptr as *mut f64, values.len()) };
        Ok(())
    }

    /// Fused policy loss. Writes `d loss / d log_prob` into `grad` and
    /// `[loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower]` into `out`.
    #[pyfunction]
    #[pyo3(signature = (
        old_log_prob, log_prob, advantages, response_mask, grad, out, *,
        mode, loss_agg_mode, clip_ratio, clip_ratio_low=None, clip_ratio_high=None,
        clip_ratio_c=3.0, rollout_is_weights=None, dp_size=1.0, batch_num_tokens=None,
        global_batch_size=None, loss_scale_factor=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn policy_loss(
        py: Python<'_>,
        old_log_prob: &Bound<'_, PyAny>,
        log_prob: &Bound<'_, PyAny>,
        advantages: &Bound<'_, PyAny>,
        response_mask: &Bound<'_, PyAny>,
        grad: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        mode: &str,
        loss_agg_mode: &str,
        clip_ratio: f64,
        clip_ratio_low: Option<f64>,
        clip_ratio_high: Option<f64>,
        clip_ratio_c: f64,
        rollout_is_weights: Option<&Bound<'_, PyAny>>,
        dp_size: f64,
        batch_num_tokens: Option<f64>,
        global_batch_size: Option<f64>,
        loss_scale_factor: Option<f64>,
    ) -> PyResult<()> {
        let old = import("old_log_prob", old_log_prob, false)?;
        let lp = import("log_prob", log_prob, false)?;
        let adv = import("advantages", advantages, false)?;
        let mask = import("response_mask", response_mask, false)?;
        let w = import_opt("rollout_is_weights", rollout_is_weights)?;
        let g = import("grad", grad, true)?;
        let o = import("out", out, true)?;
        let problem = PolicyLossProblem::new(&PolicyLossArgs {
            old_log_prob: &old.desc,
            log_prob: &lp.desc,
            advantages: &adv.desc,
            response_mask: &mask.desc,
            rollout_is_weights: w.as_ref().map(|w| &w.desc),
            grad: &g.desc,
            mode,
            loss_agg_mode,
            clip_ratio,
            clip_ratio_low,
            clip_ratio_high,
            clip_ratio_c,
            norm: Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor },
        })
        .map_err(to_py)?;
        cpu_only(&lp.desc)?;
        let r = py.detach(|| cpu::policy_loss::policy_loss(&problem));
        write_out(&o.desc, &[r.loss, r.pg_clipfrac, r.ppo_kl, r.pg_clipfrac_lower])
    }

    /// verl's `agg_loss`; writes `d loss / d loss_mat` into `grad` and
    /// returns the loss.
    #[pyfunction]
    #[pyo3(signature = (
        loss_mat, loss_mask, grad, loss_agg_mode, *, dp_size=1.0, batch_num_tokens=None,
        global_batch_size=None, loss_scale_factor=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn agg_loss(
        py: Python<'_>,
        loss_mat: &Bound<'_, PyAny>,
        loss_mask: &Bound<'_, PyAny>,
        grad: &Bound<'_, PyAny>,
        loss_agg_mode: &str,
        dp_size: f64,
        batch_num_tokens: Option<f64>,
        global_batch_size: Option<f64>,
        loss_scale_factor: Option<f64>,
    ) -> PyResult<f64> {
        let l = import("loss_mat", loss_mat, false)?;
        let m = import("loss_mask", loss_mask, false)?;
        let g = import("grad", grad, true)?;
        let norm = Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor };
        let problem = cpu::agg::AggProblem::new(&l.desc, &m.desc, &g.desc, loss_agg_mode, norm).map_err(to_py)?;
        cpu_only(&l.desc)?;
        Ok(py.detach(|| cpu::agg::agg_loss(&problem)))
    }

    /// Group advantages of verl's outcome estimators: writes the B×T
    /// advantages into `out`. `index` is an integer vector of group labels
    /// (see `group_ids` for arbitrary Python labels).
    #[pyfunction]
    #[pyo3(signature = (
        token_level_rewards, response_mask, index, out, *, estimator,
        norm_adv_by_std_in_grpo=true, epsilon=1e-6, f_norm=1.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn advantage(
        py: Python<'_>,
        token_level_rewards: &Bound<'_, PyAny>,
        response_mask: &Bound<'_, PyAny>,
        index: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        estimator: &str,
        norm_adv_by_std_in_grpo: bool,
        epsilon: f64,
        f_norm: f64,
    ) -> PyResult<()> {
        let r = import("token_level_rewards", token_level_rewards, false)?;
        let m = import("response_mask", response_mask, false)?;
        let i = import("index", index, false)?;
        let o = import("out", out, true)?;
        let problem = cpu::advantage::AdvantageProblem::new(
            &r.desc,
            &m.desc,
            &i.desc,
            &o.desc,
            estimator,
            norm_adv_by_std_in_grpo,
            epsilon,
            f_norm,
        )
        .map_err(to_py)?;
        cpu_only(&r.desc)?;
        py.detach(|| cpu::advantage::compute(&problem));
        Ok(())
    }

    /// Dense group ids `0..G` (first-appearance order) of arbitrary hashable
    /// Python labels, grouped by Python equality as a `dict` does (verl's
    /// `id2score[index[i]]`). Writes them into `out` (int64, length `len(index)`)
    /// and returns `G`.
    #[pyfunction]
    fn group_ids(index: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<usize> {
        use pyo3::types::{PyDict, PyList};
        let o = import("out", out, true)?;
        cpu_only(&o.desc)?;
        let list = match index.cast::<PyList>() {
            Ok(l) => l.clone(),
            Err(_) => PyList::new(index.py(), index.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
        };
        let n = list.len();
        if o.desc.dtype != DType::I64 || o.desc.shape != [n] || o.desc.strides[0] != 1 {
            return Err(PyValueError::new_err(format!("out: expected a contiguous int64 tensor of shape ({n},)")));
        }
        let seen = PyDict::new(index.py());
        // SAFETY: checked above: contiguous int64 of length n, writable.
        let ids = unsafe { std::slice::from_raw_parts_mut(o.desc.ptr as *mut i64, n) };
        for (k, item) in list.iter().enumerate() {
            let id = match seen.get_item(&item).map_err(|e| {
                PyTypeError::new_err(format!("index: element {k} is not a hashable group label: {e}"))
            })? {
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

    /// verl's `kl_penalty`: writes the estimate into `out` and, when given,
    /// `d out / d logprob` into `grad` (`d / d ref_logprob` is its negative).
    #[pyfunction]
    #[pyo3(signature = (logprob, ref_logprob, out, grad, kl_penalty))]
    fn kl_penalty(
        py: Python<'_>,
        logprob: &Bound<'_, PyAny>,
        ref_logprob: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        grad: Option<&Bound<'_, PyAny>>,
        kl_penalty: &str,
    ) -> PyResult<()> {
        let l = import("logprob", logprob, false)?;
        let r = import("ref_logprob", ref_logprob, false)?;
        let o = import("out", out, true)?;
        let g = match grad.filter(|g| !g.is_none()) {
            Some(g) => Some(import("grad", g, true)?),
            None => None,
        };
        let problem = cpu::kl::KlProblem::new(&l.desc, &r.desc, &o.desc, g.as_ref().map(|g| &g.desc), kl_penalty)
            .map_err(to_py)?;
        cpu_only(&l.desc)?;
        py.detach(|| cpu::kl::compute(&problem));
        Ok(())
    }

    /// Number of threads the CPU kernels use (rayon's global pool;
    /// `RAYON_NUM_THREADS` sets it before the first call).
    #[pyfunction]
    fn num_threads() -> usize {
        rayon::current_num_threads()
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(policy_loss, m)?)?;
        m.add_function(wrap_pyfunction!(agg_loss, m)?)?;
        m.add_function(wrap_pyfunction!(num_threads, m)?)?;
        m.add_function(wrap_pyfunction!(advantage, m)?)?;
        m.add_function(wrap_pyfunction!(group_ids, m)?)?;
        m.add_function(wrap_pyfunction!(kl_penalty, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
