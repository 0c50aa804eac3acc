"""The policy: a small causal transformer over the task's 15 tokens.

Pre-LayerNorm blocks, learned positions, tied input/output embeddings. With
the default sizes (d=64, 2 layers, 4 heads) it has about 0.1M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .task import BLANK, EOS, PAD, SEP, VOCAB

#: tokens a response may not contain (prompt-only and padding tokens)
_NOT_IN_RESPONSE = torch.tensor([SEP, BLANK, PAD])


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class Policy(nn.Module):
    def __init__(self, max_len: int, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, L, VOCAB)``."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.tok.weight.T

    def response_logits(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, VOCAB)`` of each response token given what precedes it."""
        P = prompts.shape[1]
        ids = torch.cat([prompts, responses[:, :-1]], dim=1)
        return _response_only(self(ids)[:, P - 1 :])

    def log_probs(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probability of each response token. PAD positions (after
        EOS, removed by the response mask) get a finite stand-in: EOS's."""
        logp = torch.log_softmax(self.response_logits(prompts, responses), dim=-1)
        tgt = responses.masked_fill(responses == PAD, EOS)
        return logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
        """``(B, cap)`` sampled responses at temperature 1, PAD after EOS."""
        B = prompts.shape[0]
        ids = prompts
        done = torch.zeros(B, dtype=torch.bool)
        out = torch.full((B, cap), PAD, dtype=torch.long)
        for t in range(cap):
            probs = torch.softmax(_response_only(self(ids)[:, -1]), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            out[:, t] = nxt
            done |= nxt == EOS
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return out


def _response_only(logits: torch.Tensor) -> torch.Tensor:
    """The response's action space: digits, ``=`` and EOS."""
    return logits.index_fill(-1, _NOT_IN_RESPONSE, float("-inf"))


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float mask: every token up to and including the first EOS (all
    ``T`` tokens when a response was cut at the cap)."""
    is_eos = responses == EOS
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS seen strictly before t
    return (before == 0).float()
