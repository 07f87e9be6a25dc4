"""`services.models.lm.tokens.add_tokens` and `modalmesh add-tokens`: a base LLM folder without a
preset's new tokens becomes the folder the preset serves (tiny Llama/Phi-3 built from configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.presets import load_preset
from services.models.lm.loading import check_added_tokens
from services.models.lm.tiny import write_tiny_lm
from services.models.lm.tokens import add_tokens, one_token
from services.models.tiny import LLM, PHI3_TOKENS, build_tokenizer

NEXTGPT = ["<Img>", "</Img>", "[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]", "[AUD0]"]


def _base(path: Path, tokens: list[str] = ["<image>"], architecture: str = "llama") -> Path:  # noqa: B006
    """A tiny causal LM whose tokenizer holds `tokens` (and none of NEXTGPT)."""
    eos = ["<|end|>"] if architecture == "phi3" else []
    write_tiny_lm(
        path, build_tokenizer(tokens + eos), architecture=architecture, sizes=LLM, max_context=64, seed=3,
        eos_tokens=eos,
    )  # fmt: skip
    return path


def _model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _base(tmp_path_factory.mktemp("base") / "llm")


def test_tokens_become_one_token_each_and_new_rows_start_at_the_mean(base: Path, tmp_path: Path) -> None:
    report = add_tokens(base, tmp_path / "out", NEXTGPT)
    tok0, lm0 = _model(base)
    tok, lm = _model(tmp_path / "out")
    old = len(tok0)
    assert len(tok) == old + len(NEXTGPT)
    assert report.added == [(t, old + i) for i, t in enumerate(NEXTGPT)]
    assert (report.rows_before, report.rows_after) == (old, old + len(NEXTGPT))
    assert [one_token(tok, t) for t in NEXTGPT] == list(range(old, old + len(NEXTGPT)))
    # legacy NExT-GPT adds plain tokens: they are kept by decode(skip_special_tokens=True)
    ids = tok("a cat [IMG0][IMG1]", add_special_tokens=False)["input_ids"]
    assert ids[-2:] == [old + 2, old + 3]
    assert "[IMG0]" in tok.decode(ids, skip_special_tokens=True)
    assert lm.config.vocab_size == old + len(NEXTGPT)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(lm0, get)().weight, getattr(lm, get)().weight
        torch.testing.assert_close(after[:old], before, rtol=0, atol=0)
        mean = before.mean(0, keepdim=True).expand(len(NEXTGPT), -1)
        torch.testing.assert_close(after[old:], mean)
    # what the LLM service checks at start now holds
    preset = load_preset("tiny-nextgpt", cache_dir=tmp_path / "cache")
    check_added_tokens(
        preset.model_copy(update={"llm": preset.llm.model_copy(update={"added_tokens": NEXTGPT})}), tok
    )
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), old + len(NEXTGPT))
    assert "wrote" in report.lines()[0] and "ids 512..518" in report.lines()[1]


def test_special_tokens_and_seeded_normal_rows(base: Path, tmp_path: Path) -> None:
    a = add_tokens(base, tmp_path / "a", ["<vid>"], special=True, init="normal", seed=7)
    add_tokens(base, tmp_path / "b", ["<vid>"], special=True, init="normal", seed=7)
    add_tokens(base, tmp_path / "c", ["<vid>"], special=True, init="normal", seed=8)
    tok, _ = _model(tmp_path / "a")
    (vid,) = [i for _, i in a.added]
    assert "<vid>" in tok.all_special_tokens
    assert "<vid>" not in tok.decode(
        tok("at <vid> s", add_special_tokens=False)["input_ids"], skip_special_tokens=True
    )
    rows = {
        k: load_file(str(tmp_path / k / "model.safetensors"))["model.embed_tokens.weight"][vid] for k in "abc"
    }
    torch.testing.assert_close(rows["a"], rows["b"], rtol=0, atol=0)
    assert not torch.equal(rows["a"], rows["c"])
    std = json.loads((base / "config.json").read_text())["initializer_range"]
    assert 0.5 * std < float(rows["a"].std()) < 1.5 * std  # N(0, initializer_range)


def test_tokens_already_held_are_left_as_they_are(base: Path, tmp_path: Path) -> None:
    report = add_tokens(base, tmp_path / "out", ["<image>", "[IMG0]"])
    assert report.present == ["<image>"]
    assert [t for t, _ in report.added] == ["[IMG0]"]
    again = add_tokens(tmp_path / "out", tmp_path / "again", ["<image>", "[IMG0]"])
    assert again.added == [] and again.present == ["<image>", "[IMG0]"]
    assert again.rows_before == again.rows_after
    assert "already one token: <image>, [IMG0]" in "\n".join(again.lines())


def test_padded_rows_take_the_new_ids_without_growing(tmp_path: Path) -> None:
    """Phi-3 pads its matrix past the tokenizer (32064 rows, 32011 tokens): a new id lands on
    a padding row, the matrix keeps its size, and that row starts at the mean of the rows in use."""
    from transformers import AutoModelForCausalLM

    src = _base(tmp_path / "phi3", tokens=list(PHI3_TOKENS), architecture="phi3")
    lm = AutoModelForCausalLM.from_pretrained(src)
    used = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(used + 16, mean_resizing=False)
    lm.save_pretrained(src)
    report = add_tokens(src, tmp_path / "out", ["<vid>"], special=True)
    assert report.added == [("<vid>", used)] and report.rows_before == report.rows_after == used + 16
    weight = load_file(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(weight[used], weight[:used].mean(0))


def test_rows_from_a_seed_checkpoint_replace_the_matrices(base: Path, tmp_path: Path) -> None:
    tok0, lm0 = _model(base)
    rows, hidden = len(tok0) + 1, lm0.config.hidden_size
    embed, head = torch.randn(rows, hidden), torch.randn(rows, hidden)
    torch.save(  # E.T. Chat / LLaVA name them behind PEFT's prefix
        {"base_model.model.model.embed_tokens.weight": embed, "base_model.model.lm_head.weight": head,
         "base_model.model.model.mm_projector.weight": torch.randn(2, 2)},
        tmp_path / "non_lora_trainables.bin",
    )  # fmt: skip
    report = add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "non_lora_trainables.bin"])
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(weights["model.embed_tokens.weight"], embed, rtol=0, atol=0)
    torch.testing.assert_close(weights["lm_head.weight"], head, rtol=0, atol=0)
    assert report.init == "checkpoint" and len(report.copied) == 2
    assert "copied non_lora_trainables.bin: base_model.model.model.embed_tokens.weight -> input" in "\n".join(
        report.lines()
    )


@pytest.mark.parametrize("lm", ["llama_model.", "llama_model.base_model.model."])
def test_rows_from_a_nextgpt_delta_in_either_key_form(base: Path, tmp_path: Path, lm: str) -> None:
    """NExT-GPT-Lagacy agent.py:71-91 saves the resized matrices as nn.Parameters under plain LLaMA
    names in stages 1-2 and PEFT names in stage 3 (agent.py:145-160 maps the one to the other)."""
    tok0, lm0 = _model(base)
    rows, hidden = len(tok0) + len(NEXTGPT), lm0.config.hidden_size
    embed, head = torch.randn(rows, hidden), torch.randn(rows, hidden)
    delta = {
        f"{lm}model.embed_tokens.weight": embed,
        f"{lm}lm_head.weight": head,
        "llama_proj.weight": torch.randn(2, 2),
    }
    (tmp_path / "7b_tiva_v0").mkdir()
    torch.save(
        {k: torch.nn.Parameter(v.clone()) for k, v in delta.items()},
        tmp_path / "7b_tiva_v0" / "pytorch_model.pt",
    )
    report = add_tokens(base, tmp_path / "out", NEXTGPT, rows_from=[tmp_path / "7b_tiva_v0"])
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(weights["model.embed_tokens.weight"], embed, rtol=0, atol=0)
    torch.testing.assert_close(weights["lm_head.weight"], head, rtol=0, atol=0)
    assert f"copied pytorch_model.pt: {lm}model.embed_tokens.weight -> input embeddings" in "\n".join(
        report.lines()
    )


# -- bad inputs: each is refused before anything is written ---------------------------------------


def test_rows_from_that_do_not_fit_are_refused(base: Path, tmp_path: Path) -> None:
    tok0, lm0 = _model(base)
    hidden = lm0.config.hidden_size
    torch.save({"model.embed_tokens.weight": torch.randn(len(tok0), hidden)}, tmp_path / "short.pt")
    with pytest.raises(
        InvalidArgumentError, match=rf"expected shape \(at least {len(tok0) + 1}, {hidden}\).*got"
    ):
        add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "short.pt"])
    torch.save({"llama_proj.weight": torch.randn(2, 2)}, tmp_path / "none.pt")
    with pytest.raises(InvalidArgumentError, match=r"expected embed_tokens\.weight or lm_head\.weight"):
        add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "none.pt"])
    torch.save(
        {"model.embed_tokens.weight": torch.randn(len(tok0) + 1, hidden), "lm_head.weight": torch.randn(len(tok0) + 2, hidden)},
        tmp_path / "mixed.pt",
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="one row count"):
        add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "mixed.pt"])
    with pytest.raises(NotFoundError, match="no such file"):
        add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "missing.pt"])
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_rows_file_with_code_is_refused_and_nothing_runs(base: Path, tmp_path: Path) -> None:
    torch.save({"model.embed_tokens.weight": _Payload(tmp_path / "ran")}, tmp_path / "evil.pt")
    with pytest.raises(InvalidArgumentError, match="refused"):
        add_tokens(base, tmp_path / "out", ["<vid>"], rows_from=[tmp_path / "evil.pt"])
    assert not (tmp_path / "ran").exists()


def test_bad_paths_tokens_and_init(base: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"expected a Hugging Face model folder .* got no such folder"):
        add_tokens(tmp_path / "missing", tmp_path / "out", ["<vid>"])
    with pytest.raises(InvalidArgumentError, match="expected a new folder, got the base model's own folder"):
        add_tokens(base, base, ["<vid>"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FailedPreconditionError, match="expected a new or empty folder"):
        add_tokens(base, tmp_path / "full", ["<vid>"])
    with pytest.raises(InvalidArgumentError, match="without whitespace, got \\['\\[IMG 0\\]', ''\\]"):
        add_tokens(base, tmp_path / "out", ["[IMG 0]", ""])
    with pytest.raises(
        InvalidArgumentError, match="init: expected one of \\['mean', 'normal'\\], got 'zeros'"
    ):
        add_tokens(base, tmp_path / "out", ["<vid>"], init="zeros")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


# -- the command, and the folder serving the preset -----------------------------------------------


def test_cli_writes_the_presets_llm_folder_which_then_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tiny-nextgpt's LLM folder, written from a base without its signal tokens: the LLM
    service refuses the base by naming the command, and loads what the command writes."""
    from modalmesh.cli import main
    from services.models.checkpoints.bundle import base_fingerprint, write_bundle
    from services.models.lm.loading import load_model
    from services.models.lm.tiny import initial_connectors, initial_heads
    from services.models.tiny import SEED

    cache = tmp_path / "cache"
    preset = load_preset("tiny-nextgpt", cache_dir=cache)
    placeholders = [m.placeholder for m in preset.modalities.values()]
    src = _base(tmp_path / "base", tokens=placeholders)

    def bundle(llm_dir: Path) -> None:
        write_bundle(
            preset.adapter.path, name=preset.adapter.name, version=preset.adapter.path.name, preset=preset.name,
            base_fingerprint=base_fingerprint(llm_dir), connectors=initial_connectors(preset, LLM["hidden_size"], seed=SEED),
            heads=initial_heads(preset, LLM["hidden_size"], seed=SEED), stage="init",
        )  # fmt: skip

    served_base = preset.model_copy(update={"llm": preset.llm.model_copy(update={"checkpoint": src})})
    bundle(src)
    with pytest.raises(FailedPreconditionError, match="modalmesh add-tokens"):
        load_model(served_base, device="cpu")

    assert main(["add-tokens", str(src), "--preset", "tiny-nextgpt", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {preset.llm.checkpoint}" in out and f"added {len(preset.llm.added_tokens)} token(s)" in out
    import shutil

    shutil.rmtree(preset.adapter.path)
    bundle(preset.llm.checkpoint)  # bundles are fingerprinted with the folder that has the tokens
    loaded = load_model(preset, device="cpu")
    assert set(loaded.projectors) == set(preset.outputs)
    for token in preset.llm.added_tokens:
        assert one_token(loaded.tokenizer, token) is not None

    # a second run refuses to overwrite; a preset without added tokens is refused by name
    assert main(["add-tokens", str(src), "--preset", "tiny-nextgpt", "--cache-dir", str(cache)]) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    argv = [
        "add-tokens",
        str(src),
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "t"),
        "--cache-dir",
        str(cache),
    ]
    assert main(argv) == 2
    assert "expected llm.added_tokens to add, got none" in capsys.readouterr().err


def _llama_style_tokenizer():  # -> LlamaTokenizerFast
    """A fast tokenizer built the way Llama/Vicuna's is (BPE with byte fallback behind a
    normaliser that prepends "▁" and turns spaces into "▁"), trained on a small corpus."""
    import random

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    words = [
        "a",
        "cat",
        "dog",
        "draw",
        "play",
        "show",
        "sound",
        "image",
        "of",
        "the",
        "red",
        "blue",
        "sky",
        "here",
        "is",
    ]
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)] + ["[]<>/#:0123456789\n"]
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    return LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        legacy=True,
    )


