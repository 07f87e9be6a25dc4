"""Add a preset's new tokens to a base LLM folder: the folder `llm.checkpoint` names.

NExT-GPT adds `<Img>`, `</Img>` and its signal tokens (`[IMG0..3]`, `[VID0..23]`, `[AUD0..7]`)
to Vicuna-7B v0; E.T. Chat adds `<vid>` to Phi-3-mini (SEEDS_SPEC 2.A, 4). The seeds do it in
their training scripts (`add_tokens` + `resize_token_embeddings`) and never save the result:
their released deltas hold the connector, LoRA and heads, and some (E.T. Chat, LLaVA) the
resized embedding matrices. modalmesh serves a plain Hugging Face folder whose tokenizer
already holds every `llm.added_tokens` entry as one token (`loading.check_added_tokens`), so
this module writes that folder once, from the base model:

    add_tokens(src, out, tokens, special=False, init="mean", seed=0, rows_from=[...])

- each token the tokenizer does not hold yet is added, plain (legacy NExT-GPT) or as an
  additional special token (E.T. Chat's `<vid>`). A plain token is matched on the raw text,
  not the normalised one (a Llama fast tokenizer's normaliser prepends "▁", and a normalised
  "[IMG0]" would then be stored as "▁[IMG0]" and never match after a letter), and it takes
  the whitespace around it, as the slow tokenizers NExT-GPT trained with did for string
  tokens: "a cat [IMG0] [IMG1]" is "a cat" + [IMG0] + [IMG1], the seed's 4 consecutive ids;
- the input and output embeddings grow to the new vocabulary (never shrink: Phi-3's padded
  rows already cover new ids), and the rows of the added ids start at the mean of the
  existing rows (`init="mean"`, the new NExT-GPT code base and E.T. Chat) or are drawn from
  N(0, initializer_range) with `seed` (`init="normal"`, what legacy NExT-GPT got from HF's
  default init, here reproducible);
- `rows_from` names seed checkpoints holding trained `embed_tokens.weight` / `lm_head.weight`
  matrices (under any prefix); those replace the model's matrices whole, after a shape check;
- the result is written aside and renamed into place (safetensors), so `out` never holds a
  half-written model. Bundles are fingerprinted with the folder they are imported against
  (`adapters.base_fingerprint`): add the tokens first, then `modalmesh import`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

logger = logging.getLogger(__name__)

INITS = ("mean", "normal")
_MATRICES = {"embed_tokens.weight": "input", "lm_head.weight": "output"}


@dataclass
class TokenReport:
    """What `add_tokens` did.

    Attributes:
        out: The folder written.
        added: (token, id) of each token added, in order.
        present: Tokens the tokenizer already held as one token.
        rows_before: Embedding rows of the base model.
        rows_after: Embedding rows of the written model.
        init: How the added ids' rows were set ("mean", "normal", or "checkpoint").
        copied: "<file>: <key> -> input|output" for each matrix taken from `rows_from`.
        extra: Files of `src` besides the model and tokenizer copied along (README, license).
    """

    out: Path
    added: list[tuple[str, int]] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    rows_before: int = 0
    rows_after: int = 0
    init: str = "mean"
    copied: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        out = [f"wrote {self.out}"]
        if self.added:
            first, last = self.added[0][1], self.added[-1][1]
            out.append(
                f"  added {len(self.added)} token(s), ids {first}..{last}: {_short([t for t, _ in self.added])}"
            )
        if self.present:
            out.append(f"  already one token: {_short(self.present)}")
        out.append(f"  embedding rows {self.rows_before} -> {self.rows_after}")
        if self.copied:
            out += [f"  copied {c}" for c in self.copied]
        elif self.added:
            out.append(f"  new rows: {self.init}")
        return out


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def one_token(tokenizer: Any, token: str) -> int | None:
    """The id of `token` when the tokenizer encodes it as exactly that one token, else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token:
        return int(ids[0])
    return None


