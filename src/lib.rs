//! luspo-rs: fused LUSPO / GSPO / GRPO policy losses, their gradients and
//! the aggregation verl uses, over caller memory shared through DLPack.
//!
//! The numerical core (`spec`, `tensor`, `policy`, `cpu`) has no Python in
//! it and is tested with `cargo test`. With the `python` feature (turned on
//! by maturin) this file also defines the `luspo_rs._core` extension module;
//! it is the only place that knows PyO3.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ops;
pub mod tensor;

#[cfg(feature = "python")]
mod python {
    use crate::cpu;
    use crate::error::{Error, Kind};
    use crate::ops::policy_loss::{PolicyLossArgs, PolicyLossProblem};
    use crate::ops::agg_loss::{AggProblem, Normalizers};
    use crate::ops::kl_penalty::KlProblem;
    use crate::ops::advantage::AdvantageProblem;
    use crate::tensor::{Tensor, Device, DType};
    use crate::cuda::{self, CudaError};
    use dlpark::python::from_dlpack;
    use dlpark::python::ImportedDlpack;
    use dlpark::python::{DlpackStream, StreamArg};
    use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
    use pyo3::prelude::*;

    fn to_py(e: Error) -> PyErr {
        match e.kind {
            Kind::Type => PyTypeError::new_err(e.to_string()),
            Kind::Value => PyValueError::new_err(e.to_string()),
            Kind::Memory => PyMemoryError::new_err(e.to_string()),
        }
    }

    /// An imported DLPack tensor and its validated description; the import
    /// keeps the producer's memory alive until it is dropped.
    struct Imported {
        _owner: ImportedDlpack,
        tensor: Tensor,
    }

    fn import(arg: &'static str, obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Imported> {
        import_on(arg, obj, writable, None)
    }

    /// The caller's CUDA stream (a `CUstream` handle, e.g.
    /// `torch.cuda.current_stream().cuda_stream`), handed to `__dlpack__` so
    /// the producer orders its work before ours without a host sync (and
    /// does nothing when it is already its current stream).
    struct ConsumerStream(usize);

    // SAFETY: the handle is the caller's live stream for the whole call and
    // is only given to producers of CUDA tensors.
    unsafe impl DlpackStream for ConsumerStream {
        fn as_python_arg(&self, _py: Python<'_>, device: dlpark::ffi::DLDevice) -> PyResult<StreamArg> {
            Ok(if device.device_type == dlpark::ffi::DLDeviceType::CUDA {
                dlpark::python::consumer::stream::cuda(self.0 as *mut std::ffi::c_void)
            } else {
                dlpark::python::consumer::stream::none()
            })
        }

        unsafe fn wait_for_producer(&self, _device: dlpark::ffi::DLDevice, producer: *mut std::ffi::c_void) -> PyResult<bool> {
            // Same stream: already ordered. Otherwise use the Python
            // protocol, whose producer makes our stream wait on an event.
            Ok(producer as usize == self.0)
        }
    }

    fn cuda_err(e: CudaError) -> PyErr {
        match e {
            CudaError::Arg(e) => to_py(e),
            CudaError::Runtime(m) => PyRuntimeError::new_err(format!("luspo_rs CUDA backend: {m}")),
        }
    }

    /// The buffers the loss kernels write on CUDA (allocated by
    /// `luspo_rs._cuda`), imported, and the stream.
    struct CudaLossBuffers {
        loss: Imported,
        scratch: Imported,
        factor: Option<Imported>,
        stream: usize,
    }

