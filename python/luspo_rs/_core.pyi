"""Type stubs of the native module ``luspo_rs._core``.

``clamp_closed`` selects torch's gradient convention for ``clamp`` on its
bounds: ``True`` passes the gradient there (torch 2.11), ``False`` does not
(torch 2.15); ``luspo_rs.functional.torch_clamp_closed()`` measures the
installed torch.

Every tensor argument is a :class:`DLPack` producer (torch tensors, numpy
arrays). Outputs (``grad``, ``loss``, ``metrics``, ``out``) are written in place and must be
writable; nothing is copied. Errors are ``TypeError`` (dtype) or
``ValueError`` (shape, rank, device, value), each naming the argument.

The mode literals below are the strings the native module accepts; the
Python package spells the same ones (``luspo_rs.policy_loss.PolicyMode``,
``luspo_rs.agg_loss.AggMode``, ``luspo_rs.kl_penalty.KlMode``,
``luspo_rs.advantage.GroupEstimator``, ``ScanEstimator`` and
``TokenBaselineEstimator``), and a test
compares them.
"""

from typing import Any, Hashable, Iterable, Literal, Optional, Protocol

class DLPack(Protocol):
    """Any object that exports itself through DLPack: ``torch.Tensor``,
    ``numpy.ndarray``, CuPy and JAX arrays, ..."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

PolicyMode = Literal[
    "vanilla", "gspo", "luspo", "cispo", "sapo", "geo_mean", "gpg", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl",
    "dro", "reinforce",
]
AggMode = Literal["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KlMode = Literal[
    "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
    "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+",
]
GroupEstimator = Literal[
    "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
    "grpo_passk", "gdpo",
]
ScanEstimator = Literal["gae", "reinforce_plus_plus", "remax"]
TokenBaselineEstimator = Literal["optimal_token_baseline", "tir_optimal_token_baseline"]
CompileTarget = Literal["ptx", "cubin"]

def policy_loss(
    old_log_prob: DLPack,
    log_prob: DLPack,
    advantages: DLPack,
    response_mask: DLPack,
    grad: DLPack,
    loss: DLPack,
    metrics: DLPack,
    *,
    mode: PolicyMode,
    loss_agg_mode: AggMode,
    clip_ratio: float,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: Optional[DLPack] = None,
    picks: Optional[DLPack] = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: Optional[float] = None,
    ppo_kl_coef: float = 0.1,
    dp_size: float = 1.0,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    clamp_closed: bool = False,
    diagnostics: bool = False,
    factor: Optional[DLPack] = None,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
) -> None:
    """Fused policy loss, the same contract on both devices: writes the final
    ``d loss / d log_prob`` into ``grad`` (shape and device of ``log_prob``,
    float dtype), the loss into ``loss`` (0-d, any float dtype), and
    ``[pg_clipfrac, ppo_kl, pg_clipfrac_lower]`` into ``metrics`` (a
    contiguous float64 tensor of ``METRICS_LEN`` elements), then the four
    length diagnostics when ``diagnostics`` (else NaN). ``factor``, an
    optional float64 scalar, multiplies the loss and the gradient.

    CUDA tensors also take ``scratch`` (float64, ``loss_scratch_len(B)``
    elements) and ``stream`` (a ``CUstream`` handle,
    ``torch.cuda.current_stream().cuda_stream``): a memset and two kernels
    are queued and the call returns at once. Errors from the CUDA driver or
    NVRTC are ``RuntimeError``."""

def agg_loss(
    loss_mat: DLPack,
    loss_mask: DLPack,
    grad: DLPack,
    loss: DLPack,
    *,
    loss_agg_mode: AggMode,
    dp_size: float = 1.0,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    factor: Optional[DLPack] = None,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
) -> None:
    """verl's ``agg_loss``, the same contract on both devices: writes the
    final ``d loss / d loss_mat`` into ``grad`` and the loss into ``loss``
    (0-d, any float dtype); ``factor``, ``scratch`` and ``stream`` as in
    :func:`policy_loss`."""

def value_loss(
    vpreds: DLPack,
    values: DLPack,
    returns: DLPack,
    response_mask: DLPack,
    grad: DLPack,
    loss: DLPack,
    metrics: DLPack,
    *,
    cliprange_value: float,
    loss_agg_mode: AggMode,
    dp_size: float = 1.0,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    factor: Optional[DLPack] = None,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
) -> None:
    """verl's clipped value loss, the same contract on both devices: writes the
    final ``d loss / d vpreds`` into ``grad``, the loss into ``loss`` (0-d, any
    float dtype) and ``vf_clipfrac`` into ``metrics[0]`` (the rest of the
    ``METRICS_LEN`` float64 buffer is 0 or NaN); ``factor``, ``scratch`` and
    ``stream`` as in :func:`policy_loss`."""

def grad_times(grad: DLPack, grad_output: DLPack, out: DLPack) -> None:
    """Writes ``grad * grad_output`` into ``out`` (CPU tensors of ``grad``'s
    shape and dtype), out of place, rounded as ``scale_grad`` rounds it."""
    ...

def scale_grad(grad: DLPack, grad_output: DLPack, stream: Optional[int] = None) -> bool:
    """Backward of both losses: ``grad *= grad_output`` in place (a
    contiguous float ``grad``, a 1-element float ``grad_output``). Returns
    whether ``grad`` may have changed: on the CPU a ``grad_output`` of 1 is
    skipped (False); on CUDA the kernel is queued on ``stream`` and skips it
    on the device (True)."""

METRICS_LEN: int
"""Elements of the policy loss's ``metrics`` buffer."""

