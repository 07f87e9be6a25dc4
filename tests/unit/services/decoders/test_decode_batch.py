"""`decode_batch`: one pipeline call per group of items with equal parameters apart from the
seed, each item as it would come out alone with its seed, bad items refused alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.models.decoders.pipelines import (
    AudioOut,
    DecodeParams,
    Decoder,
    ImageOut,
    Media,
    decode,
    decode_batch,
)
from services.models.decoders.tiny import TINY_CONDITIONING

SIZES: dict[str, dict[str, Any]] = {
    "image": {"height": 32, "width": 24},
    "audio": {"duration_s": 0.5},
    "video": {"height": 16, "width": 16, "num_frames": 3},
}


def cond(kind: str, seed: int) -> torch.Tensor:
    return torch.randn(*TINY_CONDITIONING[kind], generator=torch.Generator().manual_seed(seed))


def pixels(out: Media | InvalidArgumentError) -> np.ndarray:
    assert not isinstance(out, InvalidArgumentError), out
    if isinstance(out, ImageOut):
        return np.asarray(out.image).astype(np.float64)
    if isinstance(out, AudioOut):
        return out.waveform.astype(np.float64)
    return out.frames.astype(np.float64)


class CountingPipe:
    """The real pipeline, recording the batch size of each call."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.batches: list[int] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.batches.append(len(kwargs["generator"]))
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def counting(decoder: Decoder) -> tuple[Decoder, CountingPipe]:
    pipe = CountingPipe(decoder.pipe)
    return dataclasses.replace(decoder, pipe=pipe), pipe


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_a_batch_gives_each_item_what_it_gives_alone(decoders: dict[str, Decoder], kind: str) -> None:
    decoder, pipe = counting(decoders[kind])
    embeds = [cond(kind, i) for i in range(3)]
    params = [DecodeParams(steps=2, seed=100 + i, **SIZES[kind]) for i in range(3)]
    batch = decode_batch(decoder, embeds, params)
    assert pipe.batches == [3]
    alone = [decode(decoder, e, p) for e, p in zip(embeds, params, strict=True)]
    assert pipe.batches == [3, 1, 1, 1]
    for b, a, p in zip(batch, alone, params, strict=True):
        assert type(b) is type(a) and getattr(b, "seed", None) == p.seed
        # Batched kernels may round differently: at most one step of 8-bit colour.
        tolerance = 1e-5 if kind == "audio" else 1.0
        np.testing.assert_allclose(pixels(b), pixels(a), atol=tolerance, rtol=0)
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_same_conditioning_different_seeds_differ(decoders: dict[str, Decoder]) -> None:
    embeds = cond("image", 0)
    outs = decode_batch(decoders["image"], [embeds, embeds], [DecodeParams(steps=2, seed=s) for s in (1, 2)])
    assert not np.array_equal(pixels(outs[0]), pixels(outs[1]))


def test_items_are_grouped_by_their_parameters_apart_from_the_seed(decoders: dict[str, Decoder]) -> None:
    decoder, pipe = counting(decoders["image"])
    params = [
        DecodeParams(steps=2, height=16, width=16, seed=1),
        DecodeParams(steps=2, height=32, width=16, seed=2),
        DecodeParams(steps=2, height=16, width=16),  # a random seed; still the first group
        DecodeParams(steps=3, height=16, width=16, seed=1),
        DecodeParams(steps=2, height=32, width=16, seed=5),
    ]
    outs = decode_batch(decoder, [cond("image", i) for i in range(5)], params)
    assert sorted(pipe.batches) == [1, 2, 2]
    sizes = [o.image.size for o in outs if isinstance(o, ImageOut)]
    assert sizes == [(16, 16), (16, 32), (16, 16), (16, 16), (16, 32)]
    assert [o.seed for o in outs if isinstance(o, ImageOut)][:2] == [1, 2]
    np.testing.assert_allclose(
        pixels(outs[0]), pixels(decode(decoder, cond("image", 0), params[0])), atol=1.0, rtol=0
    )


def test_unseeded_items_get_distinct_random_seeds(decoders: dict[str, Decoder]) -> None:
    outs = decode_batch(decoders["audio"], [cond("audio", 0)] * 3, [DecodeParams(steps=1)] * 3)
    seeds = [o.seed for o in outs if isinstance(o, AudioOut)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    again = decode(decoders["audio"], cond("audio", 0), DecodeParams(steps=1, seed=seeds[1]))
    np.testing.assert_allclose(pixels(outs[1]), pixels(again), atol=1e-5, rtol=0)


def test_bad_items_fail_alone(decoders: dict[str, Decoder]) -> None:
    decoder, pipe = counting(decoders["video"])
    good = DecodeParams(steps=2, seed=3, **SIZES["video"])
    embeds = [cond("video", 0), cond("video", 1), torch.zeros(77, 32), cond("video", 3)]
    params = [good, DecodeParams(steps=500), good, dataclasses.replace(good, seed=4)]
    outs = decode_batch(decoder, embeds, params)
    assert pipe.batches == [2]
    assert isinstance(outs[1], InvalidArgumentError) and outs[1].message.startswith("steps: expected")
    assert isinstance(outs[2], InvalidArgumentError)
    assert "expected shape (77, 48) or (1, 77, 48), got (77, 32)" in outs[2].message
    np.testing.assert_allclose(pixels(outs[0]), pixels(decode(decoder, embeds[0], good)), atol=1.0, rtol=0)
    assert getattr(outs[3], "seed", None) == 4


def test_all_bad_or_empty_runs_nothing(decoders: dict[str, Decoder]) -> None:
    decoder, pipe = counting(decoders["image"])
    assert decode_batch(decoder, [], []) == []
    outs = decode_batch(decoder, [cond("image", 0)], [DecodeParams(duration_s=1.0)])
    assert isinstance(outs[0], InvalidArgumentError) and "does not apply to image" in outs[0].message
    assert pipe.batches == []


def test_lists_of_different_lengths_are_refused(decoders: dict[str, Decoder]) -> None:
    with pytest.raises(InvalidArgumentError, match="expected as many params as embeds, got 1 and 2"):
        decode_batch(decoders["image"], [cond("image", 0)] * 2, [None])


def test_a_bad_negative_fails_the_call(decoders: dict[str, Decoder]) -> None:
    with pytest.raises(InvalidArgumentError, match="negative_embeds"):
        decode_batch(decoders["image"], [cond("image", 0)], [None], negative_embeds=torch.zeros(3))
