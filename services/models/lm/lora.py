"""LoRA at serving time: checking a bundle's PEFT folder against the LM, and PEFT multi-adapter.

Several bundle versions may carry LoRA at once. They all live on the SAME LM object through
PEFT's multi-adapter support: the first one wraps the LM with `PeftModel.from_pretrained`
(which injects LoRA layers into the LM's own modules in place, so `MultimodalLM.lm` keeps
working unchanged), later ones are added with `load_adapter`, and a request selects its
version's adapter with `set_adapter`, or disables the adapter layers for a version without
LoRA. `check_lora` runs first, on a background thread, against a snapshot of the LM's linear
layers taken before any injection, so that a bundle that would fail half-way inside PEFT is
refused before the model is touched.

`LoraHost` mutates the model: call it only on the engine's worker thread (the one that runs
the decode loop), never concurrently with a forward pass.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from services.common.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def linear_shapes(lm: nn.Module) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear of the LM, by module path."""
    return {
        name: (m.in_features, m.out_features) for name, m in lm.named_modules() if isinstance(m, nn.Linear)
    }


def peft_adapter_name(ref: str) -> str:
    """A PEFT adapter name for "name@version" (module-dict keys allow no '.' or '@')."""
    return "v_" + re.sub(r"[^A-Za-z0-9_]", "_", ref)


def _targets_found(targets: Any, linears: Mapping[str, tuple[int, int]]) -> list[str]:
    """The configured targets that match no linear layer of the LM."""
    if targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in linears) else [targets]
    if not isinstance(targets, list) or not targets:
        return [repr(targets)]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in linears)]


def check_lora(lora_dir: Path, linears: Mapping[str, tuple[int, int]]) -> int:
    """Verify a PEFT LoRA folder against the LM's linear layers; returns the number of tensors.

    Checks: LoRA type, target modules exist, no `modules_to_save` or DoRA (not servable
    here), every tensor is a lora_A/lora_B weight of an existing linear layer with fitting
    shapes (A: (r, in), B: (out, r)).

    Raises:
        FailedPreconditionError: Naming the file and what does not fit.
    """
    where = f"adapter bundle {lora_dir.parent}: lora"
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise FailedPreconditionError(
            f"{where}: modules_to_save {config['modules_to_save']} cannot be served"
        )
    if config.get("use_dora"):
        raise FailedPreconditionError(f"{where}: DoRA adapters cannot be served")
    missing = _targets_found(config.get("target_modules"), linears)
    if missing:
        raise FailedPreconditionError(
            f"{where}: target_modules {missing} match no linear layer of the LM "
            "(save the LoRA relative to the causal LM, e.g. 'q_proj')"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(lora_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            shapes[key] = tuple(f.get_slice(key).get_shape())
    for key, shape in shapes.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if not key.startswith(_PREFIX) or match is None:
            raise FailedPreconditionError(f"{where}: unsupported tensor {key!r} (only lora_A/lora_B weights)")
        module = match["module"]
        if module not in linears:
            raise FailedPreconditionError(f"{where}: {key}: the LM has no linear layer {module!r}")
        in_f, out_f = linears[module]
        other = shapes.get(
            key.replace(".lora_A.", ".lora_B.")
            if match["part"] == "A"
            else key.replace(".lora_B.", ".lora_A.")
        )
        if other is None:
            raise FailedPreconditionError(
                f"{where}: {key} has no matching lora_{'B' if match['part'] == 'A' else 'A'}"
            )
        rank = shape[0] if match["part"] == "A" else shape[1]
        expected = (rank, in_f) if match["part"] == "A" else (out_f, rank)
        if len(shape) != 2 or shape != expected:
            raise FailedPreconditionError(f"{where}: {key}: expected shape {expected}, got {shape}")
    if not shapes:
        raise FailedPreconditionError(f"{where}: adapter_model.safetensors holds no tensors")
    return len(shapes)


class LoraHost:
    """PEFT multi-adapter LoRA on one LM object. Worker thread only (see the module docstring).

    Args:
        lm: The causal LM that `MultimodalLM.lm` holds; PEFT injects into it in place.
    """

    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm
        self.peft: Any = None  # peft.PeftModel once the first LoRA version arrives
        self._selected: str | None = None
        self._dirty = True

    @property
    def adapters(self) -> list[str]:
        """PEFT adapter names loaded."""
        return [] if self.peft is None else list(self.peft.peft_config)

    def add(self, adapter_name: str, lora_dir: Path) -> None:
        """Inject a checked LoRA folder as `adapter_name` (inactive until `select`).

        Raises:
            FailedPreconditionError: PEFT refused it (any partial injection is removed).
        """
        from peft import PeftModel

        self._dirty = True
        kwargs: dict[str, Any] = {
            "adapter_name": adapter_name,
            "is_trainable": False,
            "autocast_adapter_dtype": False,
        }
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", category=FutureWarning
                )  # transformers deprecations PEFT trips
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.lm, str(lora_dir), **kwargs)
                else:
                    self.peft.load_adapter(str(lora_dir), **kwargs)
        except Exception as e:
            if adapter_name in self.adapters:
                self.remove(adapter_name)
            raise FailedPreconditionError(f"adapter bundle {lora_dir.parent}: PEFT refused lora/: {e}") from e

    def remove(self, adapter_name: str) -> None:
        """Delete an adapter's LoRA weights from the LM."""
        if adapter_name in self.adapters:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")  # re-selected
                self.peft.delete_adapter(adapter_name)
        self._dirty = True

    def select(self, adapter_name: str | None) -> None:
        """Make `adapter_name` the active LoRA, or run the bare LM (None)."""
        if self.peft is None or (not self._dirty and adapter_name == self._selected):
            return
        with torch.inference_mode(False), torch.no_grad():
            tuner = self.peft.base_model
            if adapter_name is None:
                if self.adapters:  # with none left, the LoRA layers already pass through
                    tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                self.peft.set_adapter(adapter_name, inference_mode=True)
        self._selected, self._dirty = adapter_name, False
