"""The word rule that scores short answers about synthetic media (the shapes set and its kin).

A reply answers a field (a colour, a shape, a direction, a pitch) when it names the right word
and no other word of that field's vocabulary; words are the runs of a-z in the lower-cased
reply. `services.trainer.synth` (which writes the held-out sets) and `services.eval` (which
scores them through the gateway) both use it; it lives here because neither service may import
the other.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

_WORD = re.compile(r"[a-z]+")
SHAPES_KINDS = ("color", "shape", "describe")  # the shapes held-out set's question kinds


def reply_words(reply: str) -> set[str]:
    """The runs of a-z in the lower-cased reply."""
    return set(_WORD.findall(reply.lower()))


def names_only(words: Collection[str], right: str, vocabulary: Collection[str]) -> bool:
    """Whether `words` hold `right` and no other word of `vocabulary`."""
    return right in words and not set(words) & (set(vocabulary) - {right})


def shapes_correct(
    reply: str, kind: str, answer: Mapping[str, str], colors: Collection[str], shapes: Collection[str]
) -> bool:
    """Whether a reply answers a shapes held-out question: a "color" question needs the right
    colour word and no other colour word, a "shape" question the right shape word and no other
    shape word, a "describe" question (or any other kind) both. Words outside `colors` and
    `shapes` (background colours among them) never count against a reply.
    """
    words = reply_words(reply)
    color_ok = names_only(words, answer["color"], colors)
    shape_ok = names_only(words, answer["shape"], shapes)
    return {"color": color_ok, "shape": shape_ok}.get(kind, color_ok and shape_ok)
