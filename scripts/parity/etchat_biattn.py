"""Parity fixture: E.T. Chat's bidirectional attention over the video span, from the seed's code.

Builds the seed's own `ETChatPhi3ForCausalLM` (ETBench `etchat/model/language_model/phi3.py` +
`etchat/model/etchat_arch.py`) at tiny sizes with random weights, and runs a prompt holding one
video span through it twice, with `bi_attention` on and off, in eager attention (the seed's
`model/builder.py` asks for it with `bi_attention`; without, transformers 4.44 falls back to it
too, its Phi-3 declaring no SDPA support). Each run is the seed's own inference:
`generate` with the prompt (prefill, "caching" mode, then "generating" steps), greedy, with the
`<vid>` token forced at two steps so the matched frame is added to its embedding. Written into
`tests/fixtures/parity/etchat/`:

- `biattn.safetensors`: the LLM weights under Hugging Face Phi-3 names (`model.*`, `lm_head.*`)
  and the timestamp heads (`frm_head.*`, `vid_head.*`); the inputs (`input_ids` with the seed's
  `<image>` index, `span_embeds`: the video's LLM tokens, one per frame, that the seed's
  `encode_image` returns here); and per run (`on.` / `off.`) the prefill's logits, last hidden
  states (after the final norm), the final norm's input (`prenorm`), the frame keys
  (`frm_head` over it at the span) and the raw logits of every generated step; and the seed's
  training forward (`train.`): a right-padded batch of that sample and a shorter one with fewer
  frames, their ids, labels and span embeddings, and per run its loss and logits;
- `biattn.json`: the sizes, the span, the forced steps, the generated tokens and matched frames
  per run, and how it was made (versions, seed commit, command line).

The seed's connector is not part of this fixture (module parity covers it): `encode_image` of
the built model is replaced by one returning `span_embeds`. The seed builds a Q-Former from
`bert-base-uncased` by name; a tiny BERT config and vocabulary are written into a temporary
folder of that name and the model is built from there (nothing is downloaded).

Run it in a scratch environment with transformers 4.44.2 (what ETBench pins), e.g.

    pip install --target /work/scratch/overlay-biattn transformers==4.44.2 tokenizers==0.19.1 \\
        huggingface_hub==0.24.6 safetensors
    PYTHONPATH=/work/scratch/overlay-biattn /work/scratch/venv/bin/python \\
        scripts/parity/etchat_biattn.py --repo /work/seeds/ETBench --out tests/fixtures/parity/etchat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOCAB, HIDDEN, LAYERS, HEADS = 128, 64, 2, 4
MATCH_ID, EOS_ID = VOCAB - 1, 2
FRAMES, PREFIX, SUFFIX = 6, 5, 10
NEW_TOKENS, FORCED_STEPS = 6, (1, 3)
SEED = 15
IMAGE_TOKEN_INDEX = -200  # the seed's `etchat/constants.py`


def llm_config() -> dict:
    """The Phi-3 sizes (Hugging Face `Phi3Config` fields) of the fixture's LLM."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=None,
        sliding_window=2048,  # E.T. Chat's train.py sets Phi-3-mini's 2047 to 2048
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def seed_options(bi_attention: bool) -> dict:
    """The E.T. Chat fields of the config (`train/train.py` ModelArguments) at the smallest
    vision tower (`vision_output_layer` 0: one EVA block)."""
    return dict(
        language_model="phi3",
        conv_type="phi3",
        vision_tower="eva_vit",
        vision_output_layer=0,
        vision_output_token="patch",
        mm_projector="qformer",
        pretrain_vision_tower=None,
        pretrain_qformer=None,
        pretrain_projector=None,
        load_base_models=False,
        use_matching=True,
        use_time_tag=False,
        bi_attention=bi_attention,
        alpha=2.0,
        match_token_id=MATCH_ID,
    )


def write_tiny_bert(folder: Path) -> None:
    """A tiny `bert-base-uncased` (config + vocabulary) for the seed's Q-Former builder."""
    from transformers import BertConfig

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(chr(c) for c in range(ord("a"), ord("z") + 1))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(folder)


