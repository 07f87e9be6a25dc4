"""The `tiny` preset's generator: small random-weight models written deterministically.

It writes, under the paths the preset names, a CLIP-style vision tower (transformers
`CLIPVisionModel` + `preprocessor_config.json`), a Llama (`LlamaForCausalLM`) with a byte-level
BPE tokenizer trained here with `tokenizers` on a generated corpus, and an initial adapter
bundle holding the connector. Everything comes from fixed seeds, so two runs write the same
bytes; serving loads these folders through the same code that loads real checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset

logger = logging.getLogger(__name__)

SEED = 1234
# Bumped whenever the generator writes different models; a cache written by another version
# is regenerated (adapters trained on the old base then no longer match its fingerprint).
GENERATOR_VERSION = "2"  # 2: LLM initializer_range 0.1
VERSION_FILE = ".generator-version"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Tiny sizes (CONVENTIONS: 2-4 layers, width 32-128, images 28-64 px).
VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
LLM: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # Wider than transformers' 0.02 default: with a frozen random head of std 0.02 behind a
    # frozen RMSNorm, logits cannot exceed ~1.3 whatever LoRA and the connector learn, so the
    # demo's fine-tuning could not fit its answers. Trained LLMs have heads of this scale.
    "initializer_range": 0.1,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORD_LIST = (
    "a an the this that is are was be of in on at to with and or not what which where how many "
    "image picture photo color colour shape red green blue yellow black white orange purple gray "
    "square circle triangle stripe dot line left right top bottom center corner small large big "
    "one two three four five six seven eight nine ten cat dog car tree house sky sun water "
    "describe tell me about see there it has show looks like answer question yes no please "
    "chat between curious user artificial intelligence assistant gives helpful detailed polite "
    "answers questions USER ASSISTANT"
)
_WORDS = _WORD_LIST.split()


def _corpus(rng: random.Random, n: int = 3000) -> Iterator[str]:
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        yield f"{system} USER: {words}? ASSISTANT: {words.capitalize()}." if i % 10 == 0 else words
    yield "0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`\n\t"


def build_tokenizer(placeholders: list[str]):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on the generated corpus, with Llama-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + placeholders,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(SEED)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=placeholders,
    )


def _write_vision(path: Path, spec_tokens: int, spec_dim: int, select_feature: str) -> None:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    tokens = patches + (1 if select_feature == "cls_patch" else 0)
    if (spec_tokens, spec_dim) != (tokens, VISION["hidden_size"]):
        raise InvalidArgumentError(
            f"tiny vision tower: preset expects {spec_tokens} tokens of width {spec_dim}, the "
            f"generator makes {tokens} of width {VISION['hidden_size']}"
        )
    torch.manual_seed(SEED)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(path)
    size = VISION["image_size"]
    CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        do_convert_rgb=True,
    ).save_pretrained(path)


def _write_llm(path: Path, placeholders: list[str], max_context: int) -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(placeholders)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **(LLM | {"max_position_embeddings": max(max_context, 64)}),
    )
    torch.manual_seed(SEED + 1)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return config.hidden_size


def _write_adapter(preset: Preset, path: Path, llm_dir: Path, llm_dim: int) -> None:
    import torch

    from services.llm.adapters import base_fingerprint, write_bundle
    from services.llm.connectors import build_connector

    torch.manual_seed(SEED + 2)
    connectors: dict[str, dict[str, torch.Tensor]] = {
        modality: build_connector(spec.connector.type, in_dim=spec.encoder.dim, out_dim=llm_dim).state_dict()
        for modality, spec in preset.modalities.items()
    }
    write_bundle(
        path,
        name=preset.adapter.name,
        version=path.name,
        preset=preset.name,
        base_fingerprint=base_fingerprint(llm_dir),
        connectors=connectors,
        stage="init",
    )


def _targets(preset: Preset) -> list[Path]:
    return [
        preset.llm.checkpoint,
        preset.adapter.path,
        *(m.encoder.checkpoint for m in preset.modalities.values()),
    ]


def is_generated(preset: Preset) -> bool:
    """Whether every folder the preset names exists (complete: written by rename) and was
    written by this version of the generator."""
    marker = preset.llm.checkpoint.parent / VERSION_FILE
    current = marker.is_file() and marker.read_text().strip() == GENERATOR_VERSION
    return current and all(p.is_dir() for p in _targets(preset))


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".generate.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def generate(preset: Preset, *, force: bool = False) -> bool:
    """Write the preset's tiny checkpoints if missing; returns True if anything was written.

    Safe to call from several processes at once: a file lock serialises them, and each folder
    appears only when complete (written aside, then renamed into place).
    """
    if preset.generate != "tiny":
        raise InvalidArgumentError(f"preset {preset.name}: has no generator (generate: {preset.generate})")
    if not force and is_generated(preset):
        return False
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    anchor = preset.llm.checkpoint.parent
    with _lock(anchor):
        if not force and is_generated(preset):
            return False
        logger.info("generating tiny preset %s under %s", preset.name, anchor)
        placeholders = [m.placeholder for m in preset.modalities.values()]
        with tempfile.TemporaryDirectory(dir=anchor, prefix=".tmp-") as tmp_root:
            tmp = Path(tmp_root)
            for modality, spec in preset.modalities.items():
                enc = spec.encoder
                _write_vision(tmp / modality, enc.tokens, enc.dim, enc.select_feature)
                _publish(tmp / modality, enc.checkpoint)
            llm_dim = _write_llm(tmp / "llm", placeholders, preset.llm.max_context_tokens)
            _publish(tmp / "llm", preset.llm.checkpoint)
            _write_adapter(preset, tmp / "adapter" / preset.adapter.path.name, preset.llm.checkpoint, llm_dim)
            _publish(tmp / "adapter" / preset.adapter.path.name, preset.adapter.path)
        (anchor / VERSION_FILE).write_text(GENERATOR_VERSION + "\n")
    return True


def ensure_generated(preset: Preset) -> bool:
    """Generate a built-in preset's checkpoints on first use; True if it wrote them.

    A no-op (False) for presets with real checkpoints and for ones already generated.
    """
    return preset.generate is not None and generate(preset)
