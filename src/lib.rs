//! luspo-rs: fused LUSPO / GSPO / GRPO policy losses, their gradients and
//! the aggregation verl uses, over caller memory shared through DLPack.
//!
//! * `ops`: each op's modes, formulas and validated problem, for every backend;
//! * `cpu`: the rayon kernels; `cuda`: the CUDA runtime, launchers and kernels;
//! * `tensor`, `error`: DLPack views and the one error type;
//! * `python` (the `python` feature, turned on by maturin): the
//!   `luspo_rs._core` extension module, the only code that knows PyO3.
//!
//! Everything but `python` is tested with `cargo test`, without Python.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ops;
pub mod tensor;

#[cfg(feature = "python")]
mod python;
