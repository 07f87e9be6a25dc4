"""Reading the seeds' checkpoint files without running anything they hold.

- `.safetensors` files are read lazily (only the keys asked for).
- Torch pickles (`.pt`, `.pth`, `.bin`) are read by torch (its zip and legacy formats, storages
  mapped to the CPU) through our own unpickler whose `find_class` allows exactly: torch's tensor
  and parameter rebuild functions, `collections.OrderedDict`, and `EasyDict` (read as a plain
  dict). EasyDict is what VideoChat's release needs beyond a state dict: its `config`
  (video_chat/utils/config.py:17 imports it from its own utils/easydict.py, so the pickle names
  `utils.easydict.EasyDict`; tasks/train.py:191-203 pickles it beside the model, optimizer,
  scheduler and scaler states). Any other global is refused, by name, before it is looked up:
  nothing in the file runs, and no plain `pickle.load` reads a checkpoint anywhere.
- A raw DeepSpeed checkpoint (`global_step*/`, `mp_rank_*_model_states.pt`, `zero_pp_rank_*`,
  `latest`) is refused by name: its `zero_to_fp32.py` converts it into a state dict first.
"""

from __future__ import annotations

import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from services.common.errors import InvalidArgumentError, NotFoundError

SHOWN = 8  # names listed per kind of problem
# Where a seed's EasyDict class lives in its pickles: VideoChat's own copy, and the PyPI package.
EASYDICT_GLOBALS = ("utils.easydict.EasyDict", "easydict.EasyDict")
_REBUILDERS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)  # fmt: skip
ALLOW_LIST = (
    f"torch's tensor and parameter rebuild functions (torch._utils.{', '.join(_REBUILDERS)}), "
    f"collections.OrderedDict and EasyDict ({', '.join(EASYDICT_GLOBALS)}, read as a plain dict)"
)
# Files DeepSpeed's engine.save_checkpoint writes (deepspeed/runtime/engine.py), by name.
_DEEPSPEED_FILES = re.compile(
    r"^(mp_rank_\d+_model_states\.pt|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states\.pt|"
    r"layer_\d+-model_states\.pt)$"
)
_GLOBAL_STEP = re.compile(r"^global_step\d+$")


class _EasyDict(dict[str, Any]):
    """What an EasyDict unpickles into here: a dict of its items.

    EasyDict pickles as NEWOBJ + SETITEMS (its items) + BUILD with its `__dict__`, an attribute
    copy of the same items (video_chat/utils/easydict.py:125-131 sets both): the copy is dropped.
    """

    def __setstate__(self, state: object) -> None:
        pass


