"""Training job specs: parsing (YAML/JSON/mapping), defaults, the multi-host rule, queues, and the
pre-queue validation that refuses a bad job with a message naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgumentError
from services.common.settings import Settings
from services.trainer.jobs import (
    STAGE_DEFAULTS,
    JobRecord,
    JobSpec,
    parse_job,
    queue_for,
    validate_job,
)


def captions(folder: Path, name: str = "caps.jsonl") -> Path:
    path = folder / name
    path.write_text(json.dumps({"image": "a.png", "caption": "a red circle"}) + "\n")
    return path


def job(folder: Path, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "preset": "tiny",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": str(captions(folder))}],
    }
    return base | fields


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", presets_dir=None)


# -- parse_job ------------------------------------------------------------------------------------


def test_yaml_text_parses_with_the_documented_defaults() -> None:
    spec = parse_job("preset: tiny\nstage: stage3\ndatasets:\n  - {format: llava, path: /d/x.json}\n")
    assert (spec.preset, spec.stage, spec.datasets[0].format, spec.datasets[0].modality) == (
        "tiny",
        "stage3",
        "llava",
        "image",
    )
    hp, ds = spec.hyperparameters, spec.deepspeed
    assert (hp.epochs, hp.max_steps, hp.micro_batch_size, hp.grad_accum) == (1, None, 8, 1)
    assert (hp.lr, hp.connector_lr) == (None, None)  # None: the stage's default
    assert (ds.zero_stage, ds.world_size, ds.nodes, ds.launcher, ds.hardware, ds.precision) == (
        2,
        1,
        1,
        "torchrun",
        "cpu",
        "auto",
    )
    assert (spec.init_from, spec.publish, spec.adapter_name) == ("current", True, None)
    assert spec.lora.r is None and spec.lora.targets is None


def test_json_bytes_and_a_mapping_give_the_same_spec(tmp_path: Path) -> None:
    fields = job(tmp_path, hyperparameters={"lr": 5e-4, "max_steps": 3})
    from_bytes = parse_job(json.dumps(fields).encode())
    assert from_bytes == parse_job(fields)
    assert (from_bytes.hyperparameters.lr, from_bytes.hyperparameters.max_steps) == (5e-4, 3)


def test_invalid_yaml_is_refused_naming_the_source() -> None:
    with pytest.raises(InvalidArgumentError, match=r"^my job: not valid YAML or JSON"):
        parse_job("preset: [unclosed", source="my job")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42", "int"), ("", "NoneType")])
def test_a_document_that_is_not_a_mapping_is_refused(text: str, kind: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"expected a mapping of job fields, got {kind}$"):
        parse_job(text)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"hyperparameters": {"lr": -1}}, "hyperparameters.lr"),
        ({"hyperparameters": {"micro_batch_size": 0}}, "hyperparameters.micro_batch_size"),
        ({"hyperparameters": {"warmup_ratio": 1.0}}, "hyperparameters.warmup_ratio"),
        ({"deepspeed": {"zero_stage": 1}}, "deepspeed.zero_stage"),
        ({"deepspeed": {"hardware": "GPU!"}}, "deepspeed.hardware"),
        ({"stage": "stage9"}, "stage"),
        ({"datasets": []}, "datasets"),
        ({"adapter_name": "../evil"}, "adapter_name"),
        ({"bogus": 1}, "bogus"),
        ({"hyperparameters": {"lr_typo": 1}}, "hyperparameters.lr_typo"),
    ],
)
def test_a_wrong_field_is_named_in_the_message(tmp_path: Path, override: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_job(job(tmp_path, **override))
    assert info.value.message.startswith("job: ")
    assert f" {field}: " in info.value.message


def test_a_missing_required_field_is_named(tmp_path: Path) -> None:
    fields = job(tmp_path)
    del fields["preset"]
    with pytest.raises(InvalidArgumentError, match=r"preset: Field required"):
        parse_job(fields)


def test_specs_are_frozen(tmp_path: Path) -> None:
    spec = parse_job(job(tmp_path))
    with pytest.raises(ValueError, match="frozen"):
        spec.stage = "stage3"  # type: ignore[misc]


# -- DeepSpeedSpec: several hosts need the deepspeed launcher -------------------------------------


@pytest.mark.parametrize("deepspeed", [{"nodes": 2}, {"hostfile": "/etc/hostfile"}])
def test_several_hosts_with_torchrun_are_refused(tmp_path: Path, deepspeed: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError, match="need launcher: deepspeed"):
        parse_job(job(tmp_path, deepspeed=deepspeed))


def test_several_hosts_with_the_deepspeed_launcher_are_accepted(tmp_path: Path) -> None:
    spec = parse_job(
        job(tmp_path, deepspeed={"nodes": 2, "hostfile": "/etc/hostfile", "launcher": "deepspeed"})
    )
    assert (spec.deepspeed.nodes, spec.deepspeed.hostfile) == (2, Path("/etc/hostfile"))


def test_queue_for_names_one_queue_per_hardware_class() -> None:
    assert queue_for("cpu") == "train.cpu"
    assert queue_for("a100_80g") == "train.a100_80g"


def test_stage_defaults_follow_the_llava_recipe() -> None:
    s1, s3 = STAGE_DEFAULTS["stage1"], STAGE_DEFAULTS["stage3"]
    assert (s1.template, s1.lora, s1.connector_lr) == ("plain", False, None)
    assert (s3.template, s3.lora) == (None, True)
    assert s1.lr > s3.lr > s3.connector_lr  # type: ignore[operator]
    s2 = STAGE_DEFAULTS["stage2"]  # NExT-GPT pretrain_dec.sh: projectors at 2e-4, the preset's template
    assert (s2.template, s2.lora, s2.lr) == (None, False, 2e-4)


# -- validate_job ---------------------------------------------------------------------------------


def test_a_valid_job_resolves_its_preset_and_adapter_name(tmp_path: Path, settings: Settings) -> None:
    validated = validate_job(parse_job(job(tmp_path)), settings)
    assert validated.preset.name == "tiny"
    assert validated.adapter_name == validated.preset.adapter.name == "tiny"
    named = validate_job(parse_job(job(tmp_path, adapter_name="mine")), settings)
    assert named.adapter_name == "mine"


def test_an_unknown_preset_is_an_invalid_argument(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^job.preset: preset 'nope' not found") as info:
        validate_job(parse_job(job(tmp_path, preset="nope")), settings)
    assert info.value.param == "preset"


def test_a_broken_preset_file_is_an_invalid_argument(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "broken.yaml").write_text("name: broken\n")
    settings = Settings(cache_dir=tmp_path / "cache", presets_dir=presets)
    with pytest.raises(InvalidArgumentError, match=r"^job.preset: preset .*broken.yaml") as info:
        validate_job(parse_job(job(tmp_path, preset="broken")), settings)
    assert info.value.param == "preset"


def t2x(folder: Path, name: str = "t2x.jsonl") -> Path:
    path = folder / name
    record = {"caption": "a red circle", "output_modality": "image", "embedding": "a.npy"}
    path.write_text(json.dumps(record) + "\n")
    return path


def test_stage2_for_a_preset_without_outputs_is_refused(tmp_path: Path, settings: Settings) -> None:
    datasets = [{"format": "t2x", "path": str(t2x(tmp_path))}]
    with pytest.raises(
        InvalidArgumentError, match=r"stage2 aligns the output projectors; preset tiny has no outputs"
    ) as info:
        validate_job(parse_job(job(tmp_path, stage="stage2", datasets=datasets)), settings)
    assert info.value.param == "stage"


def test_stage2_takes_t2x_data_only_and_t2x_needs_outputs(tmp_path: Path, settings: Settings) -> None:
    nextgpt = job(tmp_path, preset="tiny-nextgpt", stage="stage2")
    with pytest.raises(
        InvalidArgumentError, match=r"expected format 't2x' for every dataset, got \['captions'\]"
    ):
        validate_job(parse_job(nextgpt), settings)
    ok = nextgpt | {"datasets": [{"format": "t2x", "path": str(t2x(tmp_path))}]}
    assert validate_job(parse_job(ok), settings).preset.name == "tiny-nextgpt"
    smell = ok | {"datasets": [{"format": "t2x", "path": str(t2x(tmp_path)), "modality": "smell"}]}
    with pytest.raises(InvalidArgumentError, match=r"produces \['audio', 'image', 'video'\], got 'smell'"):
        validate_job(parse_job(smell), settings)
    on_tiny = job(tmp_path, stage="stage3", datasets=ok["datasets"])
    with pytest.raises(InvalidArgumentError, match=r"t2x needs a preset with outputs; preset tiny has none"):
        validate_job(parse_job(on_tiny), settings)
    in_stage1 = nextgpt | {"stage": "stage1", "datasets": ok["datasets"]}
    with pytest.raises(InvalidArgumentError, match=r"t2x data trains output projectors \(stage2, stage3\)"):
        validate_job(parse_job(in_stage1), settings)


def test_a_modality_the_preset_lacks_is_refused(tmp_path: Path, settings: Settings) -> None:
    datasets = [{"format": "captions", "path": str(captions(tmp_path)), "modality": "audio"}]
    with pytest.raises(InvalidArgumentError, match=r"has \['image'\], got 'audio'") as info:
        validate_job(parse_job(job(tmp_path, datasets=datasets)), settings)
    assert info.value.param == "datasets[0].modality"


def test_a_missing_dataset_file_is_refused_naming_its_index(tmp_path: Path, settings: Settings) -> None:
    datasets = [
        {"format": "captions", "path": str(captions(tmp_path))},
        {"format": "captions", "path": str(tmp_path / "missing.jsonl")},
    ]
    with pytest.raises(InvalidArgumentError, match=r"^job.datasets\[1\]: .*expected a file, found nothing"):
        validate_job(parse_job(job(tmp_path, datasets=datasets)), settings)


def test_stage1_needs_caption_datasets(tmp_path: Path, settings: Settings) -> None:
    conversations = tmp_path / "conv.json"
    conversations.write_text("[]")
    datasets = [
        {"format": "captions", "path": str(captions(tmp_path))},
        {"format": "llava", "path": str(conversations)},
    ]
    with pytest.raises(InvalidArgumentError, match=r"got \['captions', 'llava'\]"):
        validate_job(parse_job(job(tmp_path, datasets=datasets)), settings)
    validate_job(parse_job(job(tmp_path, stage="stage3", datasets=datasets)), settings)  # stage 3 takes both


def test_a_missing_hostfile_is_refused(tmp_path: Path, settings: Settings) -> None:
    ds = {"launcher": "deepspeed", "nodes": 2, "hostfile": str(tmp_path / "hosts")}
    with pytest.raises(InvalidArgumentError, match="hosts does not exist") as info:
        validate_job(parse_job(job(tmp_path, deepspeed=ds)), settings)
    assert info.value.param == "deepspeed.hostfile"
    (tmp_path / "hosts").write_text("node1 slots=2\nnode2 slots=2\n")
    validate_job(parse_job(job(tmp_path, deepspeed=ds)), settings)


def test_init_from_accepts_its_four_forms_and_refuses_anything_else(
    tmp_path: Path, settings: Settings
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    for init in ("current", "preset", "tiny@3", str(bundle)):
        assert validate_job(parse_job(job(tmp_path, init_from=init)), settings).spec.init_from == init
    (bundle / "manifest.json").unlink()
    with pytest.raises(InvalidArgumentError, match=r"holding manifest\.json, got") as info:
        validate_job(parse_job(job(tmp_path, init_from=str(bundle))), settings)
    assert info.value.param == "init_from"


# -- JobRecord ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["QUEUED", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"])
def test_record_done_only_in_final_states(state: str) -> None:
    done = state in ("SUCCEEDED", "FAILED", "CANCELLED")
    assert JobRecord(id="j", spec={}, queue="train.cpu", state=state).done is done  # type: ignore[arg-type]


def test_record_public_is_plain_json_and_ignores_unknown_stored_fields() -> None:
    record = JobRecord(id="j", spec={"preset": "tiny"}, queue="train.cpu", progress={"step": 3})
    public = record.public()
    assert json.loads(json.dumps(public)) == public
    assert (public["id"], public["state"], public["progress"]) == ("j", "QUEUED", {"step": 3})
    stored = json.loads(record.model_dump_json()) | {"field_from_a_newer_version": 1}
    assert JobRecord.model_validate(stored) == record


def test_job_spec_model_rejects_extra_fields_directly() -> None:
    with pytest.raises(ValueError, match="extra"):
        JobSpec.model_validate(
            {"preset": "t", "stage": "stage1", "datasets": [{"format": "captions", "path": "x"}], "x": 1}
        )
