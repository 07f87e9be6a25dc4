"""Decoding parameters of one request, checked against a decoder's limits.

Shared by the decoder (`pipelines.resolve_params`, on the values after the defaults are
merged) and the gateway (on the values a client sent, before anything is generated), so a
request out of range fails with the same message wherever it is caught. Which fields apply to
which output modality is its registry record's `output.params`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common import modalities
from services.common.errors import InvalidArgumentError
from services.common.presets import DecodeLimits

SIZE_MULTIPLE = 8  # the latent grid of every SD-family VAE

FIELDS: tuple[str, ...] = (
    "steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "duration_s",
    "num_frames",
    "fps",
)
COMMON_FIELDS = frozenset({"steps", "guidance_scale", "seed"})  # every output modality's


def kind_fields(kind: str) -> frozenset[str]:
    """The fields an output modality takes beyond `COMMON_FIELDS` (its record's `output.params`).

    Raises:
        InvalidArgumentError: `kind` is not a modality modalmesh can produce.
    """
    out = modalities.MODALITIES[kind].output if kind in modalities.MODALITIES else None
    if out is None:
        raise InvalidArgumentError(
            f"decoder kind: expected one of {list(modalities.output_names())}, got {kind!r}", param="kind"
        )
    return out.params


def check_range(name: str, value: Any, low: float, high: float) -> None:
    """A number in [low, high]; an integer where both bounds are integers.

    Raises:
        InvalidArgumentError: Naming the field, the range and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidArgumentError(f"{name}: expected a number in [{low}, {high}], got {value!r}", param=name)
    if isinstance(low, int) and isinstance(high, int) and not isinstance(value, int):
        raise InvalidArgumentError(
            f"{name}: expected an integer in [{low}, {high}], got {value!r}", param=name
        )


def check_params(kind: str, values: Mapping[str, Any], limits: DecodeLimits, *, where: str = "") -> None:
    """Check the parameters that are set (not None) for a decoder of `kind`.

    Args:
        kind: An output modality ("image", "audio", "video").
        values: Field -> value (DecodeParams fields); None means unset.
        limits: The decoder's limits.
        where: A prefix for the field names in messages (e.g. "image." in the gateway).

    Raises:
        InvalidArgumentError: An unknown field, one that does not apply to `kind`, or a value
            out of range; the message names the field, what was expected and what came.
    """
    given = {k: v for k, v in values.items() if v is not None}
    mine = kind_fields(kind)
    for name in sorted(given):
        if name not in FIELDS:
            raise InvalidArgumentError(
                f"{where}{name}: unknown decoding parameter; expected some of {list(FIELDS)}",
                param=where + name,
            )
        if name not in COMMON_FIELDS and name not in mine:
            raise InvalidArgumentError(
                f"{where}{name}: does not apply to {kind} decoding (got {given[name]!r}); {kind} takes "
                f"{sorted(mine | COMMON_FIELDS)}",
                param=where + name,
            )
    bounds: dict[str, tuple[float, float]] = {
        "steps": (1, limits.max_steps),
        "guidance_scale": (0.0, limits.max_guidance_scale),
        "seed": (0, 2**63 - 1),
        "height": (limits.min_side, limits.max_side),
        "width": (limits.min_side, limits.max_side),
        "duration_s": (limits.min_duration_s, limits.max_duration_s),
        "num_frames": (1, limits.max_frames),
        "fps": (1, limits.max_fps),
    }
    for name, value in given.items():
        low, high = bounds[name]
        check_range(where + name, value, low, high)
        if name in ("height", "width") and value % SIZE_MULTIPLE:
            raise InvalidArgumentError(
                f"{where}{name}: expected a multiple of {SIZE_MULTIPLE}, got {value}", param=where + name
            )
