"""Conversation templates as data, their registry, and rendering turns into prompt segments.

A template is LLaVA's `Conversation` reduced to strings (`llava/conversation.py`): what goes
before and after each role's message. Rendering validates the role order and returns a list
of segments, text strings and `MediaRef`s in order; the prompt builder turns them into ids.

Within one user message, parts are joined with the template's `part_separator` ("\\n" unless
the template says otherwise) and a media part renders where it stands (vLLM's convention):
[image, text] -> "<image>\\nWhat is this?". With LLaVA's data, where the image always comes
first in the message, this gives LLaVA's own prompt. Templates of prefix-style systems
(PandaGPT, NExT-GPT, VideoChat) also wrap each media part in text, e.g. "<Img>" + media +
"</Img>"; the wrapper may depend on the item's modality, which the part's item names.
A template may also write a note after a media part from the item's frame times (VideoChat's
"The video contains 8 frames sampled at 0.5, 1.6, ... seconds."), read from the part's
`MediaFeatures`; an item whose times are unknown (or a training sample's file) gets no note.
Each `MediaRef` segment holds the media part it stands for; the prompt builder finds the
item's place in the request from it.

A time part (`TimePart`, E.T. Bench's `<vid>` in a question) renders inline as the preset's
time token, which `render` is told with `time_token`: "from " + `<vid>` + " to " + `<vid>`; no
part separator is written next to it, so the text reads as the seed's question with its
`<vid>` tokens. The prompt builder finds the token's positions after tokenizing.

BOS: a template with `bos` starts its prompt with the tokenizer's BOS (the prompt builder writes
it); Phi-3's E.T. Chat prompt has none. A `Bos` segment asks for one inside the prompt
(legacy NExT-GPT's demo form writes one before every text segment).

Templates render what the released checkpoints saw at inference; training
(`services.trainer._supervised`) renders the same text, so a model we train matches serving
even where a seed's own training text differed from its inference text. Where a seed's
inference text cannot be its training text (legacy NExT-GPT's demo splits the prompt around
its media and writes a BOS before each text piece), the preset names the inference form as
`llm.inference_template` and trains on `llm.template` (`nextgpt_demo` vs `vicuna_v0`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.content import ROLES, MediaFeatures, MediaPart, Part, TextPart, TimePart, Turn
from services.common.errors import InvalidArgumentError

PART_SEPARATOR = "\n"
ANY_MODALITY = "*"  # media_wrappers key for modalities without their own entry


@dataclass(frozen=True)
class MediaRef:
    """A segment standing for a media part of the conversation: the part itself, which the
    prompt builder finds among the request's items (by identity: two parts with equal items
    are still two items)."""

    part: MediaPart[Any]


@dataclass(frozen=True)
class Bos:
    """A segment standing for the tokenizer's BOS token."""


BOS = Bos()

Segment = str | MediaRef | Bos


