"""Loading what a preset names: tokenizer, causal LM, adapter bundle, connectors.

This is the one path for every checkpoint: the tiny preset's generated folders load exactly as
a real Hugging Face Llama/Vicuna folder would. The LM is put in eval mode and frozen here,
and nowhere else. A bundle whose connector weights do not fit the preset is refused, naming
the key and the expected vs. found shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from services.common.errors import FailedPreconditionError
from services.common.presets import Preset
from services.llm.adapters import Bundle, base_fingerprint, load_bundle
from services.llm.connectors import Connector, build_connector
from services.llm.model import MultimodalLM
from services.llm.prompt import ModalitySlots, PromptBuilder, placeholder_token_id

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """Everything the engine serves with.

    Attributes:
        preset: The preset it was loaded from.
        tokenizer: The LLM's tokenizer.
        model: Connectors + LM.
        bundle: The adapter bundle the connectors came from.
        prompt_builder: Builds prompts for this tokenizer and these connectors.
        max_context_tokens: The preset's context size, capped by the LM's positions.
        eos_ids: Token ids that end a generation.
    """

    preset: Preset
    tokenizer: Any
    model: MultimodalLM
    bundle: Bundle
    prompt_builder: PromptBuilder
    max_context_tokens: int
    eos_ids: frozenset[int]


def load_connectors(
    preset: Preset,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    llm_dim: int,
    dtype: torch.dtype,
) -> dict[str, Connector]:
    """Build each modality's connector and load its weights strictly.

    Args:
        preset: Names the connector type and encoder width per modality.
        weights: Per modality, the connector's state dict (from the bundle).
        llm_dim: The LM's hidden size.
        dtype: The dtype to serve the connectors in.

    Raises:
        FailedPreconditionError: A modality has no weights, or a key is missing, unexpected,
            or of the wrong shape.
    """
    connectors: dict[str, Connector] = {}
    for modality, spec in preset.modalities.items():
        connector = build_connector(spec.connector.type, in_dim=spec.encoder.dim, out_dim=llm_dim)
        if modality not in weights:
            raise FailedPreconditionError(
                f"adapter bundle: no connector weights for {modality!r}; it has {sorted(weights)}"
            )
        _check_state_dict(f"{modality} connector", connector.state_dict(), weights[modality])
        connector.load_state_dict(dict(weights[modality]), strict=True)
        connectors[modality] = connector.to(dtype=dtype).eval().requires_grad_(False)
    return connectors


def _check_state_dict(
    what: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(got))
    if missing:
        raise FailedPreconditionError(f"adapter bundle: {what}: missing key {missing[0]!r}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise FailedPreconditionError(f"adapter bundle: {what}: unexpected key {unexpected[0]!r}")
    for key, tensor in expected.items():
        if tuple(got[key].shape) != tuple(tensor.shape):
            raise FailedPreconditionError(
                f"adapter bundle: {what}: {key}: expected shape {tuple(tensor.shape)}, "
                f"got {tuple(got[key].shape)}"
            )


def _eos_ids(lm: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def load_model(preset: Preset) -> LoadedModel:
    """Load the tokenizer, the LM and the preset's adapter bundle, and assemble the model.

    Raises:
        NotFoundError: The adapter bundle does not exist.
        FailedPreconditionError: The bundle is damaged, built for another base model, or its
            connectors do not fit the preset.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = preset.llm.checkpoint
    dtype = DTYPES[preset.llm.dtype]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    lm.eval().requires_grad_(False)
    bundle = load_bundle(preset.adapter.path, expected_fingerprint=base_fingerprint(checkpoint))
    connectors = load_connectors(preset, bundle.connectors, llm_dim=lm.config.hidden_size, dtype=dtype)
    feature_shapes: dict[str, tuple[int, int]] = {
        m: (s.encoder.tokens, s.encoder.dim) for m, s in preset.modalities.items()
    }
    model = MultimodalLM(lm, connectors, feature_shapes).eval()
    max_context = preset.llm.max_context_tokens
    positions = getattr(lm.config, "max_position_embeddings", None)
    if positions is not None and positions < max_context:
        logger.warning(
            "max_context_tokens %s exceeds the LM's %s positions; using %s", max_context, positions, positions
        )
        max_context = positions
    slots: dict[str, ModalitySlots] = {
        m: ModalitySlots(
            placeholder=s.placeholder,
            placeholder_id=placeholder_token_id(tokenizer, s.placeholder),
            max_per_prompt=s.max_per_prompt,
            num_tokens=connectors[m].num_tokens,
        )
        for m, s in preset.modalities.items()
    }
    logger.info("loaded %s: LM %s (%s), adapter %s", preset.name, checkpoint, preset.llm.dtype, bundle.ref)
    return LoadedModel(
        preset=preset,
        tokenizer=tokenizer,
        model=model,
        bundle=bundle,
        prompt_builder=PromptBuilder(tokenizer, slots, max_context_tokens=max_context),
        max_context_tokens=max_context,
        eos_ids=_eos_ids(lm, tokenizer),
    )
