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
pub mod returns;
pub mod token_baseline;
pub mod value_loss;

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// What `policy_loss` and `agg_loss` write besides the gradient, the same on
/// both devices (torch allocates every buffer).
pub struct LossOutputs<'a> {
    /// 0-d, the loss, in any float dtype (the Python layer picks verl's: the
    /// promotion of the inputs' dtypes).
    pub loss: &'a Tensor,
    /// float64, `abi::METRICS_LEN` values `[pg_clipfrac, ppo_kl,
    /// pg_clipfrac_lower]` and the four `policy_loss::LengthDiagnostics`
    /// (policy loss only).
    pub metrics: Option<&'a Tensor>,
    /// A float64 scalar that multiplies the loss and the gradient, or none:
    /// normalisers given as CUDA tensors, combined on the device, so no
    /// value is read back to the host.
    pub factor: Option<&'a Tensor>,
}

impl LossOutputs<'_> {
    /// Checks the buffers against the inputs' device; `metrics` says whether
    /// the op writes them.
    pub fn check(&self, device: Device, metrics: bool) -> Result<()> {
        let l = self.loss;
        if l.device != device || !l.dtype.is_float() || !l.shape.is_empty() || l.read_only {
            return Err(Error::value_error(l.arg, format!("expected a writable 0-d float tensor on {device}")));
        }
        match (self.metrics, metrics) {
            (Some(m), true) => m.expect_f64_buffer(device, abi::METRICS_LEN as usize)?,
            (None, false) => {}
            (_, want) => {
                return Err(Error::value_error("metrics", if want { "required" } else { "unexpected for agg_loss" }));
            }
        }
        if let Some(f) = self.factor {
            f.expect_f64_buffer(device, 1)?;
        }
        Ok(())
    }
}

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

/// verl's `masked_var` Bessel factor `N / (N - 1)` for a mask summing to
/// `n`: `mask.sum()` is float32 for float32 masks and int64 for bool and
/// integer masks, whose true division gives float32 (torch's default dtype),
/// so the factor is rounded to float32 unless the mask is float64.
#[inline]
pub fn bessel(n: f64, mask_is_f64: bool) -> f64 {
    if mask_is_f64 {
        n / (n - 1.0)
    } else {
        let n = n as f32;
        (n / (n - 1.0)) as f64
    }
}

