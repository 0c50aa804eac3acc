"""Type stubs of the native module ``luspo_rs._core``.

Every tensor argument is any object with ``__dlpack__`` (torch tensors, numpy
arrays). Outputs (``grad``, ``out``) are written in place and must be
writable; nothing is copied. Errors are ``TypeError`` (dtype) or
``ValueError`` (shape, rank, device, value), each naming the argument.
"""

from typing import Any, Optional

def policy_loss(
    old_log_prob: Any,
    log_prob: Any,
    advantages: Any,
    response_mask: Any,
    grad: Any,
    out: Any,
    *,
    mode: str,
    loss_agg_mode: str,
    clip_ratio: float,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: Optional[Any] = None,
    dp_size: float = 1.0,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
) -> None:
    """Fused policy loss: writes ``d loss / d log_prob`` into ``grad`` (shape
    and device of ``log_prob``, float dtype) and
    ``[loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower]`` into ``out`` (a
    contiguous float64 tensor of 4 elements)."""

def agg_loss(
    loss_mat: Any,
    loss_mask: Any,
    grad: Any,
    loss_agg_mode: str,
    *,
    dp_size: float = 1.0,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
) -> float:
    """verl's ``agg_loss``: returns the scalar and writes
    ``d loss / d loss_mat`` into ``grad``."""

def num_threads() -> int:
    """Threads of the CPU kernels (set ``RAYON_NUM_THREADS`` before the first call)."""

__version__: str