@dataclass(frozen=True)
class Template:
    """A conversation format.

    For LLaVA's SeparatorStyle.TWO with roles (USER, ASSISTANT) and seps (sep, sep2):
    system_suffix = sep, user_prefix = "USER: ", user_suffix = sep,
    assistant_prefix = "ASSISTANT: ", assistant_suffix = sep2, generation_prompt = "ASSISTANT:".

    The text of a conversation is: [system_prefix + system + system_suffix] (when the system
    prompt is not empty), then per user turn (first_user_prefix for the first one, else
    user_prefix) + message + user_suffix, per assistant turn assistant_prefix + message +
    assistant_suffix, and generation_prompt at the end. Training supervises each reply plus
    the part of assistant_prefix after generation_prompt and the whole assistant_suffix, so a
    template keeps the end-of-turn marker the model must emit in assistant_suffix and starts
    assistant_prefix with generation_prompt.

    Attributes:
        name: Registry key (the preset's `llm.template`).
        system: Default system prompt; a system turn of the request replaces it.
        system_suffix: Written after a non-empty system prompt.
        user_prefix: Written before each user message.
        user_suffix: Written after each user message.
        assistant_prefix: Written before each assistant message.
        assistant_suffix: Written after each assistant message.
        generation_prompt: Written at the end to ask for the next assistant reply.
        system_prefix: Written before a non-empty system prompt.
        first_user_prefix: Written before the first user message instead of user_prefix
            (None: user_prefix). For "###"-separated formats the separator that closes a
            reply is the assistant suffix, so the first user message needs its own.
        part_separator: Joins the parts of a user message.
        media_wrappers: Per modality, (text before, text after) each media part of that
            modality in a user message; the ANY_MODALITY key covers modalities without their
            own entry. Empty: media parts are not wrapped.
        stop: Template-specific stop strings: the serving engine adds them to each request's
            stop list (the reply ends before them). They end generation where the model's
            end-of-turn marker is text; a marker that is a special token of the checkpoint
            (e.g. Phi-3's "<|end|>", in its generation_config eos ids) already ends it as EOS.
        frame_notes: Per modality, text written right after a media part of that modality
            (after its wrapper) when the item's frame times are known; "{count}" is replaced
            by the number of frames and "{times}" by the times rounded to 0.1 s, joined by ", ".
        bos: Whether the prompt starts with the tokenizer's BOS (written by the prompt
            builder). False for Phi-3 as E.T. Chat tokenizes it (Phi-3's tokenizer_config has
            add_bos_token false and `etchat/utils/tokenization.py` keeps a BOS only where the
            tokenizer writes one).
    """

    name: str
    system: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_prefix: str = ""
    first_user_prefix: str | None = None
    part_separator: str = PART_SEPARATOR
    media_wrappers: Mapping[str, tuple[str, str]] = field(default_factory=dict, hash=False)
    stop: tuple[str, ...] = ()
    frame_notes: Mapping[str, str] = field(default_factory=dict, hash=False)
    bos: bool = True

    def render(
        self,
        turns: Sequence[Turn[Any]],
        *,
        add_generation_prompt: bool = True,
        time_token: str | None = None,
    ) -> list[Segment]:
        """Render a conversation into segments.

        Args:
            turns: An optional system turn, then user/assistant turns alternating from the user.
            add_generation_prompt: End with the assistant's prefix for the reply (the last
                turn must then be the user's).
            time_token: The text a time part renders as (the preset's `<vid>`); None: the
                conversation may hold no time part.

        Returns:
            Text strings, media references and BOS markers in order; adjacent texts are merged.

        Raises:
            InvalidArgumentError: The roles are out of order, a turn is malformed, a media
                item's modality has no wrapper in this template, or a time part comes without
                a time token.
        """
        check_roles(turns, last_user=add_generation_prompt)
        system, turns = self.split_system(turns)
        out: list[Segment] = [self.system_text(system)]
        for i, turn in enumerate(turns):
            if turn.role == "user":
                out += self.user_segments(turn, first=i == 0, time_token=time_token)
            else:
                out.append(self.assistant_prefix + turn_text(turn) + self.assistant_suffix)
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return merge_text(out)

    def split_system(self, turns: Sequence[Turn[Any]]) -> tuple[str, Sequence[Turn[Any]]]:
        """The system prompt (a leading system turn's text, else the default) and the rest."""
        if turns and turns[0].role == "system":
            return turn_text(turns[0]), turns[1:]
        return self.system, turns

    def system_text(self, system: str) -> str:
        """The text written for a system prompt ("" for an empty one)."""
        return self.system_prefix + system + self.system_suffix if system else ""

    def user_segments(self, turn: Turn[Any], *, first: bool, time_token: str | None = None) -> list[Segment]:
        """A user turn with its prefix and suffix, parts joined, media wrapped.

        Args:
            turn: The user turn.
            first: Whether it is the conversation's first user turn.
            time_token: As in `render`.
        """
        prefix = self.user_prefix
        if first and self.first_user_prefix is not None:
            prefix = self.first_user_prefix
        out: list[Segment] = [prefix]
        for i, part in enumerate(turn.parts):
            if i and not isinstance(part, TimePart) and not isinstance(turn.parts[i - 1], TimePart):
                out.append(self.part_separator)
            if isinstance(part, TextPart):
                out.append(part.text)
                continue
            if isinstance(part, TimePart):
                out.append(time_part_text(part, time_token))
                continue
            before, after = self._media_wrapper(part)
            out += [before, MediaRef(part), after, self._frame_note(part)]
        out.append(self.user_suffix)
        return out

    def _frame_note(self, part: MediaPart[Any]) -> str:
        item = part.media
        if not self.frame_notes or not isinstance(item, MediaFeatures) or not item.times:
            return ""
        note = self.frame_notes.get(item.modality)
        if note is None:
            return ""
        return note.replace("{count}", str(len(item.times))).replace(
            "{times}", ", ".join(str(round(float(t), 1)) for t in item.times)
        )

    def _media_wrapper(self, part: MediaPart[Any]) -> tuple[str, str]:
        if not self.media_wrappers:
            return "", ""
        modality = part.media.modality
        wrapper = self.media_wrappers.get(modality, self.media_wrappers.get(ANY_MODALITY))
        if wrapper is None:
            raise InvalidArgumentError(
                f"media modality: template {self.name} expected one of "
                f"{sorted(self.media_wrappers)}, got {modality!r}",
                param="media.modality",
            )
        return wrapper