def random_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fresh random values for the LLM and the heads: matrices N(0, 0.1), norm weights
    1 + N(0, 0.1), biases N(0, 0.05) (far from uniform attention, so masks show)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.", "lm_head.", "frm_head.", "vid_head.")):
                continue
            if name.startswith(("model.vision_tower", "model.qformer")):
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.1)


def supervise_after_image(ids: torch.Tensor) -> torch.Tensor:
    """Labels: the tokens after the `<image>` (the answer), -100 up to and at it."""
    labels = ids.clone()
    labels[: int((ids == IMAGE_TOKEN_INDEX).nonzero()) + 1] = -100
    return labels


def fixture_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's weights (Hugging Face Phi-3 names) and the heads, without the seed's
    vision tower and Q-Former."""
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.", "lm_head.", "frm_head.", "vid_head."))
        and not k.startswith(("model.vision_tower", "model.qformer"))
    }


def run(model, input_ids: torch.Tensor, span_embeds: torch.Tensor) -> dict:
    """The seed's inference on the prompt: the prefill's states, then greedy `generate`."""
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

    frames = span_embeds.shape[0]
    model.encode_image = lambda image, **kwargs: [span_embeds[None]]  # (1, F, D): one query text
    image = [torch.zeros(frames, 3, 2, 2)]  # only its frame count is read
    extra = dict(image=image, query=[["When does it happen?"]], src=[None], tag=[None])
    ids = input_ids[None]  # (1, L_ids)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(), **extra
        )
    start, end = model.model.img_token_pos[0][-1]
    prenorm = model.model.norm.cache_state[0].clone()  # (L, D)
    result = {
        "logits": out.logits[0].float().clone(),  # (L, V)
        "last_hidden": out.hidden_states[-1][0].clone(),  # (L, D), after the final norm
        "prenorm": prenorm,
        "frame_keys": model.frm_head(prenorm[start:end]).detach().clone(),  # (F, D)
        "span": [int(start), int(end)],
    }

    class Forced(LogitsProcessor):
        """Greedy with <vid> forced at FORCED_STEPS and banned (and EOS) elsewhere."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            step = input_ids.shape[1] - ids.shape[1]
            scores = scores.clone()
            if step in FORCED_STEPS:
                keep = scores[:, MATCH_ID].clone()
                scores[:] = -float("inf")
                scores[:, MATCH_ID] = keep
            else:
                scores[:, [MATCH_ID, EOS_ID]] = -float("inf")
            return scores

    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            cache_implementation=None,
            logits_processor=LogitsProcessorList([Forced()]),
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )
    result["tokens"] = gen.sequences[0, ids.shape[1] :].tolist()
    result["frames"] = [int(t) for t in model.tgt]  # the matched frame at every position
    result["step_logits"] = torch.cat([x.float() for x in gen.logits])  # (N, V), raw
    return result