def test_plain_tokens_in_a_llama_fast_tokenizer_match_as_the_seed_did(tmp_path: Path) -> None:
    """Vicuna's normaliser would store a normalised "[IMG0]" as "▁[IMG0]" (never matched after
    a letter, and not the token the preset names). Added raw and taking the whitespace around
    them, the signal tokens come out as the seed's slow tokenizer gave them."""
    from transformers import AutoTokenizer

    src = tmp_path / "vicuna"
    write_tiny_lm(src, _llama_style_tokenizer(), architecture="llama", sizes=LLM, max_context=64, seed=3)
    report = add_tokens(src, tmp_path / "out", NEXTGPT)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = {t: i for t, i in report.added}
    assert [one_token(tok, t) for t in NEXTGPT] == [ids[t] for t in NEXTGPT]
    img = [ids[f"[IMG{i}]"] for i in range(4)]
    for text in ("a red sky[IMG0] [IMG1] [IMG2] [IMG3]", "a red sky [IMG0][IMG1][IMG2][IMG3]"):
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert got[-4:] == img and tok.decode(got[:-4]) == "a red sky", (text, tok.convert_ids_to_tokens(got))
    got = tok("<Img></Img> draw a cat", add_special_tokens=False)["input_ids"]
    assert got[:2] == [ids["<Img>"], ids["</Img>"]] and tok.decode(got[2:]) == "draw a cat"
