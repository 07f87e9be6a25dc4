"""Reading checkpoints: the allow-listed unpickler (EasyDict as a dict, nothing else runs),
damaged files and raw DeepSpeed checkpoints refused by name."""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.errors import InvalidArgumentError
from services.models.checkpoints.files import deepspeed_marks, load_pickle, read_state_dict, refuse_deepspeed
from tests.helpers.releases import seed_easydict


def _globals(path: Path) -> set[str]:
    """The globals a torch checkpoint's pickle names (read with pickletools, nothing runs)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_an_easydict_config_is_read_as_plain_dicts(tmp_path: Path) -> None:
    with seed_easydict() as easydict:
        config = easydict({"model": {"model_cls": "VideoChat_it", "layers": [{"a": 1}]}, "lr": 2e-5})
        torch.save(
            {"model": OrderedDict(w=torch.ones(2)), "config": config, "epoch": 2}, tmp_path / "ckpt.pth"
        )
    assert "utils.easydict.EasyDict" in _globals(tmp_path / "ckpt.pth")  # as the seed's pickle names it
    obj = load_pickle(tmp_path / "ckpt.pth")
    assert type(obj["config"]) is dict and type(obj["config"]["model"]) is dict
    assert obj["config"] == {"model": {"model_cls": "VideoChat_it", "layers": [{"a": 1}]}, "lr": 2e-5}
    assert type(obj["config"]["model"]["layers"][0]) is dict
    assert isinstance(obj["model"], OrderedDict) and torch.equal(obj["model"]["w"], torch.ones(2))


def test_parameters_come_back_as_detached_tensors(tmp_path: Path) -> None:
    torch.save(
        OrderedDict(p=torch.nn.Parameter(torch.ones(3)), h=torch.zeros(2, dtype=torch.float16)),
        tmp_path / "p.pt",
    )
    assert "torch._utils._rebuild_parameter" in _globals(tmp_path / "p.pt")
    state = read_state_dict(tmp_path / "p.pt")
    assert type(state["p"]) is torch.Tensor and not state["p"].requires_grad
    assert state["h"].dtype == torch.float16


class _Payload:
    """Creates a file when unpickled by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_anything_beyond_the_allow_list_is_refused_by_name_and_never_runs(tmp_path: Path) -> None:
    import argparse

    torch.save({"model": {}, "config": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    with pytest.raises(
        InvalidArgumentError, match=r"GLOBAL argparse\.Namespace is not on the allow-list"
    ) as e:
        load_pickle(tmp_path / "ns.pth")
    assert str(tmp_path / "ns.pth") in e.value.message and "EasyDict" in e.value.message
    marker = tmp_path / "ran"
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    for name in ("evil.pt", "plain.pkl"):
        # protocol 2 names getattr to reach Path.touch, protocol 4 the method itself
        with pytest.raises(
            InvalidArgumentError, match=r"GLOBAL (__builtin__\.getattr|pathlib\.Path\.touch) is not on"
        ):
            read_state_dict(tmp_path / name)
    assert not marker.exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InvalidArgumentError, match=r"cut\.pt: expected a torch checkpoint or a safetensors file"
    ):
        read_state_dict(tmp_path / "cut.pt")
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        InvalidArgumentError, match=r"cut\.safetensors: expected a torch checkpoint or a safetensors"
    ):
        read_state_dict(tmp_path / "cut.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(
        InvalidArgumentError, match=r"list\.pt: expected a state dict \(name -> tensor\), got list"
    ):
        read_state_dict(tmp_path / "list.pt")


def test_raw_deepspeed_checkpoints_are_refused_with_the_conversion(tmp_path: Path) -> None:
    run = tmp_path / "etchat-stage-1"
    (run / "global_step500").mkdir(parents=True)
    (run / "latest").write_text("global_step500")
    torch.save({"module": {}}, run / "global_step500" / "mp_rank_00_model_states.pt")
    torch.save({}, run / "global_step500" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert deepspeed_marks(run) == ["latest", "global_step500/"]
    with pytest.raises(
        InvalidArgumentError, match=r"raw DeepSpeed checkpoint \(latest, global_step500/\)"
    ) as e:
        refuse_deepspeed(run)
    assert f"zero_to_fp32.py {run} <out>" in e.value.message
    with pytest.raises(InvalidArgumentError, match=r"convert it with zero_to_fp32\.py first"):
        read_state_dict(run / "global_step500" / "mp_rank_00_model_states.pt")
    refuse_deepspeed(run, has_weights=True)  # an HF checkpoint-N/ keeps them beside its weights
    assert deepspeed_marks(tmp_path / "plain.pt") == []