_ALLOWED: dict[str, Any] = {
    **{f"torch._utils.{n}": getattr(torch._utils, n) for n in _REBUILDERS},
    "collections.OrderedDict": OrderedDict,
    **dict.fromkeys(EASYDICT_GLOBALS, _EasyDict),
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that finds only the allow-listed globals (torch maps storages before it)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(
                f"Unsupported global: GLOBAL {module}.{name} is not on the allow-list"
            )
        return found


def _allow_list_load(file: Any, **kwargs: Any) -> Any:
    return _AllowListUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: its Unpickler (subclassed to map storages) and load.
_PICKLE_MODULE = types.ModuleType("modalmesh_allow_list_pickle")
_PICKLE_MODULE.Unpickler = _AllowListUnpickler  # type: ignore[attr-defined]
_PICKLE_MODULE.load = _allow_list_load  # type: ignore[attr-defined]


def name_list(keys: list[str], limit: int = SHOWN) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _plain(obj: Any) -> Any:
    """Allow-listed objects as plain Python: EasyDicts as dicts, parameters as detached tensors."""
    if isinstance(obj, _EasyDict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, torch.nn.Parameter):
        return obj.detach()
    if isinstance(obj, dict):  # OrderedDict stays one (a state dict's type)
        for k, v in obj.items():
            obj[k] = _plain(v)
        return obj
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def _unpickler_reason(e: Exception) -> str:
    """The line of the refusal that names what was refused (e.g. "Unsupported global: GLOBAL
    argparse.Namespace ..."), not its boilerplate."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower() or "GLOBAL" in line:
            return line.split(". ")[0]
    return lines[0] if lines else type(e).__name__


def is_pickle(path: Path) -> bool:
    """Whether `path` is a torch checkpoint (zip) or a pickle, by its first bytes."""
    with path.open("rb") as f:
        magic = f.read(2)
    return zipfile.is_zipfile(path) or magic[:1] == b"\x80"


def load_pickle(path: Path) -> Any:
    """A torch checkpoint (or plain pickle) read with the allow-list; EasyDicts become dicts
    and parameters detached tensors.

    Raises:
        InvalidArgumentError: It needs a global beyond the allow-list (named), or it is
            truncated or otherwise unreadable.
    """
    zipped = zipfile.is_zipfile(path)
    try:
        # weights_only=False only hands the unpickling to _PICKLE_MODULE, whose find_class is
        # stricter than torch's weights-only one (which cannot set a dict subclass's items)
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE, mmap=zipped
        )
    except pickle.UnpicklingError as e:
        raise InvalidArgumentError(
            f"checkpoint {path}: refused: loading it would run code or build objects beyond the allow-list "
            f"({_unpickler_reason(e)}); modalmesh reads torch checkpoints allowing only {ALLOW_LIST}, so "
            "re-save only the state dict"
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        IndexError,
        KeyError,
        AttributeError,
        TypeError,
    ) as e:
        raise InvalidArgumentError(
            f"checkpoint {path}: expected a torch checkpoint or a safetensors file, got an unreadable "
            f"(truncated or damaged) file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return _plain(obj)


def read_state_dict(
    path: Path, *, only: tuple[str, ...] | None = None, unwrap: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch pickle without running code.

    Args:
        path: The file.
        only: Keep only keys with these prefixes (read lazily from safetensors).
        unwrap: A top-level key holding the state dict (VideoChat's 'model'), used when present;
            the other entries (optimizer, scheduler, scaler, config, epoch) are read and left.

    Raises:
        NotFoundError: No such file.
        InvalidArgumentError: Not a checkpoint, a truncated one, a pickle that needs code
            beyond the allow-list, a raw DeepSpeed file, or not a mapping of names to tensors.
    """
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path}: no such file")
    refuse_deepspeed(path)
    keep: Callable[[str], bool] = (lambda k: True) if only is None else (lambda k: k.startswith(only))
    if path.suffix == ".safetensors" or not is_pickle(path):
        try:
            with safe_open(str(path), framework="pt") as sf:
                return {k: sf.get_tensor(k) for k in sf.keys() if keep(k)}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise InvalidArgumentError(
                f"checkpoint {path}: expected a torch checkpoint or a safetensors file, got neither "
                f"(or a truncated one) ({e})"
            ) from None
    obj = load_pickle(path)
    if unwrap is not None and isinstance(obj, dict) and isinstance(obj.get(unwrap), dict):
        obj = obj[unwrap]
    if not isinstance(obj, dict):
        raise InvalidArgumentError(
            f"checkpoint {path}: expected a state dict (name -> tensor), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InvalidArgumentError(
            f"checkpoint {path}: expected name -> tensor entries, got non-tensor entries {name_list(bad)}"
        )
    return {k: v for k, v in obj.items() if keep(k)}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, read from its header only.

    Raises:
        InvalidArgumentError: Not a safetensors file, or a truncated one.
    """
    try:
        with safe_open(str(path), framework="pt") as sf:
            return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise InvalidArgumentError(
            f"checkpoint {path}: expected a safetensors file, got an unreadable (truncated or damaged) one ({e})"
        ) from None


def deepspeed_marks(path: Path) -> list[str]:
    """What marks `path` as a raw DeepSpeed checkpoint (empty when nothing does).

    DeepSpeed's `save_checkpoint` writes `latest` (the tag) and `global_step<N>/` holding
    `mp_rank_00_model_states.pt` and `zero_pp_rank_*_optim_states.pt`; E.T. Chat's trainer
    falls back to it under ZeRO-3 (etchat/train/etchat_trainer.py:193-196).
    """
    if path.is_file():
        return [path.name] if _DEEPSPEED_FILES.match(path.name) else []
    if not path.is_dir():
        return []
    marks = sorted(p.name for p in path.iterdir() if p.is_file() and _DEEPSPEED_FILES.match(p.name))
    steps = sorted(p.name + "/" for p in path.iterdir() if p.is_dir() and _GLOBAL_STEP.match(p.name))
    if steps and (path / "latest").is_file():
        marks += ["latest", *steps]
    return marks


def refuse_deepspeed(path: Path, *, has_weights: bool = False) -> None:
    """Refuse a raw DeepSpeed checkpoint by name.

    Args:
        path: A file or folder given to an importer.
        has_weights: The folder also holds model weights (an HF Trainer `checkpoint-N/` keeps
            the DeepSpeed state beside them); then only the DeepSpeed files themselves refuse.

    Raises:
        InvalidArgumentError: Naming what was found and the conversion to run.
    """
    marks = deepspeed_marks(path)
    if path.is_dir() and has_weights:
        marks = [m for m in marks if not m.endswith("/") and m != "latest"]
    if not marks:
        return
    folder = path if path.is_dir() else path.parent
    if _GLOBAL_STEP.match(folder.name):
        folder = folder.parent
    raise InvalidArgumentError(
        f"checkpoint {path}: a raw DeepSpeed checkpoint ({name_list(marks)}), not a model's weights: convert "
        f"it with zero_to_fp32.py first (DeepSpeed writes the script beside it: `python zero_to_fp32.py "
        f"{folder} <out>`), then import the converted weights, with the run's config.json and tokenizer "
        "beside them for a full model folder"
    )


__all__ = [
    "ALLOW_LIST",
    "EASYDICT_GLOBALS",
    "deepspeed_marks",
    "is_pickle",
    "load_pickle",
    "name_list",
    "read_state_dict",
    "refuse_deepspeed",
    "safetensors_shapes",
]
