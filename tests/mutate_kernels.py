"""Mutation testing of the CUDA kernels: does ``tests/test_cuda.py`` catch a
bug put into them?

Each mutation edits one line of a copy of ``src/cuda/kernels/`` (the edit
must match exactly once), and the suite runs against that copy through
``LUSPO_RS_KERNEL_DIR`` (read by ``src/cuda/runtime.rs``): on the simulator
where there is no GPU, on the GPU where there is one. A mutation is *caught*
when the suite fails (the first failure is shown), *survived* when it passes.

    .venv/bin/python tests/mutate_kernels.py            # every mutation
    .venv/bin/python tests/mutate_kernels.py sync tile  # those whose name contains a word

Each mutation costs one compile of the kernels (about 10 s with g++) and at
most one run of the suite (about 20 s on the simulator). Exit status 1 if any
mutation survived.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "src" / "cuda" / "kernels"

# (name, file, the exact text, its replacement, what the bug is)
MUTATIONS = [
    ("row-loop-off-by-one", "loss.cu",
     "n[u] = t < r.cols ? (int)min((i64)V, r.cols - t) : 0;\n                load_mask",
     "n[u] = t < r.cols ? (int)min((i64)V, r.cols - t + 1) : 0;\n                load_mask",
     "the row pass reads one token past the end of each row"),
    ("token-loop-off-by-one", "loss.cu",
     "for (i64 t0 = (i64)r.tl * V; t0 < r.cols; t0 += U * step) {",
     "for (i64 t0 = (i64)r.tl * V; t0 + V < r.cols; t0 += U * step) {",
     "the token pass skips each row's last run"),
    ("team-sum-missing-sync", "common.cuh",
     "        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    __syncthreads();\n    const int nw",
     "        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    const int nw",
     "team_sum reads the warps' totals before every warp wrote its own"),
    ("team-sum-missing-first-sync", "common.cuh",
     "    __syncthreads();  // sh may still be read by a previous call\n    if (lane == 0)\n#pragma unroll\n        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    __syncthreads();\n    const int nw",
     "    if (lane == 0)\n#pragma unroll\n        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    __syncthreads();\n    const int nw",
     "team_sum overwrites its shared totals while a slower thread still reads the previous call's"),
    ("block-sum-missing-sync", "common.cuh",
     "        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    __syncthreads();\n    if (warp == 0) {",
     "        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];\n    if (warp == 0) {",
     "block_sum (the advantage kernels) reads the warps' totals before they are written"),
    ("shuffle-offset", "common.cuh",
     "    for (int k = 0; k < N; ++k)\n        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);\n    if (team == 32) {",
     "    for (int k = 0; k < N; ++k)\n        for (int o = 8; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);\n    if (team == 32) {",
     "team_sum's warp tree starts at offset 8: lanes 16..31 are never added"),
    ("shuffle-width", "common.cuh",
     "            for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);",
     "            for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o, 16);",
     "block_sum's second tree shuffles within half-warps"),
    ("shuffle-broadcast-lane", "common.cuh",
     "v[k] = __shfl_sync(0xffffffffu, v[k], 0);",
     "v[k] = __shfl_sync(0xffffffffu, v[k], 1);",
     "a 32-thread team broadcasts lane 1's partial sum instead of the total"),
    ("shuffle-mask", "common.cuh",
     "    for (int k = 0; k < N; ++k)\n        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);\n    if (team == 32) {",
     "    for (int k = 0; k < N; ++k)\n        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0x0000ffffu, v[k], o);\n    if (team == 32) {",
     "team_sum's shuffles name half the warp"),
    ("mask-ignored", "loss.cu",
     "const bool in = k < n[u], keep = in && m[u][k] != zero;",
     "const bool in = k < n[u], keep = in;",
     "the token pass keeps masked tokens"),
    ("vector-mask-ignored", "loss.cu",
     "for (int k = 0; k < V; ++k) x[k] = sgn ? (F)(float)(signed char)q.b[k] : (F)(float)q.b[k];",
     "for (int k = 0; k < V; ++k) x[k] = (F)1.0f;",
     "the vector mask load reads every token as valid"),
    ("clip-bounds-swapped", "loss.cu",
     "F rc = clampg(r, lo, hi, closed, &pass);",
     "F rc = clampg(r, hi, lo, closed, &pass);",
     "the surrogate clips to [1 + high, 1 - low]"),
    ("dual-clip-sign", "loss.cu",
     "const bool neg = A < zero;",
     "const bool neg = A > zero;",
     "the dual clip applies to positive advantages"),
    ("scratch-row-offset", "loss.cu",
     "        double *p = a.scratch + SCRATCH_HEAD + r.i * ROW_STRIDE;\n        *GLOBAL(p + R_TOKENS) = tokens;",
     "        double *p = a.scratch + r.i * ROW_STRIDE;\n        *GLOBAL(p + R_TOKENS) = tokens;",
     "the row pass writes its rows without the scratch head's offset"),
    ("scratch-slot-swapped", "loss.cu",
     "*GLOBAL(p + R_S) = (double)sr;",
     "*GLOBAL(p + R_DS) = (double)sr;",
     "the sequence ratio is written into d s_i's slot"),
    ("last-block-ticket", "common.cuh",
     "last = atomicAdd(ticket, 1u) == gridDim.x - 1;",
     "last = atomicAdd(ticket, 1u) == 0;",
     "the first block to finish, not the last, sums the batch"),
    ("reverse-rows", "loss.cu",
     "const i64 blk = reverse ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;",
     "const i64 blk = reverse ? (i64)(gridDim.x - blockIdx.x) : (i64)blockIdx.x;",
     "the token pass walks the blocks backwards one too far"),
    ("kl-gradient-sign", "kl_penalty.cu",
     "g = (pass_k && pass_v) ? one - ratio : zero;",
     "g = (pass_k && pass_v) ? ratio - one : zero;",
     "k3's gradient has the wrong sign"),
    ("advantage-group-walk", "advantage.cu",
     "while (end < n && LABEL(end) == label) ++end;",
     "while (end + 1 < n && LABEL(end) == label) ++end;",
     "the last row's group stops one row early"),
    ("advantage-bessel", "advantage.cu",
     "denom = many ? sqrt(ss / (count - 1.0)) + a.epsilon : a.single;",
     "denom = many ? sqrt(ss / count) + a.epsilon : a.single;",
     "GRPO's std without Bessel's correction"),
    ("returns-carry-direction", "returns.cu",
     "for (i64 j = nt - 1; j >= 0; --j) {",
     "for (i64 j = 0; j < nt; ++j) {",
     "the scans chain their chunks' maps from the row's start instead of its end"),
    ("returns-observation-reset", "returns.cu",
     "nv = v * m + (one - m) * nv;",
     "nv = v * m;",
     "GAE's walk drops the next value at an observation token (mask 0 inside a response)"),
    ("returns-whiten-mask", "returns.cu",
     "rfpp ? (x - mean) * rstd * load<F>(a.mask, i, t) : (x - mean) * rstd",
     "rfpp ? (x - mean) * rstd : (x - mean) * rstd",
     "REINFORCE++'s whitened advantages are not multiplied by the mask"),
    ("bessel", "common.cuh",
     "return mask_f64 ? n / (n - 1.0) : (double)(n32 / (n32 - 1.0f));",
     "return mask_f64 ? n / (n - 1.0) : (double)(n32 / n32);",
     "the whitening variance (scans, reinforce_plus_plus_baseline, gdpo) without Bessel's correction"),
    ("value-bounds-swapped", "loss.cu",
     "F mn = minimumg(lp, one, old + c, zero, &dmn);",
     "F mn = minimumg(lp, one, old - c, zero, &dmn);",
     "the value loss clips predictions from above at values - c"),
    ("value-clip-gradient-dropped", "loss.cu",
     "F l = maximumg(l1, x1 + x1, l2, (x2 + x2) * dvc, &dl);",
     "F l = maximumg(l1, x1 + x1, l2, x2 + x2, &dl);",
     "the value loss's clipped branch passes the gradient where clip_by_value stops it"),
    ("value-half-dropped", "loss.cu",
     "*dloss = half * dl;",
     "*dloss = dl;",
     "the value loss's gradient misses verl's factor 0.5"),
    ("value-clipfrac-flipped", "loss.cu",
     "*clipped = l2 > l1;",
     "*clipped = l2 >= l1;",
     "vf_clipfrac counts the unclipped tokens (l2 == l1) too"),
    ("value-lower-tie", "loss.cu",
     "F vc = maximumg(mn, dmn, old - c, zero, &dvc);",
     "F vc = maximumg(mn, dmn, old - c, dmn, &dvc);",
     "a prediction on values - c passes the whole gradient, not torch's half"),
    ("scale-grad-tail", "loss.cu",
     "for (i64 t = runs * V + (i64)blockIdx.x * blockDim.x + threadIdx.x; t < a.n; t += stride)",
     "for (i64 t = runs * V + (i64)blockIdx.x * blockDim.x + threadIdx.x; t + 1 < a.n; t += stride)",
     "backward's scale skips the gradient's last element"),
    ("token-baseline-rank-cursor", "token_baseline.cu",
     "if (v && r == nt) {  // the next tile's first token",
     "if (v && r == nt - 1) {  // the next tile's first token",
     "TIR's cursor stops one valid token early: a rank is skipped at every rank tile"),
    ("token-baseline-cursor-carry", "token_baseline.cu",
     "sh_carry = carry + (sc - (double)x);",
     "sh_carry = carry + sc;",
     "TIR's W carried past a rank tile counts the cursor's own token twice"),
    ("token-baseline-zero-tail", "token_baseline.cu",
     "const bool cut = pos++ == tail;",
     "const bool cut = false; pos++;",
     "the unique longest row keeps its baseline beyond the second-longest length"),
    ("token-baseline-unmasked-numerator", "token_baseline.cu",
     "num += (double)(load<F>(ret, row, t) * W * m);",
     "num += (double)(load<F>(ret, row, t) * W);",
     "OTB's numerator is not masked"),
    ("token-baseline-returns-direction", "token_baseline.cu",
     "for (i64 j = nt - 1; j >= 0; --j) {\n            const double c = part[j];",
     "for (i64 j = 0; j < nt; ++j) {\n            const double c = part[j];",
     "the returns' chunks are chained from the row's start, not its end"),
    ("geo-sign-of-advantage", "loss.cu",
     "const F sa = A > zero ? one : (A < zero ? -one : zero);",
     "const F sa = one;",
     "GMPO clips every token as if its advantage were positive"),
    ("geo-clamp-gradient", "loss.cu",
     "const F mn = minimumg(sa * d, u, sa * *dc, pass ? u : zero, &dmn);",
     "const F mn = minimumg(sa * d, u, sa * *dc, u, &dmn);",
     "GMPO's clamp passes the gradient outside its bounds"),
    ("geo-row-sum-unmasked", "loss.cu",
     "sd += dmin * m[u][k];",
     "sd += dmin;",
     "GMPO's sequence log-ratio sums masked tokens too"),
    ("geo-team-sum-half", "loss.cu",
     "        team_sum<4>(v, (int)a.team);",
     "        team_sum<2>(v, (int)a.team);",
     "GMPO's advantage and IS-weight sums are not reduced over the team"),
    ("geo-is-weights-dropped", "loss.cu",
     "const F sw = weighted ? expg(cvt<F>(v[3] / den)) : cvt<F>(1.0);",
     "const F sw = cvt<F>(1.0);",
     "GMPO ignores the IS weights' geometric mean"),
    ("geo-is-weights-per-token", "loss.cu",
     "weighted = !geo && a.w.ptr != 0,",
     "weighted = a.w.ptr != 0,",
     "GMPO's token pass multiplies the gradient by each token's IS weight as well"),
    ("geo-row-denominator", "loss.cu",
     "const double den = plus_eps(tokens, a.mask.dtype == DT_F64);",
     "const double den = tokens;",
     "GMPO divides by L_i without verl's 1e-8 (an empty row's 0 / 0)"),
    ("geo-mean-over-rows", "loss.cu",
     "case -1: scale = 1.0 / (double)a.rows; break;",
     "case -1: scale = 1.0 / (double)(a.rows - 1); break;",
     "GMPO's mean divides by B - 1"),
    ("geo-loss-overwritten", "loss.cu",
     "if (!geo) *GLOBAL(q + R_LOSS) =",
     "*GLOBAL(q + R_LOSS) =",
     "the token pass overwrites GMPO's pg_i with its (zero) token loss"),
    ("geo-clipfrac-side", "loss.cu",
     "*clipped = c && A > zero;",
     "*clipped = c;",
     "GMPO's pg_clipfrac counts clipped tokens of either advantage sign"),
    ("ext-cispo-unclipped", "loss.cu",
     "const F k = -rc * A;",
     "const F k = -r * A;",
     "CISPO weighs log_prob by the unclipped ratio"),
    ("ext-cispo-clipfrac", "loss.cu",
     "*clipped = r != rc;",
     "*clipped = r != r;",
     "CISPO's pg_clipfrac counts no token"),
    ("ext-sapo-gate-scale", "loss.cu",
     "const F k = cvt<F>(4.0) / tau;",
     "const F k = cvt<F>(4.0);",
     "SAPO's gate misses its 1 / tau factor"),
    ("ext-sapo-taus-swapped", "loss.cu",
     "const F tau = A > zero ? cvt<F>(a.tau_pos) : cvt<F>(a.tau_neg);",
     "const F tau = A > zero ? cvt<F>(a.tau_neg) : cvt<F>(a.tau_pos);",
     "SAPO takes tau_neg for positive advantages"),
    ("ext-sapo-clamp-gradient", "loss.cu",
     "*dloss = pass ? dl : zero;",
     "*dloss = dl;",
     "SAPO passes the gradient through the log-ratio's clamp at +-20"),
    ("ext-gpg-loss", "loss.cu",
     "        *dloss = -A;\n        return -lp * A;",
     "        *dloss = -A;\n        return lp * A;",
     "GPG's loss has the wrong sign (its gradient is right)"),
    ("ext-reinforce-kl-sign", "loss.cu",
     "        *d = lp - old;\n        *dloss = -A;\n        return -A * lp;",
     "        *d = old - lp;\n        *dloss = -A;\n        return -A * lp;",
     "REINFORCE's ppo_kl has the wrong sign"),
    ("ext-dro-square-gradient", "loss.cu",
     "*dloss = -(A - hb * (x + x));",
     "*dloss = -(A - hb * x);",
     "DRO's penalty gradient misses the square's factor 2"),
    ("ext-dppo-tv-lower-bound", "loss.cu",
     "down = moved >= -lo;",
     "down = moved >= lo;",
     "DPPO-TV drops negative-advantage tokens against +low instead of -low"),
    ("ext-dppo-kl-direction", "loss.cu",
     "up = bkl <= hi || p <= po;",
     "up = bkl <= hi || p >= po;",
     "DPPO-KL keeps positive-advantage tokens whose probability rose instead of fell"),
    ("ext-dppo-truncation", "loss.cu",
     "const F tr = r > c ? c : r;",
     "const F tr = r;",
     "DPPO does not truncate its ratio at clip_ratio_c"),
    ("ext-dppo-lower-metric", "loss.cu",
     "*lower = r > c && v != zero;",
     "*lower = r > c;",
     "DPPO's pg_clipfrac_lower counts dropped tokens too"),
    ("ext-clip-cov-corr", "loss.cu",
     "const F corr = pick ? zero : one;",
     "const F corr = one;",
     "Clip-Cov forgets the pick's corr: the chosen tokens keep their loss"),
    ("ext-kl-cov-abs", "loss.cu",
     "return pick ? l1 + coef * ab : l1;",
     "return pick ? l1 + coef * x : l1;",
     "KL-Cov's penalty is the signed log-ratio, not its absolute value"),
    ("ext-kl-cov-gradient", "loss.cu",
     "*dloss = pick ? l1 + coef * sign : l1;",
     "*dloss = l1;",
     "KL-Cov's gradient misses the penalty's"),
    ("ext-picks-load", "loss.cu",
     "load_runs_as<F, SMaskU8, V>(a.picks, r.i, t, n[u], pk[u]);",
     "load_runs_as<F, SMaskU8, V>(a.mask, r.i, t, n[u], pk[u]);",
     "the ext kernel reads the mask as the picks"),
    ("dropped-row-gradient", "loss.cu",
     "        for (int k = 0; k < V; ++k) g[k] = zero;\n        for (i64 t = (i64)r.tl * V; t < r.cols; t += step)",
     "        for (int k = 0; k < V; ++k) g[k] = one;\n        for (i64 t = (i64)r.tl * V; t < r.cols; t += step)",
     "a row dropped for its NaN mask sum gets a gradient of ones, not zeros"),
    ("ext-rule-set-swapped", "loss.cu",
     "case MODE_KL_COV: token_loop<F, S, VEC, MODE, EXT_COV>(a, c, s); break;",
     "case MODE_KL_COV: token_loop<F, S, VEC, MODE, EXT_DPPO>(a, c, s); break;",
     "the ext kernel runs the DPPO rules' token loop for Clip-Cov and KL-Cov"),
    ("token-run-ignored", "loss.cu",
     "        for (int k = 0; k < V; ++k) x[k] = (F)T::get(r.e[k]);",
     "        for (int k = 0; k < V; ++k) x[k] = (F)1.0f;",
     "the vector kernels' token pass reads every full run (mask and float operands) as 1"),
    ("token-run-tail-shifted", "loss.cu",
     "for (int k = 0; k < V; ++k) x[k] = k < n ? (F)T::get(*GLOBAL(p + k)) : cvt<F>(0.0);",
     "for (int k = 0; k < V; ++k) x[k] = k + 1 < n ? (F)T::get(*GLOBAL(p + k + 1)) : cvt<F>(0.0);",
     "the vector kernels' token pass reads a row's ragged end (mask and float operands) one token late"),
    ("token-grad-tail-dropped", "loss.cu",
     "            if (k < n) *GLOBAL(p + k) = S::put(x[k]);",
     "            if (k + 1 < n) *GLOBAL(p + k) = S::put(x[k]);",
     "the vector kernels' token pass leaves a row's last ragged gradient unwritten"),
    ("token-per-row-advantage", "loss.cu",
     "a.adv.cs == 0 ? load<F>(a.adv, r.i, 0) : zero;",
     "a.adv.cs == 0 ? load<F>(a.adv, 0, 0) : zero;",
     "the vector kernels give every row the first row's per-row advantage"),
    ("token-per-row-weight", "loss.cu",
     "a.w.cs == 0 ? load<F>(a.w, r.i, 0) : one;",
     "a.w.cs == 0 ? one : one;",
     "the vector kernels ignore per-row IS weights"),
]


# Mutations no test can catch because the kernels as written never exercise
# the bug: reported, not counted as a gap.
EQUIVALENT = {
    "team-sum-missing-first-sync": "no kernel calls team_sum<N> twice for one N without a __syncthreads "
    "(last_block's) between the calls; the barrier keeps the helper safe for one that does",
}


def apply(dst: Path, file: str, old: str, new: str) -> None:
    p = dst / file
    text = p.read_text()
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"mutation text found {n} times in {file} (expected once): {old!r}")
    p.write_text(text.replace(old, new))


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("FAILED ") or line.startswith("ERROR "):
            return line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ")
    m = re.search(r"^E\s+(.*)$", out, re.M)
    return m.group(1)[:160] if m else out.strip().splitlines()[-1][:160]


def run_suite(kernel_dir: Path | None, cache: Path) -> tuple[bool, str, float]:
    env = dict(os.environ, LUSPO_RS_CACHE_DIR=str(cache))
    if kernel_dir is not None:
        env["LUSPO_RS_KERNEL_DIR"] = str(kernel_dir)
    t = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    return r.returncode == 0, first_failure(r.stdout + r.stderr), time.time() - t


def main(words: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    with tempfile.TemporaryDirectory(prefix="luspo_rs_mutants_") as tmp:
        cache = Path(tmp) / "cache"
        ok, why, secs = run_suite(None, cache)
        print(f"unmutated kernels: {'pass' if ok else 'FAIL: ' + why} ({secs:.0f} s)", flush=True)
        if not ok:
            return 2
        survived = []
        for name, file, old, new, what in chosen:
            d = Path(tmp) / name
            shutil.copytree(KERNELS, d)
            apply(d, file, old, new)
            ok, why, secs = run_suite(d, cache)
            if ok and name in EQUIVALENT:
                verdict = f"survived, equivalent: {EQUIVALENT[name]}"
            else:
                verdict = "SURVIVED" if ok else f"caught by {why}"
            print(f"{name:28s} {verdict} ({secs:.0f} s)\n{'':28s} ({file}: {what})", flush=True)
            if ok and name not in EQUIVALENT:
                survived.append(name)
        real = [m for m in chosen if m[0] not in EQUIVALENT]
        print(f"\n{len(real) - len(survived)} of {len(real)} mutations caught (and {len(chosen) - len(real)} equivalent)"
              + (f"; survived: {', '.join(survived)}" if survived else ""))
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
