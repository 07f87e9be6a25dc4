"""What trains, chosen in one place: LoRA injection on the LM (`add_lora`, full target paths by
`lora_target_names`) and the freezing and learning rate of every parameter (`select_trainable`,
by name patterns, after LoRA injection); the result is checked to be non-empty.

Serving's LoRA (loading a bundle's adapter, several versions at once) is
`services.models.lm.lora`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from services.common.presets import LoraSpec

logger = logging.getLogger(__name__)


def lora_target_names(lm: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the LM's Linear modules whose last name component is in `suffixes`.

    Full paths (not bare suffixes) so that PEFT can never match a module elsewhere.

    Raises:
        ValueError: A suffix matches no Linear module of the LM.
    """
    names = [
        n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes
    ]
    found = {n.rsplit(".", 1)[-1] for n in names}
    missing = sorted(set(suffixes) - found)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {missing} match no Linear module of the LLM; it has {linear}")
    return names


def add_lora(lm: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap the LM with a fresh PEFT LoRA adapter ("default") on the spec's targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_names(lm, spec.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters matching any of `patterns` (fnmatch on full names) train at `lr`."""

    name: str
    patterns: tuple[str, ...]
    lr: float


def select_trainable(
    model: nn.Module, groups: Sequence[ParamGroup], *, weight_decay: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Freeze everything, then unfreeze the parameters each group's patterns select.

    Returns:
        Optimizer parameter groups, and per group the number of parameters (elements).

    Raises:
        ValueError: A group selects nothing (the NExT-GPT stage-3 bug: training nothing), or a
            parameter is selected by two groups.
    """
    model.requires_grad_(False)
    chosen: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for group in groups:
        params = []
        for name, p in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in group.patterns):
                if name in chosen:
                    raise ValueError(
                        f"parameter {name} is selected by groups {chosen[name]} and {group.name}"
                    )
                chosen[name] = group.name
                p.requires_grad_(True)
                params.append(p)
        if not params:
            raise ValueError(
                f"trainable group {group.name!r}: patterns {list(group.patterns)} select no parameter"
            )
        counts[group.name] = sum(p.numel() for p in params)
        out.append({"params": params, "lr": group.lr, "weight_decay": weight_decay, "name": group.name})
    logger.info(
        "trainable: %s of %s parameters (%s)",
        sum(counts.values()),
        sum(p.numel() for p in model.parameters()),
        ", ".join(f"{k}={v}" for k, v in counts.items()),
    )
    return out, counts
