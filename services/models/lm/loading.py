"""Loading what a preset names: tokenizer, causal LM, adapter bundle, connectors.

This is the one path for every checkpoint: the tiny preset's generated folders load exactly as
a real Hugging Face Llama/Vicuna/Phi-3 folder would. The tokenizer loads through
`services.models.lm.tokenizer` (slow-only SentencePiece folders, `llm.dummy_prefix`). The LM is put in eval mode and frozen
here, and nowhere else. A bundle whose connector weights do not fit the preset is refused,
naming the key and the expected vs. found shapes. Connectors are keyed by connector name
(modalities may share one); the Q-Former types load their frozen part from `connector.base`
and the bundle's tensors over it. A preset with `heads.timestamps` also gets its timestamp
heads from the bundle (`load_heads`). A seed's own `model_type` in config.json (EventGPT's
`EventChat_llama`) is read as the transformers config it extends, and the tokens that seed's
inference adds at load are added here too (`seed_configs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from services.common.devices import default_device
from services.common.errors import FailedPreconditionError
from services.common.presets import ConnectorSpec, Preset
from services.models.checkpoints.bundle import Bundle, base_fingerprint, check_state_dict, load_bundle
from services.models.connectors.connector import Connector, cast_connector, connector_from_spec
from services.models.lm.attention import check_attention_implementation
from services.models.lm.model import MultimodalLM, feature_layouts
from services.models.lm.output_projector import OutputProjector, load_projectors
from services.models.lm.seed_configs import apply_load_tokens, read_llm_config
from services.models.lm.time_matching import check_frame_tokens, time_token_id
from services.models.lm.timestamps import (
    HEAD_NAME,
    TimestampHeads,
    init_timestamp_heads,
    load_timestamp_heads,
)
from services.models.lm.tokenizer import load_tokenizer
from services.models.prompt.builder import ModalitySlots, PromptBuilder, placeholder_token_id

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
HEADS_SEED = 0  # the initialisation of timestamp heads a bundle lacks


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
        heads: The bundle's timestamp heads (presets with `heads.timestamps`), else None.
        time_token_id: The id of the heads' time token (`<vid>`), else None.
    """

    preset: Preset
    tokenizer: Any
    model: MultimodalLM
    bundle: Bundle
    prompt_builder: PromptBuilder
    max_context_tokens: int
    eos_ids: frozenset[int]
    heads: TimestampHeads | None = None
    projectors: dict[str, OutputProjector] = field(default_factory=dict)
    time_token_id: int | None = None


def load_connectors(
    preset: Preset,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    llm_dim: int,
    dtype: torch.dtype,
    freeze_base: bool = True,
) -> dict[str, Connector]:
    """Build each connector of the preset and load its weights strictly.

    A connector's state is its frozen base (`connector.base`, the pretrained Q-Former parts)
    overlaid with the bundle's tensors for it; together they must give every parameter of the
    module, each with its shape. Modalities that name the same connector share one module.

    Args:
        preset: Names the connector type, name and encoder per modality.
        weights: Per connector name, the bundle's tensors for it (a name containing "." may
            arrive split at its first ".": keys are matched on the joined name).
        llm_dim: The LM's hidden size.
        dtype: The dtype to serve the connectors in.
        freeze_base: Q-Former types: build with the pretrained part frozen.

    Returns:
        Per connector name, the connector (eval mode, no gradients).

    Raises:
        FailedPreconditionError: The bundle has no tensors for a connector, a key is missing,
            unexpected or of the wrong shape, the base file is missing or does not fit, or
            the bundle holds a connector the preset does not have.
    """
    flat = {f"{name}.{key}": t for name, sd in weights.items() for key, t in sd.items()}
    specs = {name: m for m, name in reversed(preset.connector_names().items())}  # name -> first modality
    unknown = sorted({k for k in flat if not any(k.startswith(f"{n}.") for n in specs)})
    if unknown:
        raise FailedPreconditionError(
            f"adapter bundle: {unknown[0]!r} is no connector of preset {preset.name}; it has {sorted(specs)}"
        )
    connectors: dict[str, Connector] = {}
    for name, modality in sorted(specs.items()):
        spec = preset.modalities[modality]
        connector = connector_from_spec(spec.connector, spec.encoder, llm_dim, freeze_base=freeze_base)
        trained = {k[len(name) + 1 :]: t for k, t in flat.items() if k.startswith(f"{name}.")}
        if not trained:
            raise FailedPreconditionError(
                f"adapter bundle: no connector weights for {name!r}; it has {sorted(weights)}"
            )
        state = {**_base_state(name, spec.connector, connector), **trained}
        check_state_dict(f"{name} connector", connector.state_dict(), state)
        connector.load_state_dict(state, strict=True)
        connectors[name] = cast_connector(connector, spec.connector, dtype).eval().requires_grad_(False)
    return connectors


