"""PandaGPT's demo prompt ids on a two-turn conversation with an image and an audio clip.

Runs PandaGPT's own `web_demo.py::predict` (read from the file: importing it loads a model) and
`OpenLLAMAPEFTModel.prepare_generation_embedding` / `extract_multimodal_feature`
(`code/model/openllama.py`) with a small Vicuna-style slow tokenizer built here (transformers
4.29's slow LlamaTokenizer, as PandaGPT), an embedding table that returns ids as values and
marker features for the media (see `_prompt_common`). Writes into tests/fixtures/parity/pandagpt/:
prompt.json (the ids of both turns' prompts; media positions as -(sum of 2**item)),
prompt.tokenizer-slow/ (the Vicuna-style folder) and prompt.tokenizer-fast/ (converted by
transformers 4.29).

    /work/scratch/venv/bin/python scripts/parity/pandagpt_prompt.py --repo /path/to/PandaGPT
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompt_common as common

TURNS = [
    {"image": 0, "audio": 1, "text": "What is in the image?", "reply": "A red circle on a white table."},
    {"text": "Describe it more.", "reply": "It is round and bright red."},
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="a PandaGPT checkout")
    args = parser.parse_args()
    code = args.repo / "code"

    import torch
    from transformers import LlamaTokenizer

    out = common.out_dir("pandagpt")
    with tempfile.TemporaryDirectory() as tmp:
        model = common.spm_model(Path(tmp))
    slow = common.llama_slow_folder(common.fresh(out / "prompt.tokenizer-slow"), model)
    common.fast_from_slow(slow, common.fresh(out / "prompt.tokenizer-fast"))

    # openllama.py imports `header` (deepspeed, peft, ...), ImageBind and a Llama copy, which
    # the prompt code does not use.
    common.stub("header", torch=torch, nn=torch.nn, LlamaTokenizer=LlamaTokenizer)
    common.package("pandagpt_model", code / "model")
    common.stub("pandagpt_model.ImageBind", data=None, imagebind_model=None, ModalityType=None)
    common.stub("pandagpt_model.ImageBind.data")
    common.stub("pandagpt_model.modeling_llama", LlamaForCausalLM=object)
    openllama = common.load_module("pandagpt_model.openllama", code / "model" / "openllama.py")
    cls = openllama.OpenLLAMAPEFTModel

    tokenizer = LlamaTokenizer.from_pretrained(str(slow), use_fast=False)  # as openllama.py line 108
    tokenizer.pad_token = tokenizer.eos_token
    markers = {"image": {}, "audio": {}, "video": {}, "thermal": {}}
    for turn in TURNS:
        for kind in ("image", "audio"):
            if kind in turn:
                markers[kind][f"{kind}{turn[kind]}.bin"] = turn[kind]

    fake = SimpleNamespace(llama_tokenizer=tokenizer, device="cpu")
    fake.llama_model = SimpleNamespace(
        model=SimpleNamespace(model=SimpleNamespace(embed_tokens=common.id_embedding()))
    )
    for kind in markers:

        def encode(paths, kind=kind):
            return torch.cat([common.media_marker(markers[kind][p]) for p in paths]), None

        setattr(fake, f"encode_{kind}", encode)
    fake.extract_multimodal_feature = lambda inputs: cls.extract_multimodal_feature(fake, inputs)

    prompts: list[list[int]] = []
    replies = iter(t["reply"] for t in TURNS)

    def generate(inputs):
        prompts.append(common.decode(cls.prepare_generation_embedding(fake, inputs)))
        return next(replies)

    names = common.seed_functions(
        code / "web_demo.py", ["predict", "parse_text"], {"model": SimpleNamespace(generate=generate)}
    )
    history: list = []
    chatbot: list = []
    cache: list = []
    first = TURNS[0]
    image = next(p for p, i in markers["image"].items() if i == first["image"])
    audio = next(p for p, i in markers["audio"].items() if i == first["audio"])
    names["predict"](first["text"], image, audio, None, None, chatbot, 256, 0.01, 1.0, history, cache)
    names["predict"](TURNS[1]["text"], image, audio, None, None, chatbot, 256, 0.01, 1.0, history, cache)

    path = common.write_fixture(
        "pandagpt",
        args.repo,
        {
            "seed_code": "code/web_demo.py predict (lines 101-141); code/model/openllama.py "
            "prepare_generation_embedding (240-261), extract_multimodal_feature (222-238)",
            "tokenizer": "slow LlamaTokenizer (use_fast=False) of prompt.tokenizer-slow",
            "turns": TURNS,
            "media": [{"modality": "image"}, {"modality": "audio"}],
            "prompts": prompts,
            "bos_token_id": tokenizer.bos_token_id,
        },
        sys.argv,
    )
    sys.stdout.write(f"wrote {path}: prompts of {[len(p) for p in prompts]} positions\n")


if __name__ == "__main__":
    main()
