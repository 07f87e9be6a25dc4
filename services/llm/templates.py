"""Conversation templates as data, their registry, and rendering turns into prompt segments.

A template is LLaVA's `Conversation` reduced to strings (`llava/conversation.py`): what goes
before and after each role's message. Rendering validates the role order and returns a list
of segments, text strings and `MediaRef`s in order; the prompt builder turns them into ids.

Within one message, parts are joined with "\\n" and a media part renders where it stands
(vLLM's convention): [image, text] -> "<image>\\nWhat is this?". With LLaVA's data, where the
image always comes first in the message, this gives LLaVA's own prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError
from services.llm.domain import ROLES, MediaPart, TextPart, Turn

PART_SEPARATOR = "\n"


@dataclass(frozen=True)
class MediaRef:
    """A segment standing for media item `index` of the request."""

    index: int


Segment = str | MediaRef


@dataclass(frozen=True)
class Template:
    """A conversation format.

    For LLaVA's SeparatorStyle.TWO with roles (USER, ASSISTANT) and seps (sep, sep2):
    system_suffix = sep, user_prefix = "USER: ", user_suffix = sep,
    assistant_prefix = "ASSISTANT: ", assistant_suffix = sep2, generation_prompt = "ASSISTANT:".

    Attributes:
        name: Registry key (the preset's `llm.template`).
        system: Default system prompt; a system turn of the request replaces it.
        system_suffix: Written after a non-empty system prompt.
        user_prefix: Written before each user message.
        user_suffix: Written after each user message.
        assistant_prefix: Written before each assistant message.
        assistant_suffix: Written after each assistant message.
        generation_prompt: Written at the end to ask for the next assistant reply.
    """

    name: str
    system: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str

    def render(self, turns: Sequence[Turn], *, add_generation_prompt: bool = True) -> list[Segment]:
        """Render a conversation into segments.

        Args:
            turns: An optional system turn, then user/assistant turns alternating from the user.
            add_generation_prompt: End with the assistant's prefix for the reply (the last
                turn must then be the user's).

        Returns:
            Text strings and media references in order; adjacent texts are merged.

        Raises:
            InvalidArgumentError: The roles are out of order or a turn is malformed.
        """
        check_roles(turns, last_user=add_generation_prompt)
        system = self.system
        if turns and turns[0].role == "system":
            system = turn_text(turns[0])
            turns = turns[1:]
        out: list[Segment] = [system + self.system_suffix] if system else []
        for turn in turns:
            if turn.role == "user":
                out += [self.user_prefix, *message_segments(turn), self.user_suffix]
            else:
                out += [self.assistant_prefix, *message_segments(turn), self.assistant_suffix]
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return merge_text(out)


def turn_text(turn: Turn) -> str:
    """The text parts of a turn joined with PART_SEPARATOR (media parts left out)."""
    return PART_SEPARATOR.join(p.text for p in turn.parts if isinstance(p, TextPart))


def message_segments(turn: Turn) -> list[Segment]:
    """A message as segments: parts joined by PART_SEPARATOR, a media part where it stands."""
    out: list[Segment] = []
    for i, part in enumerate(turn.parts):
        if i:
            out.append(PART_SEPARATOR)
        out.append(part.text if isinstance(part, TextPart) else MediaRef(part.index))
    return out


def merge_text(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent text segments and drop empty ones."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, str):
            if not seg:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += seg
                continue
        out.append(seg)
    return out


def check_roles(turns: Sequence[Turn], *, last_user: bool = True) -> None:
    """Validate the shape of a conversation.

    Rules: at least one turn; roles are system/user/assistant; a system turn only first; then
    user and assistant alternate starting with the user; with `last_user` the last is the
    user's. Every turn has at least one part, and media parts only appear in user turns.

    Raises:
        InvalidArgumentError: Naming the first offending turn.
    """
    if not turns:
        raise InvalidArgumentError("turns: expected at least one user turn, got none", param="turns")
    start = 1 if turns[0].role == "system" else 0
    for i, turn in enumerate(turns):
        where = f"turns[{i}]"
        if turn.role not in ROLES:
            raise InvalidArgumentError(
                f"{where}.role: expected one of {list(ROLES)}, got {turn.role!r}", param=f"{where}.role"
            )
        if not turn.parts:
            raise InvalidArgumentError(f"{where}: has no parts", param=where)
        if turn.role != "user" and any(isinstance(p, MediaPart) for p in turn.parts):
            raise InvalidArgumentError(f"{where}: media parts are only allowed in user turns", param=where)
        if i < start:
            continue
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turn.role != expected:
            extra = " (a system turn may only come first)" if turn.role == "system" else ""
            raise InvalidArgumentError(
                f"{where}.role: expected {expected!r}, got {turn.role!r}{extra}", param=f"{where}.role"
            )
    if start == len(turns):
        raise InvalidArgumentError(
            "turns: expected at least one user turn, got only a system turn", param="turns"
        )
    if last_user and turns[-1].role != "user":
        raise InvalidArgumentError(
            f"turns[{len(turns) - 1}].role: the last turn must be 'user', got {turns[-1].role!r}",
            param=f"turns[{len(turns) - 1}].role",
        )


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _two_style(name: str, system: str) -> Template:
    # LLaVA SeparatorStyle.TWO, sep=" ", sep2="</s>".
    return Template(
        name=name,
        system=system,
        system_suffix=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT: ",
        assistant_suffix="</s>",
        generation_prompt="ASSISTANT:",
    )


TEMPLATES: dict[str, Template] = {
    "vicuna_v1": _two_style("vicuna_v1", VICUNA_SYSTEM),
    "llava_v1": _two_style("llava_v1", LLAVA_SYSTEM),
    # LLaVA SeparatorStyle.PLAIN (stage-1 pretraining): "<image>" + caption + "\n".
    "plain": Template(
        name="plain",
        system="",
        system_suffix="",
        user_prefix="",
        user_suffix="",
        assistant_prefix="",
        assistant_suffix="\n",
        generation_prompt="",
    ),
}


def get_template(name: str) -> Template:
    """The template registered under `name`.

    Raises:
        InvalidArgumentError: No such template; the message lists the known ones.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"conversation template: expected one of {sorted(TEMPLATES)}, got {name!r}"
        ) from None
