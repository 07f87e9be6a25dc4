"""Legacy NExT-GPT's inference prompt ids: its Gradio demo over two turns, and a summed pair.

Runs legacy NExT-GPT's own code (`NExT-GPT-Lagacy/code`): `demo_app.py`'s `predict`,
`parse_text` and `parse_reponse` (read from the file: importing it loads a model) and
`NextGPTModel.prepare_generation_embedding` / `_prepare_image_embed` / ... and
`_add_image_token` / `_add_video_token` / `_add_audio_token` (`model/anyToImageVideoAudio.py`)
with a small Vicuna-style slow tokenizer built here (transformers 4.29's slow LlamaTokenizer,
as NExT-GPT), the seed's tokens added by its own code, an embedding table that returns ids as
values and marker features for the media (see `_prompt_common`). Scenarios:

- demo: turn 1 with an image ("What is in the image?"), its reply, turn 2 without media;
- sum: one turn whose media segment holds two images ("<Image>a</Image><Image>b</Image>"),
  which `_prepare_image_embed` sums into one token, then the demo's "  question";
- texts: the seed's tokenizer (its tokens added) on texts around them, as training writes
  ("</Img> " + question).

Writes into tests/fixtures/parity/nextgpt/: prompt.json, prompt.tokenizer-slow/ (the
Vicuna-style base folder, before the seed adds its tokens) and prompt.tokenizer-fast/.

    /work/scratch/venv/bin/python scripts/parity/nextgpt_prompt.py --repo /path/to/NExT-GPT
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompt_common as common

TURNS = [
    {"image": 0, "text": "What is in the image?", "reply": "A red circle on a white table."},
    {"text": "Describe it more.", "reply": "It is round and bright red."},
]
SUM_TEXT = "What are these?"
TEXTS = [
    "### Human: <Img>",
    "</Img> What is in the image?\n### Assistant: A red circle.\n###",
    "A red circle [IMG0] [IMG1] [IMG2] [IMG3]\n###",
    "Sure.[VID0] [VID1]  [AUD0]",
]
GEN_TOKENS = {"num_gen_img_tokens": 4, "num_gen_video_tokens": 24, "num_gen_audio_tokens": 8}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="a NExT-GPT checkout")
    args = parser.parse_args()
    code = args.repo / "NExT-GPT-Lagacy" / "code"

    import torch
    from transformers import LlamaTokenizer, StoppingCriteria, StoppingCriteriaList

    out = common.out_dir("nextgpt")
    with tempfile.TemporaryDirectory() as tmp:
        model = common.spm_model(Path(tmp))
    slow = common.llama_slow_folder(common.fresh(out / "prompt.tokenizer-slow"), model)
    common.fast_from_slow(slow, common.fresh(out / "prompt.tokenizer-fast"))

    # anyToImageVideoAudio.py imports `header` (deepspeed, omegaconf, diffusers, ...), ImageBind,
    # a Llama copy, the diffusers pipelines and the projector layers: none is used to build a prompt.
    common.stub("header", torch=torch, nn=torch.nn, re=re, LlamaTokenizer=LlamaTokenizer)
    common.package("nextgpt_model", code / "model")
    common.stub("nextgpt_model.ImageBind", data=None)
    common.stub("nextgpt_model.ImageBind.data")
    common.stub("nextgpt_model.modeling_llama", LlamaForCausalLM=object)
    common.stub("nextgpt_model.custom_sd", StableDiffusionPipeline=object)
    common.stub("nextgpt_model.custom_vd", TextToVideoSDPipeline=object)
    common.stub("nextgpt_model.custom_ad", AudioLDMPipeline=object)
    common.stub("nextgpt_model.layers")
    common.package("nextgpt_model.common", code / "model" / "common")
    common.stub("nextgpt_model.common.utils")
    module = common.load_module(
        "nextgpt_model.anyToImageVideoAudio", code / "model" / "anyToImageVideoAudio.py"
    )
    cls = module.NextGPTModel

    fake = cls.__new__(cls)
    torch.nn.Module.__init__(fake)
    fake.args = {"freeze_lm": False, **GEN_TOKENS}
    fake.device = "cpu"
    fake.llama_tokenizer = LlamaTokenizer.from_pretrained(str(slow), use_fast=False)  # as line 96
    fake.llama_tokenizer.pad_token = fake.llama_tokenizer.eos_token
    cls._add_image_token(fake)  # the seed adds its tokens (lines 187-237)
    cls._add_video_token(fake)
    cls._add_audio_token(fake)
    added = [t for t in fake.llama_tokenizer.get_added_vocab()]
    fake.llama_model = SimpleNamespace(
        model=SimpleNamespace(model=SimpleNamespace(embed_tokens=common.id_embedding()))
    )
    markers = {"image0.png": 0, "image1.png": 1}
    for kind in ("image", "video", "audio"):

        def encode(paths, kind=kind):
            return torch.cat([common.media_marker(markers[p]) for p in paths]), None

        setattr(fake, f"encode_{kind}", encode)

    prompts: list[list[int]] = []
    prompt_texts: list[str] = []
    replies = iter(t["reply"] for t in TURNS)

    def generate(inputs):
        prompt_texts.append(inputs["prompt"])
        prompts.append(common.decode(cls.prepare_generation_embedding(fake, inputs)))
        return [next(replies) + "\n###"]

    namespace = {
        "model": SimpleNamespace(generate=generate),
        "re": re,
        "args": GEN_TOKENS,
        "max_length": 246,
        "filter_value": -float("inf"),
        "min_word_tokens": 10,
        "gen_scale_factor": 4.0,
        "max_num_imgs": 1,
        "stops_id": [[835]],
        "load_sd": True,
        "generator": None,
        "max_num_vids": 1,
        "height": 320,
        "width": 576,
        "max_num_auds": 1,
        "ENCOUNTERS": 1,
    }
    demo = common.seed_functions(code / "demo_app.py", ["predict", "parse_text", "parse_reponse"], namespace)
    history: list = []
    chatbot: list = []
    decode_args = (7.5, 50, 7.5, 50, 24, 7.5, 50, 9)  # the demo's slider values (demo_app.py 413-437)
    demo["predict"](
        TURNS[0]["text"], "image0.png", None, None, chatbot, 0.01, 1.0, history, None, *decode_args
    )
    demo["predict"](TURNS[1]["text"], None, None, None, chatbot, 0.01, 1.0, history, None, *decode_args)

    # The seed's tokenizer on texts around its added tokens (training's "</Img> " + question).
    texts = [[t, fake.llama_tokenizer(t, add_special_tokens=False).input_ids] for t in TEXTS]

    summed_text = "### Human: <Image>image0.png</Image><Image>image1.png</Image>  " + SUM_TEXT
    summed = common.decode(cls.prepare_generation_embedding(fake, {"prompt": summed_text}))
    del StoppingCriteria, StoppingCriteriaList

    path = common.write_fixture(
        "nextgpt",
        args.repo,
        {
            "seed_code": "NExT-GPT-Lagacy/code/demo_app.py predict (259-345), parse_text (68-144), "
            "parse_reponse (175-225); code/model/anyToImageVideoAudio.py prepare_generation_embedding "
            "(675-704), _prepare_image_embed (597-621), _add_*_token (187-237)",
            "tokenizer": "slow LlamaTokenizer (use_fast=False) of prompt.tokenizer-slow + the seed's add_tokens",
            "added_tokens": added,
            "turns": TURNS,
            "media": [{"modality": "image"}],
            "prompt_texts": prompt_texts,
            "texts": texts,
            "prompts": prompts,
            "sum": {
                "media": [{"modality": "image"}, {"modality": "image"}],
                "text": SUM_TEXT,
                "prompt_text": summed_text,
                "prompt": summed,
            },
            "bos_token_id": fake.llama_tokenizer.bos_token_id,
        },
        sys.argv,
    )
    sys.stdout.write(
        f"wrote {path}: demo prompts of {[len(p) for p in prompts]} positions, sum of {len(summed)}\n"
    )


if __name__ == "__main__":
    main()
