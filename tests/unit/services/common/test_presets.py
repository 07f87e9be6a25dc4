from pathlib import Path

import pytest

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import GenerationSpec, load_preset, parse_preset, shipped_presets

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


PRESETS = Path(__file__).parents[4] / "presets"
SEEDS = ["pandagpt", "nextgpt", "videochat", "etchat", "eventgpt"]


@pytest.mark.parametrize("name", SEEDS)
def test_every_seed_system_has_a_tiny_twin_of_the_same_shape(name, tmp_path):
    real = load_preset(name, cache_dir=tmp_path)
    twin = load_preset(f"tiny-{name}", cache_dir=tmp_path)
    assert twin.generate == "tiny" and real.generate is None
    assert set(twin.modalities) == set(real.modalities)
    assert twin.llm.template == real.llm.template
    assert twin.llm.inference_template == real.llm.inference_template
    assert twin.llm.architecture == real.llm.architecture
    assert twin.llm.added_tokens == real.llm.added_tokens
    assert twin.media_combine == real.media_combine
    assert twin.heads == real.heads
    for modality, spec in real.modalities.items():
        mine = twin.modalities[modality]
        assert mine.encoder.backbone == spec.encoder.backbone
        assert mine.encoder.select_layer == spec.encoder.select_layer
        assert mine.encoder.select_feature == spec.encoder.select_feature
        assert mine.connector.type == spec.connector.type
        assert mine.placeholder == spec.placeholder
        assert mine.attention == spec.attention  # the twin runs the real attention path
        assert twin.connector_names()[modality] == real.connector_names()[modality]


def test_real_presets_carry_the_seed_systems_numbers(tmp_path):
    panda = load_preset("pandagpt", cache_dir=tmp_path)
    assert {m: (s.encoder.tokens, s.encoder.dim) for m, s in panda.modalities.items()} == {
        m: (1, 1024) for m in ("image", "video", "audio", "thermal")
    }
    assert panda.modalities["video"].encoder.sampling.clips == 5
    assert panda.modalities["video"].encoder.sampling.crops == 3
    assert panda.modalities["audio"].encoder.sampling.clips == 3
    assert set(panda.connector_names().values()) == {"llama_proj"}
    assert (panda.lora.r, panda.lora.alpha, panda.lora.dropout) == (32, 32, 0.1)
    chat = load_preset("videochat", cache_dir=tmp_path)
    video = chat.modalities["video"]
    assert (video.encoder.tokens, video.encoder.dim, video.encoder.taps) == (257, 1408, 8)
    assert video.encoder.sampling.num_frames == 8
    assert video.connector.qformer.num_query_tokens + video.connector.qformer.num_extra_query_tokens == 96
    et = load_preset("etchat", cache_dir=tmp_path)
    assert et.modalities["video"].encoder.tokens == 256
    assert (
        et.modalities["video"].encoder.sampling.fps,
        et.modalities["video"].encoder.sampling.max_frames,
    ) == (
        1.0,
        350,
    )
    assert et.heads.timestamps.token == "<vid>" and et.lora.targets == ["qkv_proj", "o_proj"]
    # the frames attend to each other: its stage 3 trains with --bi_attention True and its
    # released config serves with it; every other seed system is causal
    assert et.bidirectional_modalities() == {"video"}
    others = [load_preset(n, cache_dir=tmp_path) for n in SEEDS if n != "etchat"]
    assert all(p.bidirectional_modalities() == frozenset() for p in others)
    event = load_preset("eventgpt", cache_dir=tmp_path).modalities["event"].encoder
    assert (event.tokens, event.select_layer, event.select_feature, event.sampling.event_frames) == (
        577,
        -1,
        "cls_patch",
        5,
    )


def test_real_presets_preprocess_as_their_seeds(tmp_path):
    """The rules tests/unit/parity/test_*_preprocess.py hold to each seed's own pipeline."""
    for name, last_clip_at_end in (("pandagpt", True), ("nextgpt", False)):
        ib = {m: s.encoder for m, s in load_preset(name, cache_dir=tmp_path).modalities.items()}
        assert ib["image"].preprocess.crop == "round"  # torchvision CenterCrop
        assert ib["video"].preprocess.crop == "ceil"  # ImageBind's uniform_crop
        for m in ("video", "audio"):  # git pytorchvideo (PandaGPT's video) vs PyPI 0.1.5 (NExT-GPT)
            assert ib[m].sampling.last_clip_at_end is last_clip_at_end
    chat = load_preset("videochat", cache_dir=tmp_path).modalities
    assert chat["video"].encoder.preprocess.crop == "round"  # GroupCenterCrop
    assert chat["image"].encoder.preprocess.resize == "squash"  # Resize((224, 224))
    assert chat["video"].connector.ln_vision_dtype == "float32"
    et = load_preset("etchat", cache_dir=tmp_path).modalities["video"]
    assert et.encoder.preprocess.interpolation == "torch_bilinear_antialias"
    assert et.encoder.preprocess.crop == "floor" and et.connector.ln_vision_dtype is None
    event = load_preset("eventgpt", cache_dir=tmp_path).modalities["event"].encoder
    assert event.dtype == "bfloat16" and event.preprocess.negative_polarity == "zero_only"
    for name in SEEDS:  # every seed decodes with PIL's convert("RGB")
        for spec in load_preset(name, cache_dir=tmp_path).modalities.values():
            assert spec.encoder.preprocess.transparency == "drop"


