"""PandaGPT module fixtures: ImageBind's vision and audio towers (heads, postprocessors, clip
averaging) and `llama_proj`, run by PandaGPT's own code at reduced sizes.

    /work/scratch/venv/bin/python scripts/parity/pandagpt_modules.py --repo /path/to/PandaGPT

Builds `ImageBindModel` from `code/model/ImageBind/models/imagebind_model.py` with small tower
widths and depths (its constructor arguments). The one size it hard-codes, the vision
preprocessor's 224 px (imagebind_model.py:172), is changed to 42 px by wrapping
`RGBDTPreprocessor` while the model is built. `llama_proj` is the `nn.Linear(visual_hidden_size,
hidden_size)` of `code/model/openllama.py` (OpenLLAMAPEFTModel.__init__), applied as its
`encode_image/video/audio` do. The forward is `ImageBindModel.forward` as PandaGPT ships it:
several clips per item averaged after normalisation, audio through its Normalize only.

Writes tests/fixtures/parity/pandagpt/modules.{safetensors,json}; weights are named as
`imagebind_huge.pth` (modality_*) and PandaGPT's `pytorch_model.pt` (llama_proj.*) name them.
"""

from __future__ import annotations

import torch
from _modules_common import (
    IMAGEBIND_IMAGE,
    IMAGEBIND_SHIM,
    IMAGEBIND_SIZES,
    imagebind_case,
    parse_args,
    versions,
    write_fixture,
)

LLM_HIDDEN = 40


def main() -> None:
    args = parse_args("pandagpt", __doc__)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    weights, inputs, outputs, notes = imagebind_case(
        args.repo / "code" / "model" / "ImageBind",
        gen,
        llm_hidden=LLM_HIDDEN,
        batch=2,
        video_clips=2,
        audio_clips=2,
        where="code/model/openllama.py",
    )
    write_fixture(
        args,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        record={
            "seed": "PandaGPT",
            "repo": "PandaGPT",
            "versions": versions("torch", "timm"),
            "sizes": {**IMAGEBIND_SIZES, "image_size": IMAGEBIND_IMAGE, "llm_hidden": LLM_HIDDEN},
            "shims": [IMAGEBIND_SHIM],
            "weight_files": {
                "imagebind_huge.pth": "modality_* (vision and audio towers only)",
                "pytorch_model.pt": "llama_proj.*",
            },
            "outputs": notes,
        },
    )


if __name__ == "__main__":
    main()