@dataclass(frozen=True)
class DemoSplitTemplate(Template):
    """Legacy NExT-GPT's inference form: its Gradio demo's prompt text, split around the media.

    The demo (`NExT-GPT-Lagacy/code/demo_app.py`, `predict`, lines 278-303) writes the first
    user turn as "### Human: " + "<Image>{path}</Image> " per item + " " + the question, each
    earlier turn of the history as first/user prefix + "<Image>{path}</Image> " per item + its
    question + "\n### Assistant: " + reply + "\n###", and the model
    (`code/model/anyToImageVideoAudio.py`, `prepare_generation_embedding`, lines 675-704)
    appends "\n### Assistant:", splits the text with `re.split(' <|> ')` and embeds each media
    segment as emb("<Img>") + the sum of its files' features + emb("</Img>") and each text
    segment as a BOS + its own tokens. So the text before an item loses its last space, the
    text after it one space (two were written in the current turn: " " + " question"), and
    every text segment starts with a BOS:

        <s>"### Human:" <Img>[x]</Img> <s>" q1\n### Assistant:"                  (one turn)
        <s>"### Human:" <Img>[x]</Img> <s>"q1\n### Assistant: a1\n### Human:  q2\n### Assistant:"

    Media parts of a turn are written before its text, as the demo does. Where the demo breaks
    (a second item in one turn: "> <" leaves "<Audio>..." unsplit, read as text), each item
    (each modality, with media_combine sum_per_modality) gets its own <Img>...</Img> right
    after the previous one, with no text between.
    """

    def render(
        self,
        turns: Sequence[Turn[Any]],
        *,
        add_generation_prompt: bool = True,
        time_token: str | None = None,
    ) -> list[Segment]:
        """Render as `Template.render` does, in the demo's split form (see the class)."""
        check_roles(turns, last_user=add_generation_prompt)
        system, turns = self.split_system(turns)
        current = max(i for i, t in enumerate(turns) if t.role == "user") if add_generation_prompt else -1
        pieces: list[str | MediaRef] = [self.system_text(system)]
        for i, turn in enumerate(turns):
            if turn.role != "user":
                pieces.append(self.assistant_prefix + turn_text(turn) + self.assistant_suffix)
                continue
            prefix = self.user_prefix
            if i == 0 and self.first_user_prefix is not None:
                prefix = self.first_user_prefix
            pieces.append(prefix)
            pieces += [MediaRef(p) for p in turn.parts if isinstance(p, MediaPart)]
            text = self.part_separator.join(
                p.text if isinstance(p, TextPart) else time_part_text(p, time_token)
                for p in turn.parts
                if not isinstance(p, MediaPart)
            )
            pieces.append((" " if i == current else "") + text)
        if add_generation_prompt:
            pieces.append(self.generation_prompt)
        out: list[Segment] = []
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            if text:  # the split eats the space before " <"
                out += [BOS, text[:-1] if text.endswith(" ") else text]
                text = ""
            before, after = self._media_wrapper(piece.part)
            out += [before, piece, after]
        if text:
            out += [BOS, text]
        return merge_text(out)