    impl CudaLossBuffers {
        fn import(
            loss: Option<&Bound<'_, PyAny>>,
            scratch: Option<&Bound<'_, PyAny>>,
            factor: Option<&Bound<'_, PyAny>>,
            stream: Option<&ConsumerStream>,
        ) -> PyResult<Self> {
            let st = stream.ok_or_else(|| {
                PyValueError::new_err("stream: required for CUDA tensors (torch.cuda.current_stream().cuda_stream)")
            })?;
            let required = |name: &'static str, o: Option<&Bound<'_, PyAny>>, what: &str| {
                let o = o.filter(|o| !o.is_none()).ok_or_else(|| {
                    PyValueError::new_err(format!("{name}: required for CUDA tensors ({what}, on the device)"))
                })?;
                import_on(name, o, true, Some(st))
            };
            Ok(CudaLossBuffers {
                loss: required("loss", loss, "a 0-d float tensor")?,
                scratch: required("scratch", scratch, "float64, cuda_loss_scratch_len(batch) elements")?,
                factor: import_opt_on("factor", factor, Some(st))?,
                stream: st.0,
            })
        }

        fn buffers<'a>(&'a self, metrics: Option<&'a Tensor>) -> cuda::LossBuffers<'a> {
            cuda::LossBuffers {
                loss: &self.loss.tensor,
                metrics,
                scratch: &self.scratch.tensor,
                factor: self.factor.as_ref().map(|f| &f.tensor),
            }
        }
    }

    fn import_on(
        arg: &'static str,
        obj: &Bound<'_, PyAny>,
        writable: bool,
        stream: Option<&ConsumerStream>,
    ) -> PyResult<Imported> {
        let stream = stream.map(|s| s as &dyn DlpackStream);
        if !obj.hasattr("__dlpack__")? {
            return Err(PyTypeError::new_err(format!(
                "{arg}: expected a tensor or array supporting DLPack (__dlpack__), got {}",
                obj.get_type().name()?
            )));
        }
        let owner = from_dlpack(obj.as_borrowed(), stream, Some(false))
            .map_err(|e| PyValueError::new_err(format!("{arg}: DLPack import failed: {e}")))?;
        let t = owner
            .validate()
            .map_err(|e| PyValueError::new_err(format!("{arg}: invalid DLPack tensor: {e}")))?;
        let read_only = owner.flags().contains(dlpark::DlpackFlags::READ_ONLY);
        let tensor = Tensor::from_dlpack(arg, &t, read_only).map_err(to_py)?;
        if writable && read_only {
            return Err(PyValueError::new_err(format!("{arg}: the output buffer is read-only")));
        }
        Ok(Imported { _owner: owner, tensor })
    }

    fn import_opt_on(
        arg: &'static str,
        obj: Option<&Bound<'_, PyAny>>,
        stream: Option<&ConsumerStream>,
    ) -> PyResult<Option<Imported>> {
        obj.filter(|o| !o.is_none()).map(|o| import_on(arg, o, false, stream)).transpose()
    }

    fn cpu_only(tensor: &Tensor) -> PyResult<()> {
        match tensor.device {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(PyValueError::new_err(format!(
                "{}: CUDA tensors are not supported by this build of luspo_rs (CPU only)",
                tensor.arg
            ))),
        }
    }

