"""Bidirectional media spans: the 4D mask against a one-entry-at-a-time reference, the mask
honoured alike by transformers' eager and SDPA attention (Llama and Phi-3 with its sliding
window), the same logits as transformers' own mask where no span is bidirectional, decode
steps after a bidirectional prefill, and the refusals."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.common.errors import FailedPreconditionError
from services.common.presets import load_preset
from services.models.lm.attention import (
    bidirectional_spans,
    check_attention_implementation,
    prefill_attention_mask,
    span_attention_mask,
)

MIN = torch.finfo(torch.float32).min
VOCAB = 64


def reference_mask(
    lengths: list[int], width: int, spans: list[list[tuple[int, int]]], window: int | None
) -> torch.Tensor:
    """(B, 1, L, L) built one entry at a time."""
    mask = torch.full((len(lengths), 1, width, width), MIN)
    for b, n in enumerate(lengths):
        for i in range(width):
            for j in range(width):
                causal = j <= i and j < n and (window is None or j > i - window)
                block = any(s <= i < s + k and s <= j < s + k for s, k in spans[b])
                if causal or block:
                    mask[b, 0, i, j] = 0.0
    return mask


def tiny_lm(architecture: str, implementation: str, window: int | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # far from uniform attention, so masks show in the outputs
        pad_token_id=0,
        attn_implementation=implementation,
    )
    torch.manual_seed(0)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    return Phi3ForCausalLM(Phi3Config(**sizes, sliding_window=window)).eval()


def ids(*lengths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, L) and their padding mask."""
    width = max(lengths)
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    padding = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        out[b, :n] = torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(b))
        padding[b, :n] = 1
    return out, padding


@pytest.mark.parametrize("window", [None, 3])
def test_the_mask_is_causal_with_each_span_attending_both_ways_and_padding_hidden(window: int | None) -> None:
    _, padding = ids(9, 6)
    spans = [[(1, 3), (5, 4)], [(2, 4)]]
    mask = span_attention_mask(padding, spans, dtype=torch.float32, window=window)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.float32
    assert torch.equal(mask, reference_mask([9, 6], 9, spans, window))


def test_spans_must_lie_inside_their_row_and_come_one_list_per_row() -> None:
    _, padding = ids(9, 6)
    with pytest.raises(ValueError, match=r"row 1: span \(start 4, length 3\) lies outside its 6 tokens"):
        span_attention_mask(padding, [[], [(4, 3)]], dtype=torch.float32)
    with pytest.raises(ValueError, match="expected spans for 2 row"):
        span_attention_mask(padding, [[]], dtype=torch.float32)


def test_only_spans_of_several_tokens_of_bidirectional_modalities_count_once_each() -> None:
    chosen = bidirectional_spans(
        ["video", "image", "video", "video", "video"],
        [(2, 5), (9, 4), (15, 1), (2, 5), (20, 3)],
        frozenset({"video"}),
    )
    assert chosen == [(2, 5), (20, 3)]  # the image is causal, a 1-token span has no block, (2, 5) is summed
    with pytest.raises(ValueError, match="2 items but 1 spans"):
        bidirectional_spans(["video", "video"], [(0, 2)], frozenset({"video"}))


CASES = [("llama", None), ("phi3", None), ("phi3", 4)]  # Phi-3 with a sliding window shorter than the rows


