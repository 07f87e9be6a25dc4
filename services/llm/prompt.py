"""The prompt builder: template segments -> token ids with each media item's placeholder expanded.

Placeholders expand before the forward pass (vLLM's way): each media item becomes exactly as
many placeholder ids as its connector emits LLM tokens, and the returned span per item tells
the model where to scatter that item's features. BOS is written once, at the start; each text
segment is tokenized without special tokens added, so a "</s>" written by the template maps to
the EOS id (LLaVA's `tokenizer_image_token` keeps only the first chunk's BOS likewise).

`media_combine: sum` (PandaGPT): `combine_turn_media` leaves one media part per user turn (its
first) and names, for each other item of the turn, the item whose span it shares; the
builder gives them that span and the model sums their connector outputs there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgumentError
from services.llm.domain import MediaPart, Turn
from services.llm.templates import MediaRef, Segment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModalitySlots:
    """How items of one modality appear in a prompt.

    Attributes:
        placeholder: The placeholder string of the preset, e.g. "<image>".
        placeholder_id: The id each of the item's positions holds (overwritten by features).
        max_per_prompt: Most items of this modality one prompt may hold.
        num_tokens: Frames of an item -> LLM tokens after the connector.
    """

    placeholder: str
    placeholder_id: int
    max_per_prompt: int
    num_tokens: Callable[[int], int]


@dataclass(frozen=True)
class MediaSlot:
    """One media item of a request as the prompt builder needs it.

    Attributes:
        modality: Its modality.
        frames: Its frames (an image: 1).
        combine_with: The item whose span it shares (media_combine sum), or None for its own.
    """

    modality: str
    frames: int
    combine_with: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt.

    Attributes:
        input_ids: Token ids, placeholders expanded.
        media_spans: (start, length) in input_ids for each media item, in request order;
            items combined into one span (media_combine sum) have the same span.
    """

    input_ids: list[int]
    media_spans: list[tuple[int, int]]

    @property
    def media_tokens(self) -> int:
        """Positions held by media placeholders."""
        return sum(length for _, length in set(self.media_spans))


def combine_turn_media(turns: Sequence[Turn]) -> tuple[list[Turn], dict[int, int]]:
    """media_combine sum: keep each user turn's first media part, drop its others.

    Returns:
        The turns to render, and for each dropped item the item whose span it shares.
    """
    out: list[Turn] = []
    combined: dict[int, int] = {}
    for turn in turns:
        media = [p.index for p in turn.parts if isinstance(p, MediaPart)]
        if len(media) < 2:
            out.append(turn)
            continue
        first = media[0]
        combined.update({i: first for i in media[1:] if i != first})
        parts = [p for p in turn.parts if not isinstance(p, MediaPart) or p.index == first]
        out.append(Turn(turn.role, parts))
    return out, combined


def placeholder_token_id(tokenizer: Any, placeholder: str) -> int:
    """The id of `placeholder` if the tokenizer has it as one token, else the unknown token's.

    Real checkpoints may lack the placeholder; its positions are overwritten by features anyway.
    """
    vocab = tokenizer.get_vocab()
    if placeholder in vocab:
        return int(vocab[placeholder])
    fallback = tokenizer.unk_token_id
    if fallback is None:
        fallback = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logger.info("placeholder %r is not a token of the tokenizer; using id %s", placeholder, fallback)
    return int(fallback)


