"""Shared by scripts/parity/<seed>_prompt.py: small tokenizers built here, seed code loading, fixtures.

The prompt parity scripts run a seed's own prompt-building code (its demo or inference
functions, imported or read from its files) in the scratch environment of the seed's
transformers version, on a two-turn conversation with media, with a small tokenizer built
here: a SentencePiece BPE model (Llama's settings: byte fallback, split digits, dummy prefix,
no whitespace normalisation; 600 pieces) trained on generated text, saved as the seed's
tokenizer folder (slow, and a fast one converted from it), or as a Phi-3-style folder (that
model plus Phi-3's added special tokens and tokenizer_config). Where a seed builds embeddings
rather than ids, its embedding table is replaced by one that returns each id as its value, and
each media item's features by a marker -(2**k) (k: the item's index), so the seed's own
concatenation gives back the ids and, per media position, which items were summed there.

Nothing of the seed is written to the fixtures but the ids its code produced (and the
tokenizer files built here); the fixture JSON records the command, the seed commit and the
package versions.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "parity"
CORPUS_SEED = 0
VOCAB_SIZE = 600
FRAME_SCALE = 100_000.0  # E.T. Chat: frame f of a video embeds as (f + 1) * FRAME_SCALE

_WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "were",
    "what",
    "where",
    "when",
    "who",
    "how",
    "why",
    "this",
    "that",
    "these",
    "those",
    "image",
    "video",
    "audio",
    "sound",
    "picture",
    "frame",
    "frames",
    "seconds",
    "second",
    "sampled",
    "contains",
    "describe",
    "detail",
    "details",
    "tell",
    "me",
    "about",
    "please",
    "cat",
    "dog",
    "man",
    "woman",
    "person",
    "people",
    "playing",
    "running",
    "walking",
    "sitting",
    "standing",
    "park",
    "street",
    "room",
    "table",
    "car",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "big",
    "little",
    "some",
    "many",
    "there",
    "here",
    "it",
    "its",
    "in",
    "on",
    "at",
    "of",
    "with",
    "and",
    "or",
    "to",
    "from",
    "for",
    "by",
    "up",
    "down",
    "left",
    "right",
    "front",
    "back",
    "first",
    "then",
    "after",
    "before",
    "while",
    "during",
    "show",
    "generate",
    "human",
    "assistant",
    "user",
    "system",
    "chat",
    "helpful",
    "answer",
    "question",
    "questions",
    "curious",
    "artificial",
    "intelligence",
    "polite",
    "gives",
    "detailed",
    "you",
    "are",
    "can",
    "could",
    "would",
    "should",
    "do",
    "does",
    "did",
    "not",
    "no",
    "yes",
    "more",
    "less",
    "most",
    "happens",
    "happen",
    "scene",
    "event",
    "events",
    "motion",
    "moving",
    "color",
    "colour",
    "best",
    "option",
    "time",
    "start",
    "end",
    "begins",
    "ends",
    "circle",
    "square",
]


def corpus(lines: int = 4000) -> list[str]:
    """Generated English-like lines with the conversation words and role markers."""
    rng = random.Random(CORPUS_SEED)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        text = " ".join(words) + rng.choice([".", ",", "?", "!", ":", ";"])
        r = rng.random()
        if r < 0.15:
            text = "### Human: " + text
        elif r < 0.3:
            text = "### Assistant: " + text
        elif r < 0.4:
            text = "USER: " + text + " ASSISTANT:"
        elif r < 0.45:
            text = f"{text} {rng.randint(0, 300)}.{rng.randint(0, 9)}"
        out.append(text)
    return out


def spm_model(work: Path) -> bytes:
    """A SentencePiece BPE model with Llama's settings, trained on `corpus()`.

    Scores are shifted by -1 so that no merged piece scores 0 (transformers 4.29's converter
    skips merges whose score is falsy; Llama's own model has none at 0).
    """
    import io

    import sentencepiece as spm
    from transformers.utils import sentencepiece_model_pb2 as pb  # protobuf 3 in the scratch env

    text = work / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    del proto.trainer_spec.input[:]  # a temporary path: keep the file the same from run to run
    proto.trainer_spec.input.append("corpus.txt")
    for piece in proto.pieces:
        if piece.type == pb.ModelProto.SentencePiece.NORMAL:
            piece.score -= 1.0
    return proto.SerializeToString()


def _token(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def llama_slow_folder(folder: Path, model: bytes, **config: Any) -> Path:
    """A Vicuna-style slow tokenizer folder (tokenizer.model + configs, as FastChat wrote
    Vicuna-7B v0 with transformers 4.28); `config` entries are added to tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _token("</s>"),
        "model_max_length": 2048,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _token("<unk>"),
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def fast_from_slow(slow: Path, fast: Path) -> Path:
    """The fast tokenizer folder the running transformers converts `slow` into."""
    from transformers import LlamaTokenizerFast

    LlamaTokenizerFast.from_pretrained(str(slow)).save_pretrained(str(fast))
    return fast


# Phi-3-mini-4k-instruct's added tokens (tokenizer_config.json added_tokens_decoder): ids from
# the SentencePiece vocabulary's end, special, not normalized, rstrip except <|endoftext|>.
PHI3_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]


