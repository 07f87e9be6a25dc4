"""Time tokens at inference: E.T. Chat's `<vid>` matched to a frame while decoding.

For a preset with `heads.timestamps`, a request that holds media of the heads' modality
decodes through a `TimedDecode` (SEEDS_SPEC 5, "The <vid> token and timestamp matching";
`services.models.lm.timestamps` has the heads and the per-step matcher):

- at the prefill, the frame keys: `frm_head` over the final norm's input (the last decoder
  block's output) at the span of the LAST item of that modality, one key per frame;
- at every step (the prefill included), the query: `vid_head` over `hidden_states[-2]` at the
  last position, and its best frame (argmax of the similarity);
- when the sampled token is the time token, the reply gets that frame's time in seconds
  (`MediaFeatures.times`; frame index = seconds when the item has no times, E.T. Chat's 1 fps),
  written with `format_seconds` ("12" for 12.0 s, "12.5") in place of the token, and a
  `Timestamp`; the token is fed back as emb(`<vid>`) + the frame's LLM input embedding.

Every other request (a preset without the heads, or no media of the modality) keeps the
plain KV-cached forward: no hidden states are returned and no hook is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from services.common.content import MediaFeatures, Timestamp
from services.common.errors import FailedPreconditionError
from services.common.presets import Preset
from services.models.lm.timestamps import TimestampHeads, TimestampMatcher, capture_norm_input


def time_token_id(preset: Preset, tokenizer: Any) -> int | None:
    """The id of the preset's time token (`heads.timestamps.token`), or None without the heads.

    Raises:
        FailedPreconditionError: The tokenizer does not hold it as one token.
    """
    spec = preset.heads.timestamps
    if spec is None:
        return None
    ids = tokenizer(spec.token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise FailedPreconditionError(
            f"preset {preset.name}: heads.timestamps.token {spec.token!r}: expected one token of the "
            f"LLM's tokenizer, got {len(ids)} id(s) {ids}"
        )
    return int(ids[0])


def check_frame_tokens(preset: Preset, num_tokens: Any) -> None:
    """The heads' modality must become one LLM token per frame (the keys are those tokens).

    Args:
        preset: The preset.
        num_tokens: Frames -> LLM tokens of that modality's connector.

    Raises:
        FailedPreconditionError: Its connector gives another count.
    """
    spec = preset.heads.timestamps
    if spec is None:
        return
    got = [num_tokens(f) for f in (1, 2, 3)]
    if got != [1, 2, 3]:
        raise FailedPreconditionError(
            f"preset {preset.name}: heads.timestamps matches {spec.modality} frames: expected a connector "
            f"giving one LLM token per frame, got {got} tokens for 1, 2, 3 frames"
        )


class TimedDecode:
    """One generation's forwards with time-token matching (batch 1).

    Args:
        lm: The causal LM.
        matcher: The matcher over the item's frames.
        media_index: The matched item's index in the request's media.
    """

    def __init__(self, lm: Any, matcher: TimestampMatcher, media_index: int) -> None:
        self.lm = lm
        self.matcher = matcher
        self.media_index = media_index

    @classmethod
    def for_request(
        cls,
        lm: Any,
        heads: TimestampHeads | None,
        token_id: int | None,
        modality: str,
        media: Sequence[MediaFeatures[torch.Tensor]],
        spans: Sequence[tuple[int, int]],
        embeds: torch.Tensor,
    ) -> TimedDecode | None:
        """The decode state of a request, or None when it has nothing to match against.

        Args:
            lm: The causal LM.
            heads: The serving adapter version's heads (None: the preset has none).
            token_id: The time token's id.
            modality: The heads' modality.
            media: The request's media.
            spans: (start, length) of each item in the prompt.
            embeds: The prompt's input embeddings (1, L, D).
        """
        if heads is None or token_id is None:
            return None
        mine = [i for i, item in enumerate(media) if item.modality == modality]
        if not mine:
            return None
        index = mine[-1]  # E.T. Chat matches the last visual span
        start, length = spans[index]
        times = media[index].times or tuple(float(j) for j in range(length))
        matcher = TimestampMatcher(
            heads,
            token_id=token_id,
            span=(start, start + length),
            frame_embeds=embeds[0, start : start + length],  # (F, D)
            times=times,
        )
        return cls(lm, matcher, index)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """The prefill forward (1, L, D) with the frame keys and the first match taken.

        Args:
            embeds: The prompt's input embeddings (1, L, D).
            attention_mask: Its 4D mask where a span attends bidirectionally
                (`services.models.lm.attention`), so the keys come from that prefill; None: causal.
        """
        with capture_norm_input(self.lm) as norm_in:
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=True,
            )
        self.matcher.prefill(norm_in.value, out.hidden_states[-2])
        return out

    def on_token(self, token: int) -> Timestamp | None:
        """A sampled token; for the time token, its timestamp (char_offset still -1)."""
        stamp = self.matcher.on_token(token)
        if stamp is None:
            return None
        return Timestamp(self.media_index, stamp.frame, stamp.seconds, char_offset=-1)

    def step_input(self, token: int) -> torch.Tensor:
        """The input embedding (1, 1, D) that feeds `token`: emb(token), + the matched frame's
        for the time token."""
        table = self.lm.get_input_embeddings()
        x = table(torch.tensor([[token]], device=table.weight.device))  # (1, 1, D)
        offset = self.matcher.embedding_offset(token)  # (D,) or None
        return x if offset is None else x + offset.to(x.dtype)

    def after_step(self, hidden_states: Sequence[torch.Tensor]) -> None:
        """Match the next position from a step's hidden states (this request's row, (1, 1, D) each)."""
        self.matcher.step(hidden_states[-2])

    def step(self, token: int, past_key_values: Any) -> Any:
        """Feed `token` (+ its matched frame for the time token) and match the next position."""
        out = self.lm(
            inputs_embeds=self.step_input(token),
            past_key_values=past_key_values,
            use_cache=True,
            output_hidden_states=True,
        )
        self.after_step(out.hidden_states)
        return out

    @property
    def matches(self) -> list[int]:
        """The best frame at every position so far (the prefill's first)."""
        return self.matcher.matches
