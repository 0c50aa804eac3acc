//! Arguments of the native functions: DLPack import (with the caller's CUDA
//! stream, so producers order their work before ours without a host sync)
//! and the one place that picks the backend from the inputs' device.

use super::{cuda_err, to_py};
use crate::cpu;
use crate::cuda::CudaError;
use crate::error::Error;
use crate::tensor::{Device, Tensor};
use dlpark::python::{from_dlpack, DlpackStream, ImportedDlpack, StreamArg};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

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
}

impl Call {
    pub fn new(stream: Option<usize>) -> Self {
        Call { stream: stream.map(ConsumerStream) }
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
        let tensor = Tensor::from_dlpack(arg, &t, read_only).map_err(to_py)?;
        if writable && read_only {
            return Err(PyValueError::new_err(format!("{arg}: the output buffer is read-only")));
        }
        Ok(Imported { _owner: owner, tensor })
    }

    /// [`Call::import`] of an optional argument (`None` in Python is absent).
    pub fn import_opt(&self, arg: &'static str, obj: Option<&Bound<'_, PyAny>>, writable: bool) -> PyResult<Option<Imported>> {
        obj.filter(|o| !o.is_none()).map(|o| self.import(arg, o, writable)).transpose()
    }

    /// Runs the op on the inputs' device, without the GIL: `cpu` in this
    /// process's rayon pool, or `cuda` given the caller's stream (which CUDA
    /// tensors require).
    pub fn run<T: Send>(
        &self,
        py: Python<'_>,
        device: Device,
        cpu: impl FnOnce() -> crate::error::Result<T> + Send,
        cuda: impl FnOnce(usize) -> Result<T, CudaError> + Send,
    ) -> PyResult<T> {
        match device {
            Device::Cpu => py.detach(|| cpu::pool::install(cpu)).map_err(to_py),
            Device::Cuda(_) => {
                let stream = self.stream.as_ref().map(|s| s.0).ok_or_else(|| {
                    PyValueError::new_err("stream: required for CUDA tensors (torch.cuda.current_stream().cuda_stream)")
                })?;
                py.detach(|| cuda(stream)).map_err(cuda_err)
            }
        }
    }
}

/// A buffer the CUDA kernels need (`scratch`, `order`), or the error naming it.
pub fn needed<'a>(t: &'a Option<Imported>, arg: &'static str, what: String) -> Result<&'a Tensor, CudaError> {
    t.as_ref()
        .map(|t| &t.tensor)
        .ok_or_else(|| CudaError::Arg(Error::value_error(arg, format!("required for CUDA tensors ({what}, on the device)"))))
}
