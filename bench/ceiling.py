"""What batching can gain at all on this machine: the preset's LM and the work of a chat, timed
in this process with nothing else running.

Continuous batching turns 16 decode steps of one row into one step of 16 rows; that pays off
as far as a step's time is the weights' read rather than its arithmetic (memory-bound, as on a
GPU). On a small CPU a step of 16 rows costs nearly 16 steps of one, and a chat's prefill (its
image tokens) cannot be batched away at all. The figures bound the throughput ratio the
`throughput` benchmark can show at 16 chats:
- `decode tokens/s B=16` vs `B=1`: one decode step over 16 rows vs over one row, each at a KV
  cache of a chat's prompt length;
- `chat tokens/s ceiling @16`: 16 chats' tokens over (16 prefills + their decode steps at
  B=16) vs over (16 x (prefill + decode steps at B=1)), i.e. the best a perfect batching
  scheduler could do against a one-at-a-time server with the same model and no service hops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from bench._config import BenchConfig
from bench._report import Figure, median
from bench._stack import Stack

ROWS = 16


def _seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return median(times)


@torch.inference_mode()
def ceiling(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """Decode-step and whole-chat throughput of the preset's LM at 16 rows vs one."""
    from services.models.lm.loading import load_model

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # as the services run (bench --threads)
        torch.set_num_threads(int(threads))
    loaded = load_model(stack.preset)
    lm = loaded.model.lm
    layout = loaded.model.layouts[next(iter(stack.preset.modalities))]
    prompt = int(loaded.model.llm_tokens(next(iter(stack.preset.modalities)), layout.typical_frames)) + 40
    width = lm.get_input_embeddings().weight.shape[1]
    reps = max(3, cfg.warmup + 2)

    def prefill(rows: int) -> object:
        return lm(inputs_embeds=torch.randn(rows, prompt, width), use_cache=True, logits_to_keep=1)

    caches = {rows: prefill(rows).past_key_values for rows in (1, ROWS)}  # type: ignore[attr-defined]

    def step(rows: int) -> None:
        cache = caches[rows]
        lm(input_ids=torch.zeros(rows, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt's length for the next repetition

    one, many = _seconds(lambda: step(1), reps), _seconds(lambda: step(ROWS), reps)
    pre = _seconds(lambda: prefill(1), reps)
    tokens = cfg.max_tokens
    serial = ROWS * (pre + tokens * one)  # a one-at-a-time server
    batched = ROWS * pre + tokens * many  # a perfect batching scheduler
    note = f"{stack.preset.name}'s LM, prompt {prompt} tokens, in-process, no service hops"
    return [
        Figure("decode tokens/s B=16", ROWS / many, 1 / one, "tokens/s", "higher", note + "; baseline B=1"),
        Figure(
            "chat tokens/s ceiling @16",
            ROWS * tokens / batched,
            ROWS * tokens / serial,
            "tokens/s",
            "higher",
            f"{ROWS} chats x {tokens} tokens: prefills + batched steps vs one chat at a time "
            f"(prefill {pre:.3f} s, step B=1 {one * 1e3:.1f} ms, B=16 {many * 1e3:.1f} ms)",
        ),
    ]
