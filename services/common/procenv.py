"""The environment modalmesh starts its service processes with.

glibc's allocator serves a request of more than 128 KiB (its dynamic threshold grows to at
most 32 MiB) from a fresh mmap and gives it back on free, and gives back free heap above
128 KiB; so every MB-sized buffer a request makes (feature tensors, their protobuf bytes,
gRPC's receive buffers) starts with a page fault per 4 KiB page. Measured with
`python -m bench --only transport`: a 576x4096 FP16 feature tensor (4.7 MB) crosses gRPC in
about 11 ms by default and about 5.5 ms with buffers below 64 MiB kept in the heap and up to
128 MiB of free heap kept. `GLIBC_TUNABLES` is read at process start, so it has to be in the
environment a service starts with; an operator's own setting is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=134217728"


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with modalmesh's allocator settings, unless it sets GLIBC_TUNABLES itself."""
    out = dict(env)
    out.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return out