@pytest.mark.parametrize("name", SEEDS)
def test_twins_preprocess_as_their_real_preset(name, tmp_path):
    real = load_preset(name, cache_dir=tmp_path)
    twin = load_preset(f"tiny-{name}", cache_dir=tmp_path)
    for modality, spec in real.modalities.items():
        mine = twin.modalities[modality]
        assert mine.encoder.preprocess == spec.encoder.preprocess
        assert mine.connector.ln_vision_dtype == spec.connector.ln_vision_dtype
        if spec.encoder.sampling is not None:
            assert mine.encoder.sampling.last_clip_at_end == spec.encoder.sampling.last_clip_at_end


def test_encoder_id_digests_the_preprocess_rules(tmp_path):
    text = (PRESETS / "tiny-videochat.yaml").read_text()
    other = parse_preset(
        text.replace("preprocess: {crop: round}", "preprocess: {crop: floor}"), cache_dir=tmp_path
    )
    base = parse_preset(text, cache_dir=tmp_path)
    assert base.encoder_id("video") != other.encoder_id("video")  # cached features are not reused


def test_models_dir_defaults_under_the_cache_and_can_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MODALMESH_MODELS_DIR", raising=False)
    monkeypatch.delenv("MODALMESH_CACHE_DIR", raising=False)
    assert load_preset("eventgpt", cache_dir=tmp_path).llm.checkpoint == tmp_path / "models" / "eventgpt-7b"
    monkeypatch.setenv("MODALMESH_MODELS_DIR", str(tmp_path / "m"))
    assert load_preset("eventgpt", cache_dir=tmp_path).llm.checkpoint == tmp_path / "m" / "eventgpt-7b"


@pytest.mark.parametrize(
    ("preset", "edit", "match"),
    [
        ("tiny-eventgpt", ("backbone: clip_vision", "backbone: imagebind"), r"imagebind reads .*not event"),
        (
            "tiny-eventgpt",
            ("      sampling: {event_frames: 5}\n", ""),
            r"event\.encoder\.sampling: expected one",
        ),
        (
            "tiny",
            ("      dim: 64\n", "      dim: 64\n      sampling: {num_frames: 4}\n"),
            r"an image has no frames",
        ),
        (
            "tiny-videochat",
            ("sampling: {num_frames: 4}", "sampling: {num_frames: 4, fps: 1}"),
            "exactly one of",
        ),
        (
            "tiny-videochat",
            ("sampling: {num_frames: 4}", "sampling: {clips: 2}"),
            "only the imagebind backbone",
        ),
        ("tiny-videochat", ("gmhra_layers: 2", "gmhra_layers: 3"), r"expected 2 \(encoder.taps\), got 3"),
        (
            "tiny-videochat",
            ("type: qformer\n", "type: qformer\n      tokenizer: /x\n"),
            "only instruct_qformer",
        ),
        (
            "tiny-etchat",
            ("      tokenizer: ${MODALMESH_CACHE_DIR}/tiny-etchat/qformer_tokenizer\n", ""),
            "needs tokenizer",
        ),
        ("tiny-etchat", ('added_tokens: ["<vid>"]', "added_tokens: []"), "expected one of llm.added_tokens"),
        (
            "tiny-pandagpt",
            ("select_feature: embedding", "select_feature: patch"),
            "'embedding' is imagebind's",
        ),
        (
            "tiny-pandagpt",
            ("connector: &proj {type: linear, name: llama_proj}", "connector: &proj {type: linear}"),
            None,
        ),
        (
            "tiny-eventgpt",
            ("connector: {type: event_adaptor}", "connector: {type: event_adaptor, qformer: {}}"),
            "are for the Q-Former types",
        ),
        (
            "tiny-etchat",
            ("attention: bidirectional", "attention: sideways"),
            r"video\.attention: Input should be",
        ),
        (
            "tiny-pandagpt",  # one token per item: nothing to attend to bidirectionally
            ('placeholder: "<audio>"', 'placeholder: "<audio>"\n    attention: bidirectional'),
            r"modalities\.audio\.attention: bidirectional attention over a span needs items of several",
        ),
        ("tiny-videochat", ("max_per_prompt:", "attention: bidirectional\n    max_per_prompt:"), None),
        (
            "tiny-eventgpt",
            (
                "connector: {type: event_adaptor}",
                "connector: {type: event_adaptor, ln_vision_dtype: float32}",
            ),
            "ln_vision_dtype: only the Q-Former types",
        ),
        (
            "tiny-pandagpt",
            ("      preprocess: {crop: ceil}\n", "      preprocess: {crop: ceil, resize: squash}\n"),
            r"ImageBind video is scaled as pytorchvideo's ShortSideScale",
        ),
        (
            "tiny-videochat",
            ("sampling: {num_frames: 4}", "sampling: {num_frames: 4, last_clip_at_end: true}"),
            "last_clip_at_end: only with clips",
        ),
        (
            "tiny-etchat",
            ("crop: floor}", "crop: middle}"),
            r"preprocess\.crop",
        ),
    ],
)
def test_cross_field_rules_name_what_is_wrong(preset, edit, match, tmp_path):
    text = (PRESETS / f"{preset}.yaml").read_text()
    assert edit[0] in text
    text = text.replace(*edit)
    if match is None:
        parse_preset(text, cache_dir=tmp_path)  # still valid
        return
    with pytest.raises(InvalidArgumentError, match=match):
        parse_preset(text, cache_dir=tmp_path)


