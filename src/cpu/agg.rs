//! verl's `agg_loss` for any B×T loss matrix (entropy, KL terms): the scalar
//! and `d loss / d loss_mat`, in one pass per row.

use super::{fold_rows, mask_totals, Sum8};
use crate::error::Result;
use crate::spec::{AggMode, AggPlan, Normalizers};
use crate::tensor::{piece_scratch, pieces, same_device, Desc, Mat, MatMut, Real, PIECE};

/// A validated `agg_loss` call.
pub struct AggProblem {
    pub loss_mat: Mat,
    pub loss_mask: Mat,
    /// `d loss / d loss_mat`, written by the call.
    pub grad: MatMut,
    pub agg: AggMode,
    pub norm: Normalizers,
}

impl AggProblem {
    /// Checks shapes, dtypes, devices, mode and normalisers.
    pub fn new(loss_mat: &Desc, loss_mask: &Desc, grad: &Desc, loss_agg_mode: &str, norm: Normalizers) -> Result<Self> {
        let agg = AggMode::parse(loss_agg_mode)?;
        norm.validate(agg)?;
        loss_mat.expect_float()?;
        let m = loss_mat.matrix()?;
        if m.rows == 0 || m.cols == 0 {
            return Err(crate::error::Error::value_error(
                "loss_mat",
                format!("empty loss matrix of shape {:?}", loss_mat.shape),
            ));
        }
        loss_mask.expect_shape(&[m.rows, m.cols], "loss_mat")?;
        let mask = loss_mask.matrix()?;
        let g = MatMut::new(grad, m.rows, m.cols, "loss_mat")?;
        same_device(loss_mat.device, &[loss_mask, grad])?;
        Ok(AggProblem { loss_mat: m, loss_mask: mask, grad: g, agg, norm })
    }
}

/// Aggregates on the CPU and writes the gradient; returns the loss, or a
/// `MemoryError` if its (bounded) working buffers cannot be allocated.
pub fn agg_loss(p: &AggProblem) -> Result<f64> {
    if p.loss_mat.desc.dtype == crate::tensor::DType::F64 {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

fn run<F: Real>(p: &AggProblem) -> Result<f64> {
    let cols = p.loss_mat.cols;
    let totals = match p.norm.needs_mask_totals(p.agg) {
        true => Some(mask_totals(&p.loss_mask)?),
        false => None,
    };
    let plan = AggPlan::new(p.agg, &p.norm, totals, cols, p.loss_mask.desc.dtype == crate::tensor::DType::F64);
    let seq_mode = p.agg.is_seq_mode();
    let scratch = || -> Result<_> {
        Ok((
            piece_scratch::<F>(p.loss_mat.desc.arg, cols)?,
            piece_scratch::<F>(p.loss_mask.desc.arg, cols)?,
            piece_scratch::<F>(p.grad.desc.arg, cols)?,
        ))
    };
    let mut total = 0.0;
    fold_rows(
        p.loss_mat.desc.arg,
        p.loss_mat.rows,
        cols,
        scratch,
        |(sl, sm, sg), i| {
            // the row's length first (in pieces when the row is long; a
            // short row's mask is loaded once, below)
            let mut len_sum = Sum8::default();
            if cols > PIECE {
                for (start, len) in pieces(cols) {
                    len_sum.add(p.loss_mask.part(i, start, len, sm));
                }
            }
            let mut sum = 0.0f64;
            let mut tokens = len_sum.total();
            for (start, len) in pieces(cols) {
                let l = p.loss_mat.part(i, start, len, sl);
                let m = p.loss_mask.part(i, start, len, sm);
                if cols <= PIECE {
                    len_sum.add(m);
                    tokens = len_sum.total();
                }
                let coef = F::of(plan.row_coef(tokens));
                // SAFETY: row i is written by this task only.
                unsafe {
                    p.grad.with_part(i, start, len, sg, |g| {
                        for t in 0..len {
                            if m[t] != F::zero() || seq_mode {
                                sum += (l[t] * m[t]).f64();
                            }
                            g[t] = if m[t] != F::zero() { coef * m[t] } else { F::zero() };
                        }
                    })
                };
            }
            (sum, tokens)
        },
        |(s, l)| total += plan.row_contribution(s, l),
    )?;
    Ok(plan.finish(total))
}
