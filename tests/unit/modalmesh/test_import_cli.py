"""`modalmesh import`: a PandaGPT delta into the preset's adapter folder, and errors on one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalmesh.cli import main
from services.common.presets import load_preset
from services.models.checkpoints.bundle import base_fingerprint, load_bundle


def _tiny_pandagpt(cache: Path):
    from transformers import LlamaConfig

    preset = load_preset("tiny-pandagpt", cache_dir=cache)
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, pad_token_id=0,
    ).save_pretrained(preset.llm.checkpoint)  # fmt: skip
    return preset


def _delta(path: Path) -> Path:
    delta = {"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.randn(64)}
    for i in range(2):
        for t, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 64)):
            m = f"llama_model.base_model.model.model.layers.{i}.self_attn.{t}"
            delta[f"{m}.lora_A.weight"] = torch.randn(32, 64)
            delta[f"{m}.lora_B.weight"] = torch.randn(out, 32)
    torch.save(delta, path)
    return path


def test_import_writes_the_presets_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = _tiny_pandagpt(tmp_path)
    ckpt = _delta(tmp_path / "pytorch_model.pt")
    argv = ["import", "pandagpt", str(ckpt), "--preset", "tiny-pandagpt", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {preset.adapter.path} (pandagpt -> preset tiny-pandagpt)"
    assert "  connector llama_proj: 2 tensors" in out
    assert any(line.startswith("  lora: 16 tensors (r 32, alpha 32") for line in out)
    bundle = load_bundle(preset.adapter.path, expected_fingerprint=base_fingerprint(preset.llm.checkpoint))
    assert (bundle.name, bundle.version) == ("tiny-pandagpt", "1")
    assert main([*argv, "--version", "2"]) == 0
    assert load_bundle(preset.adapter.path.parent / "2").version == "2"


def test_import_errors_are_one_message_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tiny_pandagpt(tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"llama_proj.weight": torch.randn(48, 32)}, bad)
    argv = ["import", "pandagpt", str(bad), "--preset", "tiny-pandagpt", "--cache-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("modalmesh: import pandagpt")
    assert "llama_proj.weight: expected (64, 32), got (48, 32)" in err
    assert "missing 1 key(s) the target needs: llama_proj.bias" in err
    assert main(["import", "llava", str(bad), "--cache-dir", str(tmp_path)]) == 2
    assert "expected --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import", "minigpt4", str(bad)])


def test_llm_out_and_base_out_are_only_for_an_etchat_full_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preset = _tiny_pandagpt(tmp_path)
    ckpt = _delta(tmp_path / "pytorch_model.pt")
    argv = ["import", "pandagpt", str(ckpt), "--preset", "tiny-pandagpt", "--cache-dir", str(tmp_path)]
    assert main([*argv, "--llm-out", str(tmp_path / "llm")]) == 2
    err = capsys.readouterr().err
    assert "--llm-out and --base-out are written only from an E.T. Chat full model folder" in err
    assert not (tmp_path / "llm").exists() and not preset.adapter.path.exists()
    assert main(["import", "blip2-qformer", str(ckpt), "--base-out", "x", "--cache-dir", str(tmp_path)]) == 2
    assert "--llm-out and --base-out are for etchat" in capsys.readouterr().err


def test_help_names_each_release_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    out = capsys.readouterr().out
    assert "--llm-out" in out and "'config': EasyDict" in out and "EventChat_llama" in out
    assert "full model folder (-> LLM folder + Q-Former base + bundle)" in out