class PromptBuilder:
    """Builds token ids from rendered segments.

    Args:
        tokenizer: A Hugging Face tokenizer.
        modalities: Per modality, how its items appear.
        max_context_tokens: The context size; prompts may use at most this minus one.
    """

    def __init__(
        self, tokenizer: Any, modalities: Mapping[str, ModalitySlots], *, max_context_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.modalities = dict(modalities)
        self.max_context_tokens = max_context_tokens
        self.bos_id: int | None = tokenizer.bos_token_id
        unk = tokenizer.unk_token_id
        # Placeholder ids that are real tokens must not come from text: they would be
        # positions without features.
        self._reserved = {
            s.placeholder_id: s.placeholder for s in self.modalities.values() if s.placeholder_id != unk
        }

    def build(self, segments: Sequence[Segment], media: Sequence[MediaSlot]) -> Prompt:
        """Tokenize segments and expand each media reference.

        Args:
            segments: Output of Template.render.
            media: The request's media items, indexed by MediaRef.index.

        Returns:
            The prompt with one span per media item, in the order of `media`.

        Raises:
            InvalidArgumentError: A reference is out of range, an item is referenced twice or
                never, a modality is over its limit, or the prompt does not fit the context.
        """
        self._check_counts(media)
        texts = [s for s in segments if isinstance(s, str)]
        encoded = iter(self._encode(texts))
        ids: list[int] = [self.bos_id] if self.bos_id is not None else []
        spans: list[tuple[int, int] | None] = [None] * len(media)
        for seg in segments:
            if isinstance(seg, str):
                ids += next(encoded)
                continue
            slot = self._check_ref(seg, media, spans)
            slots = self.modalities[slot.modality]
            length = slots.num_tokens(slot.frames)
            spans[seg.index] = (len(ids), length)
            ids += [slots.placeholder_id] * length
        self._combine(media, spans)
        missing = [i for i, s in enumerate(spans) if s is None]
        if missing:
            raise InvalidArgumentError(
                f"media{missing}: not referenced by any turn; every media item needs one media part",
                param=f"media[{missing[0]}]",
            )
        self._check_length(ids, spans)
        return Prompt(input_ids=ids, media_spans=[s for s in spans if s is not None])

    def _combine(self, media: Sequence[MediaSlot], spans: list[tuple[int, int] | None]) -> None:
        """Give each combined item the span of the item it joins (each must be one token)."""
        for i, slot in enumerate(media):
            j = slot.combine_with
            if j is None:
                continue
            target = spans[j] if 0 <= j < len(spans) and media[j].combine_with is None else None
            if target is None or spans[i] is not None:
                raise InvalidArgumentError(
                    f"media[{i}]: cannot be combined with media[{j}] (not a referenced item of the request)",
                    param=f"media[{i}]",
                )
            own = self.modalities[slot.modality].num_tokens(slot.frames)
            if own != target[1]:
                raise InvalidArgumentError(
                    f"media[{i}]: summing with media[{j}] needs the same token count, expected "
                    f"{target[1]}, got {own}",
                    param=f"media[{i}]",
                )
            spans[i] = target

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded: list[list[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            for token in ids:
                if token in self._reserved:
                    raise InvalidArgumentError(
                        f"message text contains {self._reserved[token]!r}, which is reserved for "
                        "media the request attaches; send images as image_url content parts "
                        "instead of writing the placeholder",
                        param="turns",
                    )
        return encoded

    def _check_counts(self, media: Sequence[MediaSlot]) -> None:
        counts: dict[str, int] = {}
        for i, item in enumerate(media):
            if item.modality not in self.modalities:
                raise InvalidArgumentError(
                    f"media[{i}].modality: expected one of {sorted(self.modalities)}, got {item.modality!r}",
                    param=f"media[{i}].modality",
                )
            counts[item.modality] = counts.get(item.modality, 0) + 1
        for modality, n in counts.items():
            limit = self.modalities[modality].max_per_prompt
            if n > limit:
                raise InvalidArgumentError(
                    f"media: at most {limit} {modality} items per prompt, got {n}", param="media"
                )

    @staticmethod
    def _check_ref(
        ref: MediaRef, media: Sequence[MediaSlot], spans: list[tuple[int, int] | None]
    ) -> MediaSlot:
        if not 0 <= ref.index < len(media):
            raise InvalidArgumentError(
                f"turns: media index {ref.index} is out of range; the request has {len(media)} media item(s)",
                param="turns",
            )
        if spans[ref.index] is not None:
            raise InvalidArgumentError(
                f"turns: media item {ref.index} is referenced more than once", param="turns"
            )
        return media[ref.index]

    def _check_length(self, ids: list[int], spans: list[tuple[int, int] | None]) -> None:
        limit = self.max_context_tokens - 1
        if len(ids) > limit:
            media_tokens = sum(s[1] for s in set(spans) if s is not None)
            raise InvalidArgumentError(
                f"prompt: {len(ids)} tokens ({media_tokens} of them for {len(spans)} media "
                f"item(s)), at most {limit} allowed (context {self.max_context_tokens} tokens, "
                "one kept for the reply)",
                param="turns",
            )
