"""Samples -> token ids and labels with LLaVA-style masking, and batching them.

Training must see the prompt exactly as serving builds it. So the unsupervised text of each
assistant turn ends with the template's `generation_prompt` (e.g. "ASSISTANT:"), which is
where serving's prompt ends, and the supervised text is the rest of the assistant prefix, the
reply and the assistant suffix, i.e. the end-of-turn marker the model must learn to emit:
" " + reply + "</s>" for vicuna_v1, reply + "\\n" for plain, " " + reply + "\\n###" for
vicuna_v0, " " + reply + "###" for videochat, reply + "<|end|>" for phi3.
Ids are made as `services.models.prompt.builder.PromptBuilder` makes them: BOS once where the template
starts with one (`Template.bos`; not Phi-3's), each text segment tokenized alone without special
tokens ("</s>" -> the EOS id), each media item expanded to as many placeholder ids as its
connector emits. Labels are IGNORE_INDEX except on the supervised
text; they are aligned with input_ids (Hugging Face causal LMs shift them inside).

Where a seed's training text differs from its own inference text, we train on the inference
text, so that a model we train sees at serving what it saw in training:
- PandaGPT / NExT-GPT legacy build their training text from separately tokenized pieces,
  "\\n###" + "Human: {q}", i.e. "\\n###Human:" with no space in text, while their demos
  prompt "\\n### Human: {q}" (SEEDS_SPEC 3 and 9.7). We use the demo's text (template
  vicuna_v0).
- VideoChat trains with " " separators ("###Human: {q} ###Assistant: {a} ###") and also
  supervises the role markers around the answers; its demo prompts "{q}\\n###Assistant:" and
  follows an answer directly with "###" (SEEDS_SPEC 4 and 9.8). We use the demo's text and
  supervise " {a}###" only (template videochat).
- E.T. Chat's phi3 is the same in both; we supervise the answer plus "<|end|>" as it does.
- Legacy NExT-GPT's demo splits its prompt around the media with a BOS before each text piece
  (template nextgpt_demo), which a training sample cannot take: its preset serves that form
  (`llm.inference_template`) and trains on vicuna_v0, as the seed trained on its own text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypedDict

import torch

from services.common.content import MediaPart, TextPart, Turn, media_parts
from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.models.prompt.builder import combine_turn_media, placeholder_token_id
from services.models.prompt.templates import Bos, Segment, Template, check_roles, merge_text, turn_text
from services.trainer._samples import BadSampleError, MediaFile, Sample

IGNORE_INDEX = -100  # labels at positions that carry no loss (torch's cross_entropy default)


def render_supervised(
    template: Template, turns: Sequence[Turn[Any]], *, time_token: str | None = None
) -> list[tuple[Segment, bool]]:
    """Render a conversation ending with an assistant turn into (segment, supervised) pairs.

    The unsupervised segments before each reply are what `template.render(turns so far,
    add_generation_prompt=True)` gives at serving; each reply, with the rest of the assistant
    prefix before it and the assistant suffix (the end-of-turn marker) after it, is one
    supervised text.

    Args:
        template: The conversation format.
        turns: An optional system turn, then user/assistant turns alternating, ending with an
            assistant turn.
        time_token: What a time part renders as (samples hold time tokens as text; serving's
            time parts render the same).

    Returns:
        Segments in order, adjacent unsupervised texts merged, each with its supervised flag.

    Raises:
        InvalidArgumentError: Roles out of order, no final assistant turn, a media modality
            the template has no wrapper for, or a template whose assistant prefix does not
            start with its generation prompt.
    """
    prompt = template.generation_prompt
    if not template.assistant_prefix.startswith(prompt):
        raise InvalidArgumentError(
            f"template {template.name}: expected the assistant prefix {template.assistant_prefix!r} "
            f"to start with the generation prompt {prompt!r}"
        )
    check_roles(turns, last_user=False)
    if turns[-1].role != "assistant":
        raise InvalidArgumentError(
            f"turns[{len(turns) - 1}].role: expected the last turn to be 'assistant', got {turns[-1].role!r}"
        )
    system, turns = template.split_system(turns)
    pending: list[Segment] = [template.system_text(system)]
    out: list[tuple[Segment, bool]] = []
    for i, turn in enumerate(turns):
        if turn.role == "user":
            pending += template.user_segments(turn, first=i == 0, time_token=time_token)
            continue
        out += [(seg, False) for seg in merge_text([*pending, prompt])]
        reply = template.assistant_prefix[len(prompt) :] + turn_text(turn) + template.assistant_suffix
        out.append((reply, True))
        pending = []
    return out


@dataclass(frozen=True)
class MediaSlots:
    """How items of one modality appear in training sequences.

    Attributes:
        placeholder: The preset's placeholder string, e.g. "<image>".
        placeholder_id: The id each of an item's positions holds.
        num_tokens: LLM tokens one item becomes (after the connector) at its usual frames.
        max_per_prompt: Most items of this modality one sample may hold.
        tokens_for_frames: Frames -> LLM tokens, for items whose frames vary (fps sampling;
            the encoder passes each item's frames); None: always `num_tokens`.
    """

    placeholder: str
    placeholder_id: int
    num_tokens: int
    max_per_prompt: int
    tokens_for_frames: Callable[[int], int] | None = field(default=None, compare=False)

    def tokens(self, frames: int | None) -> int:
        """LLM tokens of an item with `frames` frames (None: unknown, the usual count)."""
        if frames is None or self.tokens_for_frames is None:
            return self.num_tokens
        return self.tokens_for_frames(frames)


def modality_slots(
    preset: Preset,
    tokenizer: Any,
    *,
    llm_tokens: Mapping[str, int] | None = None,
    tokens_for_frames: Mapping[str, Callable[[int], int]] | None = None,
) -> dict[str, MediaSlots]:
    """Per modality of the preset, its slots, with ids as serving's loader computes them.

    Args:
        preset: The preset being trained.
        tokenizer: The LLM's tokenizer.
        llm_tokens: Per modality, LLM tokens an item becomes at its usual frames; default the
            encoder's rows per item (what linear and mlp2x_gelu connectors keep).
        tokens_for_frames: Per modality, frames -> LLM tokens (the connector's `num_tokens`).
    """
    llm_tokens = llm_tokens or {}
    per_frames = tokens_for_frames or {}
    return {
        m: MediaSlots(
            placeholder=s.placeholder,
            placeholder_id=placeholder_token_id(tokenizer, s.placeholder),
            num_tokens=llm_tokens.get(m, s.encoder.tokens_per_frame()),
            max_per_prompt=s.max_per_prompt,
            tokens_for_frames=per_frames.get(m),
        )
        for m, s in preset.modalities.items()
    }


def instruction_texts(turns: Sequence[Turn[Any]]) -> list[str]:
    """Per media item, in the order its part appears, the text of the user turn holding it
    (what E.T. Chat's Q-Former reads: the message without its placeholder), its text parts
    joined by "\n"."""
    out: list[str] = []
    for turn in turns:
        text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart)).strip()
        out += [text for p in turn.parts if isinstance(p, MediaPart)]
    return out


@dataclass(frozen=True)
class EncodedSample:
    """One tokenized training sequence.

    Attributes:
        id: The sample's id.
        input_ids: Token ids with placeholders expanded, (L,).
        labels: Targets aligned with input_ids, IGNORE_INDEX outside assistant replies, (L,).
        media_spans: (start, length) in input_ids per media item, in the order of `media`;
            items summed into one token (media_combine sum) share a span.
        media: The media files, read later.
        instructions: Per media item, the text of the user turn holding it.
        time_tokens: Per time token ("<vid>"), (its position, its seconds).
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    media_spans: list[tuple[int, int]]
    media: list[MediaFile]
    instructions: list[str] = field(default_factory=list)
    time_tokens: list[tuple[int, float]] = field(default_factory=list)


class SupervisedEncoder:
    """Encodes samples into ids and labels the way serving builds prompts.

    Args:
        tokenizer: A Hugging Face tokenizer.
        template: The conversation format of the stage ("plain" for caption pretraining).
        slots: Per modality, how its items appear (see `modality_slots`).
        max_length: Longest sequence allowed; longer samples are bad ("too_long"), never cut.
        combine: The preset's media_combine: sum, the items of one user turn share one span
            (PandaGPT); sum_per_modality, the items of each modality of a turn (legacy NExT-GPT).
        time_token: The preset's time token (E.T. Chat's "<vid>", one token of the tokenizer), or None.
        frames: Frames of each media file (from the encoder) where items' frames vary; a
            file missing here is a bad sample ("media_undecodable", with its `errors` entry).
        errors: Why each file that failed to decode did.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: Template,
        slots: Mapping[str, MediaSlots],
        *,
        max_length: int,
        combine: Literal["separate", "sum", "sum_per_modality"] = "separate",
        time_token: str | None = None,
        frames: Mapping[Any, int] | None = None,
        errors: Mapping[Any, str] | None = None,
    ) -> None:
        if max_length < 2:
            raise InvalidArgumentError(f"max_length: expected at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.slots = dict(slots)
        self.max_length = max_length
        self.combine = combine
        self.time_token = time_token
        self.time_token_id = None if time_token is None else _one_token(tokenizer, time_token)
        self.frames = frames
        self.errors = dict(errors or {})
        self.bos_id: int | None = tokenizer.bos_token_id
        unk = tokenizer.unk_token_id
        # As PromptBuilder: placeholder ids that are real tokens must not come from text.
        self._reserved = {
            s.placeholder_id: s.placeholder for s in self.slots.values() if s.placeholder_id != unk
        }

    def encode(self, sample: Sample) -> EncodedSample:
        """Tokenize a sample and mask everything but the assistant replies.

        Raises:
            BadSampleError: "roles", "unknown_modality", "placeholder_count",
                "reserved_placeholder", "time_token_count", "media_undecodable" or "too_long"
                (message: expected at most N tokens, got M).
        """
        turns: Sequence[Turn[MediaFile]] = sample.turns
        combined: dict[int, int] = {}
        if self.combine != "separate":
            turns, combined = combine_turn_media(
                sample.turns, per_modality=self.combine == "sum_per_modality"
            )
        try:
            pieces = render_supervised(self.template, turns, time_token=self.time_token)
        except InvalidArgumentError as e:
            # A media modality the template has no wrapper for, else turns out of order.
            reason = "unknown_modality" if (e.param or "").startswith("media") else "roles"
            raise BadSampleError(reason, e.message) from None
        numbers = {id(p): i for i, p in enumerate(media_parts(sample.turns))}
        encoded = iter(self._tokenize([seg for seg, _ in pieces if isinstance(seg, str)]))
        bos = [self.bos_id] if self.bos_id is not None else []
        ids: list[int] = list(bos) if self.template.bos else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        spans: list[tuple[int, int] | None] = [None] * len(sample.media)
        for seg, supervised in pieces:
            if isinstance(seg, str):
                tokens = next(encoded)
                ids += tokens
                labels += tokens if supervised else [IGNORE_INDEX] * len(tokens)
                continue
            if isinstance(seg, Bos):
                ids += bos
                labels += [IGNORE_INDEX] * len(bos)
                continue
            index = numbers.get(id(seg.part), -1)
            slot = self._slot(sample, index, spans)
            length = slot.tokens(self._frames(sample, index))
            spans[index] = (len(ids), length)
            ids += [slot.placeholder_id] * length
            labels += [IGNORE_INDEX] * length
        for i, j in combined.items():
            self._combine(sample, spans, i, j)
        done = [s for s in spans if s is not None]
        if len(done) != len(spans):
            raise BadSampleError(
                "placeholder_count",
                f"expected each of {len(spans)} media item(s) referenced, got {len(done)}",
            )
        if len(ids) > self.max_length:
            raise BadSampleError("too_long", f"expected at most {self.max_length} tokens, got {len(ids)}")
        return EncodedSample(
            sample.id,
            ids,
            labels,
            done,
            list(sample.media),
            instruction_texts(sample.turns),
            self._time_tokens(sample, ids),
        )

    def _frames(self, sample: Sample, index: int) -> int | None:
        if self.frames is None or not 0 <= index < len(sample.media):
            return None
        path = sample.media[index].path
        if path not in self.frames:
            why = self.errors.get(path, "not decoded")
            raise BadSampleError("media_undecodable", f"media[{index}]: {path}: {why}")
        return self.frames[path]

    def _combine(self, sample: Sample, spans: list[tuple[int, int] | None], i: int, j: int) -> None:
        target = spans[j]
        if target is None or spans[i] is not None or not 0 <= i < len(sample.media):
            raise BadSampleError("placeholder_count", f"media[{i}]: expected one reference, with media[{j}]")
        own = self.slots[sample.media[i].modality].tokens(self._frames(sample, i))
        if own != target[1]:
            raise BadSampleError(
                "placeholder_count",
                f"media[{i}]: summing with media[{j}] needs the same token count, expected {target[1]}, got {own}",
            )
        spans[i] = target

    def _time_tokens(self, sample: Sample, ids: list[int]) -> list[tuple[int, float]]:
        if self.time_token_id is None:
            return []
        positions = [i for i, t in enumerate(ids) if t == self.time_token_id]
        if len(positions) != len(sample.times):
            raise BadSampleError(
                "time_token_count",
                f"expected {len(sample.times)} time token(s) (one per time given), got {len(positions)}",
            )
        return list(zip(positions, sample.times, strict=True))

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded: list[list[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for tokens in encoded:
            for token in tokens:
                if token in self._reserved:
                    raise BadSampleError(
                        "reserved_placeholder",
                        f"text contains {self._reserved[token]!r}, which is reserved for media items",
                    )
        return encoded

    def _slot(self, sample: Sample, index: int, spans: list[tuple[int, int] | None]) -> MediaSlots:
        if not 0 <= index < len(sample.media) or spans[index] is not None:
            raise BadSampleError(
                "placeholder_count",
                f"media index {index}: expected each of {len(sample.media)} item(s) referenced once",
            )
        modality = sample.media[index].modality
        if modality not in self.slots:
            raise BadSampleError(
                "unknown_modality", f"media[{index}]: expected one of {sorted(self.slots)}, got {modality!r}"
            )
        return self.slots[modality]


def _one_token(tokenizer: Any, token: str) -> int:
    ids = tokenizer([token], add_special_tokens=False)["input_ids"][0]
    if len(ids) != 1:
        raise InvalidArgumentError(
            f"time token {token!r}: expected one token of the tokenizer, got ids {ids}"
        )
    return int(ids[0])


class MediaRow(NamedTuple):
    """One media item of a batch: where it goes and which file holds it."""

    batch_index: int  # row of the batch
    item_index: int  # index into that sample's media
    file: MediaFile
    start: int  # first position of its span in the row
    length: int  # positions the span holds


class Batch(TypedDict):
    """A padded batch; see `collate`."""

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX on padding
    attention_mask: torch.Tensor  # (B, L) long, 1 on tokens, 0 on padding
    media: list[MediaRow]  # every media item of the batch, by row then item
    ids: list[str]  # sample ids, by row


def collate(batch: Sequence[EncodedSample], pad_id: int) -> Batch:
    """Right-pad encoded samples into one batch.

    Args:
        batch: Encoded samples.
        pad_id: The id padding positions hold (masked out by attention_mask and labels).

    Raises:
        InvalidArgumentError: The batch is empty.
    """
    if not batch:
        raise InvalidArgumentError("collate: expected at least one sample, got none")
    rows, length = len(batch), max(len(s.input_ids) for s in batch)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)  # (B, L)
    media: list[MediaRow] = []
    for b, sample in enumerate(batch):
        n = len(sample.input_ids)
        input_ids[b, :n] = torch.tensor(sample.input_ids, dtype=torch.long)  # (n,)
        labels[b, :n] = torch.tensor(sample.labels, dtype=torch.long)  # (n,)
        attention_mask[b, :n] = 1
        for j, (file, (start, span)) in enumerate(zip(sample.media, sample.media_spans, strict=True)):
            media.append(MediaRow(b, j, file, start, span))
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        media=media,
        ids=[s.id for s in batch],
    )
