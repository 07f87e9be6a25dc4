"""Streaming text out of a growing token list: incremental detokenization and stop strings.

`IncrementalDetokenizer` follows vLLM's prefix/read offsets: it decodes a short window of
recent tokens twice (with and without the new ones) and emits the difference, holding text
back while it ends in U+FFFD, i.e. while byte-level BPE has emitted only part of a character.
Decoding a window that starts inside the prompt keeps the tokenizer's handling of leading
spaces consistent.

`StopMatcher` sits on top of the text deltas: it emits text up to (not including, unless
asked to) the first occurrence of any stop string, and holds back a trailing piece that may
still become one. `Strip` then drops the reply's leading whitespace and holds back trailing
whitespace until more text follows, dropping it at the end (a seed's `.strip()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context before the first generated token (vLLM's choice).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Text deltas from tokens appended one at a time.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt_ids: The prompt; its last few tokens are decoding context, never emitted.
        skip_special_tokens: Leave special tokens out of the text.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return text

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly complete text (may be "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back text, incomplete characters included (call once at the end)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        # The prefix decodes the same inside the longer window, except when the window ended
        # mid-character; then the U+FFFD it produced is replaced by the full character.
        delta = full[len(prefix) :] if full.startswith(prefix) else full[_common_prefix(prefix, full) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class StopMatcher:
    """Cuts a text stream before the first occurrence of any stop string.

    Args:
        stops: The stop strings (non-empty).
        include: Emit the stop string that matched too (vLLM's include_stop_str_in_output).
    """

    def __init__(self, stops: Sequence[str], *, include: bool = False) -> None:
        self.stops = tuple(stops)
        self.include = include
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add a delta; returns the text that is safe to emit.

        Once a stop string matched, `matched` names it and everything after is dropped.
        """
        if self.matched is not None:
            return ""
        buf = self.pending + text
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self.pending = ""
            self.matched = best[1]
            return buf[: best[0] + (len(best[1]) if self.include else 0)]
        hold = self._partial_suffix(buf)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held-back text, when the stream ends without a match."""
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Strip:
    """Strips a text stream at both ends, as `str.strip()` does to the whole text.

    `lead` drops whitespace until the first other character; `feed` holds back trailing
    whitespace (`pending`) until other text follows; `finish` drops what is still held.
    Disabled, every method passes text through.

    Args:
        enabled: Whether to strip.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.started = False
        self.pending = ""

    def lead(self, text: str) -> str:
        """Text with the reply's leading whitespace removed."""
        if not self.enabled or self.started:
            return text
        text = text.lstrip()
        self.started = bool(text)
        return text

    def feed(self, text: str) -> str:
        """The text safe to emit: all but trailing whitespace, which is held."""
        if not self.enabled:
            return text
        buf = self.pending + text
        body = buf.rstrip()
        self.pending = buf[len(body) :]
        return body

    def finish(self, text: str) -> str:
        """The last text: what `feed` gives, the held whitespace then dropped."""
        out = self.feed(text)
        self.pending = ""
        return out
