"""E.T. Chat's `<vid>` timestamp matching: the two heads, the soft-target loss, and inference.

A reply such as "from <vid> to <vid>" names frames by matching: the hidden state at the
position that *predicts* a `<vid>` token is a query, the visual tokens of the video are keys,
and the best-matching frame is the timestamp (SEEDS_SPEC 5, "The <vid> token and timestamp
matching"; ETBench `etchat/model/etchat_arch.py`):

- keys: `frm_head(x)` where x is the input of the LM's final norm (the last decoder block's
  output, captured with a forward pre-hook on the norm) at the frames' positions;
- queries: `vid_head(hidden_states[-2])` (the second-to-last block's output) at the position
  whose next token is `<vid>`;
- each head is LayerNorm(h) -> Linear(h, h/2) -> GELU -> Linear(h/2, h);
- training: `CE(q k^T / sqrt(h), target)` with the *unnormalised* soft target
  `target_j = alpha^-|j - t|` (t = the true frame position, clamped to the video), averaged
  over the samples that have `<vid>` answers; a batch without any adds `0 * heads` so every
  rank still produces the heads' gradients (`frame_matching_loss`);
- inference: at every step `softmax(q k^T)` over the frames and its argmax; when the sampled
  token is `<vid>`, the matched frame's LLM input embedding is *added* to the `<vid>`
  embedding fed back at the next step (in training the true frame's is added; the trainer
  does that).

Frame positions: E.T. Chat samples 1 fps from 0 s, so its seconds are frame indices. Here a
video carries the time of each frame (`times`), and `seconds_to_frames` maps seconds to
fractional frame positions by linear interpolation over them (the identity at 1 fps from 0).

The engine's API, for one generation (batch 1; the prompt holds the video at `span`):

    heads = load_timestamp_heads(bundle.heads, hidden_size=lm.config.hidden_size)
    matcher = TimestampMatcher(heads, token_id=vid_id, span=(start, end),
                               frame_embeds=embeds[0, start:end], times=item.times)
    with capture_norm_input(lm) as norm_in:            # around the prefill forward only
        out = lm(inputs_embeds=embeds, use_cache=True, output_hidden_states=True)
    matcher.prefill(norm_in.value, out.hidden_states[-2])   # keys + the first match
    loop:
        token = sample(out.logits[0, -1])
        stamp = matcher.on_token(token)                # a Timestamp when token is <vid>
        extra = matcher.embedding_offset(token)        # (D,) to add to the next input, or None
        x = lm.get_input_embeddings()(ids) (+ extra)   # feed as inputs_embeds
        out = lm(inputs_embeds=x, past_key_values=..., output_hidden_states=True)
        matcher.step(out.hidden_states[-2])            # the match for the next token

`format_seconds` renders a timestamp for the reply text (the engine replaces each `<vid>` by
it); `matcher.timestamps` lists them for the structured reply (frame, seconds, index).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import InvalidArgumentError
from services.models.checkpoints.bundle import check_state_dict

HEAD_NAME = "timestamps"  # the heads' key in a bundle's heads.safetensors ("timestamps.frm_head.0.weight")


def _head(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(hidden), nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, hidden)
    )


class TimestampHeads(nn.Module):
    """E.T. Chat's `frm_head` (frame keys) and `vid_head` (`<vid>` queries).

    Args:
        hidden_size: The LM's hidden size h (even: the heads' middle width is h / 2).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size < 2 or hidden_size % 2:
            raise InvalidArgumentError(
                f"timestamp heads: expected an even hidden size >= 2, got {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.frm_head = _head(hidden_size)
        self.vid_head = _head(hidden_size)

    def keys(self, frame_states: torch.Tensor) -> torch.Tensor:
        """Frame keys from the final norm's input at the frames' positions: (..., h) -> (..., h)."""
        return self.frm_head(frame_states)

    def queries(self, states: torch.Tensor) -> torch.Tensor:
        """`<vid>` queries from hidden_states[-2] at the predicting positions: (..., h) -> (..., h)."""
        return self.vid_head(states)

    def forward(self, query_states: torch.Tensor, frame_states: torch.Tensor) -> torch.Tensor:
        """Scaled similarities (N, F) of N query states (N, h) against F frame states (F, h)."""
        return similarity(self.queries(query_states), self.keys(frame_states))


def similarity(queries: torch.Tensor, keys: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
    """q k^T, divided by sqrt(h) when `scaled` (training; inference takes the argmax of the
    unscaled softmax, as E.T. Chat). (N, h) x (F, h) -> (N, F)."""
    sim = queries @ keys.transpose(-1, -2)  # (N, F)
    return sim / math.sqrt(queries.shape[-1]) if scaled else sim


def soft_targets(targets: torch.Tensor, num_frames: int, alpha: float) -> torch.Tensor:
    """E.T. Chat's unnormalised soft targets alpha^-|j - t| over frames j = 0..F-1.

    Args:
        targets: True frame positions t (N,), possibly fractional; clamped to [0, F - 1].
        num_frames: F.
        alpha: The base (> 1 makes the target peak at t; E.T. Chat uses 2).

    Returns:
        (N, F) float targets; the peak is 1 at an integer t.
    """
    if num_frames < 1:
        raise InvalidArgumentError(f"soft targets: expected at least one frame, got {num_frames}")
    t = targets.to(torch.float32).clamp(0, num_frames - 1)  # (N,)
    j = torch.arange(num_frames, device=targets.device, dtype=torch.float32)  # (F,)
    return torch.pow(torch.tensor(float(alpha), device=targets.device), -(j[None, :] - t[:, None]).abs())


def frame_matching_loss(
    vid_queries: Sequence[torch.Tensor],
    frame_keys: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    alpha: float,
) -> torch.Tensor:
    """The matching loss of a batch: mean over samples with targets of CE(q k^T / sqrt(h), soft).

    Per sample i, `F.cross_entropy(sim_i, alpha^-|j - t|)` with probability targets that are
    NOT normalised, i.e. mean over its N_i queries of -sum_j target_j log_softmax(sim)_j.

    Args:
        vid_queries: Per sample, the queries (N_i, h) (`heads.queries(...)`); N_i may be 0.
        frame_keys: Per sample, the keys (F_i, h) of its (last) video.
        targets: Per sample, the true frame positions (N_i,).
        alpha: Soft-target base.

    Returns:
        A scalar. With no sample holding a target it is 0 times the sum of every query and
        key given, so the heads stay in the graph (ZeRO needs their gradients on every rank).

    Raises:
        InvalidArgumentError: The lists differ in length, or a sample's queries and targets.
    """
    if not len(vid_queries) == len(frame_keys) == len(targets):
        raise InvalidArgumentError(
            f"frame matching: expected as many query, key and target entries, got "
            f"{len(vid_queries)}, {len(frame_keys)} and {len(targets)}"
        )
    losses = []
    for i, (q, k, t) in enumerate(zip(vid_queries, frame_keys, targets, strict=True)):
        if q.shape[0] != t.shape[0]:
            raise InvalidArgumentError(
                f"frame matching sample {i}: expected one target per <vid> query, got "
                f"{q.shape[0]} queries and {t.shape[0]} targets"
            )
        if q.shape[0] == 0:
            continue
        sim = similarity(q, k).float()  # (N_i, F_i)
        losses.append(F.cross_entropy(sim, soft_targets(t, k.shape[0], alpha).to(sim.device)))
    if losses:
        return torch.stack(losses).mean()
    anchor = [x.sum() for x in (*vid_queries, *frame_keys)]
    if not anchor:
        raise InvalidArgumentError("frame matching: expected at least one sample, got none")
    return torch.stack(anchor).sum() * 0.0


def seconds_to_frames(
    seconds: Sequence[float] | np.ndarray, times: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Fractional frame positions of times in seconds, interpolated over the frames' times.

    Args:
        seconds: Times in the source video (N,).
        times: The time of each sampled frame (F,), increasing.

    Returns:
        (N,) float32 positions in [0, F - 1] (times outside the frames clamp to the ends).

    Raises:
        InvalidArgumentError: No frames, or frame times that are not increasing.
    """
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise InvalidArgumentError(f"frame times: expected a non-empty 1-D array, got shape {t.shape}")
    if t.size > 1 and not bool(np.all(np.diff(t) > 0)):
        raise InvalidArgumentError("frame times: expected strictly increasing times")
    s = np.asarray(seconds, dtype=np.float64).reshape(-1)
    if t.size == 1:
        return np.zeros(s.shape, dtype=np.float32)
    return np.interp(s, t, np.arange(t.size, dtype=np.float64)).astype(np.float32)


def frame_at(position: float, num_frames: int) -> int:
    """The frame a (fractional) frame position names: rounded half to even as torch's
    `round()` (E.T. Chat's `src_ind.round()`), clamped to [0, num_frames - 1]."""
    return min(max(round(float(position)), 0), num_frames - 1)


def time_token_item(position: int, spans: Sequence[tuple[int, int]]) -> int:
    """Which visual span's frames a time token in the prompt names (an index into `spans`).

    E.T. Chat (`etchat/model/etchat_arch.py`, `prepare_multimodal_data`, lines 241-279): a
    `<vid>` in the text before a visual span gets that span's frame added, one after the last
    span the last span's. So: the first span starting after the token, else the last one.

    Args:
        position: The time token's position in the prompt.
        spans: (start, length) of each item of the heads' modality, in prompt order.

    Raises:
        InvalidArgumentError: No spans.
    """
    if not spans:
        raise InvalidArgumentError("time token: expected a media item whose frames it names, got none")
    after = [k for k, (start, _) in enumerate(spans) if start > position]
    return after[0] if after else len(spans) - 1


def source_frames(
    time_tokens: Sequence[tuple[int, float]],
    spans: Sequence[tuple[int, int]],
    times: Sequence[Sequence[float]],
) -> list[tuple[int, int, int]]:
    """The frame each time token of a prompt names, as E.T. Chat adds it at inference.

    Args:
        time_tokens: (position, seconds) of each time token (`Prompt.time_tokens`).
        spans: (start, length) of each item of the heads' modality, in prompt order (one token
            per frame).
        times: Per such item, its frame times (empty: frame k at k seconds, E.T. Chat's 1 fps).

    Returns:
        Per token, (its position, the item's index into `spans`, the frame): the item after
        the token else the last (`time_token_item`), the frame `frame_at(seconds_to_frames)`,
        i.e. E.T. Chat's `round(src)` clamped to the item where frame k is at k seconds.
    """
    out = []
    for position, seconds in time_tokens:
        k = time_token_item(position, spans)
        length = spans[k][1]
        frame_times = times[k] or tuple(float(j) for j in range(length))
        out.append((position, k, frame_at(float(seconds_to_frames([seconds], frame_times)[0]), length)))
    return out


def add_source_frames(
    embeds: torch.Tensor, rows: Sequence[int], positions: Sequence[int], frames: torch.Tensor
) -> torch.Tensor:
    """E.T. Chat's time tokens: each token's input embedding plus the LLM embedding of its frame.

    Serving (a question's `<vid>` with its source time) and training (the questions' and the
    replies' `<vid>`, teacher-forced) both go through here, as E.T. Chat adds
    `frame_token[round(src)]` in `prepare_multimodal_data` for both.

    Args:
        embeds: Input embeddings (B, L, D).
        rows: The batch row of each time token (N,).
        positions: Its position in the row (N,).
        frames: The connector output of the frame it names, per token (N, D).

    Returns:
        The embeddings with the frames added (a new tensor).
    """
    if not len(positions):
        return embeds
    index = (
        torch.as_tensor(list(rows), device=embeds.device),
        torch.as_tensor(list(positions), device=embeds.device),
    )
    return embeds.index_put(index, frames.to(embeds.dtype), accumulate=True)


def format_seconds(seconds: float) -> str:
    """A timestamp as reply text: "12" for 12.0 s, "12.5" for 12.5 s (one decimal)."""
    text = f"{seconds:.1f}"
    return text[:-2] if text.endswith(".0") else text


def load_timestamp_heads(
    flat: Mapping[str, torch.Tensor], *, hidden_size: int, prefix: str = HEAD_NAME
) -> TimestampHeads:
    """Timestamp heads from a bundle's flat heads ("timestamps.frm_head.0.weight" -> tensor).

    Raises:
        FailedPreconditionError: A key is missing or unexpected, or a shape does not fit the LM.
    """
    heads = TimestampHeads(hidden_size)
    got = {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + ".")}
    check_state_dict(
        f"{prefix} heads",
        heads.state_dict(),
        got,
        prefix=f"{prefix}.",
        shape_note=f" (LLM hidden size {hidden_size})",
    )
    heads.load_state_dict(dict(got), strict=True)
    return heads.eval().requires_grad_(False)


def final_norm(lm: Any) -> nn.Module:
    """The final norm of a Hugging Face causal LM (Llama, Phi-3, ...; PEFT-wrapped too).

    Raises:
        InvalidArgumentError: The LM has no decoder with a `norm` module.
    """
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        raise InvalidArgumentError(
            f"timestamp matching: expected a causal LM whose decoder has a final `norm`, got {type(lm).__name__}"
        )
    return norm


@dataclass
class CapturedInput:
    """What `capture_norm_input` saw: the last input of the final norm, (B, L, h)."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture_norm_input(lm: Any) -> Iterator[CapturedInput]:
    """Record the input of the LM's final norm (the last decoder block's output) while inside.

    The hook is removed on exit, so forwards outside the block pay nothing.
    """
    captured = CapturedInput()

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.value = args[0]

    handle = final_norm(lm).register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass(frozen=True)
class Timestamp:
    """One matched `<vid>`: which of the reply's `<vid>` tokens, its frame and its time."""

    index: int
    frame: int
    seconds: float


@dataclass
class TimestampMatcher:
    """One generation's `<vid>` matching state (batch 1; see the module docstring).

    Args:
        heads: The trained heads (eval).
        token_id: The `<vid>` token id.
        span: [start, end) of the matched video's tokens in the prompt (one per frame).
        frame_embeds: The LLM input embeddings of those tokens (F, D), added to `<vid>`.
        times: The time of each frame in seconds (F,).
    """

    heads: TimestampHeads
    token_id: int
    span: tuple[int, int]
    frame_embeds: torch.Tensor
    times: Sequence[float] | np.ndarray
    keys: torch.Tensor | None = field(default=None, repr=False)  # (F, h)
    matches: list[int] = field(default_factory=list)  # the argmax frame at every step
    timestamps: list[Timestamp] = field(default_factory=list)

    def __post_init__(self) -> None:
        start, end = self.span
        frames = end - start
        if frames < 1 or start < 0:
            raise InvalidArgumentError(f"timestamp matching: expected a non-empty span, got {self.span}")
        if self.frame_embeds.shape[0] != frames or len(self.times) != frames:
            raise InvalidArgumentError(
                f"timestamp matching: expected {frames} frame embeddings and times (one per token of "
                f"the span), got {self.frame_embeds.shape[0]} and {len(self.times)}"
            )

    def prefill(self, norm_input: torch.Tensor | None, hidden_m2: torch.Tensor) -> int:
        """After the prefill: compute the frame keys and the match for the first new token.

        Args:
            norm_input: The final norm's input over the prompt (1, L, h) (`capture_norm_input`).
            hidden_m2: hidden_states[-2] of the prefill (1, L, h) (or (1, 1, h): the last position).

        Returns:
            The matched frame for the next token.
        """
        if norm_input is None:
            raise InvalidArgumentError("timestamp matching: the final norm's input was not captured")
        start, end = self.span
        if norm_input.shape[1] < end:
            raise InvalidArgumentError(
                f"timestamp matching: the span ends at {end}, the prefill has {norm_input.shape[1]} positions"
            )
        self.keys = self.heads.keys(norm_input[0, start:end].to(self._dtype))  # (F, h)
        return self.step(hidden_m2)

    def step(self, hidden_m2: torch.Tensor) -> int:
        """Match the last position's hidden_states[-2] (1, L, h) against the frames; returns the frame."""
        if self.keys is None:
            raise InvalidArgumentError("timestamp matching: step() before prefill()")
        query = self.heads.queries(hidden_m2[0, -1:].to(self._dtype))  # (1, h)
        frame = int(similarity(query, self.keys, scaled=False)[0].softmax(-1).argmax())
        self.matches.append(frame)
        return frame

    def on_token(self, token: int) -> Timestamp | None:
        """Account for a sampled token; a `<vid>` gets the frame matched where it was predicted."""
        if token != self.token_id:
            return None
        if not self.matches:
            raise InvalidArgumentError("timestamp matching: a token before any match")
        frame = self.matches[-1]
        stamp = Timestamp(index=len(self.timestamps), frame=frame, seconds=float(self.times[frame]))
        self.timestamps.append(stamp)
        return stamp

    def embedding_offset(self, token: int) -> torch.Tensor | None:
        """What to add to `token`'s input embedding at the next step: the matched frame's
        embedding (D,) for `<vid>`, else None."""
        if token != self.token_id or not self.matches:
            return None
        return self.frame_embeds[self.matches[-1]]

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype


def init_timestamp_heads(hidden_size: int, *, seed: int = 0) -> TimestampHeads:
    """Freshly initialised heads, the same for the same seed and size (the global RNG is untouched).

    For a bundle without trained heads (a tiny twin's initial bundle, a stage-1/2 bundle):
    the matching then runs, but its frames mean nothing until stage 3 trains the heads.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimestampHeads(hidden_size)
