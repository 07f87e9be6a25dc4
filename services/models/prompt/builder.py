"""The prompt builder: template segments -> token ids with each media item's placeholder expanded.

Placeholders expand before the forward pass (vLLM's way): each media item becomes exactly as
many placeholder ids as its connector emits LLM tokens, and the returned span per item tells
the model where to scatter that item's features. BOS is written at the start when the
template asks for it (`bos`), and wherever a `Bos` segment stands; each text segment is
tokenized without special tokens added, so a "</s>" written by the template maps to the EOS
id (LLaVA's `tokenizer_image_token` keeps only the first chunk's BOS likewise).

Media items are numbered in the order their parts appear in the conversation
(`services.common.content.media_parts`); the template's `MediaRef` segments hold the parts
themselves, and the builder finds each one's number from its slot (`MediaSlot.part`).

`media_combine: sum` (PandaGPT): `combine_turn_media` leaves one media part per user turn (its
first) and names, for each other item of the turn, the item whose span it shares; the
builder gives them that span and the model sums their connector outputs there. With
`sum_per_modality` (legacy NExT-GPT) it does so per modality of the turn.

Time tokens (E.T. Chat's `<vid>`, rendered from the request's time parts): after tokenizing,
the builder finds each time token's position and pairs it with the request's times in order;
text holding more or fewer time tokens than the request has times is refused.

`request_prompt` is the whole path from a request's turns to its prompt, as the engine serves
it: roles and time parts checked, media combined as the preset says, rendered, tokenized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.content import MediaPart, Part, TimePart, Turn, media_parts
from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.models.prompt.templates import Bos, MediaRef, Segment, Template, check_roles

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
        part: The media part holding it (what the template's `MediaRef` names).
        frames: Its frames (an image: 1).
        combine_with: The item whose span it shares (media_combine sum), or None for its own.
    """

    part: MediaPart[Any]
    frames: int
    combine_with: int | None = None

    @property
    def modality(self) -> str:
        """The item's modality."""
        return self.part.media.modality


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt.

    Attributes:
        input_ids: Token ids, placeholders expanded.
        media_spans: (start, length) in input_ids for each media item, in request order;
            items combined into one span (media_combine sum) have the same span.
        time_tokens: (position, seconds) of each time token, in order.
    """

    input_ids: list[int]
    media_spans: list[tuple[int, int]]
    time_tokens: list[tuple[int, float]] = field(default_factory=list)

    @property
    def media_tokens(self) -> int:
        """Positions held by media placeholders."""
        return sum(length for _, length in set(self.media_spans))


def combine_turn_media(
    turns: Sequence[Turn[Any]], *, per_modality: bool = False
) -> tuple[list[Turn[Any]], dict[int, int]]:
    """media_combine sum: keep each user turn's first media part, drop its others; with
    `per_modality` (sum_per_modality) keep the first part of each modality of the turn.

    Args:
        turns: The conversation.
        per_modality: Combine the items of each modality of a turn apart; False: all the
            items of a turn whatever their modality.

    Returns:
        The turns to render, and for each dropped item the item whose span it shares, each
        by its number among the conversation's media parts.
    """
    out: list[Turn[Any]] = []
    combined: dict[int, int] = {}
    index = 0
    for turn in turns:
        firsts: dict[str, int] = {}
        keep: list[Part[Any]] = []
        for part in turn.parts:
            if not isinstance(part, MediaPart):
                keep.append(part)
                continue
            first = firsts.setdefault(part.media.modality if per_modality else "", index)
            if first == index:
                keep.append(part)
            else:
                combined[index] = first
            index += 1
        out.append(turn if len(keep) == len(turn.parts) else Turn(turn.role, keep))
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
        time_token_id: The id of the time token (`<vid>`) of a preset with timestamp heads.
    """

    def __init__(
        self,
        tokenizer: Any,
        modalities: Mapping[str, ModalitySlots],
        *,
        max_context_tokens: int,
        time_token_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.modalities = dict(modalities)
        self.max_context_tokens = max_context_tokens
        self.time_token_id = time_token_id
        self.bos_id: int | None = tokenizer.bos_token_id
        unk = tokenizer.unk_token_id
        # Placeholder ids that are real tokens must not come from text: they would be
        # positions without features.
        self._reserved = {
            s.placeholder_id: s.placeholder for s in self.modalities.values() if s.placeholder_id != unk
        }

    def build(
        self,
        segments: Sequence[Segment],
        media: Sequence[MediaSlot],
        *,
        bos: bool = True,
        times: Sequence[float] = (),
    ) -> Prompt:
        """Tokenize segments and expand each media reference.

        Args:
            segments: Output of Template.render.
            media: The request's media items in order (each `MediaRef` names one's part).
            bos: Start with the tokenizer's BOS (the template's `bos`).
            times: The seconds of the request's time parts, in order: one per time token.

        Returns:
            The prompt with one span per media item, in the order of `media`.

        Raises:
            InvalidArgumentError: A reference is not an item of `media`, an item is referenced twice or
                never, a modality is over its limit, the text holds another number of time
                tokens than `times`, or the prompt does not fit the context.
        """
        self._check_counts(media)
        texts = [s for s in segments if isinstance(s, str)]
        encoded = iter(self._encode(texts))
        bos_ids = [self.bos_id] if self.bos_id is not None else []
        ids: list[int] = list(bos_ids) if bos else []
        spans: list[tuple[int, int] | None] = [None] * len(media)
        numbers = {id(slot.part): i for i, slot in enumerate(media)}
        text_positions: list[int] = []
        for seg in segments:
            if isinstance(seg, str):
                text_positions += range(len(ids), len(ids) + len(piece := next(encoded)))
                ids += piece
                continue
            if isinstance(seg, Bos):
                ids += bos_ids
                continue
            index = self._check_ref(seg, numbers, spans)
            slot, slots = media[index], self.modalities[media[index].modality]
            length = slots.num_tokens(slot.frames)
            spans[index] = (len(ids), length)
            ids += [slots.placeholder_id] * length
        self._combine(media, spans)
        missing = [i for i, s in enumerate(spans) if s is None]
        if missing:
            raise InvalidArgumentError(
                f"media{missing}: not referenced by any turn; every media item needs one media part",
                param=f"media[{missing[0]}]",
            )
        self._check_length(ids, spans)
        return Prompt(
            input_ids=ids,
            media_spans=[s for s in spans if s is not None],
            time_tokens=self._time_tokens(ids, text_positions, times),
        )

    def _time_tokens(
        self, ids: list[int], text_positions: list[int], times: Sequence[float]
    ) -> list[tuple[int, float]]:
        """(position, seconds) of each time token of the text, paired with `times` in order."""
        if self.time_token_id is None:
            if times:
                raise InvalidArgumentError(
                    "turns: time parts need a preset with timestamp heads (heads.timestamps)", param="turns"
                )
            return []
        found = [i for i in text_positions if ids[i] == self.time_token_id]
        if len(found) != len(times):
            token = self.tokenizer.convert_ids_to_tokens(self.time_token_id)
            raise InvalidArgumentError(
                f"turns: expected one {token!r} per time part ({len(times)}), the text holds "
                f"{len(found)}; send each time as a time content part, not as {token!r} in text",
                param="turns",
            )
        return list(zip(found, (float(t) for t in times), strict=True))

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
    def _check_ref(ref: MediaRef, numbers: Mapping[int, int], spans: list[tuple[int, int] | None]) -> int:
        """The number of the item `ref` stands for."""
        index = numbers.get(id(ref.part))
        if index is None:
            raise InvalidArgumentError(
                f"turns: a media part that is not one of the request's {len(spans)} media item(s)",
                param="turns",
            )
        if spans[index] is not None:
            raise InvalidArgumentError(
                f"turns: media item {index} is referenced more than once", param="turns"
            )
        return index

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


def request_times(turns: Sequence[Turn[Any]]) -> tuple[list[float], str | None]:
    """The seconds of the request's time parts in order, and where the first one is."""
    times: list[float] = []
    where = None
    for i, turn in enumerate(turns):
        for j, part in enumerate(turn.parts):
            if isinstance(part, TimePart):
                times.append(float(part.seconds))
                where = where or f"turns[{i}].parts[{j}]"
    return times, where


def request_prompt(
    preset: Preset,
    template: Template,
    builder: PromptBuilder,
    turns: Sequence[Turn[Any]],
    frames: Sequence[int],
) -> Prompt:
    """A request's prompt as the engine serves it: roles checked, time parts checked, media
    combined as the preset says, rendered with `template` and tokenized.

    Args:
        preset: The served preset (media_combine, heads.timestamps).
        template: The template serving renders (`llm.inference_template` or `llm.template`).
        builder: The prompt builder of the loaded tokenizer.
        turns: The conversation, each media part carrying its item.
        frames: The frames of each media item, in the order its part appears.

    Raises:
        InvalidArgumentError: Bad turns, time parts the preset or the request cannot take, or
            a prompt too long.
    """
    check_roles(turns)
    parts = media_parts(turns)
    if len(frames) != len(parts):
        raise InvalidArgumentError(f"media: {len(parts)} items but {len(frames)} frame counts")
    times, time_token = check_time_parts(preset, turns, [p.media.modality for p in parts])
    combined: dict[int, int] = {}
    if preset.media_combine != "separate":
        turns, combined = combine_turn_media(turns, per_modality=preset.media_combine == "sum_per_modality")
    segments = template.render(turns, time_token=time_token)
    slots = [MediaSlot(p, n, combined.get(i)) for i, (p, n) in enumerate(zip(parts, frames, strict=True))]
    return builder.build(segments, slots, bos=template.bos, times=times)


def check_time_parts(
    preset: Preset, turns: Sequence[Turn[Any]], modalities: Sequence[str]
) -> tuple[list[float], str | None]:
    """The seconds of the request's time parts in order, and the time token they render as
    (None: the preset has no timestamp heads, and the request may hold no time part).

    Raises:
        InvalidArgumentError: Time parts for a preset without timestamp heads or for a request
            without media of the heads' modality, or a time that is not finite and >= 0.
    """
    spec = preset.heads.timestamps
    times, where = request_times(turns)
    if not times:
        return times, None if spec is None else spec.token
    if spec is None:
        raise InvalidArgumentError(
            f"{where}: a time part needs a preset with timestamp heads (heads.timestamps, E.T. "
            f"Chat's <vid>); preset {preset.name} has none",
            param=where,
        )
    if spec.modality not in modalities:
        raise InvalidArgumentError(
            f"{where}: a time part names a frame of a {spec.modality} item, and the request has "
            f"no {spec.modality} media",
            param=where,
        )
    bad = [t for t in times if not (t == t and 0 <= t < float("inf"))]
    if bad:
        raise InvalidArgumentError(
            f"{where}: time parts: expected finite seconds >= 0, got {bad[0]}", param=where
        )
    return times, spec.token
