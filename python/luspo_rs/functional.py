"""Compatibility names: the autograd Functions and the argument helpers
that lived here now live with their op (:mod:`luspo_rs.policy_loss`,
:mod:`luspo_rs.agg_loss`, :mod:`luspo_rs.kl_penalty`) and in
:mod:`luspo_rs._args`. ``torch_clamp_closed()`` is documented here.
"""

from ._args import refuse_double_backward, torch_clamp_closed
from .agg_loss import AggLossFunction, agg_loss
from .kl_penalty import KlPenaltyFunction, kl_penalty
from .policy_loss import METRICS, PolicyLossFunction, policy_loss

__all__ = [
    "METRICS",
    "AggLossFunction",
    "KlPenaltyFunction",
    "PolicyLossFunction",
    "agg_loss",
    "kl_penalty",
    "policy_loss",
    "refuse_double_backward",
    "torch_clamp_closed",
]
