//! The four ops, each described once for every backend: its modes (parsed
//! from verl's names), its formulas (in the docs), and its validated
//! problem — the tensors as checked views plus the resolved parameters. The
//! CPU kernels (`crate::cpu`) and the CUDA launchers (`crate::cuda`) both
//! start from these problems.

pub mod abi;
pub mod advantage;
pub mod agg_loss;
pub mod kl_penalty;
pub mod policy_loss;

/// `sum + 1e-8` as verl computes it: torch adds the epsilon in the mask's
/// float type, which is float32 (the default dtype) for bool and integer
/// masks, so only a float64 mask keeps the epsilon of a large count.
#[inline]
pub fn plus_eps(sum: f64, mask_is_f64: bool) -> f64 {
    if mask_is_f64 {
        sum + 1e-8
    } else {
        ((sum as f32) + 1e-8f32) as f64
    }
}

