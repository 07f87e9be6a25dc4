"""A running batch's KV cache: rows of different lengths decoding together (left padding).

Continuous batching (`services.llm.engine`; the model runner, `services.llm.runner`, holds one
`BatchCache` per adapter version) prefills each new request alone and then merges its KV cache
into the running batch of its adapter version. Rows have different lengths, so
the batch cache is left-padded: per layer, keys and values of shape (B, H, T, d) where row i's
real tokens are its last `lengths[i]` columns and the columns before them are padding that
the attention mask (B, T) hides. Every decode step appends one column to every row, so the
real tokens of a row stay contiguous at the right; when rows leave, the leading columns that
are padding for every row left are cut.

A row decodes with position ids = its own length (not the batch's column count), so RoPE sees
the same positions as in a batch of one, and masked columns get zero attention weight: the
logits of a row equal its logits alone up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache, each (B, H, T, d)."""
    out = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            raise ValueError(
                f"a KV cache layer without keys/values ({type(layer).__name__}) cannot be batched"
            )
        out.append((keys, values))
    return out


class _GrowingLayer(DynamicLayer):
    """A KV cache layer over buffers with room to grow: a step writes its column in place.

    Hugging Face's DynamicLayer concatenates every step, copying the whole layer (for 16 rows
    of a 12-layer 768-wide model at 260 tokens, about 300 MB a step); here a step copies one
    column, and the buffers grow by half when full. `keys` / `values` are views of the filled
    part, as DynamicLayer's tensors are.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._length = int(keys.shape[2])
        self._k = self._room(keys, self._length)
        self._v = self._room(values, self._length)
        self._view()

    @staticmethod
    def _room(t: torch.Tensor, length: int) -> torch.Tensor:
        """`t`'s first `length` columns in a new buffer with room for more."""
        capacity = length + max(64, length // 2)
        buf = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
        buf[:, :, :length] = t[:, :, :length]
        return buf

    def _view(self) -> None:
        self.keys = self._k[:, :, : self._length]
        self.values = self._v[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(key_states.shape[2])
        if self._length + n > self._k.shape[2]:
            self._k, self._v = self._room(self._k, self._length), self._room(self._v, self._length)
        self._k[:, :, self._length : self._length + n] = key_states
        self._v[:, :, self._length : self._length + n] = value_states
        self._length += n
        self._view()
        return self._k[:, :, : self._length], self._v[:, :, : self._length]


def _growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache over `layers` whose steps append in place (`_GrowingLayer`)."""
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v) for k, v in layers]
    return cache


def _pad_left(t: torch.Tensor, columns: int) -> torch.Tensor:
    """`t` (B, H, T, d) with `columns` zero columns before its first one."""
    if columns == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], columns, t.shape[3])
    return torch.cat([pad, t], dim=2)


class BatchCache:
    """The left-padded KV cache and attention mask of the rows decoding together.

    The cache is built anew only when rows join or leave; a step's forward writes its column
    into the buffers in place (`_GrowingLayer`).
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []  # real tokens per row
        self.mask: torch.Tensor | None = None  # (B, T) int64, 1 = real

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return len(self.lengths)

    @property
    def columns(self) -> int:
        """T: the padded length every row's cache has."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, cache: DynamicCache) -> None:
        """Append a row: the cache of one request (batch 1) with no padding."""
        layers = cache_layers(cache)
        length = int(layers[0][0].shape[2])
        mask = torch.ones(1, length, dtype=torch.long, device=layers[0][0].device)
        if self.cache is None or self.mask is None:
            self.cache, self.lengths, self.mask = _growing_cache(layers), [length], mask
            return
        width = max(self.columns, length)
        grow, pad = width - self.columns, width - length
        self.cache = _growing_cache(
            [
                (
                    torch.cat([_pad_left(k, grow), _pad_left(nk, pad)]),
                    torch.cat([_pad_left(v, grow), _pad_left(nv, pad)]),
                )
                for (k, v), (nk, nv) in zip(cache_layers(self.cache), layers, strict=True)
            ]
        )
        old = torch.cat([self.mask.new_zeros(self.size, grow), self.mask], dim=1)
        new = torch.cat([mask.new_zeros(1, pad), mask], dim=1)
        self.mask = torch.cat([old, new])
        self.lengths.append(length)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); columns that are padding for all of them are cut."""
        if list(rows) == list(range(self.size)):
            return
        if not rows:
            self.cache, self.lengths, self.mask = None, [], None
            return
        assert self.cache is not None and self.mask is not None
        lengths = [self.lengths[i] for i in rows]
        cut = self.columns - max(lengths)
        index = torch.tensor(list(rows), device=self.mask.device)
        self.cache = _growing_cache(
            [(k[index, :, cut:], v[index, :, cut:]) for k, v in cache_layers(self.cache)]
        )
        self.mask, self.lengths = self.mask[index, cut:], lengths

    def step_inputs(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """For a one-token step of every row: the cache (the forward appends to it), the
        attention mask (B, T + 1) and the position ids (B, 1)."""
        assert self.cache is not None and self.mask is not None
        mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        positions = torch.tensor(self.lengths, device=self.mask.device).unsqueeze(1)
        return self.cache, mask, positions

    def stepped(self) -> None:
        """The step's forward has appended one column per row to the cache."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        self.lengths = [n + 1 for n in self.lengths]

    def row_cache(self, row: int) -> DynamicCache:
        """Row `row`'s cache alone (batch 1, no padding), to go on decoding it by itself."""
        assert self.cache is not None
        start = self.columns - self.lengths[row]
        return DynamicCache(
            ddp_cache_data=[
                (k[row : row + 1, :, start:], v[row : row + 1, :, start:])
                for k, v in cache_layers(self.cache)
            ]
        )
