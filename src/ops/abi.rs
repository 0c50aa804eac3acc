//! The constants the Rust launchers and the CUDA kernels share, defined once:
//! element-type codes, mode and aggregation codes, the layout of the
//! kernels' float64 scratch buffers and the metrics buffer. [`prelude`]
//! emits them as C constants in front of the kernel sources
//! (`cuda/kernels/*`), which define none of them themselves (a test checks).

/// Declares `pub const NAME: i64 = value;` for each entry and [`ALL`], the
/// same entries by name, for [`prelude`]. (A group's doc comment documents
/// the group here; the constants themselves get a generic one.)
macro_rules! shared_constants {
    ($($(#[doc = $doc:literal])* $group:literal { $($name:ident = $value:expr),* $(,)? })*) => {
        $($(#[doc = concat!("Shared with the kernels: ", $group, ".")] pub const $name: i64 = $value;)*)*
        /// Every shared constant, grouped as the prelude declares them.
        pub const ALL: &[(&str, &[(&str, i64)])] = &[$(($group, &[$((stringify!($name), $value)),*])),*];
    };
}

shared_constants! {
    /// Element types of a `View` (`crate::tensor::DType`).
    "element types" {
        DT_F64 = 0, DT_F32 = 1, DT_BF16 = 2, DT_F16 = 3, DT_U8 = 4, DT_I8 = 5, DT_I16 = 6, DT_I32 = 7, DT_I64 = 8,
    }
    /// `LossArgs.mode`: the policy-loss modes, the loss kernels computing
    /// `agg_loss`, and verl's value loss (`ops::value_loss`).
    "loss kernels' modes" {
        MODE_VANILLA = 0, MODE_GSPO = 1, MODE_LUSPO = 2, MODE_AGG = 3, MODE_VALUE = 4, MODE_CISPO = 5, MODE_SAPO = 6,
        MODE_GEO_MEAN = 7, MODE_GPG = 8, MODE_CLIP_COV = 9, MODE_KL_COV = 10, MODE_DPPO_TV = 11, MODE_DPPO_KL = 12,
        MODE_DRO = 13, MODE_REINFORCE = 14,
    }
    /// `LossArgs.agg`: verl's `loss_agg_mode`s.
    "aggregation modes" {
        AGG_TOKEN_MEAN = 0, AGG_TOKEN_SUM = 1, AGG_SEQ_SUM = 2, AGG_SEQ_MEAN = 3, AGG_SEQ_SUM_NORM = 4,
    }
    /// The loss kernels' float64 scratch: a head (two u32 tickets, zeroed by
    /// the host before each call; the batch-wide scale and token count), then
    /// `ROW_STRIDE` values per row (GMPO's row pass writes its `pg_i` into
    /// `R_LOSS` and `pg_i / (L_i + 1e-8)` into `R_S`; slot 9 is free).
    "loss scratch: head" { SC_TICKETS = 0, SC_SCALE = 1, SC_TOKENS = 2, SCRATCH_HEAD = 4 }
    "loss scratch: per row" {
        R_TOKENS = 0, R_S = 1, R_DS = 2, R_LOSS = 3, R_CLIPPED = 4, R_KL = 5, R_LOWER = 6, R_ADV = 7, R_MASS = 8,
        ROW_STRIDE = 10,
    }
    /// `LossArgs.vec` bits: the 1-byte mask can be read in V-byte runs, and in
    /// 16-byte loads in the mask-only row pass; the length diagnostics are
    /// wanted; GMPO rounds `d` to f32 in f64 math (`PolicyLossProblem::geo_narrow`).
    "LossArgs.vec bits" { VEC_MASK = 2, VEC_MASK16 = 4, VEC_DIAGNOSTICS = 8, VEC_NARROW = 16 }
    /// Largest block of the loss kernels (and so the largest team); the
    /// policy loss's metrics buffer: `[pg_clipfrac, ppo_kl, pg_clipfrac_lower]`
    /// and the four `LengthDiagnostics`.
    "loss kernels' sizes" { MAX_THREADS = 512, METRICS_LEN = 7 }
    /// `KlArgs.kind`: verl's `kl_penalty` estimators.
    "kl_penalty estimators" { KL_K1 = 0, KL_ABS = 1, KL_K2 = 2, KL_K3 = 3 }
    /// `AdvArgs.estimator`: the outcome advantage estimators.
    "advantage estimators" {
        EST_GRPO = 0, EST_GRPO_NOSTD = 1, EST_RLOO = 2, EST_RLOO_VEC = 3, EST_RFPP = 4, EST_OPO = 5, EST_GPG = 6,
        EST_PASSK = 7, EST_PASSK_NOSTD = 8, EST_GDPO = 9, EST_GDPO_NOSTD = 10,
    }
    /// The advantage scratch: `ADV_NSTAT` float64 per row, then 2 batch values.
    "advantage scratch: per row" { A_SCORE = 0, A_M1 = 1, A_M2 = 2, A_M3 = 3, A_SCALAR = 4, ADV_NSTAT = 5 }
    /// `ScanArgs.estimator`: the scan estimators (`ops::returns`).
    "scan estimators" { SCAN_GAE = 0, SCAN_RFPP = 1, SCAN_REMAX = 2 }
    /// The scan scratch: `SCAN_NSTAT` float64 per row (the row's whitening
    /// moments, `ops::returns::Moments`: `sum m`, the mean, `sum m (x - mean)^2`),
    /// then 2 batch values (mean, 1 / std).
    "scan scratch: per row" { S_N = 0, S_MEAN = 1, S_M2 = 2, SCAN_NSTAT = 3 }
    /// Threads per row of the scan kernels: one chunk of the row each.
    "scan kernels' block" { SCAN_THREADS = 128 }
    /// The token baselines' scratch: `TB_NSTAT` float64 per row (its length,
    /// W's carried sum, TIR's column cursor and the cursor of the tile before).
    "token baseline scratch: per row" { TB_LEN = 0, TB_CARRY = 1, TB_CUR = 2, TB_CUR0 = 3, TB_NSTAT = 4 }
    /// `TbArgs.rounding` bits (`ops::token_baseline::Rounding`), and the block
    /// of the token baseline kernels (a column or a rank per thread).
    "token baseline kernels" {
        TB_RD_PI = 1, TB_RD_WP = 2, TB_RD_Q = 4, TB_RD_W = 8, TB_RD_WC = 16, TB_RD_R = 32, TB_THREADS = 128,
    }
}

/// float64 values of the loss kernels' scratch for `rows` rows.
pub fn loss_scratch_len(rows: usize) -> usize {
    (SCRATCH_HEAD + ROW_STRIDE * rows as i64) as usize
}

/// float64 values of the advantage kernels' scratch for `rows` rows.
pub fn advantage_scratch_len(rows: usize) -> usize {
    (ADV_NSTAT * rows as i64 + 2) as usize
}

/// float64 values of the scan kernels' scratch for `rows` rows.
pub fn returns_scratch_len(rows: usize) -> usize {
    (SCAN_NSTAT * rows as i64 + 2) as usize
}

/// float64 values of the token baseline kernels' scratch for `rows` rows.
pub fn token_baseline_scratch_len(rows: usize) -> usize {
    (TB_NSTAT * rows as i64) as usize
}

/// The constants as C enumerators, one `enum` per group, to put in front of
/// the kernel sources.
pub fn prelude() -> String {
    let mut s = String::from("// Generated from src/ops/abi.rs: the constants Rust and the kernels share.\n");
    for (group, items) in ALL {
        let body: Vec<String> = items.iter().map(|(n, v)| format!("{n} = {v}")).collect();
        s += &format!("enum {{ {} }};  // {group}\n", body.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_prelude_declares_each_once() {
        let p = prelude();
        let mut seen = std::collections::HashSet::new();
        for (_, items) in ALL {
            for (n, v) in *items {
                assert!(seen.insert(*n), "{n} declared twice");
                assert_eq!(p.matches(&format!(" {n} = {v}")).count(), 1, "{n}");
            }
        }
    }
}
