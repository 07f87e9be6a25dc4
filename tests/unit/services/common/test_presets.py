from pathlib import Path

import pytest

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import load_preset, parse_preset, shipped_presets

TINY = Path(__file__).parents[4] / "presets" / "tiny.yaml"


@pytest.mark.parametrize("name", shipped_presets())
def test_every_shipped_preset_validates_without_building_anything(name, tmp_path):
    preset = load_preset(name, cache_dir=tmp_path)
    assert preset.name == name
    assert preset.modalities


def test_tiny_paths_expand_under_the_cache_dir(tmp_path):
    preset = load_preset("tiny", cache_dir=tmp_path)
    assert preset.llm.checkpoint == tmp_path / "tiny" / "llm"
    assert preset.modalities["image"].encoder.checkpoint == tmp_path / "tiny" / "clip_vision"
    assert preset.triton_model("image") == "image_clip_vision"
    assert preset.generate == "tiny"


def test_environment_overrides_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALMESH_CACHE_DIR", str(tmp_path / "elsewhere"))
    preset = load_preset("tiny", cache_dir=tmp_path)
    assert preset.llm.checkpoint == tmp_path / "elsewhere" / "tiny" / "llm"


def test_presets_dir_is_searched_first(tmp_path):
    text = TINY.read_text().replace("name: tiny", "name: mine")
    (tmp_path / "tiny.yaml").write_text(text)
    assert load_preset("tiny", cache_dir=tmp_path, presets_dir=tmp_path).name == "mine"


def test_a_yaml_path_can_name_a_preset(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(TINY.read_text())
    assert load_preset(str(path), cache_dir=tmp_path).name == "tiny"


def test_unknown_preset_lists_the_shipped_ones(tmp_path):
    with pytest.raises(NotFoundError, match=r"preset 'nope' not found; shipped presets: .*tiny"):
        load_preset("nope", cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("template: vicuna_v1", "template: vicuna_v9"), r"llm\.template: Input should be"),
        (("tokens: 16", "tokens: 0"), r"modalities\.image\.encoder\.tokens: Input should be greater than 0"),
        (("type: mlp2x_gelu", "type: mlp3x"), r"modalities\.image\.connector\.type"),
        (("architecture: llama", "architecture: llama\n  surprise: 1"), r"llm\.surprise: Extra inputs"),
        (
            ("${MODALMESH_CACHE_DIR}/tiny/llm", "${NOT_SET_ANYWHERE_42}/llm"),
            r"llm\.checkpoint: \$\{NOT_SET_ANYWHERE_42\} is not set",
        ),
        (("  image:", "  smell:"), r"modalities\.smell"),
    ],
)
def test_schema_errors_name_the_field(edit, match, tmp_path):
    text = TINY.read_text().replace(*edit)
    with pytest.raises(InvalidArgumentError, match=match):
        parse_preset(text, cache_dir=tmp_path, source="x.yaml")


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not valid YAML"):
        parse_preset("a: [", cache_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match="expected a mapping, got list"):
        parse_preset("- 1\n- 2", cache_dir=tmp_path)


def test_encoder_id_changes_with_the_encoder_spec(tmp_path):
    base = load_preset("tiny", cache_dir=tmp_path)
    other_layer = parse_preset(
        TINY.read_text().replace("select_layer: -2", "select_layer: -1"), cache_dir=tmp_path
    )
    other_place = load_preset("tiny", cache_dir=tmp_path / "elsewhere")
    assert base.encoder_id("image").startswith("image_clip_vision-")
    assert base.encoder_id("image") == load_preset("tiny", cache_dir=tmp_path).encoder_id("image")
    assert (
        len({base.encoder_id("image"), other_layer.encoder_id("image"), other_place.encoder_id("image")}) == 3
    )
