"""Reading answers out of model replies: timestamps, spans and option letters.

Every function here takes the reply text and returns a `Parsed` value: either what was found,
or the reason nothing usable was found ("no_timestamps", "no_letter", ...). Nothing raises on a
bad reply; scorers count the reasons. The rules are our own, written from the seeds' evaluation
scripts (cited per function) and documented in each docstring.

Times in replies may be decimal seconds ("12.5", "12.") or clock times ("1:05", "0:01:05.5",
read as minutes:seconds or hours:minutes:seconds).
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
Span = tuple[float, float]

# Reasons a reply (or a sample) could not be scored; scorers count them.
EMPTY_REPLY = "empty_reply"
NO_TIMESTAMPS = "no_timestamps"
NO_LETTER = "no_letter"
LETTER_OUT_OF_RANGE = "letter_out_of_range"
AMBIGUOUS_LETTER = "ambiguous_letter"
WRONG_TIMESTAMP_COUNT = "wrong_timestamp_count"
BAD_SPAN = "bad_span"

OPTION_LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """What a reply yielded: a value, or the reason there is none.

    Attributes:
        value: The parsed value; None when `reason` is set.
        reason: Why nothing usable was found, e.g. "no_letter"; None on success.
    """

    value: T | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when a value was found."""
        return self.reason is None


def _fail(reason: str) -> Parsed[T]:
    return Parsed(None, reason)


_CLOCK = r"\d{1,2}(?::\d{2}){1,2}(?:\.\d+)?"
_DECIMAL = r"\d+(?:\.\d*)?"
_TIME = rf"(?:{_CLOCK}|{_DECIMAL})"
_UNIT = r"(?:\s*(?:seconds?|secs?|s)\b)?"
# A time must start a number: not preceded by a digit, a decimal point or a colon.
_AT = r"(?<![\d.:])"
_RANGE = re.compile(
    rf"{_AT}(?P<a>{_TIME}){_UNIT}\s*(?:-|\u2013|\u2014|~|\bto\b|\buntil\b|\btill\b)\s*(?P<b>{_TIME})",
    re.IGNORECASE,
)
_BETWEEN = re.compile(rf"\bbetween\s+(?P<a>{_TIME}){_UNIT}\s+and\s+(?P<b>{_TIME})", re.IGNORECASE)
_ONE_TIME = re.compile(rf"{_AT}{_TIME}")
# Within one sentence: a word starting with start/begin (or end/finish/stop), then a time.
_START = re.compile(rf"\b(?:start|begin)\w*[^\d.!?\n]*?{_AT}({_TIME})", re.IGNORECASE)
_END = re.compile(rf"\b(?:end|finish|stop)\w*[^\d.!?\n]*?{_AT}({_TIME})", re.IGNORECASE)


