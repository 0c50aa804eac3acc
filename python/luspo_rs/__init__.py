"""luspo-rs: fused LUSPO, GSPO and GRPO/PPO policy losses for PyTorch RL
trainers, computed in Rust (rayon on the CPU, CUDA kernels on the GPU) over
tensors shared through DLPack.

Public API, one function per op (each in the module of the same name, with
its autograd Function):

* :func:`policy_loss` — the fused loss, its gradient and verl's metrics;
* :func:`agg_loss` — verl's loss aggregation for any ``(B, T)`` loss matrix;
* :func:`kl_penalty` — verl's KL estimators, elementwise, differentiable;
* :func:`advantage` — verl's group advantage estimators by name;
* :func:`value_loss` — verl's clipped critic loss, fused with its gradient.

``luspo_rs.core_algos`` holds verl's signatures over them, and
``luspo_rs.verl`` plugs them into verl.
"""

from ._core import __version__, num_threads
from .advantage import advantage
from .agg_loss import agg_loss
from .kl_penalty import kl_penalty
from .policy_loss import policy_loss
from .value_loss import value_loss

__all__ = ["__version__", "advantage", "agg_loss", "kl_penalty", "num_threads", "policy_loss", "value_loss"]