def phi3_folder(folder: Path, model: bytes, work: Path) -> Path:
    """A Phi-3-mini-style tokenizer folder: the SentencePiece model, a legacy Llama
    tokenizer.json (Prepend("▁") + Replace normalizer, as Llama-2's and Phi-3's), Phi-3's added
    special tokens and its tokenizer_config (add_bos_token false, legacy false, eos and pad
    <|endoftext|>). Needs transformers >= 4.40 (the E.T. Chat overlay)."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizerFast

    base = llama_slow_folder(work / "phi3-base", model)
    tok = LlamaTokenizerFast.from_pretrained(str(base), legacy=True, from_slow=True)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=t != "<|endoftext|>")
                for t in PHI3_TOKENS
            ]
        }
    )
    tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("additional_special_tokens", None)
    cfg.update(
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=4096,
        tokenizer_class="LlamaTokenizer",
        use_default_system_prompt=False,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special.pop("additional_special_tokens", None)
    special.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


# -- running the seed's code ----------------------------------------------------------------


def stub(name: str, **attrs: Any) -> types.ModuleType:
    """A module standing for a package the prompt code imports but does not use."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def package(name: str, path: Path) -> types.ModuleType:
    """A namespace for a seed package folder whose __init__ imports too much: its modules load
    one by one, relative imports resolving inside it."""
    module = stub(name)
    module.__path__ = [str(path)]  # type: ignore[attr-defined]
    return module


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import one seed file as module `name` (its package must be in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def seed_functions(path: Path, names: Iterable[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """The seed's top-level functions `names`, read from a file whose import has side effects
    (a demo that loads a model), compiled as written into `namespace`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    wanted = set(names)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    missing = wanted - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"{path}: no function {sorted(missing)}")
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # the seed's own function bodies
    return {n: namespace[n] for n in wanted}


def id_embedding(dtype: Any = None) -> Any:
    """An embedding table returning each id as its value: (B, L) -> (B, L, 1)."""
    import torch

    def embed(ids: Any) -> Any:
        return torch.as_tensor(ids).to(dtype or torch.float64)[..., None]

    return embed


def media_marker(index: int, tokens: int = 1) -> Any:
    """Features of media item `index` as (1, tokens, 1) of -(2**index)."""
    import torch

    return torch.full((1, tokens, 1), -float(2**index), dtype=torch.float64)


def decode(embeds: Any) -> list[int]:
    """(1, L, 1) from `id_embedding` and `media_marker`s -> ids, media positions as their
    negative marker sums."""
    values = embeds.reshape(-1).tolist()
    if any(v != int(v) for v in values):
        raise SystemExit(f"non-integral embedding values: {values}")
    return [int(v) for v in values]


# -- the fixture -----------------------------------------------------------------------------


def seed_commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    try:
        import sentencepiece

        out["sentencepiece"] = sentencepiece.__version__
    except ImportError:
        pass
    return out


def out_dir(seed: str) -> Path:
    folder = FIXTURES / seed
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def write_fixture(seed: str, repo: Path, payload: dict[str, Any], argv: Sequence[str]) -> Path:
    """tests/fixtures/parity/<seed>/prompt.json with the provenance."""
    path = out_dir(seed) / "prompt.json"
    overlay = os.environ.get("PYTHONPATH")
    body = {
        "made_by": " ".join([*([f"PYTHONPATH={overlay}"] if overlay else []), "python", *argv]),
        "seed_commit": seed_commit(repo),
        "versions": versions(),
        "corpus_seed": CORPUS_SEED,
        "vocab_size": VOCAB_SIZE,
        **payload,
    }
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    return path
