"""Export a trained model as an adapter bundle (ARCHITECTURE section 5).

Every rank calls `export_bundle` (under ZeRO-3 the trainable parameters are partitioned and
must be gathered collectively); rank 0 writes: the connectors to `connectors.safetensors`
(keyed by connector name, without their frozen base from `connector.base`), the timestamp
heads and the output projectors to `heads.safetensors` (trained here, or carried over from the
start bundle), the LoRA
adapter (if any) in PEFT format under `lora/`, then the manifest with every file's sha256.
The bundle's version is stamped when it is published.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.common.presets import Preset
from services.models.checkpoints.bundle import Bundle, base_fingerprint, write_bundle
from services.models.lm.output_projector import bundle_heads
from services.models.lm.timestamps import HEAD_NAME
from services.models.lm.training import TrainingModel
from services.trainer.build import connector_states
from services.trainer.runconfig import RunConfig

logger = logging.getLogger(__name__)

UNPUBLISHED = "unpublished"


def _gathered(model: TrainingModel, zero3: bool) -> contextlib.AbstractContextManager[Any]:
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    # The trained parameters, and the connectors even when frozen (stage 2 carries them over):
    # under ZeRO-3 every parameter is partitioned, frozen ones included.
    params = [p for n, p in model.named_parameters() if p.requires_grad or n.startswith("connectors.")]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def export_bundle(
    cfg: RunConfig,
    model: TrainingModel,
    *,
    preset: Preset,
    metrics: dict[str, float],
    start: Bundle | None = None,
) -> Path | None:
    """Write the bundle to `cfg.bundle_dir` (rank 0); returns its path on rank 0, else None.

    Args:
        start: The bundle the job started from: heads this stage did not train (stage 1 of
            E.T. Chat) are carried over from it, and so is its LoRA when this stage applied
            it frozen (stage 2).
    """
    zero3 = cfg.spec.deepspeed.zero_stage == 3
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = cfg.bundle_dir
    with _gathered(model, zero3):
        if rank == 0:
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            connectors = connector_states(dict(model.connectors.items()))
            heads = _heads(model, start)
            lm: Any = model.lm
            carried_lora = None
            if hasattr(lm, "peft_config"):
                lora = {n: p for n, p in lm.named_parameters() if "lora_" in n}
                if any(p.requires_grad for p in lora.values()) or start is None or start.lora_dir is None:
                    lora_state = {n: p.detach().float().cpu().clone() for n, p in lora.items()}
                    lm.save_pretrained(str(out / "lora"), state_dict=lora_state)
                else:  # applied frozen (stage 2): the start bundle's adapter, byte for byte
                    carried_lora = start.lora_dir
            write_bundle(
                out,
                name=cfg.adapter_name,
                version=UNPUBLISHED,
                preset=preset.name,
                base_fingerprint=base_fingerprint(preset.llm.checkpoint),
                connectors=connectors,
                heads=heads,
                lora_dir=carried_lora,
                stage=cfg.spec.stage,
                metrics={k: float(v) for k, v in metrics.items()},
            )
            logger.info("exported bundle to %s", out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def _heads(model: TrainingModel, start: Bundle | None) -> dict[str, dict[str, torch.Tensor]] | None:
    """The start bundle's heads, with the ones this model trains (timestamp heads, output
    projectors) replaced by their trained values."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if start is not None:
        for key, value in start.heads.items():
            head, _, param = key.partition(".")
            heads.setdefault(head, {})[param] = value
    if model.heads is not None:
        heads[HEAD_NAME] = {k: v.detach().float().cpu().clone() for k, v in model.heads.state_dict().items()}
    if model.outputs is not None:
        projectors = dict(model.outputs.projectors.items())
        trained = bundle_heads(projectors, model.outputs.head_names)  # type: ignore[arg-type]
        heads |= {h: {k: v.float().cpu().clone() for k, v in sd.items()} for h, sd in trained.items()}
    return heads or None