def to_seconds(text: str) -> float:
    """One time as seconds: "12.5" -> 12.5, "1:05" -> 65.0, "1:00:05" -> 3605.0."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _ordered(a: float, b: float) -> Span:
    return (a, b) if a <= b else (b, a)


def parse_spans(reply: str) -> Parsed[list[Span]]:
    """Every [start, end] span a reply names, in the order they appear.

    Rules, tried in order (our own, modelled on `tvg_format` in the copies of E.T. Bench's
    `evaluation/compute_metrics.py` that circulate; the official one ships with the benchmark's
    data kit, not with PolyU-ChenLab/ETBench on GitHub):

    1. Ranges "A - B" (also en and em dashes, "~", "to", "until", "till", with an optional unit after
       A: "3s to 5s", "3.0 - 5.0 seconds") and "between A and B".
    2. Failing that, the first time after each word starting with "start"/"begin", paired in
       order with the first time after each word starting with "end"/"finish"/"stop" in the
       same sentence ("starts at 3.5 seconds and ends at 7").

    Each span is ordered (a reversed "7 - 3" becomes (3.0, 7.0)).

    Returns:
        The spans, or reason "no_timestamps" when there is none.
    """
    found: list[tuple[int, Span]] = []
    taken: list[tuple[int, int]] = []
    for pattern in (_BETWEEN, _RANGE):
        for m in pattern.finditer(reply):
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            taken.append((m.start(), m.end()))
            found.append((m.start(), _ordered(to_seconds(m["a"]), to_seconds(m["b"]))))
    if found:
        return Parsed([span for _, span in sorted(found)])
    starts = [to_seconds(m.group(1)) for m in _START.finditer(reply)]
    ends = [to_seconds(m.group(1)) for m in _END.finditer(reply)]
    spans = [_ordered(a, b) for a, b in zip(starts, ends, strict=False)]
    return Parsed(spans) if spans else _fail(NO_TIMESTAMPS)


def parse_point(reply: str) -> Parsed[float]:
    """The first time a reply names (one timestamp, as E.T. Bench's VHD asks for).

    The copies of E.T. Bench's `compute_metrics.py` (`vhd_eval`) take the first number in the
    reply; so do we, also reading clock times.

    Returns:
        Seconds, or reason "no_timestamps".
    """
    m = _ONE_TIME.search(reply)
    return Parsed(to_seconds(m.group(0))) if m else _fail(NO_TIMESTAMPS)


_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")


def etbench_letter(reply: str, n_options: int) -> Parsed[int]:
    """The option a reply to an E.T. Bench multiple-choice question picks (RAR, ECA, RVQ, GVQ).

    E.T. Chat's `etchat/eval/infer_etbench.py` ends the prompt with "Best Option: (", so its
    replies start with the letter ("B) ..."). Our reading of `rvq_eval` / `gvq_eval` in the
    copies of E.T. Bench's `compute_metrics.py`:

    1. The first "(X)" anywhere, X a letter of one of the `n_options` options, decides.
    2. Otherwise, case-insensitively: drop a leading "Best Option:", then leading spaces and
       "("; if what is left is one character, or its second character is ".", ",", " " or ")",
       its first character is the letter (so "a man walks" reads as A, as it does there).

    (The copies' `gvq_eval` skips step 1; we apply the same rule to all four tasks, so a GVQ
    reply "The answer is (B) ..." reads as B here.)
    3. Otherwise the official script picks the option whose text is most similar to the reply
       under a sentence-embedding model (all-MiniLM-L6-v2); we use no model and report
       "no_letter" (so a reply that only paraphrases an option counts as wrong here).

    Returns:
        The option index (0 for A), or reason "empty_reply", "no_letter" or
        "letter_out_of_range" (a letter past the options, e.g. "E" of four).
    """
    for m in _PAREN_LETTER.finditer(reply):
        index = OPTION_LETTERS.index(m.group(1).upper())
        if index < n_options:
            return Parsed(index)
        break
    text = reply.strip().lower()
    if text.startswith("best option:"):
        text = text[len("best option:") :]
    text = text.lstrip().lstrip("(").lstrip()
    if not text:
        return _fail(EMPTY_REPLY)
    if len(text) == 1 or text[1] in "., )":
        if text[0] not in OPTION_LETTERS.lower():
            return _fail(NO_LETTER)
        index = OPTION_LETTERS.lower().index(text[0])
        return Parsed(index) if index < n_options else _fail(LETTER_OUT_OF_RANGE)
    return _fail(NO_LETTER)


_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])(?![A-Za-z])")


def llava_letter(reply: str, n_options: int) -> Parsed[int]:
    """The option letter of a LLaVA-style multiple-choice reply.

    After LLaVA's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA), which asks "Answer with
    the option's letter from the given choices directly." and accepts, in order:

    1. the whole reply (stripped) is an option letter: "B";
    2. the reply starts with an option letter and ". ": "B. a dog";
    3. "The answer is B" exactly once (we also accept "The answer is (B)", and several
       mentions of the same letter; different letters are "ambiguous_letter").

    Letters are upper case, as in LLaVA. Unlike LLaVA we never guess a random option for an
    unreadable reply; it counts as wrong, with its reason.

    Returns:
        The option index, or reason "empty_reply", "no_letter", "ambiguous_letter" or
        "letter_out_of_range".
    """
    text = reply.strip()
    if not text:
        return _fail(EMPTY_REPLY)
    letter: str | None = None
    if len(text) == 1 and text in OPTION_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = set(_ANSWER_IS.findall(text))
        if len(found) > 1:
            return _fail(AMBIGUOUS_LETTER)
        letter = found.pop() if found else None
    if letter is None:
        return _fail(NO_LETTER)
    index = OPTION_LETTERS.index(letter)
    return Parsed(index) if index < n_options else _fail(LETTER_OUT_OF_RANGE)


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """A reply or reference reduced for comparison.

    SQuAD v1.1's `normalize_answer` (its official evaluate script), on Unicode: NFKC, case
    folded, every punctuation character (Unicode category P*) dropped, the English articles
    "a", "an", "the" dropped, runs of whitespace made one space, ends stripped. "The Cat's
    hat." and "cats hat" both become "cats hat".
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_tokens(text: str, part: str) -> bool:
    """Whether the words of `part` occur in `text` consecutively, as whole words (both already
    normalised); never true for an empty `part`."""
    words, sub = text.split(), part.split()
    if not sub:
        return False
    return any(words[i : i + len(sub)] == sub for i in range(len(words) - len(sub) + 1))