def test_shared_connectors_must_agree_and_sum_needs_one_token_each(tmp_path):
    text = (PRESETS / "tiny-pandagpt.yaml").read_text()
    mixed = text.replace(
        '    connector: *proj\n    placeholder: "<audio>"',
        '    connector: {type: mlp2x_gelu, name: llama_proj}\n    placeholder: "<audio>"',
    )
    with pytest.raises(InvalidArgumentError, match="share connector 'llama_proj'"):
        parse_preset(mixed, cache_dir=tmp_path)
    chat = (PRESETS / "tiny-videochat.yaml").read_text() + "\nmedia_combine: sum\n"
    with pytest.raises(InvalidArgumentError, match=r"media_combine sum: .*one LLM token"):
        parse_preset(chat, cache_dir=tmp_path)
    per_modality = (PRESETS / "tiny-videochat.yaml").read_text() + "\nmedia_combine: sum_per_modality\n"
    with pytest.raises(InvalidArgumentError, match=r"media_combine sum_per_modality: .*one LLM token"):
        parse_preset(per_modality, cache_dir=tmp_path)


def test_real_presets_default_to_their_seeds_prompts(tmp_path):
    presets = {
        n: load_preset(n, cache_dir=tmp_path)
        for n in ("pandagpt", "nextgpt", "videochat", "etchat", "eventgpt")
    }
    assert {n: p.llm.dummy_prefix for n, p in presets.items()} == {
        "pandagpt": "every_run",
        "nextgpt": "every_run",
        "videochat": "every_run",
        "etchat": "none",
        "eventgpt": "first_run",
    }
    assert {n: p.media_combine for n, p in presets.items()} == {
        "pandagpt": "sum",
        "nextgpt": "sum_per_modality",
        "videochat": "separate",
        "etchat": "separate",
        "eventgpt": "separate",
    }
    assert {n: p.llm.inference_template for n, p in presets.items()} == {
        "pandagpt": None,
        "nextgpt": "nextgpt_demo",
        "videochat": None,
        "etchat": None,
        "eventgpt": None,
    }
    decoders = {m: o.decoder.defaults for m, o in presets["nextgpt"].outputs.items()}
    # NExT-GPT-Lagacy/code/demo_app.py sliders and constants
    assert (decoders["image"].guidance_scale, decoders["image"].steps) == (7.5, 50)
    video = decoders["video"]
    assert (video.guidance_scale, video.steps, video.num_frames, video.height, video.width, video.fps) == (
        7.5, 50, 24, 320, 576, 8,
    )  # fmt: skip
    assert (decoders["audio"].guidance_scale, decoders["audio"].steps, decoders["audio"].duration_s) == (
        7.5,
        50,
        9.0,
    )