def turn_text(turn: Turn[Any], time_token: str = "") -> str:
    """The text parts of a turn joined with PART_SEPARATOR (media parts left out), each time
    part written inline as `time_token` (no separator next to it)."""
    out: list[str] = []
    previous: Part[Any] | None = None
    for part in turn.parts:
        if isinstance(part, MediaPart):
            continue
        if out and not isinstance(part, TimePart) and not isinstance(previous, TimePart):
            out.append(PART_SEPARATOR)
        out.append(part.text if isinstance(part, TextPart) else time_token)
        previous = part
    return "".join(out)


def time_part_text(part: TimePart, time_token: str | None) -> str:
    """The text a time part renders as: the time token.

    Raises:
        InvalidArgumentError: There is no time token (the preset has no timestamp heads).
    """
    if time_token is None:
        raise InvalidArgumentError(
            f"turns: a time part ({part.seconds} s) needs a preset with timestamp heads "
            "(heads.timestamps, E.T. Chat's <vid>); this one has none",
            param="turns",
        )
    return time_token


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


def check_roles(turns: Sequence[Turn[Any]], *, last_user: bool = True) -> None:
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
        if turn.role != "user" and any(isinstance(p, TimePart) for p in turn.parts):
            raise InvalidArgumentError(f"{where}: time parts are only allowed in user turns", param=where)
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


