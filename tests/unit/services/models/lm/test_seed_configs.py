"""Seed model_types read as their transformers base, unknown ones refused by name, and the
tokens EventGPT's inference adds at load."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.presets import Preset
from services.models.lm.seed_configs import apply_load_tokens, plain_config, read_llm_config

AUTO_MAP = {"AutoConfig": "configuration_phi3.Phi3Config"}  # Phi-3-mini's, carried into E.T. Chat's config


def _config(folder: Path, **fields: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    (folder / "config.json").write_text(json.dumps(base | fields))
    return folder


def test_seed_model_types_map_to_their_base(tmp_path: Path) -> None:
    event = read_llm_config(_config(tmp_path / "e", model_type="EventChat_llama", mm_use_im_start_end=True))
    assert event.config.model_type == "llama" and event.seed is not None and event.seed.system == "eventgpt"
    assert event.config.hidden_size == 32 and event.raw["mm_use_im_start_end"] is True
    et = read_llm_config(
        _config(
            tmp_path / "t", model_type="etchat_phi3", bi_attention=True, match_token_id=99, auto_map=AUTO_MAP
        )
    )
    assert et.config.model_type == "phi3"
    plain = plain_config(et.raw, et.seed)
    assert plain["model_type"] == "phi3" and plain["architectures"] == ["Phi3ForCausalLM"]
    assert "bi_attention" not in plain and "match_token_id" not in plain and "auto_map" not in plain
    assert plain["vocab_size"] == 100
    assert read_llm_config(_config(tmp_path / "l")).seed is None


def test_unknown_model_types_and_bad_configs_are_named(tmp_path: Path) -> None:
    folder = _config(tmp_path / "x", model_type="MiniGPT4_llama")
    with pytest.raises(FailedPreconditionError) as e:
        read_llm_config(folder)
    assert str(folder / "config.json") in e.value.message
    assert "got 'MiniGPT4_llama'" in e.value.message and "EventChat_llama, etchat_phi3" in e.value.message
    with pytest.raises(InvalidArgumentError, match="model_type: expected a string, got None"):
        read_llm_config(_config(tmp_path / "y", model_type=None), error=InvalidArgumentError)
    (tmp_path / "y" / "config.json").write_text("{")
    with pytest.raises(InvalidArgumentError, match="expected JSON"):
        read_llm_config(tmp_path / "y", error=InvalidArgumentError)
    with pytest.raises(NotFoundError, match="no such file"):
        read_llm_config(tmp_path / "none")


def _eventgpt_folder(twin: Callable[[str], Preset], tmp_path: Path, **flags: object) -> Path:
    """The twin's LLM folder relabelled as an EventGPT release (its tokenizer without <ev_*>)."""
    folder = tmp_path / "EventGPT-7b"
    shutil.copytree(twin("tiny-eventgpt").llm.checkpoint, folder)
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "EventChat_llama", **flags}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("flags", "added"),
    [
        ({}, ["<ev_patch>"]),  # inference.py:34: mm_use_im_patch_token defaults to True
        ({"mm_use_im_patch_token": False}, []),
        ({"mm_use_im_start_end": True}, ["<ev_patch>", "<ev_start>", "<ev_end>"]),
    ],
)
def test_eventgpt_tokens_are_added_at_load_as_its_inference_does(
    twin: Callable[[str], Preset], tmp_path: Path, flags: dict[str, object], added: list[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = read_llm_config(_eventgpt_folder(twin, tmp_path, **flags))
    tokenizer = AutoTokenizer.from_pretrained(llm.path.parent, config=llm.config)
    lm = AutoModelForCausalLM.from_pretrained(llm.path.parent, config=llm.config)
    rows = lm.get_input_embeddings().weight.shape[0]
    before = lm.get_input_embeddings().weight[:rows].clone()
    got = apply_load_tokens(llm, tokenizer, lm)
    assert [t for t, _ in got] == added
    assert [i for _, i in got] == list(range(rows, rows + len(added)))
    for token, token_id in got:
        assert tokenizer("a" + token + "b", add_special_tokens=False)["input_ids"].count(token_id) == 1
    weight = lm.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer) == lm.get_output_embeddings().weight.shape[0]
    assert torch.equal(weight[:rows], before)
    if added:  # N(0, initializer_range), the same at every load
        assert 0.01 < float(weight[rows:].detach().std()) < 0.3
        again = AutoModelForCausalLM.from_pretrained(llm.path.parent, config=llm.config)
        apply_load_tokens(llm, AutoTokenizer.from_pretrained(llm.path.parent, config=llm.config), again)
        assert torch.equal(again.get_input_embeddings().weight, weight)


def test_tokens_the_release_holds_are_not_added_again(twin: Callable[[str], Preset], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _eventgpt_folder(twin, tmp_path, mm_use_im_start_end=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<ev_patch>", "<ev_start>", "<ev_end>"], special_tokens=True)
    tokenizer.save_pretrained(folder)
    llm = read_llm_config(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, config=llm.config)
    lm.resize_token_embeddings(
        len(tokenizer) + 5
    )  # padded rows past the tokenizer are cut, as the seed's resize does
    assert apply_load_tokens(llm, AutoTokenizer.from_pretrained(folder), lm) == []
    assert lm.get_input_embeddings().weight.shape[0] == len(tokenizer)
