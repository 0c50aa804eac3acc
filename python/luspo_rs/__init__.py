"""luspo-rs: fused LUSPO, GSPO and GRPO/PPO policy losses for PyTorch RL
trainers, computed in Rust (rayon) over tensors shared through DLPack.

Public API:

* :func:`policy_loss` — the fused loss, its gradient and verl's metrics;
* :func:`agg_loss` — verl's loss aggregation for any ``(B, T)`` loss matrix.
"""

from ._core import __version__, num_threads
from .functional import agg_loss, policy_loss

__all__ = ["__version__", "agg_loss", "num_threads", "policy_loss"]