@pytest.mark.parametrize(("architecture", "window"), CASES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_without_bidirectional_spans_the_mask_gives_what_transformers_own_mask_gives(
    architecture: str, window: int | None, implementation: str
) -> None:
    lm = tiny_lm(architecture, implementation, window)
    tokens, padding = ids(10, 7)
    mask = span_attention_mask(padding, [[], []], dtype=torch.float32, window=window)
    with torch.no_grad():
        own = lm(input_ids=tokens, attention_mask=padding).logits  # (B, L, V)
        ours = lm(input_ids=tokens, attention_mask=mask).logits
    real = padding.bool()
    assert (own[real] - ours[real]).abs().max() <= 1e-5


@pytest.mark.parametrize(("architecture", "window"), CASES)
def test_eager_and_sdpa_honour_the_span_block_alike_and_only_it_changes(
    architecture: str, window: int | None
) -> None:
    tokens, padding = ids(12, 9)
    spans = [[(3, 5)], [(2, 4)]]
    bidirectional = span_attention_mask(padding, spans, dtype=torch.float32, window=window)
    causal = span_attention_mask(padding, [[], []], dtype=torch.float32, window=window)
    out = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            lm = tiny_lm(architecture, implementation, window)
            out[implementation] = lm(input_ids=tokens, attention_mask=bidirectional).logits  # (B, L, V)
            out[f"{implementation} causal"] = lm(input_ids=tokens, attention_mask=causal).logits
    real = padding.bool()
    assert (out["eager"][real] - out["sdpa"][real]).abs().max() <= 1e-5
    diff = (out["sdpa"] - out["sdpa causal"]).abs().amax(-1)  # (B, L)
    assert diff[0, :3].max() <= 1e-5 and diff[1, :2].max() <= 1e-5  # before each span: unchanged
    assert diff[0, 3:7].min() > 1e-3 and diff[1, 2:5].min() > 1e-3  # inside it (but its last): changed
    assert diff[0, 8:11].min() > 1e-4  # after it: the next layer reads the changed span (in the window)


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_decode_steps_after_a_bidirectional_prefill_equal_the_whole_sequence_at_once(
    architecture: str,
) -> None:
    """The KV cache of the span carries the bidirectional prefill; a new token attends to all."""
    lm = tiny_lm(architecture, "sdpa")
    tokens, _ = ids(13)
    prompt, more = tokens[:, :10], tokens[:, 10:]
    with torch.no_grad():
        full_mask = span_attention_mask(torch.ones(1, 13), [[(2, 6)]], dtype=torch.float32)
        whole = lm(input_ids=tokens, attention_mask=full_mask).logits[0, 9:]  # (4, V)
        out = lm(input_ids=prompt, attention_mask=full_mask[:, :, :10, :10], use_cache=True)
        steps = [out.logits[0, -1]]
        for k in range(3):
            out = lm(
                input_ids=more[:, k : k + 1],
                past_key_values=out.past_key_values,
                attention_mask=torch.ones(1, 11 + k, dtype=torch.long),
                use_cache=True,
            )
            steps.append(out.logits[0, -1])
    assert (torch.stack(steps) - whole).abs().max() <= 1e-5


def test_an_implementation_without_arbitrary_masks_is_refused_by_name() -> None:
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(
        FailedPreconditionError,
        match=r"preset etchat: modalities\.video\.attention: bidirectional needs .* got 'flash_attention_2'",
    ):
        check_attention_implementation(flash, frozenset({"video"}), preset="etchat")
    check_attention_implementation(flash, frozenset(), preset="tiny")  # causal presets: any
    for implementation in ("eager", "sdpa"):
        lm = SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))
        check_attention_implementation(lm, frozenset({"video"}), preset="etchat")


def test_a_prefill_gets_a_mask_only_where_the_preset_asks(tmp_path: Path) -> None:
    lm = SimpleNamespace(config=SimpleNamespace(sliding_window=None))
    embeds = torch.zeros(1, 12, 8, dtype=torch.float16)
    etchat = load_preset("tiny-etchat", cache_dir=tmp_path)
    mask = prefill_attention_mask(etchat, lm, ["video"], [(3, 6)], embeds)
    assert mask is not None and mask.shape == (1, 1, 12, 12) and mask.dtype == torch.float16
    assert bool((mask[0, 0, 3:9, 3:9] == 0).all()) and bool((mask[0, 0, 2, 3:] < 0).all())
    assert prefill_attention_mask(etchat, lm, [], [], embeds) is None  # text only: causal
    tiny = load_preset("tiny", cache_dir=tmp_path)
    assert prefill_attention_mask(tiny, lm, ["image"], [(3, 6)], embeds) is None