def loss_scratch_len(rows: int) -> int:
    """float64 elements of the ``scratch`` the CUDA loss kernels need for ``rows`` rows."""

def advantage_scratch_len(rows: int) -> int:
    """float64 elements of the ``scratch`` the CUDA advantage kernels need for ``rows`` rows."""

def cuda_set_nvrtc_hints(dirs: list[str]) -> None:
    """Directories searched for ``libnvrtc`` after ``LUSPO_RS_NVRTC`` and
    before ``CUDA_HOME``, ``/usr/local/cuda`` and the loader's path
    (``luspo_rs`` passes PyTorch's ``site-packages/nvidia/*/lib``)."""

def nvrtc_info() -> tuple[str, int, int]:
    """Loads NVRTC if needed; returns ``(path, major, minor)``.
    ``RuntimeError`` if none is found."""

def cuda_compile(major: int, minor: int, target: CompileTarget = "ptx") -> bytes:
    """Compiles the embedded CUDA kernels for compute capability
    ``major.minor`` to ``"ptx"`` or ``"cubin"`` with NVRTC (no GPU needed);
    ``RuntimeError`` with NVRTC's log on failure."""

def sim_enabled() -> bool:
    """Whether CUDA calls run on the simulator (``LUSPO_RS_CUDA=sim``, read
    at the first call): CPU tensors are then the simulated ``cuda:0``."""

def sim_set_enabled(on: bool) -> None:
    """Turns the simulator on or off for this process (the tests' switch)."""

def sim_set_seed(seed: int) -> None:
    """The seed of the next simulated launch's block and thread order (each
    launch adds 1; ``LUSPO_RS_SIM_SEED`` sets the first)."""

def advantage(
    token_level_rewards: DLPack,
    response_mask: DLPack,
    index: DLPack,
    out: DLPack,
    *,
    estimator: GroupEstimator,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    order: Optional[DLPack] = None,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
    scores: Optional[DLPack] = None,
    weights: Optional[DLPack] = None,
) -> None:
    """Group outcome advantages (``grpo``, ``grpo_vectorized``, ``rloo``,
    ``rloo_vectorized``, ``reinforce_plus_plus_baseline``, ``opo``, ``gpg``,
    ``grpo_passk``, ``gdpo``) with verl 0.9.x semantics: writes the ``(B, T)``
    advantages into ``out`` (float, shape of ``token_level_rewards``).
    ``index`` is a 1-D integer tensor/array of group labels of length ``B``.
    ``grpo_passk`` refuses a group of one row (``ValueError`` naming
    ``index``; on CUDA such a row gets NaN). ``gdpo`` optionally takes
    ``scores`` (float, ``(B, K)``: each row's score under K reward keys, read
    instead of the rewards' row sums) and ``weights`` (contiguous float64
    ``(K,)`` on the same device), both or neither.

    CUDA tensors: ``index`` must be int64 on the device, ``order`` a stable
    argsort of it (int64, on the device), ``scratch`` a contiguous float64
    device tensor of at least ``5 * B + 2`` elements, and ``stream`` the
    ``CUstream`` to queue the kernels on; the call returns at once."""

