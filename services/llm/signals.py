"""Output signals during generation (NExT-GPT): signal spans -> hidden states -> projector.

A preset with `outputs` gives each output modality N signal tokens (`[IMG0]..[IMG3]`). One
`SignalCapture` follows one request's decode loop:

- when the model samples a modality's FIRST signal token, the other N-1 are forced (fed
  without sampling), so a span is always complete and in order, as the seed asserts; a stray
  later signal token on its own is ignored (it is never in the reply text either);
- it keeps the hidden state of every fed position at the layers the outputs use, so a span's
  projector input can be cut "at" its tokens (how training computes it) or "before" them (the
  states that predicted them: legacy NExT-GPT inference; SEEDS_SPEC 2.A "Surprise"), as the
  preset's `outputs.<m>.position` says;
- as soon as a span's states exist it is projected (`OutputProjector`) to the decoder's
  conditioning and reported as an `OutputSignal`;
- at the end, a modality the request asked for (`GenerationRequest.outputs`) that the model
  did not emit is appended: its signal tokens are fed after the reply's last fed token (an
  end-of-sequence token that ended the reply is not fed) and projected the same way.

Positions: states[0] is the prompt's last position; states[k] the state after feeding
generated token k (1-based, tokens[k-1]). A span starting at generated token k with N tokens
uses states[k .. k+N-1] "at" and states[k-1 .. k+N-2] "before".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.llm.domain import OutputSignal
from services.models.lm.output_projector import OutputProjector, signal_token_ids


@dataclass
class _Span:
    modality: str
    start: int  # generated-token number (1-based) of its first signal token
    char_offset: int
    appended: bool


def output_signal_ids(preset: Preset, tokenizer: object) -> dict[str, list[int]]:
    """Per output modality, its signal token ids in order (each a single token).

    Raises:
        FailedPreconditionError: A signal token is not a single token of the tokenizer.
    """
    return {m: signal_token_ids(tokenizer, spec.signal_tokens) for m, spec in preset.outputs.items()}


def check_requested(preset: Preset, requested: Sequence[str]) -> tuple[str, ...]:
    """The requested output modalities, each once, checked against the preset.

    Raises:
        InvalidArgumentError: A modality the preset cannot produce.
    """
    can = sorted(preset.outputs)
    for m in requested:
        if m not in preset.outputs:
            raise InvalidArgumentError(
                f"output modality {m!r}: preset {preset.name} can produce "
                + (", ".join(can) if can else "text only"),
                param="modalities",
            )
    return tuple(dict.fromkeys(requested))


class SignalCapture:
    """One request's signal spans, hidden states and projections.

    Args:
        preset: The served preset (its `outputs`).
        signal_ids: `output_signal_ids(preset, tokenizer)`.
        projectors: The request's adapter version's projectors, per modality.
        embed: The LM's input embedding table (the projector adds the signal tokens' rows).
        requested: Output modalities the request asks for (`check_requested`).
        eos_ids: End-of-sequence ids: one that ended the reply is not fed before an appended span.
    """

    def __init__(
        self,
        preset: Preset,
        signal_ids: Mapping[str, list[int]],
        projectors: Mapping[str, OutputProjector],
        embed: nn.Module,
        requested: Sequence[str] = (),
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.eos_ids = eos_ids
        self.specs = preset.outputs
        self.ids = dict(signal_ids)
        self.projectors = projectors
        self.embed = embed
        self.requested = tuple(requested)
        self.members = frozenset(i for ids in self.ids.values() for i in ids)
        self._first = {ids[0]: m for m, ids in self.ids.items()}
        self.layers = sorted({s.hidden_layer for s in self.specs.values()})
        self.states: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.tokens: list[int] = []
        self._forcing: list[int] = []
        self._spans: list[_Span] = []  # not yet projected
        self.emitted: set[str] = set()
        self.count = 0

    def is_signal(self, token: int) -> bool:
        """Whether a token is any modality's signal token (it never shows in the text)."""
        return token in self.members

    def next_forced(self) -> int | None:
        """The token to feed next without sampling (the rest of a started span), or None."""
        return self._forcing[0] if self._forcing else None

    def on_token(self, token: int, char_offset: int) -> None:
        """Account for the next generated token (sampled or forced).

        Args:
            token: The token.
            char_offset: Where the reply's text stands when it comes (a span's media goes there).
        """
        self.tokens.append(token)
        if self._forcing:
            if token != self._forcing[0]:
                raise InvalidArgumentError(
                    f"signal span: expected forced token {self._forcing[0]}, got {token}"
                )
            self._forcing.pop(0)
            return
        modality = self._first.get(token)
        if modality is not None:
            self._spans.append(_Span(modality, len(self.tokens), char_offset, appended=False))
            self.emitted.add(modality)
            self._forcing = list(self.ids[modality][1:])

    def on_states(self, hidden_states: Sequence[torch.Tensor], count: int = 1) -> None:
        """Keep the states of the last `count` positions of a forward (Hugging Face
        `hidden_states`, per layer (1, L, D)) at each layer the outputs use."""
        for layer in self.layers:
            self.states[layer].extend(hidden_states[layer][0, -count:].detach().unbind(0))  # count x (D,)

    def ready(self) -> list[OutputSignal]:
        """Project every span whose states are all computed; each is reported once."""
        out, waiting = [], []
        for span in self._spans:
            lo, hi = self._window(span)
            if hi <= len(self.states[self.specs[span.modality].hidden_layer]):
                out.append(self._project(span, lo, hi))
            else:
                waiting.append(span)
        self._spans = waiting
        return out

    def finish(
        self, feed: Callable[[list[int]], Sequence[torch.Tensor]], char_offset: int
    ) -> list[OutputSignal]:
        """After the last sampled token: complete a cut-off span, append the requested
        modalities the model did not emit, feed what their states need (in one forward),
        project the rest.

        Args:
            feed: Feeds tokens after the last fed one (one forward with the KV cache) and
                returns its `hidden_states`.
            char_offset: The whole reply's text length (where appended media go).
        """
        first = self.states[self.layers[0]]
        fed = len(first) - 1  # generated tokens fed
        if self._forcing:  # a span cut off by the token budget or the context
            self.tokens += self._forcing
            self._forcing = []
        elif len(self.tokens) > fed and self.tokens[-1] in self.eos_ids:
            self.tokens.pop()  # the end of sequence that ended the reply is not fed
        for modality in self.requested:
            if modality not in self.emitted:
                self._spans.append(_Span(modality, len(self.tokens) + 1, char_offset, appended=True))
                self.tokens += self.ids[modality]
                self.emitted.add(modality)
        need = max((self._window(s)[1] for s in self._spans), default=0)  # states needed
        if len(first) < need:  # generated tokens len(first) .. need - 1 are not fed yet
            todo = self.tokens[len(first) - 1 : need - 1]
            self.on_states(feed(todo), len(todo))
        return self.ready()

    def _window(self, span: _Span) -> tuple[int, int]:
        n = len(self.ids[span.modality])
        lo = span.start if self.specs[span.modality].position == "at" else span.start - 1
        return lo, lo + n

    def _project(self, span: _Span, lo: int, hi: int) -> OutputSignal:
        spec = self.specs[span.modality]
        projector = self.projectors[span.modality]
        hidden = torch.stack(self.states[spec.hidden_layer][lo:hi]).unsqueeze(0)  # (1, N, D)
        ids = torch.tensor(self.ids[span.modality], device=hidden.device)
        embs = self.embed(ids).unsqueeze(0)  # (1, N, D)
        cond = projector(hidden, embs)[0]  # (rows, width)
        signal = OutputSignal(
            modality=span.modality,
            conditioning=cond.detach().float().cpu().contiguous(),
            index=self.count,
            char_offset=span.char_offset,
            appended=span.appended,
        )
        self.count += 1
        return signal
