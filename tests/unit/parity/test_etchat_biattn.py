"""E.T. Chat's bidirectional attention over the video span against the seed's own model code.

`tests/fixtures/parity/etchat/biattn.*` holds the outputs of ETBench's `ETChatPhi3ForCausalLM`
(transformers 4.44.2, eager attention) at tiny sizes with random weights, with `bi_attention` on
and off (`scripts/parity/etchat_biattn.py` wrote them). Here the same weights are written as a
Phi-3 Hugging Face folder and loaded as `services.models.lm.loading` loads an LLM, the prompt's
attention mask comes from the preset (`etchat`'s video `bidirectional`; a causal copy for off)
as the engine's prefill builds it, and the time matching runs through `TimedDecode`, the
engine's path: the prefill's logits, last hidden states, the final norm's input and the frame
keys, then every generated token, its logits and its matched frame, agree to 1e-5 (fp32). The
seed's training forward on a right-padded batch of two samples agrees with the trainer's
(`TrainingModel` with the preset's bidirectional modalities, as stage 3 builds it): loss and
logits at every real position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.presets import Preset, load_preset
from services.models.connectors.connector import build_connector
from services.models.lm.attention import prefill_attention_mask
from services.models.lm.model import FeatureLayout
from services.models.lm.time_matching import TimedDecode
from services.models.lm.timestamps import (
    HEAD_NAME,
    TimestampMatcher,
    capture_norm_input,
    load_timestamp_heads,
)
from services.models.lm.training import TrainingModel
from services.trainer.loop import MediaInExample, TrainExample, collate

FIXTURE = Path(__file__).parents[2] / "fixtures" / "parity" / "etchat"
TOL = 1e-5
IMAGE_TOKEN_INDEX = -200  # where the seed's prompt holds the video


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(FIXTURE / "biattn.safetensors")), json.loads((FIXTURE / "biattn.json").read_text())


@pytest.fixture(scope="module")
def llm_folder(
    golden: tuple[dict[str, torch.Tensor], dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The fixture's LLM as a Phi-3 Hugging Face folder (config.json + model.safetensors)."""
    from transformers import Phi3Config

    tensors, meta = golden
    folder = tmp_path_factory.mktemp("etchat-biattn") / "llm"
    Phi3Config(**meta["llm_config"]).save_pretrained(folder)
    save_file(
        {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))},
        str(folder / "model.safetensors"),
    )
    return folder


def load_lm(folder: Path, implementation: str | None = None) -> Any:
    """As `services.models.lm.loading.load_model` loads it (its default implementation: SDPA)."""
    from transformers import AutoModelForCausalLM

    options = {} if implementation is None else {"attn_implementation": implementation}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options).eval()


def preset(mode: str, tmp_path: Path) -> Preset:
    """The shipped etchat preset (bidirectional video: the seed's release) or a causal copy."""
    etchat = load_preset("etchat", cache_dir=tmp_path)
    if mode == "on":
        return etchat
    video = etchat.modalities["video"].model_copy(update={"attention": "causal"})
    return etchat.model_copy(update={"modalities": {"video": video}})


def prompt(lm: Any, tensors: dict[str, torch.Tensor], span: list[int]) -> torch.Tensor:
    """The prompt's input embeddings (1, L, D): text ids, and the video's tokens at its span."""
    ids = tensors["input_ids"]
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    frames = tensors["span_embeds"]  # (F, D)
    assert (at, at + frames.shape[0]) == tuple(span)
    expanded = torch.cat([ids[:at], torch.zeros(frames.shape[0], dtype=torch.long), ids[at + 1 :]])  # (L,)
    embeds = lm.get_input_embeddings()(expanded[None]).clone()  # (1, L, D)
    embeds[0, span[0] : span[1]] = frames
    return embeds


def heads(tensors: dict[str, torch.Tensor]) -> Any:
    flat = {f"{HEAD_NAME}.{k}": v for k, v in tensors.items() if k.startswith(("frm_head.", "vid_head."))}
    return load_timestamp_heads(flat, hidden_size=tensors["span_embeds"].shape[1])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("implementation", [None, "eager"])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_prefill_matches_the_seed(
    golden: tuple[dict[str, torch.Tensor], dict[str, Any]],
    llm_folder: Path,
    mode: str,
    implementation: str | None,
    tmp_path: Path,
) -> None:
    tensors, meta = golden
    lm = load_lm(llm_folder, implementation)
    span = meta["span"]
    with torch.no_grad():
        embeds = prompt(lm, tensors, span)
        mask = prefill_attention_mask(
            preset(mode, tmp_path), lm, ["video"], [(span[0], span[1] - span[0])], embeds
        )
        assert (mask is None) == (mode == "off")
        with capture_norm_input(lm) as norm_in:
            out = lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        assert norm_in.value is not None
        keys = heads(tensors).keys(norm_in.value[0, span[0] : span[1]])  # (F, D)
    assert max_diff(out.logits[0], tensors[f"{mode}.logits"]) <= TOL
    assert max_diff(out.hidden_states[-1][0], tensors[f"{mode}.last_hidden"]) <= TOL
    assert max_diff(norm_in.value[0], tensors[f"{mode}.prenorm"]) <= TOL
    assert max_diff(keys, tensors[f"{mode}.frame_keys"]) <= TOL


