"""The generator of the built-in tiny presets: small random-weight models written deterministically.

For `tiny` and every seed system's tiny twin (`tiny-pandagpt`, `tiny-videochat`, ...) it
writes, under the paths the preset names: each encoder backbone (CLIP vision tower, EVA-ViT,
ImageBind towers; `services.models.backbones.tiny`), each connector's frozen base weights and
text tokenizer where it has them (Q-Formers; `services.models.lm.tiny`), each output modality's
diffusers decoder (`services.models.decoders.tiny`), the LLM (a Llama
or a Phi-3) with a byte-level BPE tokenizer trained here with `tokenizers` on a generated
corpus, holding the preset's placeholders and added tokens, and an initial adapter bundle
holding the connectors and heads (timestamp heads, output projectors). The sizes come from the preset (`encoder.config`, `connector.qformer`),
so a twin is built by the same builders as its real preset. Everything comes from fixed seeds,
so two runs write the same bytes; serving loads these folders through the same code that
loads real checkpoints.
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
GENERATOR_VERSION = "6"  # 2: initializer_range 0.1; 3: every modality, phi3, twins; 4: decoders; 5: signal replies; 6: thermal
VERSION_FILE = ".generator-version"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Phi-3's chat markers (its template's role and end-of-turn strings are single tokens there).
PHI3_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Tiny sizes (CONVENTIONS: 2-4 layers, width 32-128, images 28-64 px). The LLM's are here; each
# part's writer keeps its own defaults (the CLIP tower's: `services.models.backbones.tiny.VISION`),
# so the writers are leaves and this module only composes them.
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
    """A byte-level BPE tokenizer trained on the generated corpus, with Llama-style specials.

    `placeholders` (media placeholders, added tokens, chat markers) become single special tokens.
    """
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


def _write_llm(path: Path, preset: Preset) -> int:
    from services.models.lm.tiny import write_tiny_lm

    phi3 = preset.llm.architecture == "phi3"
    tokens = _llm_tokens(preset) + [t for t in PHI3_TOKENS if phi3 and t not in _llm_tokens(preset)]
    dim = write_tiny_lm(
        path,
        build_tokenizer(tokens),
        architecture=preset.llm.architecture,
        sizes=LLM | preset.llm.config,
        max_context=preset.llm.max_context_tokens,
        seed=SEED + 1,
        eos_tokens=["<|end|>"] if phi3 else [],
    )
    if preset.outputs:  # the any-to-any twin answers draw/play/show with signal tokens
        from services.models.lm.tiny import teach_signal_replies

        loss = teach_signal_replies(path, preset, seed=SEED + 4)
        logger.info("tiny %s: taught the signal replies (final loss %.4f)", preset.name, loss)
    return dim


def _write_adapter(preset: Preset, path: Path, llm_dir: Path, llm_dim: int) -> None:
    from services.models.checkpoints.bundle import base_fingerprint, write_bundle
    from services.models.lm.tiny import initial_connectors, initial_heads

    connectors = initial_connectors(preset, llm_dim, seed=SEED + 2)
    heads = initial_heads(preset, llm_dim, seed=SEED + 3) or None
    write_bundle(
        path,
        name=preset.adapter.name,
        version=path.name,
        preset=preset.name,
        base_fingerprint=base_fingerprint(llm_dir),
        connectors=connectors,
        heads=heads,
        stage="init",
    )


def _write_media_parts(preset: Preset, tmp: Path) -> None:
    """Each distinct backbone checkpoint, connector base and Q-Former tokenizer, written once."""
    from services.models.backbones.tiny import write_tiny_backbone
    from services.models.lm.tiny import write_tiny_connector_base, write_tiny_qformer_tokenizer

    done: set[Path] = set()
    for i, (modality, spec) in enumerate(preset.modalities.items()):
        enc, conn = spec.encoder, spec.connector
        if enc.checkpoint not in done:
            done.add(enc.checkpoint)
            users = [m for m, s in preset.modalities.items() if s.encoder.checkpoint == enc.checkpoint]
            write_tiny_backbone(enc, tmp / f"enc-{i}", seed=SEED + 10 * i, modalities=users)
            _publish(tmp / f"enc-{i}", enc.checkpoint)
        if conn.tokenizer is not None and conn.tokenizer not in done:
            done.add(conn.tokenizer)
            assert conn.qformer is not None  # the schema requires it with a tokenizer
            write_tiny_qformer_tokenizer(tmp / f"tok-{i}", conn.qformer.vocab_size)
            _publish(tmp / f"tok-{i}", conn.tokenizer)
        if conn.base is not None and conn.base not in done:
            done.add(conn.base)
            (tmp / f"base-{i}").mkdir()
            write_tiny_connector_base(conn, enc, tmp / f"base-{i}" / conn.base.name, seed=SEED + 20 + i)
            conn.base.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f"base-{i}" / conn.base.name, conn.base)
        logger.debug("tiny %s: %s parts written", preset.name, modality)


def _write_decoders(preset: Preset, tmp: Path) -> None:
    """Each output modality's tiny diffusers pipeline (`services.models.decoders.tiny`)."""
    from services.models.decoders.tiny import TINY_CONDITIONING, write_tiny_decoder

    for i, (modality, out) in enumerate(preset.outputs.items()):
        if tuple(out.conditioning) != TINY_CONDITIONING[modality]:
            raise InvalidArgumentError(
                f"preset {preset.name}: outputs.{modality}.conditioning expected the tiny decoder's "
                f"{TINY_CONDITIONING[modality]}, got {tuple(out.conditioning)}"
            )
        write_tiny_decoder(modality, tmp / f"dec-{i}", seed=SEED + 30 + i)
        _publish(tmp / f"dec-{i}", out.decoder.checkpoint)


def _targets(preset: Preset) -> list[Path]:
    out = [preset.llm.checkpoint, preset.adapter.path]
    for spec in preset.modalities.values():
        out += [spec.encoder.checkpoint, *(p for p in (spec.connector.base, spec.connector.tokenizer) if p)]
    out += [o.decoder.checkpoint for o in preset.outputs.values()]
    return out


def _llm_tokens(preset: Preset) -> list[str]:
    """The single tokens the tiny tokenizer must hold: placeholders, then added tokens."""
    tokens = [m.placeholder for m in preset.modalities.values()] + list(preset.llm.added_tokens)
    return list(dict.fromkeys(tokens))


def is_generated(preset: Preset) -> bool:
    """Whether every folder the preset names exists (complete: written by rename) and was
    written by this version of the generator."""
    marker = preset.llm.checkpoint.parent / VERSION_FILE
    current = marker.is_file() and marker.read_text().strip() == GENERATOR_VERSION
    return current and all(p.exists() for p in _targets(preset))


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
        with tempfile.TemporaryDirectory(dir=anchor, prefix=".tmp-") as tmp_root:
            tmp = Path(tmp_root)
            _write_media_parts(preset, tmp)
            _write_decoders(preset, tmp)
            llm_dim = _write_llm(tmp / "llm", preset)
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
