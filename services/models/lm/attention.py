"""Attention masks where a media item's span attends bidirectionally (E.T. Chat).

A modality with `attention: bidirectional` (`ModalitySpec.attention`) lets every position of one
item's span attend to every other position of that span; everything else stays causal: text,
other items, and the positions after the span (which see the whole span, as they would anyway).
That is E.T. Chat's `bi_attention` (ETBench `etchat/model/etchat_arch.py` `_update_causal_mask`:
the causal mask set to 0 over `[s:e, s:e]` of each recorded visual span), which its stage 3
trains with (`scripts/train_stage_3.sh`, `--bi_attention True`) and its released model serves
with.

Where it applies:
- serving: only the prefill, which holds the whole prompt; a decode step's one new token
  attends to everything before it in either case, so steps (alone or in a continuous batch,
  `services.llm.batching`) keep their 2D padding mask, and the KV cache of the span carries the
  bidirectional prefill into them;
- training (stage 3): every row of a right-padded batch, with its own spans.

The mask is 4D and additive, (B, 1, L, L) in the activations' dtype: 0 where a query may attend
a key, the dtype's minimum elsewhere. transformers (`masking_utils`) passes a 4D mask through
unchanged, and both the `eager` attention (adds it to the scores) and `sdpa` (takes it as
`attn_mask`) honour it; other implementations (flash attention, flex attention) take no
arbitrary mask, so a preset that needs the mask is refused with them
(`check_attention_implementation`). Where the LM has a sliding window (Phi-3's config), the
mask keeps it, as transformers' own causal mask does, so a prompt without such spans gets the
same attention either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from services.common.errors import FailedPreconditionError
from services.common.presets import Preset

# Attention implementations of transformers that honour a custom 4D additive mask.
MASK_IMPLEMENTATIONS = ("eager", "sdpa")

Span = tuple[int, int]  # (start, length)


def check_attention_implementation(lm: Any, bidirectional: Iterable[str], *, preset: str) -> None:
    """Bidirectional spans need an attention implementation that takes our 4D mask.

    Args:
        lm: The causal LM (its config names the implementation).
        bidirectional: The preset's bidirectional modalities (`Preset.bidirectional_modalities`).
        preset: The preset's name, for the message.

    Raises:
        FailedPreconditionError: There are such modalities and the LM runs another
            implementation (e.g. flash_attention_2).
    """
    modalities = sorted(bidirectional)
    if not modalities:
        return
    implementation = getattr(lm.config, "_attn_implementation", None)
    if implementation not in MASK_IMPLEMENTATIONS:
        raise FailedPreconditionError(
            f"preset {preset}: modalities.{modalities[0]}.attention: bidirectional needs the LLM's "
            f"attention implementation to take a 4D mask, expected one of {list(MASK_IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )


def sliding_window(lm: Any) -> int | None:
    """The LM's sliding attention window (Phi-3's `config.sliding_window`), or None."""
    window = getattr(lm.config, "sliding_window", None)
    return int(window) if window is not None else None


def span_attention_mask(
    padding: torch.Tensor,
    spans: Sequence[Sequence[Span]],
    *,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """A causal mask with each span's block bidirectional, for right-padded (or unpadded) rows.

    Query i may attend key j where j <= i (and j > i - window, with a window) and j is a real
    token, or where i and j lie in the same span of that row.

    Args:
        padding: (B, L), nonzero on real tokens, 0 on padding (right padding).
        spans: Per row, the (start, length) of each span that attends bidirectionally.
        dtype: The activations' dtype (the mask is added to the attention scores).
        window: The LM's sliding window, or None.

    Returns:
        The additive mask (B, 1, L, L): 0 where attended, `finfo(dtype).min` elsewhere.

    Raises:
        ValueError: A span outside its row's real tokens, or not one list of spans per row.
    """
    rows, length = padding.shape
    if len(spans) != rows:
        raise ValueError(f"span attention mask: expected spans for {rows} row(s), got {len(spans)}")
    real = padding.bool()  # (B, L)
    q = torch.arange(length, device=padding.device)[:, None]  # (L, 1)
    k = torch.arange(length, device=padding.device)[None, :]  # (1, L)
    causal = k <= q  # (L, L)
    if window is not None:
        causal = causal & (k > q - window)
    allowed = (causal[None] & real[:, None, :]).clone()  # (B, L, L)
    for row, row_spans in enumerate(spans):
        n = int(real[row].sum())
        for start, size in row_spans:
            if start < 0 or size < 1 or start + size > n:
                raise ValueError(
                    f"span attention mask: row {row}: span (start {start}, length {size}) lies outside "
                    f"its {n} tokens"
                )
            allowed[row, start : start + size, start : start + size] = True
    mask = torch.zeros(rows, 1, length, length, dtype=dtype, device=padding.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)  # (B, 1, L, L)


def bidirectional_spans(
    modalities: Sequence[str], spans: Sequence[Span], bidirectional: frozenset[str]
) -> list[Span]:
    """The spans (distinct, of more than one token) of the items whose modality is bidirectional.

    Args:
        modalities: Per media item, its modality.
        spans: Per media item, its (start, length) in the prompt (items summed into one span
            share it).
        bidirectional: The bidirectional modalities (`Preset.bidirectional_modalities`).
    """
    if len(modalities) != len(spans):
        raise ValueError(f"media: {len(modalities)} items but {len(spans)} spans")
    chosen = [tuple(s) for m, s in zip(modalities, spans, strict=True) if m in bidirectional and s[1] > 1]
    return [(int(s[0]), int(s[1])) for s in dict.fromkeys(chosen)]


def prefill_attention_mask(
    preset: Preset,
    lm: Any,
    modalities: Sequence[str],
    spans: Sequence[Span],
    embeds: torch.Tensor,
) -> torch.Tensor | None:
    """The attention mask of one prompt's prefill (batch 1, no padding), or None where plain
    causal attention is what the preset asks for (transformers then builds its own mask).

    Args:
        preset: Says which modalities attend bidirectionally.
        lm: The causal LM (its config gives the sliding window).
        modalities: Per media item of the prompt, its modality.
        spans: Per media item, its (start, length) in the prompt.
        embeds: The prompt's input embeddings (1, L, D) (length, dtype and device).

    Returns:
        (1, 1, L, L) additive mask, or None.
    """
    chosen = bidirectional_spans(modalities, spans, preset.bidirectional_modalities())
    if not chosen:
        return None
    padding = torch.ones(1, embeds.shape[1], dtype=torch.long, device=embeds.device)  # (1, L)
    return span_attention_mask(padding, [chosen], dtype=embeds.dtype, window=sliding_window(lm))