@pytest.mark.parametrize("mode", ["on", "off"])
def test_generation_and_its_matched_frames_match_the_seed(
    golden: tuple[dict[str, torch.Tensor], dict[str, Any]], llm_folder: Path, mode: str, tmp_path: Path
) -> None:
    """The engine's time-matching decode (`TimedDecode`) after the preset's prefill: the seed's
    greedy tokens (the time token forced where the fixture forced it), each step's logits and
    the frame matched at every position."""
    tensors, meta = golden
    lm = load_lm(llm_folder)
    span, vid, eos = meta["span"], meta["match_token_id"], meta["eos_token_id"]
    expected = meta["runs"][mode]
    with torch.no_grad():
        embeds = prompt(lm, tensors, span)
        mask = prefill_attention_mask(
            preset(mode, tmp_path), lm, ["video"], [(span[0], span[1] - span[0])], embeds
        )
        frames = tensors["span_embeds"]
        matcher = TimestampMatcher(
            heads(tensors), token_id=vid, span=tuple(span), frame_embeds=frames, times=range(frames.shape[0])
        )
        timed = TimedDecode(lm, matcher, 0)
        out = timed.prefill(embeds, mask)
        tokens = []
        for step in range(len(expected["tokens"])):
            logits = out.logits[0, -1]  # (V,)
            assert max_diff(logits, tensors[f"{mode}.step_logits"][step]) <= TOL
            banned = logits.clone()
            banned[[vid, eos]] = -float("inf")
            token = vid if step in meta["forced_steps"] else int(banned.argmax())
            tokens.append(token)
            timed.on_token(token)
            if step + 1 < len(expected["tokens"]):
                out = timed.step(token, out.past_key_values)
    assert tokens == expected["tokens"]
    assert timed.matches == expected["frames"]
    assert [s.frame for s in matcher.timestamps] == [expected["frames"][s] for s in meta["forced_steps"]]


def test_the_bidirectional_span_changes_the_seed_outputs(
    golden: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    """On and off differ from the span on (and agree before it), so the tests above tell them apart."""
    tensors, meta = golden
    start, end = meta["span"]
    on, off = tensors["on.logits"], tensors["off.logits"]
    assert max_diff(on[:start], off[:start]) <= TOL
    assert float((on[start : end - 1] - off[start : end - 1]).abs().amax(-1).min()) > 1e-2
    assert float((on[end:] - off[end:]).abs().amax(-1).min()) > 1e-2
    assert max_diff(tensors["on.frame_keys"], tensors["off.frame_keys"]) > 1e-2
    assert meta["runs"]["on"] != meta["runs"]["off"]


def training_example(tensors: dict[str, torch.Tensor], i: int) -> TrainExample:
    """Sample i of the seed's batch as the trainer's example: the `<image>` expanded to its
    frames (placeholder id 0, not supervised), the span's embeddings as the item's features."""
    ids, labels, frames = (tensors[f"train.{k}.{i}"] for k in ("input_ids", "labels", "span_embeds"))
    at, count = int((ids == IMAGE_TOKEN_INDEX).nonzero()), frames.shape[0]
    return TrainExample(
        input_ids=[*ids[:at].tolist(), *[0] * count, *ids[at + 1 :].tolist()],
        labels=[*labels[:at].tolist(), *[-100] * count, *labels[at + 1 :].tolist()],
        media=[MediaInExample(at, count, "video", frames)],
    )


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_stage3_training_forward_matches_the_seed(
    golden: tuple[dict[str, torch.Tensor], dict[str, Any]], llm_folder: Path, mode: str, tmp_path: Path
) -> None:
    tensors, _ = golden
    lm = load_lm(llm_folder)
    width = tensors["span_embeds"].shape[1]
    identity = build_connector("linear", in_dim=width, out_dim=width)  # the features are the span's tokens
    with torch.no_grad():
        identity.proj.weight.copy_(torch.eye(width))
        identity.proj.bias.zero_()
    model = TrainingModel(
        lm,
        {"video": identity},
        {"video": FeatureLayout("video", tokens_per_frame=1, dim=width, frames=None)},
        bidirectional=preset(mode, tmp_path).bidirectional_modalities(),
    )
    examples = [training_example(tensors, i) for i in (0, 1)]
    logits: list[torch.Tensor] = []
    handle = model.lm.register_forward_hook(lambda _m, _a, out: logits.append(out.logits))
    try:
        with torch.no_grad():
            loss = model(**collate(examples, pad_id=0, device=torch.device("cpu")))
    finally:
        handle.remove()
    expected = tensors[f"train.{mode}.logits"]  # (B, L, V); the seed pads the embeddings with zeros
    assert logits[0].shape == expected.shape
    for row, example in enumerate(examples):
        real = len(example.input_ids)
        assert max_diff(logits[0][row, :real], expected[row, :real]) <= TOL
    assert abs(float(loss) - float(tensors[f"train.{mode}.loss"])) <= TOL
