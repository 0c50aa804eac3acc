//! The rayon pool the CPU kernels run on, made anew in a forked child.
//!
//! `fork()` copies the parent's memory, rayon's pool handle included, but
//! none of its worker threads: work queued on the copied pool would wait for
//! ever. So the pool is tagged with the id of the process that built it, and
//! a process that finds another id (a child of `os.fork`, `multiprocessing`
//! with the fork start method, a DataLoader worker) builds its own. The
//! parent's handle is left alone in the child (dropping it would signal
//! threads that do not exist there); one pool per process is leaked at most.
//! No lock is taken on the way, so a fork while another thread held one
//! cannot deadlock the child either.

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

static POOL: AtomicPtr<ThreadPool> = AtomicPtr::new(std::ptr::null_mut());
static OWNER: AtomicU32 = AtomicU32::new(0);

/// This process's pool (`RAYON_NUM_THREADS` threads, else one per core).
pub fn pool() -> &'static ThreadPool {
    let pid = std::process::id();
    let p = POOL.load(Ordering::Acquire);
    if !p.is_null() && OWNER.load(Ordering::Acquire) == pid {
        // SAFETY: pools are leaked boxes, never freed.
        return unsafe { &*p };
    }
    let fresh = Box::into_raw(Box::new(
        ThreadPoolBuilder::new().thread_name(|i| format!("luspo-rs-{i}")).build().expect("rayon thread pool"),
    ));
    match POOL.compare_exchange(p, fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            OWNER.store(pid, Ordering::Release);
            // SAFETY: just leaked above.
            unsafe { &*fresh }
        }
        Err(current) => {
            // another thread of this process installed one first: use it
            // SAFETY: `fresh` was never shared; `current` is a leaked pool.
            drop(unsafe { Box::from_raw(fresh) });
            while OWNER.load(Ordering::Acquire) != pid {
                std::hint::spin_loop();
            }
            unsafe { &*current }
        }
    }
}

/// Calls of at most this many bytes in all (inputs and outputs) run on the
/// calling thread: handing a call to the pool and waking a worker costs
/// more than such a call gains from a second thread. Measured on two cores
/// (A/B in one process): inline is faster up to about 300 KiB for a LUSPO
/// forward and backward or a GAE call, and 25-75% faster at 4x8 tokens.
pub const INLINE_BYTES: u64 = 64 << 10;

thread_local! {
    /// This thread runs a kernel inline: the row helpers iterate in order
    /// here instead of going to the pool (see [`install`]).
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the kernel running on this thread was started inline by
/// [`install`] (then it must not use rayon, whose free functions would
/// reach for rayon's global pool).
pub fn inline() -> bool {
    INLINE.with(|c| c.get())
}

/// Runs `f` (a CPU kernel touching `bytes` bytes) on this process's pool,
/// or on the calling thread for a call of at most [`INLINE_BYTES`]. Either
/// way rows are combined in index order, so the results are the same bits.
pub fn install<R: Send>(bytes: u64, f: impl FnOnce() -> R + Send) -> R {
    if bytes > INLINE_BYTES || inline() {
        return pool().install(f);
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            INLINE.with(|c| c.set(false));
        }
    }
    INLINE.with(|c| c.set(true));
    let _reset = Reset; // (also on unwind)
    f()
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_pool_per_process() {
        assert!(std::ptr::eq(super::pool(), super::pool()));
        assert_eq!(super::install(u64::MAX, rayon::current_num_threads), super::pool().current_num_threads());
        // a small call runs here, marked inline only while it runs
        assert!(super::install(1, super::inline));
        assert!(!super::inline());
    }
}