def _check_paths(src: Path, out: Path) -> None:
    if not (src / "config.json").is_file():
        found = "a folder without config.json" if src.is_dir() else "no such folder"
        raise NotFoundError(
            f"base LLM {src}: expected a Hugging Face model folder with config.json, weights and tokenizer, "
            f"got {found}"
        )
    if out.resolve() == src.resolve():
        raise InvalidArgumentError(f"--out {out}: expected a new folder, got the base model's own folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FailedPreconditionError(f"--out {out}: expected a new or empty folder, got an existing one")


def _check_tokens(tokens: list[str]) -> None:
    bad = [t for t in tokens if not t or t != t.strip() or any(c.isspace() for c in t)]
    if bad:
        raise InvalidArgumentError(f"tokens: expected non-empty tokens without whitespace, got {bad!r}")


def _matrices(paths: list[Path]) -> list[tuple[str, str, torch.Tensor]]:
    """(file: key, input|output, tensor) for each embedding matrix in the seed checkpoints."""
    from services.models.checkpoints.files import read_state_dict

    found: list[tuple[str, str, torch.Tensor]] = []
    for path in paths:
        files = [path]
        if path.is_dir():
            files = (
                sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
            )
            if not files:
                raise NotFoundError(
                    f"--rows-from {path}: expected .safetensors, .bin or .pt files, found none"
                )
        for file in files:
            state = read_state_dict(file)
            for key, tensor in state.items():
                kind = next((k for suffix, k in _MATRICES.items() if key.endswith(suffix)), None)
                if kind is not None:
                    found.append((f"{file.name}: {key}", kind, tensor))
    if not found:
        raise InvalidArgumentError(
            f"--rows-from {', '.join(map(str, paths))}: expected embed_tokens.weight or lm_head.weight "
            "matrices, found none"
        )
    return found


def _init_rows(model: Any, ids: list[int], rows_before: int, init: str, seed: int) -> None:
    """Set the rows of `ids` in the input and output embeddings."""
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    index = torch.tensor(ids)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            if init == "mean":
                old = weight[:rows_before].float().mean(0, keepdim=True)
                rows = old.expand(len(ids), -1)
            else:
                rows = torch.randn((len(ids), weight.shape[1]), generator=generator) * std
            weight[index] = rows.to(weight.dtype)


def _copy_matrices(model: Any, matrices: list[tuple[str, str, torch.Tensor]], vocab: int) -> list[str]:
    """Replace the model's embedding matrices by the checkpoint's, growing the model to their
    rows first; every matrix must be (rows >= vocab, hidden) and the inputs and outputs agree."""
    hidden = model.get_input_embeddings().weight.shape[1]
    rows = {int(t.shape[0]) for _, _, t in matrices}
    for name, _, tensor in matrices:
        if tensor.ndim != 2 or tensor.shape[1] != hidden or tensor.shape[0] < vocab:
            raise InvalidArgumentError(
                f"--rows-from {name}: expected shape (at least {vocab}, {hidden}) for a vocabulary of {vocab}, "
                f"got {tuple(tensor.shape)}"
            )
    if len(rows) != 1:
        raise InvalidArgumentError(
            f"--rows-from: expected the embedding matrices to have one row count, got {sorted(rows)}"
        )
    (count,) = rows
    if count != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(count, mean_resizing=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    copied: list[str] = []
    with torch.no_grad():
        for name, kind, tensor in matrices:
            if kind == "output" and tied:
                copied.append(f"{name}: ignored (the model ties its output to its input embeddings)")
                continue
            module = model.get_input_embeddings() if kind == "input" else model.get_output_embeddings()
            if module is None:
                raise FailedPreconditionError(f"--rows-from {name}: the model has no {kind} embedding to set")
            module.weight.copy_(tensor.to(module.weight.dtype))
            copied.append(f"{name} -> {kind} embeddings")
    return copied


def add_tokens(
    src: Path,
    out: Path,
    tokens: list[str],
    *,
    special: bool = False,
    init: Literal["mean", "normal"] = "mean",
    seed: int = 0,
    rows_from: list[Path] | None = None,
) -> TokenReport:
    """Write `out`: the model of `src` whose tokenizer holds each of `tokens` as one token.

    Args:
        src: The base model's Hugging Face folder (config, weights, tokenizer).
        out: A new (or empty) folder to write.
        tokens: The tokens to add (`llm.added_tokens` of a preset), in order.
        special: Add them as additional special tokens (E.T. Chat) instead of plain ones
            (legacy NExT-GPT).
        init: How the rows of the added ids start: "mean" of the existing rows, or "normal"
            N(0, initializer_range) drawn with `seed`.
        seed: The seed of "normal".
        rows_from: Seed checkpoints (files or folders) whose embedding matrices replace the
            model's whole (their trained rows for the added tokens included).

    Raises:
        NotFoundError: `src` or a `rows_from` path is missing.
        InvalidArgumentError: A token is empty or holds whitespace, `init` is unknown, a token
            does not become one token, or a `rows_from` matrix does not fit.
        FailedPreconditionError: `out` exists and is not empty.
    """
    from transformers import AutoModelForCausalLM

    from services.models.lm.tokenizer import load_tokenizer

    if init not in INITS:
        raise InvalidArgumentError(f"init: expected one of {list(INITS)}, got {init!r}")
    _check_tokens(tokens)
    _check_paths(src, out)
    matrices = _matrices(list(rows_from)) if rows_from else []
    tokenizer = load_tokenizer(src)  # a slow-only folder (Vicuna v0) too
    report = TokenReport(out=out, init="checkpoint" if matrices else init)
    report.added = add_to_tokenizer(tokenizer, tokens, special=special)
    added = {t for t, _ in report.added}
    report.present = [t for t in dict.fromkeys(tokens) if t not in added]

    model: Any = AutoModelForCausalLM.from_pretrained(src, dtype="auto", low_cpu_mem_usage=True)
    report.rows_before = int(model.get_input_embeddings().weight.shape[0])
    vocab = len(tokenizer)
    if matrices:
        report.copied = _copy_matrices(model, matrices, vocab)
    elif report.added:
        if vocab > report.rows_before:
            model.resize_token_embeddings(vocab, mean_resizing=False)
        ids = [i for _, i in report.added]
        # the mean is over the rows in use: Phi-3 pads its matrix past the tokenizer, and
        # those padding rows (where new ids land) were never trained
        _init_rows(model, ids, min(report.rows_before, *ids), init, seed)
    report.rows_after = int(model.get_input_embeddings().weight.shape[0])

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        report.extra = copy_extra_files(src, staged)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staged, out)
    logger.info("added %d token(s) to %s -> %s", len(report.added), src, out)
    return report


def add_to_tokenizer(tokenizer: Any, tokens: list[str], *, special: bool = False) -> list[tuple[str, int]]:
    """Add each of `tokens` the tokenizer does not hold as one token; (token, id) of each added.

    A plain token (legacy NExT-GPT) is matched on the raw text and takes the whitespace around
    it, as the slow tokenizer of transformers 4.29 did for added strings; a special one (E.T.
    Chat's `<vid>`) keeps it, as `add_special_tokens` did.

    Raises:
        InvalidArgumentError: A token does not become one token.
    """
    from tokenizers import AddedToken

    missing = [t for t in dict.fromkeys(tokens) if one_token(tokenizer, t) is None]
    if missing and special:
        added = [AddedToken(t, special=True, normalized=False) for t in missing]
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    elif missing:
        tokenizer.add_tokens([AddedToken(t, normalized=False, lstrip=True, rstrip=True) for t in missing])
    out = []
    for token in missing:
        token_id = one_token(tokenizer, token)
        if token_id is None:
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            raise InvalidArgumentError(
                f"token {token!r}: expected one token once added, got {len(ids)} id(s) {ids}"
            )
        out.append((token, token_id))
    return out


def copy_extra_files(src: Path, out: Path) -> list[str]:
    """Documents of `src` (README, license, use policy) copied into `out` when absent there;
    returns their names. Weights, configs and tokenizer files are never copied: `out` holds
    its own, and a stale tokenizer file beside them would shadow the added tokens."""
    copied: list[str] = []
    for path in sorted(src.iterdir()):
        doc = path.suffix.lower() in (".md", ".txt") or path.name.upper().startswith(
            ("LICENSE", "USE_POLICY")
        )
        if path.is_file() and doc and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied
