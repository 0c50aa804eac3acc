//! Arguments of the native functions: DLPack import (with the caller's CUDA
//! stream, so producers order their work before ours without a host sync)
//! and the one place that picks the backend from the inputs' device. Every
//! buffer of a call is recorded: outputs must not overlap themselves, each
//! other or an input (a data race on the CPU, a stray write on the GPU), and
//! with the CUDA simulator on (`LUSPO_RS_CUDA=sim`, `crate::cuda::sim`), CPU
//! tensors are imported as the simulated device `cuda:0` and the simulator
//! checks the kernels' accesses against those buffers.

use super::{cuda_err, to_py};
use crate::cpu;
use crate::cuda::{sim, CudaError};
use crate::error::Error;
use crate::tensor::{Device, Tensor};
use dlpark::python::{from_dlpack, DlpackStream, ImportedDlpack, StreamArg};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::cell::RefCell;

/// An imported DLPack tensor and its validated description; the import
/// keeps the producer's memory alive until it is dropped.
pub struct Imported {
    _owner: ImportedDlpack,
    pub tensor: Tensor,
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

/// One native call: its stream (CUDA tensors only) and how its tensors are
/// imported and its work dispatched.
pub struct Call {
    stream: Option<ConsumerStream>,
    /// The simulator is on: CPU tensors are `cuda:0`.
    simulated: bool,
    /// Every imported tensor's bytes: (name, first, one past the last, writable).
    buffers: RefCell<Vec<(&'static str, u64, u64, bool)>>,
}

impl Call {
    /// A call whose host-only arguments stay on the CPU, simulator or not.
    pub fn host() -> Self {
        Call { stream: None, simulated: false, buffers: RefCell::new(Vec::new()) }
    }

    pub fn new(stream: Option<usize>) -> Self {
        let simulated = sim::enabled();
        // the simulated device has one (synchronous) stream
        let stream = if simulated { Some(stream.unwrap_or(0)) } else { stream };
        Call { stream: stream.map(ConsumerStream), simulated, buffers: RefCell::new(Vec::new()) }
    }

    /// Imports `obj` as the argument `arg`; `writable`: an output.
    pub fn import(&self, arg: &'static str, obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Imported> {
        let stream = self.stream.as_ref().map(|s| s as &dyn DlpackStream);
        if !obj.hasattr("__dlpack__")? {
            return Err(PyTypeError::new_err(format!(
                "{arg}: expected a tensor or array supporting DLPack (__dlpack__), got {}",
                obj.get_type().name()?
            )));
        }
        let owner = from_dlpack(obj.as_borrowed(), stream, Some(false))
            .map_err(|e| PyValueError::new_err(format!("{arg}: DLPack import failed: {e}")))?;
        let t = owner.validate().map_err(|e| PyValueError::new_err(format!("{arg}: invalid DLPack tensor: {e}")))?;
        let read_only = owner.flags().contains(dlpark::DlpackFlags::READ_ONLY);
        let mut tensor = Tensor::from_dlpack(arg, &t, read_only).map_err(to_py)?;
        if writable && read_only {
            return Err(PyValueError::new_err(format!("{arg}: the output buffer is read-only")));
        }
        if writable {
            let inner = tensor.shape.len().checked_sub(1).filter(|&d| tensor.shape[d] > 1);
            if inner.is_some_and(|d| tensor.strides[d] != 1) || tensor.overlaps_itself() {
                return Err(PyValueError::new_err(format!(
                    "{arg}: an output must have unit stride in its last dimension and no two elements in one place \
                     (shape {:?}, strides {:?}); pass a contiguous tensor",
                    tensor.shape, tensor.strides
                )));
            }
        }
        if self.simulated && tensor.device == Device::Cpu {
            tensor.device = Device::Cuda(0);
        }
        let (lo, hi) = tensor.span();
        self.buffers.borrow_mut().push((arg, lo, hi, writable));
        Ok(Imported { _owner: owner, tensor })
    }

    /// [`Call::import`] of an optional argument (`None` in Python is absent).
    pub fn import_opt(&self, arg: &'static str, obj: Option<&Bound<'_, PyAny>>, writable: bool) -> PyResult<Option<Imported>> {
        obj.filter(|o| !o.is_none()).map(|o| self.import(arg, o, writable)).transpose()
    }

    /// Runs the op on the inputs' device, without the GIL: `cpu` in this
    /// process's rayon pool (on this thread for a call of a few KiB, see
    /// `cpu::pool::install`), or `cuda` given the caller's stream (which CUDA
    /// tensors require).
    pub fn run<T: Send>(
        &self,
        py: Python<'_>,
        device: Device,
        cpu: impl FnOnce() -> crate::error::Result<T> + Send,
        cuda: impl FnOnce(usize) -> Result<T, CudaError> + Send,
    ) -> PyResult<T> {
        self.check_disjoint_outputs()?;
        match device {
            Device::Cpu => {
                let bytes = self.buffers.borrow().iter().map(|&(_, lo, hi, _)| hi - lo).sum();
                py.detach(|| cpu::pool::install(bytes, cpu)).map_err(to_py)
            }
            Device::Cuda(_) => {
                let stream = self.stream.as_ref().map(|s| s.0).ok_or_else(|| {
                    PyValueError::new_err("stream: required for CUDA tensors (torch.cuda.current_stream().cuda_stream)")
                })?;
                if self.simulated {
                    let buffers = self.buffers.borrow().clone();
                    return py.detach(|| sim::with_buffers(&buffers, || cuda(stream))).map_err(cuda_err);
                }
                py.detach(|| cuda(stream)).map_err(cuda_err)
            }
        }
    }
}

impl Call {
    /// `ValueError` naming the output that shares memory with another
    /// argument (only non-empty spans can).
    fn check_disjoint_outputs(&self) -> PyResult<()> {
        let b = self.buffers.borrow();
        for (k, &(name, lo, hi, writable)) in b.iter().enumerate() {
            if !writable || lo == hi {
                continue;
            }
            for (j, &(other, olo, ohi, ow)) in b.iter().enumerate() {
                if j != k && olo < ohi && lo < ohi && olo < hi && (!ow || j < k) {
                    let what = if ow { "output" } else { "input" };
                    return Err(PyValueError::new_err(format!(
                        "{name}: the output shares memory with the {what} `{other}`; pass a separate buffer"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A buffer the CUDA kernels need (`scratch`, `order`), or the error naming it.
pub fn needed<'a>(t: &'a Option<Imported>, arg: &'static str, what: String) -> Result<&'a Tensor, CudaError> {
    t.as_ref()
        .map(|t| &t.tensor)
        .ok_or_else(|| CudaError::Arg(Error::value_error(arg, format!("required for CUDA tensors ({what}, on the device)"))))
}
