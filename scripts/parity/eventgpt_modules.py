"""EventGPT module fixtures: the CLIP tower's last layer with CLS, the MLP2x-GELU visual projector,
the feature adaptor and the spatio-temporal aggregation, run by EventGPT's own `EventChatModel`
(model/EventChatModel.py) at reduced sizes.

    PYTHONPATH=/work/scratch/modules/shims /work/scratch/venv/bin/python \\
        scripts/parity/eventgpt_modules.py --repo /path/to/EventGPT

`model/EventChatModel.py` imports peft (get_peft_model, LoraConfig, TaskType) but builds and
runs these modules without it; where the scratch env has no peft, a stand-in package defining
those three names as None goes on PYTHONPATH (outside the project).

`EventChatModel(config)` is built as `EventChatModel.from_pretrained` builds it for inference
(inference.py): a config with `mm_visual_tower` (a local tiny CLIP folder: `CLIPVisionModel` +
`CLIPImageProcessor`, loaded by the seed's `VisualTower` in bfloat16) and
`event_feature_adaptor`, on a small Llama config. `EventChatLlamaModel.__init__` hard-codes
the CLIP width 1024 and the LLM width 4096 (EventChatModel.py:68-69) for the projector and
the adaptor; while the model is built, the module's `nn` is seen through a shim that turns
those two numbers into CLIP_WIDTH and LLM_HIDDEN. The model is then made float32 (the seed
serves bfloat16; this fixture is the fp32 math).

Outputs come from `prepare_inputs_labels_for_multimodal` as `generate` calls it with
`event_tensors` = one list of EVENT_FRAMES frames per prompt (`process_event_data` returns a
list, which the method wraps): per frame `visval_encode` (CLIP `last_hidden_state`, CLS kept,
then `visual_projector`) and `feature_adaptor`, then `get_spatio_temporal_features` (frame
means, then token means); the event rows are cut out of the spliced input embeddings.

Writes tests/fixtures/parity/eventgpt/modules.{safetensors,json}; weights named as the seed's
state dict names them (`model.visual_tower.visual_tower.vision_model.*`,
`model.visual_projector.{0,2}.*`, `model.feature_adaptor.*`; the Llama left out).
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from _modules_common import parse_args, patched, randn, randomize, state, versions, write_fixture

CLIP = {  # seed: openai/clip-vit-large-patch14-336 (1024 wide, 24 layers, 16 heads, 336 px)
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "projection_dim": 16,
}
LLM_HIDDEN = 24
EVENT_FRAMES = 5
EVENT_TOKEN_INDEX = -200
PROMPTS = [[1, 5, EVENT_TOKEN_INDEX, 7], [1, 9, EVENT_TOKEN_INDEX, 3]]  # ids around one <event> each


def build(repo: Path, work: Path) -> tuple[Any, Any]:
    sys.path.insert(0, str(repo))
    import model.EventChatModel as ecm
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip_dir = work / "clip"
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(clip_dir)
    side = CLIP["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(clip_dir)

    widths = {1024: CLIP["hidden_size"], 4096: LLM_HIDDEN}
    nn_shim = types.ModuleType("nn_shim")
    nn_shim.__dict__.update(torch.nn.__dict__)
    nn_shim.Linear = lambda i, o, *a, **kw: torch.nn.Linear(widths.get(i, i), widths.get(o, o), *a, **kw)  # type: ignore[attr-defined]

    config = ecm.EventChatConfig(
        vocab_size=64,
        hidden_size=LLM_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    config.mm_visual_tower = str(clip_dir)
    config.event_feature_adaptor = True
    with patched(ecm, "nn", nn_shim):
        model = ecm.EventChatModel(config)
    return model.float().eval(), ecm


def main() -> None:
    args = parse_args("eventgpt", __doc__)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, ecm = build(args.repo, Path(tmp))
    inner = model.get_model()
    assert inner.visual_projector[0].in_features == CLIP["hidden_size"]
    assert inner.feature_adaptor.in_features == LLM_HIDDEN
    randomize(model, gen)

    side = CLIP["image_size"]
    events = randn(gen, len(PROMPTS), EVENT_FRAMES, 3, side, side)  # per prompt, its event frames
    input_ids = torch.tensor(PROMPTS)
    tokens = (side // CLIP["patch_size"]) ** 2 + 1
    with torch.no_grad():
        last = inner.visual_tower.visual_tower(events.flatten(0, 1)).last_hidden_state  # (P*F, 1 + N, C)
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, None, None, None, [list(frames) for frames in events]
        )
    start = PROMPTS[0].index(EVENT_TOKEN_INDEX)
    assert all(p.index(EVENT_TOKEN_INDEX) == start for p in PROMPTS)
    features = embeds[:, start : start + EVENT_FRAMES + tokens]  # (P, F + 1 + N, hidden)
    assert embeds.shape[1] == len(PROMPTS[0]) - 1 + EVENT_FRAMES + tokens
    inputs = {"event_frames": events}
    outputs = {
        "clip_last_hidden_state": last.reshape(len(PROMPTS), EVENT_FRAMES, tokens, -1),
        "event_features": features,
    }
    weights = state(model, skip=("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
    write_fixture(
        args,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        record={
            "seed": "EventGPT",
            "repo": "EventGPT",
            "versions": versions("torch", "transformers"),
            "sizes": {
                "clip": CLIP,
                "llm_hidden": LLM_HIDDEN,
                "event_frames": EVENT_FRAMES,
                "tokens_per_frame": tokens,
            },
            "note": "EventGPT pins transformers 4.37.2; CLIPVisionModel's math is the same in the 4.29.2 used here",
            "shims": [
                "EventChatModel.nn seen through a shim while the model is built: nn.Linear widths 1024 "
                f"(CLIP) and 4096 (LLM), hard-coded at EventChatModel.py:68-69, become {CLIP['hidden_size']} "
                f"and {LLM_HIDDEN}",
                "peft: a stand-in package on PYTHONPATH in the scratch env (EventChatModel.py imports "
                "get_peft_model, LoraConfig, TaskType and uses none of them here)",
                "mm_visual_tower: a tiny local CLIP folder (CLIPVisionModel + CLIPImageProcessor)",
            ],
            "weight_files": {
                "EventGPT model folder (model.safetensors)": "model.visual_projector.*, model.feature_adaptor.*",
                "CLIP folder (mm_visual_tower)": "model.visual_tower.visual_tower.* = its vision_model.*",
            },
            "outputs": {
                "clip_last_hidden_state": {
                    "from": "model/EventChatModel.py visval_encode: visual_tower.visual_tower(ev).last_hidden_state",
                },
                "event_features": {
                    "from": "model/EventChatModel.py prepare_inputs_labels_for_multimodal (visval_encode, "
                    "feature_adaptor, get_spatio_temporal_features), the event rows of the input embeddings",
                },
            },
        },
    )
    del ecm


if __name__ == "__main__":
    main()
