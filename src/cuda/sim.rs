//! The CUDA simulator: our kernels, built for the host, behind the same
//! driver and NVRTC tables ([`Driver`], [`Nvrtc`]) that `runtime.rs` uses on
//! a GPU, so that the launchers, the cubin cache and the module loading run
//! unchanged, in every `make test`, on machines without a GPU.
//!
//! Switched on by `LUSPO_RS_CUDA=sim` (read at the first CUDA call; tests flip
//! it with [`set_enabled`]): CPU tensors are then the simulated device
//! `cuda:0`, and `src/python/args.rs` sends them to the CUDA launchers.
//!
//! * "NVRTC" compiles the translation unit `runtime.rs` hands it with the
//!   host's C++ compiler (`$CXX`, else `g++`, at `-O2` with strict aliasing
//!   on), after the emulation header `sim/sim.h`, and returns the shared
//!   object as the "cubin". A first pass (`-E`) lists the kernels, and a
//!   table of them is compiled in.
//! * The "driver" loads that object (`cuModuleLoadData`), looks kernels up
//!   by name, memsets and launches synchronously: every thread of every
//!   block runs (`sim/sim.h` tells how). Every access a kernel makes is
//!   checked against the buffers of the native call that launched it
//!   ([`with_buffers`]); a bad one fails the launch with an error that names
//!   the kernel, the buffer and the offset.
//! * Blocks and threads run in an order shuffled by a seed:
//!   `LUSPO_RS_SIM_SEED` (default 0) plus the number of launches before, or
//!   [`set_seed`].

use super::sys::{CUcontext, CUdevice, CUfunction, CUmodule, CUresult, CUstream, Driver, NvrtcProgram, NvrtcResult, Nvrtc};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const SIM_H: &str = include_str!("sim/sim.h");
const LAUNCH_H: &str = include_str!("sim/launch.h");
const LAUNCH_IMPL: &str = include_str!("sim/launch_impl.h");

// ---------------------------------------------------------------- the switch

/// 0: not read yet, 1: off, 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether CUDA calls go to the simulator (`LUSPO_RS_CUDA=sim`).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("LUSPO_RS_CUDA").is_ok_and(|v| v == "sim");
            ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Turns the simulator on or off for the rest of the process (tests).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

static SEED: OnceLock<AtomicU64> = OnceLock::new();

fn seed() -> &'static AtomicU64 {
    SEED.get_or_init(|| {
        AtomicU64::new(std::env::var("LUSPO_RS_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0))
    })
}

/// The seed of the next launch's block and thread order (each launch adds 1).
pub fn set_seed(s: u64) {
    seed().store(s, Ordering::Relaxed);
}

// ---------------------------------------------------------------- buffers

/// A buffer a native call hands to its kernels (`Region` in sim/sim.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct Region {
    lo: u64,
    hi: u64,
    name: *const c_char,
    writable: i64,
}

thread_local! {
    /// The buffers of the native call running on this thread, and their names.
    static BUFFERS: RefCell<(Vec<Region>, Vec<CString>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// The last failure's message, for `cuGetErrorString`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs `f` with `buffers` (name, first byte, one past the last byte,
/// writable) as the memory its launches may touch.
pub fn with_buffers<T>(buffers: &[(&str, u64, u64, bool)], f: impl FnOnce() -> T) -> T {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        let names: Vec<CString> = buffers.iter().map(|(n, ..)| CString::new(*n).unwrap_or_default()).collect();
        b.0 = buffers
            .iter()
            .zip(&names)
            .map(|(&(_, lo, hi, w), n)| Region { lo, hi, name: n.as_ptr(), writable: w as i64 })
            .collect();
        b.1 = names;
    });
    let r = f();
    BUFFERS.with(|b| *b.borrow_mut() = (Vec::new(), Vec::new()));
    r
}

fn set_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg.replace('\0', " ")).unwrap_or_default());
}

