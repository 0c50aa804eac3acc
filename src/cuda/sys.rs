//! The CUDA driver API and NVRTC, loaded with `dlopen` on first use: the
//! crate links against neither, so it builds and imports where there is no
//! CUDA at all, and a missing library is an error at the first CUDA call.
//!
//! Only the handful of entry points luspo-rs uses are bound; their C ABI has
//! not changed from CUDA 11 to 13.

use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::{Path, PathBuf};

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUcontext = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUstream = *mut c_void;
pub type NvrtcResult = c_int;
pub type NvrtcProgram = *mut c_void;

pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

macro_rules! api {
    ($name:ident { $($f:ident : fn($($a:ty),*) -> $r:ty;)* }) => {
        /// Entry points resolved from the loaded library (kept alive with it).
        #[allow(non_snake_case)]
        pub struct $name {
            /// The library the entry points live in (None: the simulator's, `super::sim`).
            pub lib: Option<Library>,
            /// Where the library was loaded from.
            pub path: PathBuf,
            $(pub $f: unsafe extern "C" fn($($a),*) -> $r,)*
        }
        impl $name {
            /// # Safety
            /// `lib` must be the library these signatures describe.
            #[allow(non_snake_case)]
            unsafe fn resolve(lib: Library, path: PathBuf) -> Result<Self, String> {
                $(
                    let $f = *lib
                        .get::<unsafe extern "C" fn($($a),*) -> $r>(concat!(stringify!($f), "\0").as_bytes())
                        .map_err(|e| format!("{}: missing symbol {}: {e}", path.display(), stringify!($f)))?;
                )*
                Ok($name { lib: Some(lib), path, $($f,)* })
            }
        }
    };
}

api!(Driver {
    cuInit: fn(c_uint) -> CUresult;
    cuDriverGetVersion: fn(*mut c_int) -> CUresult;
    cuDeviceGet: fn(*mut CUdevice, c_int) -> CUresult;
    cuDeviceGetCount: fn(*mut c_int) -> CUresult;
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRetain: fn(*mut CUcontext, CUdevice) -> CUresult;
    cuCtxPushCurrent_v2: fn(CUcontext) -> CUresult;
    cuCtxPopCurrent_v2: fn(*mut CUcontext) -> CUresult;
    cuModuleLoadData: fn(*mut CUmodule, *const c_void) -> CUresult;
    cuModuleGetFunction: fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult;
    cuModuleUnload: fn(CUmodule) -> CUresult;
    cuMemsetD32Async: fn(u64, c_uint, usize, CUstream) -> CUresult;
    cuLaunchKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;
    cuGetErrorString: fn(CUresult, *mut *const c_char) -> CUresult;
});

api!(Nvrtc {
    nvrtcVersion: fn(*mut c_int, *mut c_int) -> NvrtcResult;
    nvrtcGetErrorString: fn(NvrtcResult) -> *const c_char;
    nvrtcCreateProgram: fn(*mut NvrtcProgram, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> NvrtcResult;
    nvrtcCompileProgram: fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult;
    nvrtcGetProgramLogSize: fn(NvrtcProgram, *mut usize) -> NvrtcResult;
    nvrtcGetProgramLog: fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
    nvrtcGetPTXSize: fn(NvrtcProgram, *mut usize) -> NvrtcResult;
    nvrtcGetPTX: fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
    nvrtcGetCUBINSize: fn(NvrtcProgram, *mut usize) -> NvrtcResult;
    nvrtcGetCUBIN: fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
    nvrtcDestroyProgram: fn(*mut NvrtcProgram) -> NvrtcResult;
    nvrtcGetNumSupportedArchs: fn(*mut c_int) -> NvrtcResult;
    nvrtcGetSupportedArchs: fn(*mut c_int) -> NvrtcResult;
});

impl Driver {
    /// Loads `libcuda` (the driver is installed system-wide; it is never in
    /// a wheel). `LUSPO_RS_LIBCUDA` overrides the path.
    pub fn load() -> Result<Self, String> {
        let mut tried = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("LUSPO_RS_LIBCUDA") {
            candidates.push(PathBuf::from(p));
        }
        candidates.extend(["libcuda.so.1", "libcuda.so", "nvcuda.dll"].iter().map(PathBuf::from));
        for c in candidates {
            // SAFETY: libcuda's initialisers are safe to run.
            match unsafe { Library::new(&c) } {
                Ok(lib) => return unsafe { Driver::resolve(lib, c) },
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            }
        }
        Err(format!("the CUDA driver library (libcuda.so.1) was not found; tried {}", tried.join("; ")))
    }

    /// Turns a driver status into a `Result`, naming the call.
    pub fn check(&self, what: &str, r: CUresult) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a static string or leaves it null.
        unsafe { (self.cuGetErrorString)(r, &mut s) };
        let msg = if s.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(s) }.to_string_lossy() };
        Err(format!("{what} failed with CUDA error {r}: {msg}"))
    }
}

/// File names NVRTC has shipped under, newest first.
const NVRTC_NAMES: &[&str] = &[
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
    "libnvrtc.so",
];

/// Where NVRTC is looked for, in order: `LUSPO_RS_NVRTC` (a file or a
/// directory), the directories in `hints` (the Python layer passes the
/// `nvidia/*/lib` directories of PyTorch's CUDA wheels), `CUDA_HOME` /
/// `CUDA_PATH`, `/usr/local/cuda/lib64`, then the loader's own search
/// (`LD_LIBRARY_PATH`, ldconfig).
pub fn nvrtc_candidates(hints: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LUSPO_RS_NVRTC") {
        let p = PathBuf::from(p);
        if p.is_dir() {
            dirs.push(p);
        } else {
            out.push(p);
        }
    }
    dirs.extend(hints.iter().cloned());
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(Path::new(&h).join("lib64"));
            dirs.push(Path::new(&h).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for d in &dirs {
        for n in NVRTC_NAMES {
            let p = d.join(n);
            if p.exists() {
                out.push(p);
            }
        }
    }
    out.extend(NVRTC_NAMES.iter().map(PathBuf::from));
    out
}

impl Nvrtc {
    /// Loads the first NVRTC of [`nvrtc_candidates`] that opens.
    pub fn load(hints: &[PathBuf]) -> Result<Self, String> {
        let mut tried = Vec::new();
        for c in nvrtc_candidates(hints) {
            // SAFETY: NVRTC's initialisers are safe to run.
            match unsafe { Library::new(&c) } {
                Ok(lib) => return unsafe { Nvrtc::resolve(lib, c) },
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            }
        }
        Err(format!(
            "NVRTC (libnvrtc) was not found; install PyTorch's CUDA wheels or the CUDA toolkit, or set \
             LUSPO_RS_NVRTC to the library; tried {}",
            tried.join("; ")
        ))
    }

    /// `(major, minor)` of the loaded NVRTC.
    pub fn version(&self) -> (i32, i32) {
        let (mut a, mut b) = (0, 0);
        // SAFETY: plain out-parameters.
        unsafe { (self.nvrtcVersion)(&mut a, &mut b) };
        (a, b)
    }

    /// Turns an NVRTC status into a `Result`, naming the call.
    pub fn check(&self, what: &str, r: NvrtcResult) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string.
        let s = unsafe { CStr::from_ptr((self.nvrtcGetErrorString)(r)) }.to_string_lossy();
        Err(format!("{what} failed: {s}"))
    }
}
