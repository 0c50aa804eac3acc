//! `kl_penalty`: verl's estimators (parsed names) and the validated problem.
//! The elementwise formulas are in `cpu/kl_penalty.rs` and, twinned, in
//! `cuda/kernels/kl_penalty.cu`:
//!
//! verl's `kl_penalty` estimators, elementwise, with the derivative in
//! `logprob` written in the same pass (the derivative in `ref_logprob` is
//! its negative: every estimator is a function of `d = logprob - ref_logprob`).
//!
//! * `kl` / `k1`: `d`;
//! * `abs`: `|d|` (torch's `sign(d)` gradient, 0 at 0);
//! * `mse` / `k2`: `d^2 / 2`;
//! * `low_var_kl` / `k3`: `k = clamp(-d, -20, 20)`, `clamp(exp(k) - k - 1, -10, 10)`;
//! * a `+` suffix (`k1+`, `k3+`, ...): the same value, with the gradient of
//!   `k2` (straight-through), as verl.
//!
//! Clamps pass the gradient strictly inside their bounds, as `torch.clamp`
//! does (the clamp shared with the policy loss, `lane::clamp`).

use crate::error::{Error, Result};
use crate::tensor::{same_device, Mat, MatMut, Tensor};

/// The value estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlKind {
    K1,
    Abs,
    K2,
    K3,
}

/// A parsed `kl_penalty` name: the estimator and whether the gradient is
/// the straight-through `k2` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KlMode {
    pub kind: KlKind,
    pub straight_through: bool,
}

impl KlMode {
    /// Parses verl's names, with an optional `+` suffix.
    pub fn parse(s: &str) -> Result<Self> {
        let (base, st) = match s.strip_suffix('+') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let kind = match base {
            "kl" | "k1" => KlKind::K1,
            "abs" => KlKind::Abs,
            "mse" | "k2" => KlKind::K2,
            "low_var_kl" | "k3" => KlKind::K3,
            _ => {
                return Err(Error::value_error(
                    "kl_penalty",
                    format!(
                        "unknown kl_penalty {s:?}; expected one of \"kl\", \"k1\", \"abs\", \"mse\", \"k2\", \
                         \"low_var_kl\", \"k3\", optionally with a \"+\" suffix (\"full\" is not implemented, as in verl)"
                    ),
                ))
            }
        };
        Ok(KlMode { kind, straight_through: st })
    }
}

/// A validated `kl_penalty` call.
pub struct KlProblem {
    pub logprob: Mat,
    pub ref_logprob: Mat,
    pub out: MatMut,
    /// `d out / d logprob`, when a gradient is wanted.
    pub grad: Option<MatMut>,
    pub mode: KlMode,
    /// torch's clamp convention on the bounds (see `ops::policy_loss::Clip::clamp_closed`).
    pub clamp_closed: bool,
}

impl KlProblem {
    /// Checks shapes, dtypes and devices; errors name the argument.
    pub fn new(logprob: &Tensor, ref_logprob: &Tensor, out: &Tensor, grad: Option<&Tensor>, kl_penalty: &str, clamp_closed: bool) -> Result<Self> {
        let mode = KlMode::parse(kl_penalty)?;
        logprob.expect_float()?;
        ref_logprob.expect_float()?;
        let lp = logprob.matrix()?;
        if lp.rows == 0 || lp.cols == 0 {
            return Err(Error::value_error("logprob", format!("empty tensor of shape {:?}", logprob.shape)));
        }
        ref_logprob.expect_shape(&logprob.shape, "logprob")?;
        let rf = ref_logprob.matrix()?;
        let o = MatMut::new(out, lp.rows, lp.cols, "logprob")?;
        let g = grad.map(|g| MatMut::new(g, lp.rows, lp.cols, "logprob")).transpose()?;
        let mut all = vec![ref_logprob, out];
        all.extend(grad);
        same_device(logprob.device, &all)?;
        Ok(KlProblem { logprob: lp, ref_logprob: rf, out: o, grad: g, mode, clamp_closed })
    }
}

