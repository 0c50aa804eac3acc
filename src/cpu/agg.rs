//! verl's `agg_loss` for any B×T loss matrix (entropy, KL terms): the scalar
//! and `d loss / d loss_mat`, in one pass per row.

use super::{mask_totals, min_rows_per_task, sum_f64};
use crate::error::Result;
use crate::spec::{AggMode, AggPlan, Normalizers};
use crate::tensor::{same_device, Desc, Mat, MatMut, Real};
use rayon::prelude::*;

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

/// Aggregates on the CPU and writes the gradient; returns the loss.
pub fn agg_loss(p: &AggProblem) -> f64 {
    if p.loss_mat.desc.dtype == crate::tensor::DType::F64 {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

fn run<F: Real>(p: &AggProblem) -> f64 {
    let cols = p.loss_mat.cols;
    let totals = p.norm.needs_mask_totals(p.agg).then(|| mask_totals(&p.loss_mask));
    let plan = AggPlan::new(p.agg, &p.norm, totals, cols, p.loss_mask.desc.dtype == crate::tensor::DType::F64);
    let seq_mode = p.agg.is_seq_mode();
    let rows: Vec<(f64, f64)> = (0..p.loss_mat.rows)
        .into_par_iter()
        .with_min_len(min_rows_per_task(cols))
        .map_init(
            || (vec![F::zero(); cols], vec![F::zero(); cols], vec![F::zero(); cols]),
            |(sl, sm, sg), i| {
                let l = p.loss_mat.row(i, sl);
                let m = p.loss_mask.row(i, sm);
                let tokens = sum_f64(m);
                let coef = F::of(plan.row_coef(tokens));
                let mut sum = 0.0f64;
                // SAFETY: row i is written by this task only.
                unsafe {
                    p.grad.with_row(i, sg, |g| {
                        for t in 0..cols {
                            if m[t] != F::zero() || seq_mode {
                                sum += (l[t] * m[t]).f64();
                            }
                            g[t] = if m[t] != F::zero() { coef * m[t] } else { F::zero() };
                        }
                    })
                };
                (sum, tokens)
            },
        )
        .collect();
    plan.finish(rows.iter().map(|&(s, l)| plan.row_contribution(s, l)).sum())
}
