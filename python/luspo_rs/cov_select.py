"""Clip-Cov's and KL-Cov's choice of tokens, in torch, as verl makes it.

TODO(helper): the selection; until then no token is chosen.
"""

from __future__ import annotations

from typing import Optional

import torch


def choose_tokens(mode: str, old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, **kw) -> Optional[torch.Tensor]:
    return None
