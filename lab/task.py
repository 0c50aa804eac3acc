"""The synthetic task: the sum of n digits, mod 10, with optional written steps.

A prompt is ``n`` digits (``n`` drawn from ``n_min..n_max``), filled with BLANK
to a fixed width and closed by SEP, so every prompt has the same length, every
response starts at the same position, and digit ``j`` always sits ``n_max + 1``
tokens before step ``j``. A response is

    [s_1 s_2 ... s_k] = a EOS

any number of step digits (the reward does not read them), ``=``, one answer
digit and EOS. The reward is 1 when ``a == sum(digits) % 10`` and the response is
well formed (exactly that shape, EOS within the cap), else 0.

Why length can matter: the demonstrations write either nothing before ``=``
(the direct answer, 3 tokens) or the running sums ``s_j = (d_1 + ... + d_{j+1})
% 10`` for ``j = 1..n-1`` (``n + 2`` tokens), so the answer is a copy of the
last step. Each step is one local operation (the previous step plus the next
digit, a 100-entry table), which a small causal transformer learns quickly; the
direct answer needs all ``n`` digits combined in one forward pass, which it
learns slowly, if at all, in the time the lab has. Long responses are therefore
the reliable way to be right, and short ones are close to a guess for large n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

# vocabulary: the ten digits are their own ids
EQ, EOS, SEP, BLANK, PAD = 10, 11, 12, 13, 14
VOCAB = 15
NAMES = {EQ: "=", EOS: "<eos>", SEP: "?", BLANK: "_", PAD: "."}


@dataclass(frozen=True)
class Task:
    n_min: int = 2
    n_max: int = 6
    cap: int = 12  # most response tokens, EOS included

    @property
    def prompt_len(self) -> int:
        return self.n_max + 1

    def sample(self, rng: np.random.Generator, count: int) -> list[list[int]]:
        """``count`` random digit lists."""
        ns = rng.integers(self.n_min, self.n_max + 1, size=count)
        return [rng.integers(0, 10, size=int(n)).tolist() for n in ns]

    def encode_prompts(self, problems: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(B, n_max + 1)`` token ids: the digits, BLANK fill, SEP."""
        out = torch.full((len(problems), self.prompt_len), BLANK, dtype=torch.long)
        for i, d in enumerate(problems):
            if not self.n_min <= len(d) <= self.n_max:
                raise ValueError(f"problem {i}: {len(d)} digits, expected {self.n_min}..{self.n_max}")
            out[i, : len(d)] = torch.tensor(list(d))
        out[:, -1] = SEP
        return out

    def pad_responses(self, responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(B, cap)`` token ids, PAD after each response."""
        out = torch.full((len(responses), self.cap), PAD, dtype=torch.long)
        for i, r in enumerate(responses):
            r = list(r)[: self.cap]
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out


def answer(digits: Sequence[int]) -> int:
    return sum(digits) % 10


def demonstration(digits: Sequence[int], steps: Union[bool, int]) -> list[int]:
    """The demonstrated response: the running sums (all ``n - 1`` if ``steps`` is
    True, none if False, the first ``steps`` if an int), then ``= a EOS``."""
    k = (len(digits) - 1 if steps else 0) if isinstance(steps, bool) else int(steps)
    out, s = [], digits[0]
    for d in digits[1 : 1 + k]:
        s = (s + d) % 10
        out.append(s)
    return out + [EQ, answer(digits), EOS]


def parse(response: Sequence[int]) -> Optional[tuple[int, int]]:
    """``(answer, number of steps)`` of a well-formed response, else None.
    ``response`` may carry PAD after EOS; anything after the first EOS is ignored."""
    toks = [int(t) for t in response]
    if EOS not in toks:
        return None  # truncated at the cap, or empty
    toks = toks[: toks.index(EOS)]
    if len(toks) < 2 or toks[-2] != EQ or not 0 <= toks[-1] <= 9:
        return None
    steps = toks[:-2]
    if any(not 0 <= t <= 9 for t in steps):
        return None
    return toks[-1], len(steps)


def reward(digits: Sequence[int], response: Sequence[int]) -> float:
    """1.0 for a well-formed response with the right answer, else 0.0."""
    p = parse(response)
    return float(p is not None and p[0] == answer(digits))


def render(digits: Sequence[int], response: Sequence[int]) -> str:
    """Human-readable ``"3 5 1 ? 8 9 = 9 <eos>"``."""
    toks = [str(d) for d in digits] + ["?"]
    for t in response:
        t = int(t)
        if t == PAD:
            break
        toks.append(NAMES.get(t, str(t)))
    return " ".join(toks)