def test_an_inference_only_template_cannot_be_trained_on(tmp_path):
    text = (
        (PRESETS / "tiny-nextgpt.yaml")
        .read_text()
        .replace("  template: vicuna_v0\n", "  template: nextgpt_demo\n")
    )
    with pytest.raises(InvalidArgumentError, match=r"llm\.template: nextgpt_demo is an inference form only"):
        parse_preset(text, cache_dir=tmp_path)
    bad = (
        (PRESETS / "tiny.yaml")
        .read_text()
        .replace("  template: vicuna_v1\n", "  template: vicuna_v1\n  dummy_prefix: always\n")
    )
    with pytest.raises(InvalidArgumentError, match="dummy_prefix"):
        parse_preset(bad, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            "generation: {temperature: 2.5}",
            r"generation\.temperature: Input should be less than or equal to 2",
        ),
        ("generation: {top_p: 0}", r"generation\.top_p: Input should be greater than 0"),
        ("generation: {top_k: -1}", r"generation\.top_k: Input should be greater than or equal to 0"),
        ("generation: {max_tokens: 0}", r"generation\.max_tokens: Input should be greater than 0"),
        (
            "generation: {repetition_penalty: 0}",
            r"generation\.repetition_penalty: Input should be greater than 0",
        ),
        (
            "generation: {repetition_penalty: .inf}",
            r"generation\.repetition_penalty: Input should be a finite",
        ),
        (
            "generation: {presence_penalty: 2.5}",
            r"generation\.presence_penalty: Input should be less than or equal",
        ),
        (
            "generation: {frequency_penalty: -3}",
            r"generation\.frequency_penalty: Input should be greater than",
        ),
        ("generation: {stop: ['']}", r"generation\.stop\.0: String should have at least 1 character"),
        (
            "generation: {stop_token_ids: [-1]}",
            r"generation\.stop_token_ids\.0: Input should be greater than",
        ),
        ("generation: {top_n: 3}", r"generation\.top_n: Extra inputs are not permitted"),
    ],
)
def test_generation_errors_name_the_field(edit, match, tmp_path):
    with pytest.raises(InvalidArgumentError, match=match):
        parse_preset(TINY.read_text() + edit + "\n", cache_dir=tmp_path)


@pytest.mark.parametrize("twin", ["tiny-nextgpt", "tiny-etchat"])
def test_drop_last_tokens_is_refused_where_tokens_place_media_or_times(twin, tmp_path):
    text = (PRESETS / f"{twin}.yaml").read_text() + "generation: {drop_last_tokens: 2}\n"
    with pytest.raises(InvalidArgumentError, match=r"generation\.drop_last_tokens: only for presets without"):
        parse_preset(text, cache_dir=tmp_path)


def test_twins_keep_the_neutral_generation_defaults(tmp_path):
    """The twins' tokenizers are not the seeds': no seed stop ids or sampling defaults there."""
    for name in SEEDS:
        assert load_preset(f"tiny-{name}", cache_dir=tmp_path).generation == GenerationSpec()


def test_real_presets_decode_as_their_seeds_demo_or_inference_script(tmp_path):
    """Each value is cited in the preset's comment and docs/presets.md (seed file:line)."""
    rows = {}
    for name in SEEDS:
        g = load_preset(name, cache_dir=tmp_path).generation
        rows[name] = (g.temperature, g.top_p, g.top_k, g.max_tokens, g.repetition_penalty)
        assert g.decode_reply_alone and (g.presence_penalty, g.frequency_penalty) == (0.0, 0.0)
    assert rows == {
        "pandagpt": (1.0, 0.01, 50, 256, 1.0),
        "nextgpt": (1.0, 0.01, 50, 246, 1.0),
        "videochat": (1.0, 0.9, 50, 1000, 1.0),
        "etchat": (0.2, 1.0, 0, 2048, 1.0),
        "eventgpt": (0.4, 1.0, 50, 512, 1.0),
    }
    panda = load_preset("pandagpt", cache_dir=tmp_path).generation
    assert (panda.stop, panda.stop_token_ids, panda.drop_last_tokens) == ([], [2277], 2)
    nextgpt = load_preset("nextgpt", cache_dir=tmp_path).generation
    assert (nextgpt.stop, nextgpt.stop_token_ids, nextgpt.include_stop_str_in_output) == ([], [835], True)
    for name in ("videochat", "etchat", "eventgpt"):  # the template's stop strings, then .strip()
        g = load_preset(name, cache_dir=tmp_path).generation
        assert (g.stop, g.stop_token_ids, g.strip) == (None, [], True)


def test_only_videochat_keeps_the_llm_frozen_in_instruction_tuning(tmp_path):
    """VideoChat freezes the LLM and adds no LoRA (video_chat/models/videochat.py:128-130)."""
    for name in SEEDS:
        for preset in (name, f"tiny-{name}"):
            assert load_preset(preset, cache_dir=tmp_path).lora.enabled is (name != "videochat")


def test_only_etchat_serves_without_the_checkpoints_sliding_window(tmp_path):
    """E.T. Chat's eager Phi-3 on transformers 4.44 applied no sliding window (etchat/model/
    builder.py:27,74); the Llama presets have none to apply."""
    for name in SEEDS:
        for preset in (name, f"tiny-{name}"):
            window = load_preset(preset, cache_dir=tmp_path).llm.sliding_window
            assert window == ("none" if name == "etchat" else "checkpoint")
