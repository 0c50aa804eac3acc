//! Times the CPU policy loss without Python: `RAYON_NUM_THREADS=1 cargo run --release --example bench_row`
//! (B=512, T=4096 fp32), for profiling the kernels with `perf record`.
use luspo_rs::tensor::Tensor;
use luspo_rs::ops::agg_loss::Normalizers;
use luspo_rs::ops::policy_loss::{ModeKnobs, PolicyLossArgs, PolicyLossProblem};
use std::time::Instant;
fn main() {
    let (b, t) = (512usize, 4096usize);
    let n = b * t;
    let mut seed = 1u64;
    let mut rnd = || { seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((seed >> 33) as f32) / (1u64 << 31) as f32 };
    let old: Vec<f32> = (0..n).map(|_| -2.0 * rnd()).collect();
    let lp: Vec<f32> = old.iter().map(|&o| o + 0.2 * (rnd() - 0.5)).collect();
    let adv: Vec<f32> = (0..n).map(|_| rnd() - 0.5).collect();
    let mask: Vec<bool> = (0..n).map(|i| (i % t) < 3000).collect();
    let mut grad = vec![0f32; n];
    for mode in ["vanilla", "gspo"] {
        let d = |a: &'static str, v: &[f32]| Tensor::from_slice(a, v, &[b, t]);
        let (o, l, a, m) = (d("old_log_prob", &old), d("log_prob", &lp), d("advantages", &adv), Tensor::from_slice("response_mask", &mask, &[b, t]));
        let g = Tensor::from_mut_slice("grad", &mut grad, &[b, t]);
        let p = PolicyLossProblem::new(&PolicyLossArgs { old_log_prob: &o, log_prob: &l, advantages: &a, response_mask: &m, rollout_is_weights: None, picks: None, grad: &g, mode, loss_agg_mode: "token-mean", clip_ratio: 0.2, clip_ratio_low: None, clip_ratio_high: None, clip_ratio_c: 3.0, clamp_closed: false, knobs: ModeKnobs { beta: 0.1, ..ModeKnobs::default() }, norm: Normalizers::default(), diagnostics: std::env::var_os("DIAG").is_some() }).unwrap();
        let mut best = f64::MAX;
        for _ in 0..10 { let t0 = Instant::now(); let r = luspo_rs::cpu::policy_loss::policy_loss(&p).unwrap(); best = best.min(t0.elapsed().as_secs_f64()); std::hint::black_box(r); }
        println!("{mode}: {:.2} ms", best * 1e3);
    }
}
