"""A prepared request: what `Engine.prepare` makes of a `GenerationRequest`, the unit the
scheduler queues, the model runner decodes and the output stream reports on.

It is plain data (no tensors of its own beyond the request's media features, and no torch
import), built once on the event loop before the request queues, and never changed after:
validation and the prompt are done by then, so the worker thread only runs the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from services.common.content import MediaFeatures
    from services.llm.adapter_manager import AdapterVersion
    from services.llm.domain import GenerationRequest
    from services.models.prompt.builder import Prompt


@dataclass(eq=False)
class PreparedRequest:
    """A validated request with its prompt, ready for the decode loop.

    Attributes:
        request: The request, its sampling parameters resolved against the preset.
        prompt: Its tokenized prompt, media placeholders expanded.
        version: The adapter version it holds, resolved when prepared; kept to the end.
        budget: Tokens it may generate: max_tokens capped by the context left.
        media: Its media items' features, in prompt order (`engine.request_media`).
        stop: The request's stop strings, then the preset's (or the template's).
        stop_token_ids: The request's and the preset's.
        instructions: Per media item, the text of the user turn holding it.
        outputs: Output modalities asked for (appended if not emitted).
        cancel: Set when its consumer goes away or the engine closes.
        admitted: perf_counter() when it was admitted, for queue time and TTFT.
    """

    request: GenerationRequest
    prompt: Prompt
    version: AdapterVersion
    budget: int
    media: Sequence[MediaFeatures[torch.Tensor]] = ()
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    instructions: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    admitted: float = field(default_factory=time.perf_counter)

    @property
    def adapter(self) -> str:
        """ "name@version" serving this request (the key of the batch it decodes in)."""
        return self.version.ref

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens (what its prefill costs the scheduler's budget)."""
        return len(self.prompt.input_ids)