def returns(
    token_level_rewards: DLPack,
    response_mask: DLPack,
    advantages: DLPack,
    returns: DLPack,
    *,
    estimator: ScanEstimator,
    values: Optional[DLPack] = None,
    reward_baselines: Optional[DLPack] = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
) -> None:
    """The scan estimators with verl 0.9.x semantics (``gae`` with ``values``,
    ``gamma``, ``lam``; ``reinforce_plus_plus`` with ``gamma``; ``remax``
    with ``reward_baselines``, shape ``(B,)``): writes verl's ``(B, T)``
    advantages and returns into ``advantages`` and ``returns`` (float,
    shape of ``token_level_rewards``, distinct buffers).

    CUDA tensors: ``scratch`` a contiguous float64 device tensor of at least
    ``returns_scratch_len(B)`` elements, and ``stream`` the ``CUstream`` to
    queue the kernels on; the call returns at once."""

def returns_scratch_len(rows: int) -> int:
    """float64 elements of the ``scratch`` the CUDA scan kernels need for ``rows`` rows."""

def token_baseline(
    token_level_rewards: DLPack,
    response_mask: DLPack,
    index: DLPack,
    old_log_probs: DLPack,
    sum_pi_squared: DLPack,
    advantages: DLPack,
    returns: DLPack,
    *,
    estimator: TokenBaselineEstimator,
    rollout_is_weights: Optional[DLPack] = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    order: Optional[DLPack] = None,
    scratch: Optional[DLPack] = None,
    stream: Optional[int] = None,
) -> None:
    """verl's optimal token baselines (``optimal_token_baseline``: per group
    and column; ``tir_optimal_token_baseline``: per group and valid-token
    rank), grouped by the integer labels ``index`` (shape ``(B,)``): writes
    verl's ``(B, T)`` advantages and returns into ``advantages`` and
    ``returns`` (float, shape of ``token_level_rewards``, distinct buffers).

    CUDA tensors: ``index`` int64 on the device, ``order`` a stable argsort
    of it (int64, on the device), ``scratch`` a contiguous float64 device
    tensor of at least ``token_baseline_scratch_len(B)`` elements, and
    ``stream`` the ``CUstream`` to queue the kernels on; the call returns at once."""

def token_baseline_scratch_len(rows: int) -> int:
    """float64 elements of the ``scratch`` the CUDA token baseline kernels need for ``rows`` rows."""

def group_ids(index: Iterable[Hashable], out: DLPack) -> int:
    """Dense group ids (first-appearance order) of arbitrary hashable labels,
    equal labels (Python ``==``/``hash``, as a ``dict``) sharing an id; writes
    them into ``out`` (contiguous int64 of length ``len(index)``) and returns
    the number of groups."""

def kl_penalty(
    logprob: DLPack,
    ref_logprob: DLPack,
    out: DLPack,
    grad: Optional[DLPack],
    kl_penalty: KlMode,
    *,
    clamp_closed: bool = False,
    stream: Optional[int] = None,
) -> None:
    """verl's ``kl_penalty`` (``kl``/``k1``, ``abs``, ``mse``/``k2``,
    ``low_var_kl``/``k3``, each optionally with ``+``): writes the estimate
    into ``out`` and, if ``grad`` is given, ``d out / d logprob`` into it.
    CUDA tensors need ``stream`` (the kernel is queued there; the call
    returns at once)."""

def num_threads() -> int:
    """Threads of the CPU kernels (set ``RAYON_NUM_THREADS`` before the first call)."""

__version__: str
