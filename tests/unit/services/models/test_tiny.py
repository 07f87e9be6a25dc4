"""The tiny preset generator: deterministic, complete, and loadable by the standard HF code."""

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from services.common.presets import load_preset
from services.models.checkpoints.bundle import base_fingerprint, load_bundle
from services.models.tiny import generate, is_generated


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in {"manifest.json", ".generate.lock"}
    }


def test_generation_is_deterministic(tiny_cache_dir, tmp_path):
    generate(load_preset("tiny", cache_dir=tmp_path))
    assert _digest(tmp_path / "tiny") == _digest(tiny_cache_dir / "tiny")


def test_second_call_reuses_what_is_there(tiny_preset):
    assert is_generated(tiny_preset)
    assert generate(tiny_preset) is False


def test_checkpoints_load_through_standard_transformers_code(tiny_preset):
    tok = AutoTokenizer.from_pretrained(tiny_preset.llm.checkpoint)
    llm = LlamaForCausalLM.from_pretrained(tiny_preset.llm.checkpoint)
    vision = CLIPVisionModel.from_pretrained(tiny_preset.modalities["image"].encoder.checkpoint)
    assert llm.config.vocab_size == len(tok)
    assert vision.config.hidden_size == tiny_preset.modalities["image"].encoder.dim
    assert llm.config.eos_token_id == tok.eos_token_id
    assert (tiny_preset.modalities["image"].encoder.checkpoint / "preprocessor_config.json").is_file()


def test_tokenizer_round_trips_text_and_keeps_specials_whole(tiny_preset):
    tok = AutoTokenizer.from_pretrained(tiny_preset.llm.checkpoint)
    text = "USER: <image>\nWhat colour is it, naïve 猫? ASSISTANT: red</s>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert ids[-1] == tok.eos_token_id
    assert tok.bos_token == "<s>" and tok.pad_token == "<pad>"


def test_adapter_bundle_matches_the_base_and_holds_the_connector(tiny_preset):
    bundle = load_bundle(
        tiny_preset.adapter.path, expected_fingerprint=base_fingerprint(tiny_preset.llm.checkpoint)
    )
    assert bundle.ref == "tiny@1"
    assert set(bundle.connectors) == {"image"}
    assert bundle.connectors["image"]["fc1.weight"].shape == (64, 64)
    manifest = json.loads((tiny_preset.adapter.path / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["stage"] == "init"


def test_a_preset_that_disagrees_with_the_generator_is_refused(tmp_path):
    text = (
        (Path(__file__).parents[4] / "presets" / "tiny.yaml").read_text().replace("tokens: 16", "tokens: 17")
    )
    (tmp_path / "tiny.yaml").write_text(text)
    from services.common.errors import InvalidArgumentError

    preset = load_preset("tiny", cache_dir=tmp_path, presets_dir=tmp_path)
    with pytest.raises(
        InvalidArgumentError, match=r"preset expects 17 tokens of width 64 per frame .* give 16 of width 64"
    ):
        generate(preset)


def test_a_cache_from_another_generator_version_is_regenerated(tmp_path) -> None:
    from services.common.presets import load_preset
    from services.models.tiny import GENERATOR_VERSION, VERSION_FILE

    preset = load_preset("tiny", cache_dir=tmp_path)
    assert generate(preset) and is_generated(preset)
    marker = preset.llm.checkpoint.parent / VERSION_FILE
    assert marker.read_text().strip() == GENERATOR_VERSION
    marker.write_text("1\n")  # as an older modalmesh left it
    assert not is_generated(preset)
    assert generate(preset) and is_generated(preset)
    assert not generate(preset)  # now current: nothing to do


def test_a_twin_with_every_kind_of_part_is_deterministic_and_complete(tmp_path):
    """tiny-etchat: EVA backbone, Q-Former base, Q-Former tokenizer, Phi-3 with <vid>."""
    from transformers import AutoTokenizer

    first = load_preset("tiny-etchat", cache_dir=tmp_path / "a")
    second = load_preset("tiny-etchat", cache_dir=tmp_path / "b")
    assert generate(first) and generate(second)
    assert is_generated(first)
    assert _digest(tmp_path / "a" / "tiny-etchat") == _digest(tmp_path / "b" / "tiny-etchat")
    connector = first.modalities["video"].connector
    assert connector.base.is_file() and (connector.tokenizer / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(first.llm.checkpoint)
    for token in ("<vid>", "<image>", "<|end|>", "<|user|>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token


def test_the_any_to_any_twin_is_deterministic_with_decoders_projectors_and_taught_replies(tmp_path):
    """tiny-nextgpt: three diffusers decoders, fresh projectors in the bundle, and an LLM taught
    to answer draw/play/show with signal tokens, the same bytes on every run."""
    from services.models.checkpoints.bundle import load_bundle

    first = load_preset("tiny-nextgpt", cache_dir=tmp_path / "a")
    second = load_preset("tiny-nextgpt", cache_dir=tmp_path / "b")
    assert generate(first) and generate(second)
    assert _digest(tmp_path / "a" / "tiny-nextgpt") == _digest(tmp_path / "b" / "tiny-nextgpt")
    for out in first.outputs.values():
        assert (out.decoder.checkpoint / "model_index.json").is_file()
    heads = {k.split(".", 1)[0] for k in load_bundle(first.adapter.path).heads}
    assert heads == {"gen_text_hidden_fcs", "gen_text_hidden_fcs_video", "gen_text_hidden_fcs_audio"}


def test_a_generated_preset_can_size_its_llm(tmp_path):
    """`llm.config` overrides the tiny generator's LM sizes (the bench preset's 12x768 Llama)."""
    import json

    import yaml

    from services.common.presets import parse_preset

    text = (Path(__file__).parents[4] / "presets" / "tiny.yaml").read_text()
    data = yaml.safe_load(text)
    data["llm"]["config"] = {"hidden_size": 96, "num_hidden_layers": 3, "num_key_value_heads": 4}
    preset = parse_preset(yaml.safe_dump(data), cache_dir=tmp_path)
    assert generate(preset)
    config = json.loads((preset.llm.checkpoint / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (96, 3, 4)
    assert config["intermediate_size"] == 128  # the rest stays the generator's
    bench = load_preset(
        str(Path(__file__).parents[4] / "bench" / "presets" / "bench-small.yaml"), cache_dir=tmp_path
    )
    assert bench.llm.config["hidden_size"] == 768 and bench.modalities["image"].encoder.tokens == 196
