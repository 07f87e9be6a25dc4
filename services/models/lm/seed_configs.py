"""Seed model configs read as the transformers config they extend, and what the seed adds at load.

Two seeds save their own `model_type` into `config.json`, which transformers does not know
(`AutoConfig` refuses the folder):

- EventGPT: `EventChat_llama` (EventGPT model/EventChatModel.py:41-42, registered at :429-430), a
  `LlamaConfig` plus `mm_visual_tower`, `event_feature_adaptor` (:101-104) and the tokenizer flags
  `mm_use_im_start_end` / `mm_use_im_patch_token`. Its inference (inference.py:33-39) adds
  `<ev_patch>` as a special token when `mm_use_im_patch_token` (default **True**), `<ev_start>` and
  `<ev_end>` when `mm_use_im_start_end` (default False), and then always resizes the embeddings to
  the tokenizer's length. The release folder is the preset's LLM folder, so the LLM service does
  the same at every load (`apply_load_tokens`).
- E.T. Chat: `etchat_phi3` (etchat/model/language_model/phi3.py:9-10, :28-29), a `Phi3Config` plus
  the training script's model arguments (etchat/train/train.py:28-44, written by :408),
  `load_base_models` (:409, etchat_trainer.py:191) and `match_token_id` (train.py:457). Its full
  release is imported into a plain Phi-3 folder (`services/models/checkpoints/import_full.py`), with the seed's
  keys dropped (`plain_config`).

Any other `model_type` must be one transformers knows; an unknown one is refused, naming the
file and the known ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPreconditionError, ModalmeshError, NotFoundError

LOAD_TOKENS_SEED = 0  # the rows of tokens a seed adds at load (EventGPT: drawn unseeded at each start)


@dataclass(frozen=True)
class SeedConfig:
    """A seed's config class over a transformers one.

    Attributes:
        system: The seed system.
        base: The transformers `model_type` it extends.
        architecture: The transformers class its LM part is.
        seed_keys: Keys the seed adds to the base config (dropped from a plain folder's config).
        load_tokens: (config flag, its default, tokens): special tokens the seed's inference adds
            to the tokenizer when the flag is set.
        resize_to_tokenizer: The seed resizes the embeddings to the tokenizer's length at load.
        source: Where the seed defines it.
    """

    system: str
    base: str
    architecture: str
    seed_keys: tuple[str, ...] = ()
    load_tokens: tuple[tuple[str, bool, tuple[str, ...]], ...] = ()
    resize_to_tokenizer: bool = False
    source: str = ""


# EventChatModel.py:71-78, 101-104 and inference.py:33-34
_EVENTGPT_KEYS = (
    "mm_visual_tower", "event_feature_adaptor", "use_event_qformer", "mm_use_im_start_end", "mm_use_im_patch_token",
)  # fmt: skip
# etchat/train/train.py:28-44 (ModelArguments, written into the config at :408), :409 and :457
_ETCHAT_KEYS = (
    "model_name_or_path", "language_model", "conv_type", "vision_tower", "vision_processor", "vision_output_layer",
    "vision_output_token", "mm_projector", "pretrain_vision_tower", "pretrain_qformer", "pretrain_projector",
    "use_matching", "use_time_tag", "bi_attention", "alpha", "load_base_models", "match_token_id",
)  # fmt: skip
SEED_CONFIGS: dict[str, SeedConfig] = {
    "EventChat_llama": SeedConfig(
        system="eventgpt",
        base="llama",
        architecture="LlamaForCausalLM",
        seed_keys=_EVENTGPT_KEYS,
        load_tokens=(
            ("mm_use_im_patch_token", True, ("<ev_patch>",)),
            ("mm_use_im_start_end", False, ("<ev_start>", "<ev_end>")),
        ),
        resize_to_tokenizer=True,
        source="EventGPT model/EventChatModel.py:41-42, inference.py:33-39",
    ),
    "etchat_phi3": SeedConfig(
        system="etchat",
        base="phi3",
        architecture="Phi3ForCausalLM",
        seed_keys=_ETCHAT_KEYS,
        source="etchat/model/language_model/phi3.py:9-10, etchat/train/train.py:28-44, 408-409, 457",
    ),
}


@dataclass(frozen=True)
class LLMConfig:
    """A model folder's config.json: as written, its seed (if any), and the transformers config.

    Attributes:
        path: The config.json read.
        raw: Its contents as written.
        seed: The seed's config class, for a seed `model_type`; else None.
        config: The transformers config (the base one for a seed's).
    """

    path: Path
    raw: dict[str, Any]
    seed: SeedConfig | None
    config: Any


def known_model_types() -> list[str]:
    """The seed `model_type`s mapped here (transformers' own are accepted too)."""
    return sorted(SEED_CONFIGS)


def plain_config(raw: dict[str, Any], seed: SeedConfig | None) -> dict[str, Any]:
    """config.json of the base transformers model: the seed's model_type and architectures
    replaced, its own keys and `auto_map` (remote code the folder does not hold; Phi-3-mini's
    config names its own) dropped; every other value (sizes, rope, dtype, ids) as written."""
    if seed is None:
        return dict(raw)
    out = {k: v for k, v in raw.items() if k not in seed.seed_keys and k != "auto_map"}
    out["model_type"] = seed.base
    out["architectures"] = [seed.architecture]
    return out


def read_llm_config(folder: Path, *, error: type[ModalmeshError] = FailedPreconditionError) -> LLMConfig:
    """Read `folder/config.json`, mapping a seed's `model_type` to the transformers one it extends.

    Args:
        folder: A Hugging Face model folder.
        error: The error raised for a config that does not parse or names an unknown model_type
            (the LLM service: FailedPreconditionError; the importers: InvalidArgumentError).

    Raises:
        NotFoundError: No config.json.
        error: It does not parse, has no model_type, or names one neither transformers nor
            SEED_CONFIGS knows.
    """
    from transformers import CONFIG_MAPPING

    path = folder / "config.json"
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file (expected a Hugging Face model folder's config)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: expected JSON, got a file that does not parse: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise error(f"{path}: model_type: expected a string, got {got!r}")
    model_type = raw["model_type"]
    seed = SEED_CONFIGS.get(model_type)
    plain = plain_config(raw, seed)
    if plain["model_type"] not in CONFIG_MAPPING:
        raise error(
            f"{path}: model_type: expected one transformers knows (the presets serve llama and phi3) or a "
            f"seed's ({', '.join(known_model_types())}), got {model_type!r}"
        )
    # the seed's own keys stay readable on the config (EventGPT's tokenizer flags)
    config = CONFIG_MAPPING[plain["model_type"]].from_dict({**raw, **plain})
    return LLMConfig(path=path, raw=raw, seed=seed, config=config)


def apply_load_tokens(llm: LLMConfig, tokenizer: Any, lm: Any) -> list[tuple[str, int]]:
    """Do what the seed's inference does to the tokenizer and embeddings at load.

    EventGPT (inference.py:33-39): `<ev_patch>` when `mm_use_im_patch_token` (default True),
    `<ev_start>`, `<ev_end>` when `mm_use_im_start_end` (default False), each added as a special
    token unless the tokenizer holds it; then the embeddings are resized to the tokenizer's
    length (grown or cut). Rows of grown ids are drawn from N(0, initializer_range), as the
    seed's resize initialises them, with a fixed seed (`LOAD_TOKENS_SEED`) where the seed's draw
    differs at every start.

    Returns:
        (token, id) of each token added to the tokenizer.
    """
    seed = llm.seed
    if seed is None:
        return []
    added: list[tuple[str, int]] = []
    for flag, default, tokens in seed.load_tokens:
        if not llm.raw.get(flag, default):
            continue
        vocab = tokenizer.get_vocab()
        new = [t for t in tokens if t not in vocab]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
            added += [(t, int(tokenizer.convert_tokens_to_ids(t))) for t in new]
    rows = int(lm.get_input_embeddings().weight.shape[0])
    if seed.resize_to_tokenizer and len(tokenizer) != rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if len(tokenizer) > rows:
            _normal_rows(lm, rows, len(tokenizer))
    return added


def _normal_rows(lm: Any, start: int, stop: int) -> None:
    """Rows start..stop-1 of the input and output embeddings from N(0, initializer_range)."""
    generator = torch.Generator().manual_seed(LOAD_TOKENS_SEED)
    std = float(getattr(lm.config, "initializer_range", 0.02))
    matrices = [lm.get_input_embeddings().weight]
    output = lm.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            rows = torch.randn((stop - start, weight.shape[1]), generator=generator) * std
            weight[start:stop] = rows.to(weight.dtype)


__all__ = [
    "SEED_CONFIGS",
    "LLMConfig",
    "SeedConfig",
    "apply_load_tokens",
    "known_model_types",
    "plain_config",
    "read_llm_config",
]