def _two_style(name: str, system: str, **extra: Any) -> Template:
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
        **extra,
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
    # PandaGPT and legacy NExT-GPT (Vicuna v0), as PandaGPT generates (SEEDS_SPEC 3, lines
    # 320-322; openllama.py::prepare_generation_embedding and web_demo.py::predict):
    #   "<s>### Human: <Img>" + media + "</Img> {q1}\n### Assistant: {a1}\n### Human: {q2}\n### Assistant:"
    # No system prompt (LLaVA's v0 one, SEEDS_SPEC 1.4, is not used by either); one " "
    # between "</Img>" and the text; the same <Img> wrapper for every modality (SEEDS_SPEC
    # 2.A, line 159). NExT-GPT's training prompt is this one (SEEDS_SPEC 2.A, lines 156-167).
    # NExT-GPT's inference form (a BOS before every text segment, re.split(' <|> ') around the
    # media; SEEDS_SPEC 2.A) is "nextgpt_demo" below. The reply ends at "###".
    "vicuna_v0": Template(
        name="vicuna_v0",
        system="",
        system_suffix="\n",
        first_user_prefix="### Human: ",
        user_prefix=" Human: ",
        user_suffix="\n",
        assistant_prefix="### Assistant: ",
        assistant_suffix="\n###",
        generation_prompt="### Assistant:",
        part_separator=" ",
        media_wrappers={ANY_MODALITY: ("<Img>", "</Img>")},
        stop=("###",),
    ),
    # Legacy NExT-GPT's inference form (its Gradio demo; see DemoSplitTemplate), served with
    # `llm.inference_template: nextgpt_demo` while training renders vicuna_v0 (its training
    # text, `prompt_wrap`: one BOS, "### Human: <Img>" + media + "</Img> " + ...).
    "nextgpt_demo": DemoSplitTemplate(
        name="nextgpt_demo",
        system="",
        system_suffix="\n",
        first_user_prefix="### Human: ",
        user_prefix=" Human: ",
        user_suffix="",
        assistant_prefix="\n### Assistant: ",
        assistant_suffix="\n###",
        generation_prompt="\n### Assistant:",
        part_separator=" ",
        media_wrappers={ANY_MODALITY: ("<Img>", "</Img>")},
        stop=("###",),
        bos=False,  # a BOS starts every text segment instead
    ),
    # VideoChat (Ask-Anything video_chat/), as its demo generates (SEEDS_SPEC 4, lines
    # 381-385; conversation.py: system "", sep "###", get_prompt = system + sep + sum of
    # role + ": " + message + sep; upload_video/upload_img add the media as a Human message of
    # its own, ask() adds text + "\n", a reply is stored stripped):
    #   "###Human: <Video>" + media + "</Video> The video contains 8 frames sampled at 0.5, 1.6,
    #   ... seconds.\n###Human: {q1}\n###Assistant: {a1}###Human: {q2}\n###Assistant:"
    # Each part of a user message is a Human message of its own (part_separator), as the
    # demo's uploads and questions are. Images are wrapped in <Image></Image>, videos in
    # <Video></Video>; a video's frame message (load_video: str(round(t, 1)) joined by ", ")
    # follows "</Video>" after one space when the item's frame times are known.
    "videochat": Template(
        name="videochat",
        system="",
        system_suffix="",
        first_user_prefix="###Human: ",
        user_prefix="Human: ",
        user_suffix="\n###",
        assistant_prefix="Assistant: ",
        assistant_suffix="###",
        generation_prompt="Assistant:",
        part_separator="\n###Human: ",
        media_wrappers={"image": ("<Image>", "</Image>"), "video": ("<Video>", "</Video>")},
        stop=("###",),
        frame_notes={"video": " The video contains {count} frames sampled at {times} seconds."},
    ),
    # E.T. Chat's phi3 (SEEDS_SPEC 5, lines 439-443; etchat/conversation.py: system
    # "<|system|>\nYou are a helpful AI assistant.", roles "\n<|user|>\n"/"\n<|assistant|>\n",
    # sep "<|end|>", leading "\n" stripped), the same text in training and at inference:
    #   "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n{q1}<|end|>\n"
    #   "<|assistant|>\n{a1}<|end|>\n<|user|>\n{q2}<|end|>\n<|assistant|>\n"
    # The answer plus "<|end|>" is supervised, as preprocess_multi_row does. No BOS: E.T.
    # Chat's `tokenize` (etchat/utils/tokenization.py, lines 12-17) keeps a BOS only where the
    # tokenizer writes one, and Phi-3-mini's tokenizer_config.json has add_bos_token false.
    "phi3": Template(
        name="phi3",
        system="You are a helpful AI assistant.",
        system_prefix="<|system|>\n",
        system_suffix="<|end|>\n",
        first_user_prefix="<|user|>\n",
        user_prefix="\n<|user|>\n",
        user_suffix="<|end|>\n",
        assistant_prefix="<|assistant|>\n",
        assistant_suffix="<|end|>",
        generation_prompt="<|assistant|>\n",
        stop=("<|end|>",),
        bos=False,
    ),
    # EventGPT (SEEDS_SPEC 6; LLaVA v1 style with the "human" system prompt, USER/ASSISTANT,
    # sep " ", sep2 "</s>"); prepare_event_prompt's user message "<ev_start><event><ev_end>\n{query}":
    #   "{system} USER: <ev_start>" + media + "<ev_end>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
    # <ev_start>/<ev_end> are plain text unless the checkpoint's tokenizer has them as tokens.
    "eventgpt_v1": _two_style(
        "eventgpt_v1", LLAVA_SYSTEM, media_wrappers={ANY_MODALITY: ("<ev_start>", "<ev_end>")}
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
