//! CUDA backend: the hand-written kernels of `kernels/`, compiled at run
//! time by NVRTC for each device's architecture (cached per device), loaded
//! and launched through the CUDA driver API on the caller's stream. Both
//! libraries are opened with `dlopen` ([`sys`]), so nothing here is needed
//! to build or import the crate.
//!
//! A policy loss or `agg_loss` call zeroes two tickets and launches two
//! kernels, then returns: a team of threads per row sums the row's mask
//! (and GSPO's log-ratio) and the last block to finish derives the
//! batch-wide scale; then the token pass writes the final gradient and the
//! row sums, and its last block writes the loss and verl's metrics (see
//! `kernels/loss.cu`). Backward is [`scale_grad`], which
//! leaves the gradient untouched when `grad_output` is 1. `kl_penalty` is
//! one elementwise kernel; the group advantages are three or four (row
//! scores, group statistics in row order, batch statistics, the B×T write;
//! see [`advantage`]). Every buffer is the caller's (torch allocates them);
//! nothing is copied, allocated or synchronised here.

//!
//! Files: [`runtime`] (libraries, NVRTC, cache, devices, launch), one
//! launcher per op ([`loss`] for the policy loss and `agg_loss`, which share
//! their kernels; [`kl_penalty`]; [`advantage`]), and `kernels/` with one
//! source per op after `common.cuh`.

pub mod advantage;
pub mod kl_penalty;
pub mod loss;
pub mod returns;
pub mod runtime;
pub mod sim;
pub mod sys;
pub mod token_baseline;

pub use advantage::advantage;
pub use kl_penalty::kl_penalty;
pub use loss::{agg_loss, policy_loss, scale_grad};
pub use returns::returns;
pub use token_baseline::token_baseline;
pub use runtime::{compile, compile_with_ptxas_log, nvrtc, set_nvrtc_hints, source, CudaError, Target};
