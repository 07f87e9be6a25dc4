"""NExT-GPT (legacy) module fixtures: its ImageBind copy + `llama_proj` on the input side, and
the three output projectors (`TextFcLayer`, mode transformer), run by the seed's own code.

    /work/scratch/venv/bin/python scripts/parity/nextgpt_modules.py --repo /path/to/NExT-GPT

- ImageBind: `NExT-GPT-Lagacy/code/model/ImageBind/models` (the same code as PandaGPT's copy but
  for comments; built and run exactly as scripts/parity/pandagpt_modules.py does).
- `llama_proj`: `nn.Linear(visual_hidden_size, hidden_size)` (anyToImageVideoAudio.py,
  NextGPTModel.__init__), applied as its `encode_image/video/audio`.
- Output projectors: `layers.py` `TextFcLayer(in_dim, out_dim, num_input_tokens,
  num_output_tokens, mode='transformer')`, one per modality in a ModuleList as
  NextGPTModel.__init__ builds them (`gen_text_hidden_fcs{,_video,_audio}`, slot 0 = layer -1),
  with the seed's token counts (4 -> 77, 24 -> 77, 8 -> 1) and small widths. TextFcLayer
  hard-codes its transformer width (`hidden_dim = 512`, layers.py:42, and 4 x 512 feed-forward):
  while it is built, `layers.nn` and `layers.torch` are seen through a shim that turns the
  sizes 512 and 2048 into HIDDEN and 4 x HIDDEN; heads (4), layers (4 + 4), dropout, norm_first
  and the forward are the seed's.

Writes tests/fixtures/parity/nextgpt/modules.{safetensors,json}.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch
from _modules_common import (
    IMAGEBIND_IMAGE,
    IMAGEBIND_SHIM,
    IMAGEBIND_SIZES,
    imagebind_case,
    parse_args,
    randn,
    randomize,
    state,
    versions,
    write_fixture,
)

LLM_HIDDEN = 40
HIDDEN = 16  # TextFcLayer's transformer width (seed: 512)
# head -> (seed attribute, num_input_tokens, num_output_tokens, out_dim (seed: 768 / 1024 / 512))
OUTPUTS = {
    "image": ("gen_text_hidden_fcs", 4, 77, 12),
    "video": ("gen_text_hidden_fcs_video", 24, 77, 10),
    "audio": ("gen_text_hidden_fcs_audio", 8, 1, 8),
}
BATCH = 2


def import_layers(model_dir: Any) -> types.ModuleType:
    """`code/model/layers.py` (and its `.qformer`) without running the package's __init__
    (which loads the whole NExT-GPT model and its diffusers pipelines)."""
    package = types.ModuleType("nextgpt_model")
    package.__path__ = [str(model_dir)]  # type: ignore[attr-defined]
    sys.modules["nextgpt_model"] = package
    return importlib.import_module("nextgpt_model.layers")


def resized(value: Any) -> Any:
    return {512: HIDDEN, 2048: 4 * HIDDEN}.get(value, value) if isinstance(value, int) else value


def width_shim(layers: types.ModuleType) -> tuple[types.ModuleType, types.ModuleType]:
    """Stand-ins for `layers.nn` and `layers.torch` that build the hard-coded 512 as HIDDEN."""
    nn_shim = types.ModuleType("nn_shim")
    nn_shim.__dict__.update(torch.nn.__dict__)
    nn_shim.Linear = lambda i, o, *a, **kw: torch.nn.Linear(resized(i), resized(o), *a, **kw)  # type: ignore[attr-defined]
    nn_shim.Transformer = lambda **kw: torch.nn.Transformer(**{k: resized(v) for k, v in kw.items()})  # type: ignore[attr-defined]
    torch_shim = types.ModuleType("torch_shim")
    torch_shim.__dict__.update(torch.__dict__)
    torch_shim.randn = lambda *shape, **kw: torch.randn(*[resized(s) for s in shape], **kw)  # type: ignore[attr-defined]
    return nn_shim, torch_shim


def main() -> None:
    args = parse_args("nextgpt", __doc__)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    code = args.repo / "NExT-GPT-Lagacy" / "code"
    weights, inputs, outputs, notes = imagebind_case(
        code / "model" / "ImageBind",
        gen,
        llm_hidden=LLM_HIDDEN,
        batch=1,
        video_clips=2,
        audio_clips=2,
        where="NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py",
    )

    layers = import_layers(code / "model")
    nn_shim, torch_shim = width_shim(layers)
    real_nn, real_torch = layers.nn, layers.torch
    layers.nn, layers.torch = nn_shim, torch_shim
    try:
        heads = {
            m: torch.nn.ModuleList(
                [
                    layers.TextFcLayer(
                        LLM_HIDDEN, out, num_input_tokens=n_in, num_output_tokens=n_out, mode="transformer"
                    )
                ]
            )
            for m, (_, n_in, n_out, out) in OUTPUTS.items()
        }
    finally:
        layers.nn, layers.torch = real_nn, real_torch
    for modality, (attr, n_in, n_out, _out) in OUTPUTS.items():
        module = heads[modality].eval()
        assert module[0].tfm.d_model == HIDDEN and module[0].query_embs.shape == (1, n_out, HIDDEN)
        randomize(module, gen)
        hidden = randn(gen, BATCH, n_in, LLM_HIDDEN)
        embeds = randn(gen, BATCH, n_in, LLM_HIDDEN, scale=0.5)
        with torch.no_grad():
            # anyToImageVideoAudio.py generate: gen_emb = self.gen_text_hidden_fcs[-1](raw_emb, gen_prefix_embs)
            outputs[f"{attr}"] = module[-1](hidden, embeds)
        inputs[f"{attr}.hidden"] = hidden
        inputs[f"{attr}.input_embs"] = embeds
        notes[attr] = {
            "from": f"NExT-GPT-Lagacy/code/model/layers.py TextFcLayer.forward ({modality}, mode transformer)"
        }
        weights.update(state(module, f"{attr}."))

    write_fixture(
        args,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        record={
            "seed": "NExT-GPT",
            "repo": "NExT-GPT",
            "versions": versions("torch", "timm", "transformers"),
            "sizes": {
                **IMAGEBIND_SIZES,
                "image_size": IMAGEBIND_IMAGE,
                "llm_hidden": LLM_HIDDEN,
                "projector_hidden": HIDDEN,
                "projector_heads": 4,
                "projector_layers": [4, 4],
                "outputs": {
                    m: {"head": a, "num_input_tokens": i, "num_output_tokens": o, "out_dim": d}
                    for m, (a, i, o, d) in OUTPUTS.items()
                },
            },
            "shims": [
                IMAGEBIND_SHIM,
                f"layers.py TextFcLayer built with `nn`/`torch` seen through a shim mapping the "
                f"hard-coded width 512 (layers.py:42) to {HIDDEN} and its feed-forward 2048 to {4 * HIDDEN}",
                "code/model/__init__.py not run (it imports the whole model); layers.py and qformer.py "
                "imported as a package of their own",
            ],
            "weight_files": {
                "imagebind_huge.pth": "modality_* (vision and audio towers only)",
                "pytorch_model.pt": "llama_proj.*, gen_text_hidden_fcs{,_video,_audio}.0.*",
            },
            "outputs": notes,
        },
    )


if __name__ == "__main__":
    main()
