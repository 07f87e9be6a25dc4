"""Next-token selection: greedy, or temperature + top-k + top-p with a per-request generator.

`SamplingParams` validates its ranges on construction, so an invalid request never reaches
the decode loop. A `Sampler` owns a `torch.Generator` seeded from the request's seed (or a
fresh random seed), so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from services.common.errors import InvalidArgumentError

MAX_TEMPERATURE = 2.0
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (logits / t would overflow float32)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request.

    Attributes:
        max_tokens: Upper bound on generated tokens, > 0.
        temperature: In [0, 2]; 0 selects greedy decoding, and so does any temperature below
            GREEDY_BELOW (as vLLM's _SAMPLING_EPS): dividing float32 logits by 1e-45 makes
            them infinite and the softmax NaN.
        top_p: Nucleus mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 disables it.
        seed: Seed of the request's generator; None draws a fresh one.
        stop: Generation stops before the first occurrence of any of these strings.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidArgumentError(
                f"sampling.max_tokens: expected > 0, got {self.max_tokens}", param="max_tokens"
            )
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise InvalidArgumentError(
                f"sampling.temperature: expected in [0, {MAX_TEMPERATURE:g}], got {self.temperature:g}",
                param="temperature",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(
                f"sampling.top_p: expected in (0, 1], got {self.top_p:g}", param="top_p"
            )
        if self.top_k < 0:
            raise InvalidArgumentError(
                f"sampling.top_k: expected >= 0 (0 disables it), got {self.top_k}", param="top_k"
            )
        for i, s in enumerate(self.stop):
            if not s:
                raise InvalidArgumentError(f"sampling.stop[{i}]: must not be empty", param="stop")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0, or below GREEDY_BELOW)."""
        return self.temperature < GREEDY_BELOW


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties at the k-th are kept); k=0: no-op.

    Args:
        logits: (V,) or (B, V).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p; p=1: no-op.

    The most likely token is always kept.

    Args:
        logits: (V,) or (B, V).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (..., V)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (..., V) mass of strictly better tokens
    drop_sorted = mass_before >= p  # (..., V)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (..., V)
    return logits.masked_fill(drop, -math.inf)


class Sampler:
    """Chooses next tokens for one request.

    Args:
        params: The request's sampling parameters.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id for last-position logits of shape (V,)."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        scaled = logits.float() / self.params.temperature  # (V,)
        scaled = apply_top_p(apply_top_k(scaled, self.params.top_k), self.params.top_p)  # (V,)
        probs = torch.softmax(scaled, dim=-1).cpu()  # (V,)
        return int(torch.multinomial(probs, 1, generator=self.generator))