def run_training(model, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """The seed's training forward (`model.train()`, labels) on a right-padded batch of
    samples (ids with one `<image>`, labels, span embeddings), padded as its collator does
    (`train/train.py` MultimodalDataCollator: pad id 0 here, labels -100, mask = ids != pad)."""
    from torch.nn.utils.rnn import pad_sequence

    model.train()
    model.encode_image = lambda image, **kwargs: [e[None] for _, _, e in samples]  # (1, F_i, D) each
    ids = pad_sequence([i for i, _, _ in samples], batch_first=True, padding_value=0)  # (B, L_ids)
    labels = pad_sequence([t for _, t, _ in samples], batch_first=True, padding_value=-100)
    rows = len(samples)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=ids != 0,
            labels=labels,
            image=[torch.zeros(e.shape[0], 3, 2, 2) for _, _, e in samples],
            query=[["When does it happen?"]] * rows,
            src=[None] * rows,
            tgt=[None] * rows,  # no <vid> answers: the LM loss alone
            tag=[None] * rows,
        )
    model.eval()
    return {"loss": out.loss.reshape(1).float().clone(), "logits": out.logits.float().clone()}  # (B, L, V)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="an ETBench checkout (holds etchat/)")
    parser.add_argument("--out", type=Path, required=True, help="tests/fixtures/parity/etchat")
    args = parser.parse_args()
    repo, out = args.repo.resolve(), args.out.resolve()
    sys.path.insert(0, str(repo))
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"

    import transformers
    from etchat.model.language_model.phi3 import ETChatPhi3Config, ETChatPhi3ForCausalLM
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_bert(Path(tmp) / "bert-base-uncased")
        cwd = Path.cwd()
        os.chdir(tmp)  # the seed names "bert-base-uncased": the folder here
        try:
            for mode in ("on", "off"):
                config = ETChatPhi3Config(**llm_config(), **seed_options(mode == "on"))
                config._attn_implementation = "eager"  # builder.py:27,74; 4.44's Phi-3 has no SDPA
                torch.manual_seed(SEED)
                models[mode] = ETChatPhi3ForCausalLM(config).eval()
        finally:
            os.chdir(cwd)
    random_weights(models["on"], generator)
    state = fixture_state(models["on"])
    models["off"].load_state_dict(state, strict=False)
    assert all(m.model.layers[0].self_attn.__class__.__name__ == "Phi3Attention" for m in models.values())

    text = torch.randint(3, MATCH_ID, (PREFIX + SUFFIX,), generator=generator)
    input_ids = torch.cat([text[:PREFIX], torch.tensor([IMAGE_TOKEN_INDEX]), text[PREFIX:]])
    span_embeds = torch.randn(FRAMES, HIDDEN, generator=generator) * 0.5  # (F, D)
    runs = {mode: run(model, input_ids, span_embeds) for mode, model in models.items()}
    # a second, shorter sample with fewer frames: the batch is right-padded
    short = torch.randint(3, MATCH_ID, (3 + 6,), generator=generator)
    short_ids = torch.cat([short[:3], torch.tensor([IMAGE_TOKEN_INDEX]), short[3:]])
    samples = [
        (input_ids, supervise_after_image(input_ids), span_embeds),
        (short_ids, supervise_after_image(short_ids), torch.randn(4, HIDDEN, generator=generator) * 0.5),
    ]
    trained = {mode: run_training(model, samples) for mode, model in models.items()}

    tensors = {**state, "input_ids": input_ids, "span_embeds": span_embeds}
    for mode, r in runs.items():
        for key in ("logits", "last_hidden", "prenorm", "frame_keys", "step_logits"):
            tensors[f"{mode}.{key}"] = r[key].contiguous()
    for i, (ids, labels, embeds) in enumerate(samples):
        tensors.update(
            {
                f"train.input_ids.{i}": ids.clone(),
                f"train.labels.{i}": labels,
                f"train.span_embeds.{i}": embeds.clone(),
            }
        )
    for mode, r in trained.items():
        tensors.update({f"train.{mode}.loss": r["loss"], f"train.{mode}.logits": r["logits"].contiguous()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "biattn.safetensors"))
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "what": "E.T. Chat bi_attention over the video span: prefill states and greedy generate, on and off",
        "seed": {
            "repo": "ETBench",
            "commit": commit,
            "code": ["etchat/model/language_model/phi3.py", "etchat/model/etchat_arch.py"],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": "PYTHONPATH=<overlay: transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.24.6 "
        "safetensors> python scripts/parity/etchat_biattn.py --repo <ETBench checkout> --out tests/fixtures/parity/etchat",
        "llm_config": llm_config(),
        "attention": {"on": "eager, bi_attention True", "off": "eager, bi_attention False"},
        "match_token_id": MATCH_ID,
        "eos_token_id": EOS_ID,
        "span": runs["on"]["span"],
        "forced_steps": list(FORCED_STEPS),
        "runs": {m: {"tokens": r["tokens"], "frames": r["frames"]} for m, r in runs.items()},
        "on_vs_off_max_abs_logit_diff": float((runs["on"]["logits"] - runs["off"]["logits"]).abs().max()),
        "train_loss": {m: float(r["loss"]) for m, r in trained.items()},
    }
    (out / "biattn.json").write_text(json.dumps(meta, indent=2) + "\n")
    keys = ("span", "runs", "on_vs_off_max_abs_logit_diff", "train_loss")
    sys.stdout.write(json.dumps({k: meta[k] for k in keys}) + "\n")


if __name__ == "__main__":
    main()
