"""Next-token selection: penalties, then greedy or temperature + top-k + top-p, per request.

`SamplingParams` validates its ranges on construction, so an invalid request never reaches
the decode loop. A field left unset (None) takes the preset's `generation:` value, else a
neutral default (`SamplingParams.resolve`, called by the engine that knows the preset). A
`Sampler` owns a `torch.Generator` seeded from the request's seed (or a fresh random seed), so
the same seed gives the same tokens.

Penalties act on the logits before temperature and filtering, as Hugging Face's logits
processors and vLLM's sampler order them. `Penalties` is one row's token memory;
`apply_penalties` applies the rows of a batch in one go (`penalise_rows`: the penalised
rows of a batch whose other rows have none):
- repetition_penalty (Hugging Face's `RepetitionPenaltyLogitsProcessor`, vLLM's extra field):
  each id seen in the prompt or the reply gets its logit divided by the penalty when positive,
  multiplied when negative. Media positions (expanded placeholders) and the timestamp token
  are left out, as E.T. Chat's own processor leaves out its -200 and `<vid>`
  (etchat/utils/inference.py, RepetitionPenaltyLogitsProcessor).
- presence_penalty / frequency_penalty (OpenAI's, as vLLM takes them): over the reply's tokens
  only, logit -= frequency * count + presence * (count > 0).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import GenerationSpec

MAX_TEMPERATURE = 2.0
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (logits / t would overflow float32)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI, vLLM)
DEFAULT_MAX_TOKENS = 256
_NEUTRAL = GenerationSpec()
_T = TypeVar("_T", int, float)


def _pick(value: _T | None, preset: _T | None, neutral: _T) -> _T:
    """The request's value, else the preset's, else the neutral one."""
    return value if value is not None else preset if preset is not None else neutral


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request; None leaves a field to the preset (see `resolve`).

    Attributes:
        max_tokens: Upper bound on generated tokens, > 0.
        temperature: In [0, 2]; 0 selects greedy decoding, and so does any temperature below
            GREEDY_BELOW (as vLLM's _SAMPLING_EPS): dividing float32 logits by 1e-45 makes
            them infinite and the softmax NaN. Neutral default 1.
        top_p: Nucleus mass in (0, 1]; 1 (the neutral default) disables it.
        top_k: Keep the k most likely tokens; 0 (the neutral default) disables it.
        seed: Seed of the request's generator; None draws a fresh one.
        stop: Generation stops before the first occurrence of any of these strings.
        repetition_penalty: > 0; 1 (neutral) is off.
        presence_penalty: In [-2, 2]; 0 (neutral) is off.
        frequency_penalty: In [-2, 2]; 0 (neutral) is off.
        stop_token_ids: Token ids that end generation (besides end-of-sequence).
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidArgumentError(
                f"sampling.max_tokens: expected > 0, got {self.max_tokens}", param="max_tokens"
            )
        t = self.temperature
        if t is not None and not 0.0 <= t <= MAX_TEMPERATURE:  # NaN fails too
            raise InvalidArgumentError(
                f"sampling.temperature: expected in [0, {MAX_TEMPERATURE:g}], got {t:g}", param="temperature"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(
                f"sampling.top_p: expected in (0, 1], got {self.top_p:g}", param="top_p"
            )
        if self.top_k is not None and self.top_k < 0:
            raise InvalidArgumentError(
                f"sampling.top_k: expected >= 0 (0 disables it), got {self.top_k}", param="top_k"
            )
        r = self.repetition_penalty
        if r is not None and not (math.isfinite(r) and r > 0):
            raise InvalidArgumentError(
                f"sampling.repetition_penalty: expected a number > 0 (1 disables it), got {r:g}",
                param="repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise InvalidArgumentError(
                    f"sampling.{name}: expected in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 disables it), got {v:g}",
                    param=name,
                )
        for i, s in enumerate(self.stop):
            if not s:
                raise InvalidArgumentError(f"sampling.stop[{i}]: must not be empty", param="stop")
        for i, token in enumerate(self.stop_token_ids):
            if token < 0:
                raise InvalidArgumentError(
                    f"sampling.stop_token_ids[{i}]: expected a token id >= 0, got {token}",
                    param="stop_token_ids",
                )

    def resolve(
        self, defaults: GenerationSpec = _NEUTRAL, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> SamplingParams:
        """Every unset field filled: the request's value, else the preset's, else the neutral one.

        Args:
            defaults: The preset's `generation:` section.
            default_max_tokens: max_tokens where neither the request nor the preset sets it.
        """
        return dataclasses.replace(
            self,
            max_tokens=_pick(self.max_tokens, defaults.max_tokens, default_max_tokens),
            temperature=_pick(self.temperature, defaults.temperature, 1.0),
            top_p=_pick(self.top_p, defaults.top_p, 1.0),
            top_k=_pick(self.top_k, defaults.top_k, 0),
            repetition_penalty=_pick(self.repetition_penalty, defaults.repetition_penalty, 1.0),
            presence_penalty=_pick(self.presence_penalty, defaults.presence_penalty, 0.0),
            frequency_penalty=_pick(self.frequency_penalty, defaults.frequency_penalty, 0.0),
        )

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0, or below GREEDY_BELOW)."""
        return (self.temperature if self.temperature is not None else 1.0) < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (a request without one skips the penalty step)."""
        return (
            self.repetition_penalty not in (None, 1.0)
            or self.presence_penalty not in (None, 0.0)
            or self.frequency_penalty not in (None, 0.0)
        )


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


class Penalties:
    """One row's token memory for its request's penalties.

    Args:
        params: The request's resolved sampling parameters.
        vocab_size: V, the width of the logits.
        prompt_ids: The prompt's ids.
        skip_spans: (start, length) spans of the prompt left out of the repetition penalty
            (the media placeholders).
        skip_ids: Ids the repetition penalty never touches (the timestamp token).
        device: Where the logits are.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt_ids: Sequence[int] = (),
        *,
        skip_spans: Collection[tuple[int, int]] = (),
        skip_ids: Collection[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.repetition = _pick(params.repetition_penalty, None, 1.0)  # unset: neutral
        self.presence = _pick(params.presence_penalty, None, 0.0)
        self.frequency = _pick(params.frequency_penalty, None, 0.0)
        self.skip_ids = frozenset(skip_ids)
        keep = torch.ones(len(prompt_ids), dtype=torch.bool)  # (L,)
        for start, length in skip_spans:
            keep[start : start + length] = False
        ids = torch.tensor(list(prompt_ids), dtype=torch.long)[keep]  # (L',)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # (V,) ids the repetition penalty hits
        self.seen[ids] = True
        self.seen[list(self.skip_ids)] = False
        self.seen = self.seen.to(device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # (V,) of the reply

    def add(self, token: int) -> None:
        """Record a token of the reply."""
        self.counts[token] += 1
        if token not in self.skip_ids:
            self.seen[token] = True


def apply_penalties(logits: torch.Tensor, rows: Sequence[Penalties]) -> torch.Tensor:
    """The logits of a batch's rows with each row's penalties applied (in float32).

    Args:
        logits: (B, V), row i belonging to rows[i].
        rows: Each row's token memory.

    Returns:
        (B, V) float32; the input is left unchanged.
    """
    out = logits.float()  # (B, V)
    seen = torch.stack([r.seen for r in rows])  # (B, V)
    counts = torch.stack([r.counts for r in rows])  # (B, V)
    repetition = out.new_tensor([r.repetition for r in rows])[:, None]  # (B, 1)
    presence = out.new_tensor([r.presence for r in rows])[:, None]  # (B, 1)
    frequency = out.new_tensor([r.frequency for r in rows])[:, None]  # (B, 1)
    penalised = torch.where(out < 0, out * repetition, out / repetition)  # (B, V)
    out = torch.where(seen, penalised, out)  # (B, V)
    return out - frequency * counts - presence * (counts > 0)  # (B, V)


def penalise_rows(logits: torch.Tensor, rows: Sequence[Penalties | None]) -> torch.Tensor:
    """A batch step's last-position logits with the penalised rows' penalties applied (one
    `apply_penalties` call for all of them); unchanged when no row has penalties.

    Args:
        logits: (B, V), row i belonging to rows[i].
        rows: Each row's token memory, None for a row without penalties.

    Returns:
        (B, V): float32 where some row is penalised, else `logits` itself.
    """
    which = [(i, p) for i, p in enumerate(rows) if p is not None]
    if not which:
        return logits
    out = logits.float()  # (B, V)
    index = torch.tensor([i for i, _ in which], device=logits.device)
    penalised = apply_penalties(out[index], [p for _, p in which])  # (P, V)
    return out.index_copy(0, index, penalised)  # (B, V)


class Sampler:
    """Chooses next tokens for one request (from logits its penalties were applied to).

    Args:
        params: The request's sampling parameters (unset ones take the neutral defaults).
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.resolve()
        self.temperature = _pick(params.temperature, None, 1.0)
        self.top_k = _pick(params.top_k, None, 0)
        self.top_p = _pick(params.top_p, None, 1.0)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id for last-position logits of shape (V,)."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        scaled = logits.float() / self.temperature  # (V,)
        scaled = apply_top_p(apply_top_k(scaled, self.top_k), self.top_p)  # (V,)
        probs = torch.softmax(scaled, dim=-1).cpu()  # (V,)
        return int(torch.multinomial(probs, 1, generator=self.generator))
