"""Loading an LLM's tokenizer as its seed tokenized: slow SentencePiece folders, the dummy prefix.

Two things the seeds' tokenizers did that transformers 5 does not do by itself:

- **Slow-only folders.** Vicuna-7B v0 (PandaGPT, NExT-GPT, VideoChat) ships a SentencePiece
  `tokenizer.model` and no `tokenizer.json`; the seeds read it with the slow `LlamaTokenizer`.
  transformers 5 converts such a folder only with the `sentencepiece` package installed.
  Without it, `load_tokenizer` reads the model proto with protobuf (which transformers needs
  anyway), builds the BPE vocabulary and merges the way transformers' own converter does
  (merges ordered by piece score, byte fallback, `<unk>`/`<s>`/`</s>` as special tokens) and
  loads the folder with that `tokenizer.json` beside its configuration files.
- **The dummy prefix** (`llm.dummy_prefix`). SentencePiece marks a word start with "▁" and
  adds one before the text (`add_dummy_prefix`). The slow LlamaTokenizer of transformers 4.29
  (PandaGPT, NExT-GPT, VideoChat) ran SentencePiece on every run of text between special or
  added tokens alone, so each run starts with "▁" ("</Img> What" -> "</Img>", "▁What"), and a
  legacy Llama `tokenizer.json` (Prepend("▁") normalizer, Phi-3's, which E.T. Chat's
  transformers 4.44 loaded as is) does the same. transformers 5 loads Llama-style tokenizers
  with `legacy=False` semantics: "▁" only at the start of the text ("</Img>", "What"), which
  changes the ids after every added token. `every_run` restores the seeds' normalizer
  (Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer); `first_run` is transformers'
  Metaspace(prepend_scheme="first") (EventGPT's transformers 4.37 slow tokenizer with
  legacy=False); `none` is Metaspace(prepend_scheme="never"): E.T. Chat's training loads
  Phi-3's tokenizer with `add_prefix_space=False, legacy=False` (`etchat/train/train.py`
  lines 444-449), which converts it anew without any dummy prefix, and saves that tokenizer
  into its release (`etchat_trainer.py` line 215), where inference reads it back. A
  byte-level tokenizer (the tiny twins') has no "▁" and is left as it is.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from services.common.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

DummyPrefix = Literal["every_run", "first_run", "none"]
MARK = "\u2581"  # SentencePiece's word-start mark "▁"
_BPE = 2  # sentencepiece ModelProto.TrainerSpec.ModelType.BPE
_SPECIAL_TYPES = (2, 3)  # UNKNOWN, CONTROL pieces: special tokens
_CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def load_tokenizer(folder: Path, *, dummy_prefix: DummyPrefix | None = None, config: Any = None) -> Any:
    """The tokenizer of a Hugging Face model folder, tokenizing as `dummy_prefix` says.

    Args:
        folder: The LLM folder (`llm.checkpoint`).
        dummy_prefix: every_run / first_run / none (see the module docstring); None: as loaded.
        config: The folder's model config when its own config.json names a model_type
            transformers does not know (`seed_configs.read_llm_config`); None: read by transformers.

    Raises:
        FailedPreconditionError: A slow-only folder whose tokenizer.model cannot be read.
    """
    from transformers import AutoTokenizer

    extra = {} if config is None else {"config": config}
    model_file = folder / "tokenizer.model"
    if (folder / "tokenizer.json").is_file() or not model_file.is_file() or _has_sentencepiece():
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    else:
        with tempfile.TemporaryDirectory(prefix="modalmesh-tokenizer-") as tmp:
            staged = Path(tmp)
            for name in _CONFIG_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, staged / name)
            config = _json(folder / "tokenizer_config.json")
            (staged / "tokenizer.json").write_text(
                sentencepiece_tokenizer_json(
                    model_file,
                    add_bos=bool(config.get("add_bos_token", True)),
                    add_eos=bool(config.get("add_eos_token", False)),
                )
            )
            tokenizer = AutoTokenizer.from_pretrained(staged, **extra)
            tokenizer.name_or_path = str(folder)
    if dummy_prefix is not None:
        set_dummy_prefix(tokenizer, dummy_prefix)
    return tokenizer


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise FailedPreconditionError(f"{path}: not readable JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def sentencepiece_tokenizer_json(model_file: Path, *, add_bos: bool = True, add_eos: bool = False) -> str:
    """A `tokenizer.json` for a SentencePiece BPE model (Llama's), read with protobuf only.

    The vocabulary is the model's pieces by id; the merges are every split of a piece into two
    pieces, ordered by the merged piece's score (transformers' `generate_merges`, as its
    SentencePiece converter); unknown and control pieces are special tokens; encoding with
    special tokens writes the BOS (`add_bos`, Llama's `add_bos_token`) and the EOS (`add_eos`).

    Raises:
        FailedPreconditionError: The file is not a SentencePiece model, or not a BPE one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges
    from transformers.utils import sentencepiece_model_pb2_new as pb

    proto = pb.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError and kin
        raise FailedPreconditionError(f"{model_file}: not a SentencePiece model ({e})") from None
    if not proto.pieces or proto.trainer_spec.model_type != _BPE:
        raise FailedPreconditionError(
            f"{model_file}: expected a SentencePiece BPE model (Llama's), got model type "
            f"{proto.trainer_spec.model_type} with {len(proto.pieces)} pieces; install sentencepiece "
            "or give the folder a tokenizer.json"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab, scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(MARK), normalizers.Replace(" ", MARK)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(MARK, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in _SPECIAL_TYPES
        ]
    )
    spec = proto.trainer_spec
    bos = [(proto.pieces[spec.bos_id].piece, spec.bos_id)] if add_bos and spec.bos_id >= 0 else []
    eos = [(proto.pieces[spec.eos_id].piece, spec.eos_id)] if add_eos and spec.eos_id >= 0 else []
    first, last = " ".join(t for t, _ in bos), " ".join(t for t, _ in eos)
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(x for x in (first, "$A:0", last) if x),
        pair=" ".join(
            x for x in (first, "$A:0", last, first and f"{first}:1", "$B:1", last and f"{last}:1") if x
        ),
        special_tokens=bos + eos,
    )
    return tok.to_str()


def set_dummy_prefix(tokenizer: Any, mode: DummyPrefix) -> bool:
    """Make a SentencePiece-style tokenizer write "▁" before every run of text between special
    or added tokens (`every_run`), before the text only (`first_run`) or nowhere (`none`).

    Returns:
        Whether the tokenizer is SentencePiece-style (else nothing was changed).
    """
    from tokenizers import normalizers, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    pre, norm = backend.pre_tokenizer, backend.normalizer
    if not (isinstance(pre, pre_tokenizers.Metaspace) or MARK in json.dumps(_state(norm))):
        logger.debug(
            "tokenizer %s has no '%s' mark; dummy_prefix %s left out", tokenizer.name_or_path, MARK, mode
        )
        return False
    if mode == "every_run":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(MARK), normalizers.Replace(" ", MARK)])
        backend.pre_tokenizer = None
    else:
        scheme = "first" if mode == "first_run" else "never"
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme=scheme, split=False)
    return True


def _state(component: Any) -> Any:
    """A tokenizers component's JSON state (None for none)."""
    if component is None:
        return None
    getstate = getattr(component, "__getstate__", None)
    state = getstate() if getstate is not None else None
    if isinstance(state, bytes | str):
        return json.loads(state)
    return str(component)