    /// Writes the four f64 results into `out` (a contiguous float64 CPU
    /// tensor of at least `values.len()` elements).
    fn write_out(out: &Tensor, values: &[f64]) -> PyResult<()> {
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

    /// Fused policy loss. Writes `d loss / d log_prob` into `grad`. On the
    /// CPU, `out` gets `[loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower]`; on
    /// CUDA, `out` gets the three metrics, `loss` (0-d, log_prob's dtype) the
    /// loss, and `scratch`, `factor` and `stream` are as `luspo_rs._cuda` says.
    #[pyfunction]
    #[pyo3(signature = (
        old_log_prob, log_prob, advantages, response_mask, grad, out, *,
        mode, loss_agg_mode, clip_ratio, clip_ratio_low=None, clip_ratio_high=None,
        clip_ratio_c=3.0, rollout_is_weights=None, dp_size=1.0, batch_num_tokens=None,
        global_batch_size=None, loss_scale_factor=None, scratch=None, stream=None,
        clamp_closed=false, loss=None, factor=None
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
        scratch: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        clamp_closed: bool,
        loss: Option<&Bound<'_, PyAny>>,
        factor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let cs = stream.map(ConsumerStream);
        let s = cs.as_ref();
        let old = import_on("old_log_prob", old_log_prob, false, s)?;
        let lp = import_on("log_prob", log_prob, false, s)?;
        let adv = import_on("advantages", advantages, false, s)?;
        let mask = import_on("response_mask", response_mask, false, s)?;
        let w = import_opt_on("rollout_is_weights", rollout_is_weights, s)?;
        let g = import_on("grad", grad, true, s)?;
        let o = import_on("out", out, true, s)?;
        let problem = PolicyLossProblem::new(&PolicyLossArgs {
            old_log_prob: &old.tensor,
            log_prob: &lp.tensor,
            advantages: &adv.tensor,
            response_mask: &mask.tensor,
            rollout_is_weights: w.as_ref().map(|w| &w.tensor),
            grad: &g.tensor,
            mode,
            loss_agg_mode,
            clip_ratio,
            clip_ratio_low,
            clip_ratio_high,
            clip_ratio_c,
            clamp_closed,
            norm: Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor },
        })
        .map_err(to_py)?;
        if let Device::Cuda(_) = lp.tensor.device {
            let b = CudaLossBuffers::import(loss, scratch, factor, cs.as_ref())?;
            return py.detach(|| cuda::policy_loss(&problem, &b.buffers(Some(&o.tensor)), b.stream)).map_err(cuda_err);
        }
        let r = py.detach(|| cpu::pool::install(|| cpu::policy_loss::policy_loss(&problem))).map_err(to_py)?;
        write_out(&o.tensor, &[r.loss, r.pg_clipfrac, r.ppo_kl, r.pg_clipfrac_lower])
    }

    /// verl's `agg_loss`; writes `d loss / d loss_mat` into `grad` and
    /// returns the loss on the CPU. On CUDA it returns None and writes the
    /// loss into `out` (0-d, loss_mat's dtype); `scratch`, `factor` and
    /// `stream` are as for `policy_loss`.
    #[pyfunction]
    #[pyo3(signature = (
        loss_mat, loss_mask, grad, loss_agg_mode, *, dp_size=1.0, batch_num_tokens=None,
        global_batch_size=None, loss_scale_factor=None, out=None, scratch=None, stream=None, factor=None
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
        out: Option<&Bound<'_, PyAny>>,
        scratch: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
        factor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<f64>> {
        let cs = stream.map(ConsumerStream);
        let s = cs.as_ref();
        let l = import_on("loss_mat", loss_mat, false, s)?;
        let m = import_on("loss_mask", loss_mask, false, s)?;
        let g = import_on("grad", grad, true, s)?;
        let norm = Normalizers { dp_size, batch_num_tokens, global_batch_size, loss_scale_factor };
        let problem = AggProblem::new(&l.tensor, &m.tensor, &g.tensor, loss_agg_mode, norm).map_err(to_py)?;
        if let Device::Cuda(_) = l.tensor.device {
            let b = CudaLossBuffers::import(out, scratch, factor, cs.as_ref())?;
            py.detach(|| cuda::agg_loss(&problem, &b.buffers(None), b.stream)).map_err(cuda_err)?;
            return Ok(None);
        }
        Ok(Some(py.detach(|| cpu::pool::install(|| cpu::agg_loss::agg_loss(&problem))).map_err(to_py)?))
    }

    /// Group advantages of verl's outcome estimators: writes the B×T
    /// advantages into `out`. `index` is an integer vector of group labels
    /// (see `group_ids` for arbitrary Python labels). CUDA tensors also need
    /// `order` (a stable argsort of `index`, int64 on the device), `scratch`
    /// and `stream` (see `luspo_rs._cuda`).
    #[pyfunction]
    #[pyo3(signature = (
        token_level_rewards, response_mask, index, out, *, estimator,
        norm_adv_by_std_in_grpo=true, epsilon=1e-6, f_norm=1.0, order=None, scratch=None, stream=None
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
        order: Option<&Bound<'_, PyAny>>,
        scratch: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let cs = stream.map(ConsumerStream);
        let s = cs.as_ref();
        let r = import_on("token_level_rewards", token_level_rewards, false, s)?;
        let m = import_on("response_mask", response_mask, false, s)?;
        let i = import_on("index", index, false, s)?;
        let o = import_on("out", out, true, s)?;
        let problem = AdvantageProblem::new(
            &r.tensor,
            &m.tensor,
            &i.tensor,
            &o.tensor,
            estimator,
            norm_adv_by_std_in_grpo,
            epsilon,
            f_norm,
        )
        .map_err(to_py)?;
        if let Device::Cuda(_) = r.tensor.device {
            let ord = order.filter(|o| !o.is_none()).ok_or_else(|| {
                PyValueError::new_err("order: required for CUDA tensors (a stable argsort of index, int64, on the device)")
            })?;
            let ord = import_on("order", ord, false, s)?;
            let st = cs.as_ref().ok_or_else(|| {
                PyValueError::new_err("stream: required for CUDA tensors (torch.cuda.current_stream().cuda_stream)")
            })?;
            let sc = scratch.filter(|o| !o.is_none()).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "scratch: required for CUDA tensors (float64, {} elements, on the device)",
                    crate::ops::abi::advantage_scratch_len(problem.rewards.rows)
                ))
            })?;
            let sc = import_on("scratch", sc, true, s)?;
            let st = st.0;
            return py.detach(|| cuda::advantage(&problem, &ord.tensor, &sc.tensor, st)).map_err(cuda_err);
        }
        py.detach(|| cpu::pool::install(|| cpu::advantage::compute(&problem))).map_err(to_py)
    }

    /// Dense group ids `0..G` (first-appearance order) of arbitrary hashable
    /// Python labels, grouped by Python equality as a `dict` does (verl's
    /// `id2score[index[i]]`). Writes them into `out` (int64, length `len(index)`)
    /// and returns `G`.
    #[pyfunction]
    fn group_ids(index: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<usize> {
        use pyo3::types::{PyDict, PyList};
        let o = import("out", out, true)?;
        cpu_only(&o.tensor)?;
        let list = match index.cast::<PyList>() {
            Ok(l) => l.clone(),
            Err(_) => PyList::new(index.py(), index.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
        };
        let n = list.len();
        if o.tensor.dtype != DType::I64 || o.tensor.shape != [n] || o.tensor.strides[0] != 1 {
            return Err(PyValueError::new_err(format!("out: expected a contiguous int64 tensor of shape ({n},)")));
        }
        let seen = PyDict::new(index.py());
        // SAFETY: checked above: contiguous int64 of length n, writable.
        let ids = unsafe { std::slice::from_raw_parts_mut(o.tensor.ptr as *mut i64, n) };
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
    /// CUDA tensors are processed on `stream` without waiting.
    #[pyfunction]
    #[pyo3(signature = (logprob, ref_logprob, out, grad, kl_penalty, *, clamp_closed=false, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn kl_penalty(
        py: Python<'_>,
        logprob: &Bound<'_, PyAny>,
        ref_logprob: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        grad: Option<&Bound<'_, PyAny>>,
        kl_penalty: &str,
        clamp_closed: bool,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let cs = stream.map(ConsumerStream);
        let s = cs.as_ref();
        let l = import_on("logprob", logprob, false, s)?;
        let r = import_on("ref_logprob", ref_logprob, false, s)?;
        let o = import_on("out", out, true, s)?;
        let g = match grad.filter(|g| !g.is_none()) {
            Some(g) => Some(import_on("grad", g, true, s)?),
            None => None,
        };
        let problem = KlProblem::new(&l.tensor, &r.tensor, &o.tensor, g.as_ref().map(|g| &g.tensor), kl_penalty, clamp_closed)
            .map_err(to_py)?;
        if let Device::Cuda(_) = l.tensor.device {
            let st = cs.as_ref().ok_or_else(|| {
                PyValueError::new_err("stream: required for CUDA tensors (torch.cuda.current_stream().cuda_stream)")
            })?;
            let st = st.0;
            return py.detach(|| cuda::kl_penalty(&problem, st)).map_err(cuda_err);
        }
        py.detach(|| cpu::pool::install(|| cpu::kl_penalty::compute(&problem))).map_err(to_py)
    }

    /// Backward of the CUDA loss kernels: `grad *= grad_output` in place on
    /// `stream`, skipped on the device when `grad_output` is 1.
    #[pyfunction]
    fn cuda_scale_grad(grad: &Bound<'_, PyAny>, grad_output: &Bound<'_, PyAny>, stream: usize) -> PyResult<()> {
        let cs = ConsumerStream(stream);
        let g = import_on("grad", grad, true, Some(&cs))?;
        let go = import_on("grad_output", grad_output, false, Some(&cs))?;
        if g.tensor.device == Device::Cpu {
            return Err(PyValueError::new_err("grad: expected a CUDA tensor"));
        }
        cuda::scale_grad(&g.tensor, &go.tensor, stream).map_err(cuda_err)
    }

    /// float64 elements of the `scratch` the CUDA loss kernels need for `rows` rows.
    #[pyfunction]
    fn cuda_loss_scratch_len(rows: usize) -> usize {
        crate::ops::abi::loss_scratch_len(rows)
    }

    /// Number of threads the CPU kernels use (this process's pool, see
    /// `cpu::pool`; `RAYON_NUM_THREADS` sets it before the first call).
    #[pyfunction]
    fn num_threads() -> usize {
        cpu::pool::pool().current_num_threads()
    }

    /// Directories searched for NVRTC before the system paths.
    #[pyfunction]
    fn cuda_set_nvrtc_hints(dirs: Vec<std::path::PathBuf>) {
        cuda::set_nvrtc_hints(dirs)
    }

    /// Loads NVRTC if needed and returns `(path, major, minor)`.
    #[pyfunction]
    fn nvrtc_info() -> PyResult<(String, i32, i32)> {
        let n = cuda::nvrtc().map_err(|e| PyRuntimeError::new_err(format!("luspo_rs CUDA backend: {e}")))?;
        let (a, b) = n.version();
        Ok((n.path.display().to_string(), a, b))
    }

    /// Compiles the embedded kernels for compute capability `major.minor`
    /// (`target` "ptx" or "cubin") and returns the image; no GPU needed.
    #[pyfunction]
    #[pyo3(signature = (major, minor, target="ptx"))]
    fn cuda_compile<'py>(py: Python<'py>, major: i32, minor: i32, target: &str) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let t = match target {
            "ptx" => cuda::Target::Ptx,
            "cubin" => cuda::Target::Cubin,
            _ => return Err(PyValueError::new_err(format!("target: expected \"ptx\" or \"cubin\", got {target:?}"))),
        };
        let n = cuda::nvrtc().map_err(|e| PyRuntimeError::new_err(format!("luspo_rs CUDA backend: {e}")))?;
        let img = py.detach(|| cuda::compile(&n, major, minor, t)).map_err(PyRuntimeError::new_err)?;
        Ok(pyo3::types::PyBytes::new(py, &img))
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(cuda_set_nvrtc_hints, m)?)?;
        m.add_function(wrap_pyfunction!(nvrtc_info, m)?)?;
        m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
        m.add_function(wrap_pyfunction!(policy_loss, m)?)?;
        m.add_function(wrap_pyfunction!(agg_loss, m)?)?;
        m.add_function(wrap_pyfunction!(num_threads, m)?)?;
        m.add_function(wrap_pyfunction!(cuda_scale_grad, m)?)?;
        m.add_function(wrap_pyfunction!(cuda_loss_scratch_len, m)?)?;
        m.add_function(wrap_pyfunction!(advantage, m)?)?;
        m.add_function(wrap_pyfunction!(group_ids, m)?)?;
        m.add_function(wrap_pyfunction!(kl_penalty, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