def load_heads(
    preset: Preset, flat: Mapping[str, torch.Tensor], *, llm_dim: int, dtype: torch.dtype
) -> TimestampHeads | None:
    """The timestamp heads of a preset that has them, from a bundle's flat heads.

    A bundle without them (a tiny twin's initial bundle, a stage-1 or stage-2 bundle) gets
    heads initialised from `HEADS_SEED`, the same at every load: timestamps are then matched
    but mean nothing until stage 3 trains the heads (a warning says so).

    Raises:
        FailedPreconditionError: A heads key is missing, unexpected or of the wrong shape.
    """
    if preset.heads.timestamps is None:
        return None
    if any(k.startswith(f"{HEAD_NAME}.") for k in flat):
        heads = load_timestamp_heads(flat, hidden_size=llm_dim)
    else:
        logger.warning(
            "preset %s has timestamp heads but the adapter bundle holds none: serving an untrained "
            "initialisation (seed %s); its timestamps are meaningless until stage 3 trains them",
            preset.name,
            HEADS_SEED,
        )
        heads = init_timestamp_heads(llm_dim, seed=HEADS_SEED)
    return heads.to(dtype=dtype).eval().requires_grad_(False)


def _base_state(name: str, spec: ConnectorSpec, connector: Connector) -> dict[str, torch.Tensor]:
    """The frozen tensors of `spec.base`, checked to be keys of the connector's base part."""
    if spec.base is None:
        return {}
    if not spec.base.is_file():
        raise FailedPreconditionError(f"{name} connector: its base file {spec.base} does not exist")
    try:
        base = load_file(str(spec.base))
    except (SafetensorError, OSError, ValueError) as e:
        raise FailedPreconditionError(
            f"{name} connector: base {spec.base} is not a valid safetensors file: {e}"
        ) from None
    expected = connector.state_dict()
    for key, tensor in base.items():
        if key not in expected:
            raise FailedPreconditionError(f"{name} connector base {spec.base}: unexpected key {key!r}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise FailedPreconditionError(
                f"{name} connector base {spec.base}: {key}: expected shape {tuple(expected[key].shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    return base


def check_llm_folder(preset: Preset) -> Path:
    """The preset's LM folder, checked to be a Hugging Face model folder (else transformers
    takes the path for a hub repo id and says so instead).

    Raises:
        FailedPreconditionError: Naming the folder and what was found there.
    """
    checkpoint = preset.llm.checkpoint
    if not (checkpoint / "config.json").is_file():
        found = "a folder without config.json" if checkpoint.is_dir() else "no such folder"
        raise FailedPreconditionError(
            f"preset {preset.name}: llm.checkpoint: expected a Hugging Face model folder with config.json, "
            f"weights and tokenizer, got {found} at {checkpoint} (docs/presets.md says what each preset needs)"
        )
    return checkpoint


def check_added_tokens(preset: Preset, tokenizer: Any) -> None:
    """Each of `llm.added_tokens` must be one token of the LLM's tokenizer.

    Raises:
        FailedPreconditionError: Naming the first token that is not, and what it became.
    """
    for token in preset.llm.added_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
            raise FailedPreconditionError(
                f"preset {preset.name}: llm.added_tokens {token!r}: expected one token of the tokenizer of "
                f"{preset.llm.checkpoint}, got {len(ids)} id(s) {ids}; `modalmesh add-tokens <base model folder> "
                f"--preset {preset.name}` writes an LLM folder that holds the preset's tokens"
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


def load_lm(preset: Preset, *, dtype: torch.dtype) -> tuple[Any, Any]:
    """The preset's tokenizer and causal LM, as the seed's inference loads them.

    A seed's own `model_type` in config.json (EventGPT's `EventChat_llama`) is read as the
    transformers config it extends, and the tokens that seed's inference adds at load, with
    the embeddings resized to the tokenizer (EventGPT inference.py:33-39), are added here
    (`seed_configs.apply_load_tokens`); then every `llm.added_tokens` must be one token.
    `llm.sliding_window: none` clears the config's window (E.T. Chat).

    Raises:
        FailedPreconditionError: The folder is missing, its config names an unknown
            model_type, or an added token is not one token.
    """
    from transformers import AutoModelForCausalLM

    checkpoint = check_llm_folder(preset)
    llm_config = read_llm_config(checkpoint)
    if preset.llm.sliding_window == "none":  # E.T. Chat's eager Phi-3 (transformers 4.44) had none
        llm_config.config.sliding_window = None
    tokenizer = load_tokenizer(checkpoint, dummy_prefix=preset.llm.dummy_prefix, config=llm_config.config)
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, config=llm_config.config, dtype=dtype)
    for token, token_id in apply_load_tokens(llm_config, tokenizer, lm):
        logger.info("%s: added %s (id %s) as the seed's inference does", checkpoint, token, token_id)
    check_added_tokens(preset, tokenizer)
    return tokenizer, lm


def load_model(preset: Preset, *, device: str | torch.device | None = None) -> LoadedModel:
    """Load the tokenizer, the LM and the preset's adapter bundle, and assemble the model on
    `device` (default: the first CUDA device when there is one, else the CPU).

    Raises:
        NotFoundError: The adapter bundle does not exist.
        FailedPreconditionError: The LM folder is missing, the bundle is damaged, built for
            another base model, or its connectors do not fit the preset.
    """
    checkpoint = check_llm_folder(preset)
    dtype = DTYPES[preset.llm.dtype]
    tokenizer, lm = load_lm(preset, dtype=dtype)
    lm.eval().requires_grad_(False)
    check_attention_implementation(lm, preset.bidirectional_modalities(), preset=preset.name)
    bundle = load_bundle(preset.adapter.path, expected_fingerprint=base_fingerprint(checkpoint))
    connectors = load_connectors(preset, bundle.connectors, llm_dim=lm.config.hidden_size, dtype=dtype)
    model = MultimodalLM(lm, connectors, feature_layouts(preset)).eval().to(device or default_device())
    ts = preset.heads.timestamps
    if ts is not None:
        check_frame_tokens(preset, model.connector(ts.modality).num_tokens)
    heads = load_heads(preset, bundle.heads, llm_dim=lm.config.hidden_size, dtype=dtype)
    projectors = load_projectors(preset, bundle.heads, llm_dim=lm.config.hidden_size, dtype=dtype)
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
            num_tokens=model.connector(m).num_tokens,
        )
        for m, s in preset.modalities.items()
    }
    logger.info("loaded %s: LM %s (%s), adapter %s", preset.name, checkpoint, preset.llm.dtype, bundle.ref)
    time_id = time_token_id(preset, tokenizer)
    return LoadedModel(
        preset=preset,
        tokenizer=tokenizer,
        model=model,
        bundle=bundle,
        prompt_builder=PromptBuilder(tokenizer, slots, max_context_tokens=max_context, time_token_id=time_id),
        max_context_tokens=max_context,
        eos_ids=_eos_ids(lm, tokenizer),
        heads=None if heads is None else heads.to(model.device),
        time_token_id=time_id,
        projectors={m: p.to(model.device) for m, p in projectors.items()},
    )