// ---------------------------------------------------------------- "NVRTC": the host compiler

struct Program {
    src: String,
    log: CString,
    image: Vec<u8>,
}

fn cxx() -> String {
    std::env::var("CXX").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "g++".into())
}

/// Runs the host compiler on `source` (from stdin) with `args`.
fn run_cxx(args: &[&str], source: &str) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(cxx())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("the simulator needs a C++ compiler ({}): {e}", cxx()))?;
    let mut stdin = child.stdin.take().unwrap();
    let src = source.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(src.as_bytes()));
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(out.stdout)
}

/// The kernels (`extern "C" __global__` functions) of the preprocessed unit.
fn kernel_names(preprocessed: &str) -> Vec<String> {
    let mut names = Vec::new();
    for part in preprocessed.split("luspo_rs_sim_kernel").skip(1) {
        let rest = part.trim_start().strip_prefix("void").unwrap_or("").trim_start();
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Compiles `src` (the unit NVRTC would get) into the simulator's shared object.
fn build(src: &str, opts: &[String]) -> Result<Vec<u8>, String> {
    let std_opt = opts.iter().find_map(|o| o.strip_prefix("--std=")).unwrap_or("c++14");
    let std_flag = format!("-std={std_opt}");
    let unit = format!("{SIM_H}\n#line 1 \"prelude\"\n{src}");
    let pre = run_cxx(&[&std_flag, "-E", "-P", "-DLUSPO_RS_SIM_SCAN", "-x", "c++", "-"], &unit)?;
    let names = kernel_names(&String::from_utf8_lossy(&pre));
    if names.is_empty() {
        return Err("the simulator found no kernel (`extern \"C\" __global__` function) in the source".into());
    }
    let table: String = names.iter().map(|n| format!("    {{\"{n}\", &::sim::Invoke<decltype(&{n}), &{n}>::run}},\n")).collect();
    let full = format!("{unit}\n{LAUNCH_H}\nstatic const ::sim::Kernel luspo_rs_sim_kernels[] = {{\n{table}}};\n{LAUNCH_IMPL}");
    let dir = scratch_dir("build")?;
    let out = dir.join("kernels.so");
    let out_s = out.to_string_lossy().into_owned();
    // --fmad=false: no contraction on the host either
    let r = run_cxx(
        &[&std_flag, "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-x", "c++", "-", "-o", &out_s],
        &full,
    )
    .and_then(|_| std::fs::read(&out).map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn scratch_dir(what: &str) -> Result<PathBuf, String> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "luspo_rs_sim_{what}_{}_{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

unsafe extern "C" fn nvrtc_version(major: *mut c_int, minor: *mut c_int) -> NvrtcResult {
    *major = 0;
    *minor = 0;
    0
}

unsafe extern "C" fn nvrtc_error_string(r: NvrtcResult) -> *const c_char {
    match r {
        0 => c"NVRTC_SUCCESS".as_ptr(),
        6 => c"NVRTC_ERROR_COMPILATION (the simulator's host compiler)".as_ptr(),
        _ => c"NVRTC_ERROR_INVALID_INPUT".as_ptr(),
    }
}

unsafe extern "C" fn nvrtc_create(
    prog: *mut NvrtcProgram,
    src: *const c_char,
    _name: *const c_char,
    _n: c_int,
    _h: *const *const c_char,
    _i: *const *const c_char,
) -> NvrtcResult {
    let src = CStr::from_ptr(src).to_string_lossy().into_owned();
    *prog = Box::into_raw(Box::new(Program { src, log: CString::default(), image: Vec::new() })) as NvrtcProgram;
    0
}

/// The architectures the simulator's NVRTC says it knows (as
/// `nvrtcGetSupportedArchs`: 10 * major + minor), and the architecture
/// option of its last compile: the tests of the PTX fallback set and read them.
static ARCHS: Mutex<Vec<c_int>> = Mutex::new(Vec::new());
static LAST_ARCH: Mutex<String> = Mutex::new(String::new());
const DEFAULT_ARCHS: [c_int; 6] = [70, 75, 80, 86, 89, 90];

/// Sets the architectures the simulator's NVRTC knows (empty: the default,
/// sm_70 to sm_90).
pub fn set_supported_archs(archs: &[i32]) {
    *ARCHS.lock().unwrap_or_else(|e| e.into_inner()) = archs.to_vec();
}

/// The `--gpu-architecture=` option of the simulator's last compile.
pub fn last_arch() -> String {
    LAST_ARCH.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn archs() -> Vec<c_int> {
    let a = ARCHS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if a.is_empty() {
        DEFAULT_ARCHS.to_vec()
    } else {
        a
    }
}

unsafe extern "C" fn nvrtc_num_archs(n: *mut c_int) -> NvrtcResult {
    *n = archs().len() as c_int;
    0
}

unsafe extern "C" fn nvrtc_archs(out: *mut c_int) -> NvrtcResult {
    for (k, a) in archs().into_iter().enumerate() {
        *out.add(k) = a;
    }
    0
}

unsafe extern "C" fn nvrtc_compile(prog: NvrtcProgram, n: c_int, opts: *const *const c_char) -> NvrtcResult {
    let p = &mut *(prog as *mut Program);
    let opts: Vec<String> = (0..n as usize).map(|k| CStr::from_ptr(*opts.add(k)).to_string_lossy().into_owned()).collect();
    if let Some(a) = opts.iter().find(|o| o.starts_with("--gpu-architecture=")) {
        *LAST_ARCH.lock().unwrap_or_else(|e| e.into_inner()) = a.clone();
    }
    match build(&p.src, &opts) {
        Ok(img) => {
            p.image = img;
            0
        }
        Err(log) => {
            p.log = CString::new(log.replace('\0', " ")).unwrap_or_default();
            6
        }
    }
}

unsafe extern "C" fn nvrtc_log_size(prog: NvrtcProgram, n: *mut usize) -> NvrtcResult {
    *n = (*(prog as *mut Program)).log.as_bytes_with_nul().len();
    0
}

unsafe extern "C" fn nvrtc_log(prog: NvrtcProgram, out: *mut c_char) -> NvrtcResult {
    let log = (*(prog as *mut Program)).log.as_bytes_with_nul();
    std::ptr::copy_nonoverlapping(log.as_ptr() as *const c_char, out, log.len());
    0
}

unsafe extern "C" fn nvrtc_image_size(prog: NvrtcProgram, n: *mut usize) -> NvrtcResult {
    *n = (*(prog as *mut Program)).image.len();
    0
}

unsafe extern "C" fn nvrtc_image(prog: NvrtcProgram, out: *mut c_char) -> NvrtcResult {
    let img = &(*(prog as *mut Program)).image;
    std::ptr::copy_nonoverlapping(img.as_ptr() as *const c_char, out, img.len());
    0
}

unsafe extern "C" fn nvrtc_destroy(prog: *mut NvrtcProgram) -> NvrtcResult {
    if !(*prog).is_null() {
        drop(Box::from_raw(*prog as *mut Program));
        *prog = std::ptr::null_mut();
    }
    0
}

/// The simulator's NVRTC table. Its `path` names the emulation header's
/// version and the compiler, so the cubin cache keeps one image per both.
pub fn nvrtc() -> Arc<Nvrtc> {
    static N: OnceLock<Arc<Nvrtc>> = OnceLock::new();
    N.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (SIM_H, LAUNCH_H, LAUNCH_IMPL, cxx()).hash(&mut h);
        Arc::new(Nvrtc {
            lib: None,
            path: PathBuf::from(format!("<luspo_rs simulator {:016x}, {}>", h.finish(), cxx())),
            nvrtcVersion: nvrtc_version,
            nvrtcGetErrorString: nvrtc_error_string,
            nvrtcCreateProgram: nvrtc_create,
            nvrtcCompileProgram: nvrtc_compile,
            nvrtcGetProgramLogSize: nvrtc_log_size,
            nvrtcGetProgramLog: nvrtc_log,
            nvrtcGetPTXSize: nvrtc_image_size,
            nvrtcGetPTX: nvrtc_image,
            nvrtcGetCUBINSize: nvrtc_image_size,
            nvrtcGetCUBIN: nvrtc_image,
            nvrtcDestroyProgram: nvrtc_destroy,
            nvrtcGetNumSupportedArchs: nvrtc_num_archs,
            nvrtcGetSupportedArchs: nvrtc_archs,
        })
    })
    .clone()
}

// ---------------------------------------------------------------- the "driver"

const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
const CUDA_ERROR_NOT_FOUND: CUresult = 500;
const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;

type FindFn = unsafe extern "C" fn(*const c_char) -> c_int;
type LaunchFn =
    unsafe extern "C" fn(c_int, c_uint, c_uint, *mut *mut c_void, *const Region, usize, u64, *mut c_char, usize) -> c_int;

/// A loaded simulator image.
struct Module {
    _lib: libloading::Library,
    find: FindFn,
    launch: LaunchFn,
}

struct Function {
    module: *const Module,
    index: c_int,
    name: String,
}

/// Bytes of the ELF image at `p`: the end of its section header table or of
/// its last section, whichever is further.
unsafe fn elf_len(p: *const u8) -> Option<usize> {
    let head = std::slice::from_raw_parts(p, 64);
    if &head[..4] != b"\x7fELF" || head[4] != 2 {
        return None;
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum) = (u64_at(head, 0x28), u16_at(head, 0x3a), u16_at(head, 0x3c));
    let mut end = shoff + shentsize * shnum;
    for k in 0..shnum {
        let sh = std::slice::from_raw_parts(p.add(shoff + k * shentsize), shentsize);
        let nobits = u32::from_le_bytes(sh[4..8].try_into().unwrap()) == 8;
        if !nobits {
            end = end.max(u64_at(sh, 0x18) + u64_at(sh, 0x20));
        }
    }
    Some(end)
}

unsafe extern "C" fn cu_init(_flags: c_uint) -> CUresult {
    0
}
unsafe extern "C" fn cu_driver_version(v: *mut c_int) -> CUresult {
    *v = 13000;
    0
}
unsafe extern "C" fn cu_device_get(d: *mut CUdevice, ordinal: c_int) -> CUresult {
    *d = ordinal;
    if ordinal == 0 {
        0
    } else {
        CUDA_ERROR_INVALID_VALUE
    }
}
unsafe extern "C" fn cu_device_count(n: *mut c_int) -> CUresult {
    *n = 1;
    0
}
unsafe extern "C" fn cu_device_attribute(v: *mut c_int, attr: c_int, _d: CUdevice) -> CUresult {
    use super::sys::*;
    *v = match attr {
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR => 9,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR => 0,
        // (the PTX fallback is tested below the device table: runtime::load_module)
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT => 132,
        _ => return CUDA_ERROR_INVALID_VALUE,
    };
    0
}
unsafe extern "C" fn cu_ctx_retain(ctx: *mut CUcontext, _d: CUdevice) -> CUresult {
    *ctx = 1usize as CUcontext;
    0
}
unsafe extern "C" fn cu_ctx_push(_ctx: CUcontext) -> CUresult {
    0
}
unsafe extern "C" fn cu_ctx_pop(ctx: *mut CUcontext) -> CUresult {
    if !ctx.is_null() {
        *ctx = 1usize as CUcontext;
    }
    0
}

unsafe extern "C" fn cu_module_load(m: *mut CUmodule, image: *const c_void) -> CUresult {
    let fail = |msg: String| {
        set_error(msg);
        CUDA_ERROR_INVALID_IMAGE
    };
    let Some(len) = elf_len(image as *const u8) else {
        return fail("the simulator's module image is not a shared object".into());
    };
    let bytes = std::slice::from_raw_parts(image as *const u8, len);
    let dir = match scratch_dir("module") {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let path = dir.join("kernels.so");
    let loaded = std::fs::write(&path, bytes).map_err(|e| e.to_string()).and_then(|_| {
        // SAFETY: the simulator's own image, whose initialisers are plain C++ statics.
        let lib = libloading::Library::new(&path).map_err(|e| e.to_string())?;
        let find = *lib.get::<FindFn>(b"luspo_rs_sim_find\0").map_err(|e| e.to_string())?;
        let launch = *lib.get::<LaunchFn>(b"luspo_rs_sim_launch\0").map_err(|e| e.to_string())?;
        Ok(Module { _lib: lib, find, launch })
    });
    let _ = std::fs::remove_dir_all(&dir);
    match loaded {
        Ok(module) => {
            *m = Box::into_raw(Box::new(module)) as CUmodule;
            0
        }
        Err(e) => fail(format!("the simulator could not load its image: {e}")),
    }
}

unsafe extern "C" fn cu_module_unload(m: CUmodule) -> CUresult {
    if m.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    drop(Box::from_raw(m as *mut Module));
    0
}

unsafe extern "C" fn cu_module_function(f: *mut CUfunction, m: CUmodule, name: *const c_char) -> CUresult {
    let module = m as *const Module;
    let index = ((*module).find)(name);
    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
    if index < 0 {
        set_error(format!("no kernel named {name} in the simulator's image"));
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = Box::into_raw(Box::new(Function { module, index, name })) as CUfunction;
    0
}

/// Whether `[lo, lo + len)` lies in one writable buffer of the running call.
fn writable(lo: u64, len: u64) -> bool {
    BUFFERS.with(|b| b.borrow().0.iter().any(|r| r.writable != 0 && lo >= r.lo && lo + len <= r.hi))
}

unsafe extern "C" fn cu_memset_d32(ptr: u64, value: c_uint, n: usize, _s: CUstream) -> CUresult {
    if !writable(ptr, 4 * n as u64) || ptr % 4 != 0 {
        set_error(format!("cuMemsetD32Async of {n} words at {ptr:#x}: not within one output buffer of the call"));
        return CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    std::slice::from_raw_parts_mut(ptr as *mut u32, n).fill(value);
    0
}

/// One launch at a time in the process: the image's shared memory and
/// stacks are per image, not per thread.
static LAUNCH: Mutex<()> = Mutex::new(());

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn cu_launch(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    _shared: c_uint,
    _s: CUstream,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    let f = &*(f as *const Function);
    if gy != 1 || gz != 1 || by != 1 || bz != 1 {
        set_error(format!("{}: the simulator runs one-dimensional launches only", f.name));
        return CUDA_ERROR_INVALID_VALUE;
    }
    let regions: Vec<Region> = BUFFERS.with(|b| b.borrow().0.clone());
    let mut err = vec![0u8; 1024];
    let seed = seed().fetch_add(1, Ordering::Relaxed);
    let _g = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
    let r = ((*f.module).launch)(
        f.index,
        gx,
        bx,
        params,
        regions.as_ptr(),
        regions.len(),
        seed,
        err.as_mut_ptr() as *mut c_char,
        err.len(),
    );
    if r == 0 {
        return 0;
    }
    let msg = CStr::from_bytes_until_nul(&err).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    set_error(format!("simulated launch of {} ({gx} blocks of {bx}, seed {seed}): {msg}", f.name));
    r
}

unsafe extern "C" fn cu_error_string(_r: CUresult, s: *mut *const c_char) -> CUresult {
    *s = LAST_ERROR.with(|e| e.borrow().as_ptr());
    0
}

/// The simulator's driver table: one device (`cuda:0`, compute capability
/// 9.0) whose memory is the host's.
pub fn driver() -> Arc<Driver> {
    static D: OnceLock<Arc<Driver>> = OnceLock::new();
    D.get_or_init(|| {
        Arc::new(Driver {
            lib: None,
            path: PathBuf::from("<luspo_rs simulator>"),
            cuInit: cu_init,
            cuDriverGetVersion: cu_driver_version,
            cuDeviceGet: cu_device_get,
            cuDeviceGetCount: cu_device_count,
            cuDeviceGetAttribute: cu_device_attribute,
            cuDevicePrimaryCtxRetain: cu_ctx_retain,
            cuCtxPushCurrent_v2: cu_ctx_push,
            cuCtxPopCurrent_v2: cu_ctx_pop,
            cuModuleLoadData: cu_module_load,
            cuModuleGetFunction: cu_module_function,
            cuModuleUnload: cu_module_unload,
            cuMemsetD32Async: cu_memset_d32,
            cuLaunchKernel: cu_launch,
            cuGetErrorString: cu_error_string,
        })
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit runtime.rs compiles builds for the host and loads, and every
    /// entry point the launchers look up is in it.
    #[test]
    fn the_kernels_build_load_and_are_found() {
        let img = super::super::runtime::compile(&nvrtc(), 9, 0, super::super::runtime::Target::Cubin).unwrap();
        assert!(img.starts_with(b"\x7fELF"));
        assert_eq!(unsafe { elf_len(img.as_ptr()) }, Some(img.len()));
        let d = driver();
        let mut m: CUmodule = std::ptr::null_mut();
        assert_eq!(unsafe { (d.cuModuleLoadData)(&mut m, img.as_ptr() as *const c_void) }, 0);
        for name in super::super::runtime::tests::kernel_names() {
            let mut f: CUfunction = std::ptr::null_mut();
            let c = CString::new(name.clone()).unwrap();
            assert_eq!(unsafe { (d.cuModuleGetFunction)(&mut f, m, c.as_ptr()) }, 0, "{name}");
        }
        let mut f: CUfunction = std::ptr::null_mut();
        assert_eq!(unsafe { (d.cuModuleGetFunction)(&mut f, m, c"no_such_kernel".as_ptr()) }, CUDA_ERROR_NOT_FOUND);
    }

    /// Kernels that exercise the execution model, one per property.
    const MODEL: &str = r#"
struct Buf { int *out; const int *in; long long n; };
extern "C" __global__ void barrier(Buf a) {
    __shared__ int sh[256];
    sh[threadIdx.x] = (int)threadIdx.x * 3;
    __syncthreads();
    *GLOBAL(a.out + blockIdx.x * blockDim.x + threadIdx.x) = sh[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void shuffles(Buf a) {
    const int v = (int)threadIdx.x * 10, o = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    *GLOBAL(a.out + o + 0) = __shfl_down_sync(0xffffffffu, v, 1);
    *GLOBAL(a.out + o + 1) = __shfl_xor_sync(0xffffffffu, v, 3);
    *GLOBAL(a.out + o + 2) = __shfl_sync(0xffffffffu, v, 5, 8);
    *GLOBAL(a.out + o + 3) = __shfl_down_sync(0xffffffffu, v, 4, 8);
}
extern "C" __global__ void half_mask(Buf a) {
    const unsigned lane = threadIdx.x & 31u;
    if (lane < 16) *GLOBAL(a.out + threadIdx.x) = __shfl_down_sync(0x0000ffffu, (int)lane, 8);
    else *GLOBAL(a.out + threadIdx.x) = -1;
}
extern "C" __global__ void divergent_barrier(Buf a) { if (threadIdx.x < 16) __syncthreads(); }
extern "C" __global__ void lanes_missing(Buf a) { if ((threadIdx.x & 31u) < 16) *GLOBAL(a.out) = __shfl_down_sync(0xffffffffu, 1, 1); }
extern "C" __global__ void short_warp(Buf a) { *GLOBAL(a.out + threadIdx.x) = __shfl_down_sync(0xffffffffu, 1, 1); }
extern "C" __global__ void past_the_end(Buf a) { if (threadIdx.x == 0) *GLOBAL(a.out + a.n) = 1; }
extern "C" __global__ void into_input(Buf a) { if (threadIdx.x == 0) *GLOBAL((int *)a.in + 1) = 1; }
extern "C" __global__ void misaligned(Buf a) { if (threadIdx.x == 0) *GLOBAL((int *)((char *)a.out + 2)) = 1; }
extern "C" __global__ void block_order(Buf a) {
    __shared__ unsigned int slot;
    if (threadIdx.x == 0) slot = atomicAdd((unsigned int *)a.out, 1u);
    __syncthreads();
    if (threadIdx.x == 0) *GLOBAL(a.out + 1 + slot) = (int)blockIdx.x;
}
extern "C" __global__ void fresh_shared(Buf a) {
    __shared__ int sh;
    if (threadIdx.x == 0) { *GLOBAL(a.out + blockIdx.x) = sh; sh = 7; }
}
"#;

    #[repr(C)]
    struct Buf {
        out: *mut i32,
        input: *const i32,
        n: i64,
    }

    /// Launches `name` from [`MODEL`] on `grid` blocks of `block` threads with
    /// `out` (writable) and `input` (read-only) as the call's buffers.
    fn launch(name: &str, grid: u32, block: u32, out: &mut [i32], input: &[i32], seed: u64) -> Result<(), String> {
        static MODULE: OnceLock<usize> = OnceLock::new();
        let d = driver();
        let m = *MODULE.get_or_init(|| {
            let img = build(MODEL, &[]).unwrap();
            let mut m: CUmodule = std::ptr::null_mut();
            assert_eq!(unsafe { (d.cuModuleLoadData)(&mut m, img.as_ptr() as *const c_void) }, 0);
            m as usize
        });
        let mut f: CUfunction = std::ptr::null_mut();
        let c = CString::new(name).unwrap();
        assert_eq!(unsafe { (d.cuModuleGetFunction)(&mut f, m as CUmodule, c.as_ptr()) }, 0);
        let mut a = Buf { out: out.as_mut_ptr(), input: input.as_ptr(), n: out.len() as i64 };
        let mut params = [&mut a as *mut Buf as *mut c_void];
        // (the seed is process-wide: tests that launch in parallel take turns)
        static TURN: Mutex<()> = Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let bufs = [
            ("out", out.as_ptr() as u64, out.as_ptr() as u64 + 4 * out.len() as u64, true),
            ("in", input.as_ptr() as u64, input.as_ptr() as u64 + 4 * input.len() as u64, false),
        ];
        set_seed(seed);
        let r = with_buffers(&bufs, || unsafe {
            (d.cuLaunchKernel)(f, grid, 1, 1, block, 1, 1, 0, std::ptr::null_mut(), params.as_mut_ptr(), std::ptr::null_mut())
        });
        if r == 0 {
            return Ok(());
        }
        let mut msg: *const c_char = std::ptr::null();
        unsafe { (d.cuGetErrorString)(r, &mut msg) };
        Err(format!("{r}: {}", unsafe { CStr::from_ptr(msg) }.to_string_lossy()))
    }

    #[test]
    fn a_barrier_orders_every_thread_of_the_block() {
        for seed in 0..4 {
            let mut out = vec![0; 2 * 96];
            launch("barrier", 2, 96, &mut out, &[0], seed).unwrap();
            for (k, v) in out.iter().enumerate() {
                assert_eq!(*v, ((k % 96 + 1) % 96) as i32 * 3, "seed {seed}, thread {k}");
            }
        }
    }

    #[test]
    fn shuffles_honour_offset_and_width() {
        let mut out = vec![0; 4 * 64];
        launch("shuffles", 1, 64, &mut out, &[0], 1).unwrap();
        for t in 0..64usize {
            let lane = t % 32;
            let v = |l: usize| ((t - lane + l) * 10) as i32;
            let seg = lane & !7;
            let want = [
                if lane < 31 { v(lane + 1) } else { v(lane) },
                v(lane ^ 3),
                v(seg + 5),
                if lane - seg + 4 < 8 { v(lane + 4) } else { v(lane) },
            ];
            assert_eq!(&out[4 * t..4 * t + 4], &want, "thread {t}");
        }
        // a half-warp mask: the lanes it names exchange among themselves
        let mut out = vec![0; 32];
        launch("half_mask", 1, 32, &mut out, &[0], 2).unwrap();
        for lane in 0..16 {
            assert_eq!(out[lane], if lane + 8 < 32 && lane + 8 < 16 { lane as i32 + 8 } else { -1 }, "lane {lane}");
        }
    }

    #[test]
    fn a_barrier_or_shuffle_not_every_thread_reaches_is_an_error_not_a_hang() {
        let e = launch("divergent_barrier", 1, 64, &mut [0], &[0], 0).unwrap_err();
        assert!(e.starts_with("719: ") && e.contains("divergent_barrier") && e.contains("deadlock") && e.contains("16 wait at __syncthreads"), "{e}");
        let e = launch("lanes_missing", 1, 32, &mut [0], &[0], 0).unwrap_err();
        assert!(e.contains("deadlock") && e.contains("16 wait at a warp shuffle"), "{e}");
        let e = launch("short_warp", 1, 48, &mut [0; 48], &[0], 0).unwrap_err();
        assert!(e.contains("names lanes this warp does not have (it has 16)"), "{e}");
    }

    #[test]
    fn bad_accesses_name_the_kernel_the_buffer_and_the_offset() {
        let e = launch("past_the_end", 1, 32, &mut [0; 5], &[0], 0).unwrap_err();
        assert!(e.starts_with("700: ") && e.contains("past_the_end") && e.contains("offset 20 of `out`, which holds 20 bytes"), "{e}");
        let e = launch("into_input", 1, 32, &mut [0; 5], &[0, 0], 0).unwrap_err();
        assert!(e.contains("into_input") && e.contains("output pointer into the input `in`, at offset 4"), "{e}");
        let e = launch("misaligned", 1, 32, &mut [0; 5], &[0], 0).unwrap_err();
        assert!(e.contains("misaligned 4-byte access at offset 2 of `out`"), "{e}");
        // nothing was written by the failed launches
        let mut out = [0; 5];
        let _ = launch("past_the_end", 1, 32, &mut out, &[0], 0);
        assert_eq!(out, [0; 5]);
    }

    #[test]
    fn blocks_run_in_an_order_the_seed_shuffles_each_with_fresh_shared_memory() {
        let order = |seed| {
            let mut out = vec![0; 1 + 16];
            launch("block_order", 16, 32, &mut out, &[0], seed).unwrap();
            assert_eq!(out[0], 16);
            let mut sorted = out[1..].to_vec();
            sorted.sort();
            assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "every block ran once");
            out[1..].to_vec()
        };
        let orders: std::collections::HashSet<Vec<i32>> = (0..6).map(order).collect();
        assert!(orders.len() >= 5, "{orders:?}");
        assert_eq!(order(3), order(3), "one seed, one order");
        // each block sees its own shared memory, 0xff-filled, not the last block's 7
        let mut out = vec![0; 8];
        launch("fresh_shared", 8, 32, &mut out, &[0], 0).unwrap();
        assert_eq!(out, vec![-1; 8]);
    }

    #[test]
    fn kernel_names_are_read_from_the_preprocessed_unit() {
        let pre = "extern \"C\" luspo_rs_sim_kernel void a_f32(A a) {}\nvoid helper();\n\
                   extern \"C\" luspo_rs_sim_kernel void  b(B b) {}";
        assert_eq!(kernel_names(pre), vec!["a_f32".to_string(), "b".to_string()]);
    }
}
