"""Tiny LLM-side weights for the tiny presets: connector bases, the Q-Former tokenizer, bundles.

The tiny generator (`services.models.tiny`) calls these to write what the LLM service loads for a
tiny twin, from the same builders that serve the real presets, with small sizes and fixed
seeds (the same seed writes the same bytes):

- `write_tiny_connector_base`: the frozen part of a qformer / instruct_qformer connector (the
  Q-Former, its queries, ln_vision) as the safetensors file `connector.base` names;
- `write_tiny_qformer_tokenizer`: a small BERT-style WordPiece tokenizer with `[DEC]`, which
  transformers' `AutoTokenizer` loads as `BertTokenizerFast` (E.T. Chat's instruction text);
- `initial_connectors`: per connector name, the trainable tensors of a fresh connector, i.e.
  what the initial adapter bundle holds (`adapters.write_bundle(connectors=...)`);
- `initial_heads`: the fresh timestamp heads of a preset with `heads.timestamps` and output
  projectors of one with `outputs`, for the same bundle (`adapters.write_bundle(heads=...)`);
- `write_tiny_lm`: a tiny Llama or Phi-3 causal LM with its tokenizer and generation config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.errors import InvalidArgumentError
from services.common.presets import ConnectorSpec, EncoderSpec, Preset
from services.models.connectors.connector import bundle_state, connector_from_spec
from services.models.lm.output_projector import initial_projectors, preset_heads
from services.models.lm.timestamps import HEAD_NAME, init_timestamp_heads

QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC_TOKEN = "[DEC]"
_WORD_TEXT = (
    "a an the this that is are was what which where when how many video frame clip second seconds "
    "start end begin begins ends happen happens during after before first last moment time event "
    "describe tell me about see show shows person people man woman dog cat car ball moving moves "
    "left right up down red green blue square circle shape sound tone audio loud quiet find locate "
    "from to and or not in on at of with question answer yes no please"
)
_WORDS = _WORD_TEXT.split()


def _fresh(spec: ConnectorSpec, encoder: EncoderSpec, llm_dim: int, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return connector_from_spec(spec, encoder, llm_dim, load_tokenizer=False)


def write_tiny_connector_base(spec: ConnectorSpec, encoder: EncoderSpec, path: Path, *, seed: int) -> None:
    """Write the frozen part of a Q-Former connector (what `spec.base` names) with random weights.

    Args:
        spec: A qformer or instruct_qformer connector spec.
        encoder: The encoder spec it reads (its width).
        path: The safetensors file to write (its folder is created).
        seed: Fixes the weights.

    Raises:
        InvalidArgumentError: The connector type has no frozen part.
    """
    if spec.type not in ("qformer", "instruct_qformer"):
        raise InvalidArgumentError(
            f"connector base: expected a qformer or instruct_qformer connector, got {spec.type}"
        )
    q = spec.qformer
    assert q is not None  # ConnectorSpec validates it
    connector = _fresh(spec, encoder, q.width, seed)  # the output width is not part of the base
    base = {k: v.contiguous() for k, v in connector.state_dict().items() if connector.is_base_key(k)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(base, str(path), metadata={"format": "pt"})


def initial_connectors(preset: Preset, llm_dim: int, *, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per connector name, the trainable tensors of a freshly initialised connector.

    What an initial adapter bundle holds: everything but a Q-Former connector's frozen base
    (that comes from `connector.base`). Modalities sharing a connector give one entry. The
    connectors are built in name order, the k-th with seed `seed + k`.
    """
    first: dict[str, str] = {}
    for modality, name in preset.connector_names().items():
        first.setdefault(name, modality)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, name in enumerate(sorted(first)):
        spec = preset.modalities[first[name]]
        connector = _fresh(spec.connector, spec.encoder, llm_dim, seed + k)
        out[name] = {key: v.clone().contiguous() for key, v in bundle_state(connector).items()}
    return out


def initial_heads(preset: Preset, llm_dim: int, *, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The heads an initial adapter bundle holds, fresh and fixed by `seed`: {"timestamps": state
    dict} for a preset with `heads.timestamps`, and one output projector per `outputs` entry
    under its head name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    if preset.heads.timestamps is not None:
        heads = init_timestamp_heads(llm_dim, seed=seed)
        out[HEAD_NAME] = {k: v.clone().contiguous() for k, v in heads.state_dict().items()}
    if preset.outputs:
        projectors = initial_projectors(preset, llm_dim, seed=seed + 1)
        for head, state in preset_heads(preset, projectors).items():
            out[head] = {k: v.clone().contiguous() for k, v in state.items()}
    return out


def _wordpiece_vocab(size: int) -> dict[str, int]:
    """Specials, every letter, digit and punctuation mark (alone and as "##" continuation),
    then whole words, up to `size` entries; deterministic (no training)."""
    letters = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    punctuation = [*".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"]
    pieces = [*QFORMER_SPECIALS, *letters, *punctuation, *(f"##{c}" for c in letters)]
    if size < len(pieces):
        raise InvalidArgumentError(
            f"qformer tokenizer: expected a vocabulary of at least {len(pieces) + 1}, got {size + 1}"
        )
    pieces += [w for w in dict.fromkeys(_WORDS) if w not in pieces][: size - len(pieces)]
    return {p: i for i, p in enumerate(pieces)}


def write_tiny_qformer_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write a BERT-style uncased WordPiece tokenizer with [DEC], of at most `vocab_size` tokens.

    The vocabulary is fixed (characters, "##" continuations and a small word list; no
    training, so the same size writes the same files), with BERT's normaliser and
    pre-tokenizer and [CLS] ... [SEP] post-processing. Saved as transformers' `BertTokenizer`
    (the fast, tokenizers-backed one; `BertTokenizerFast` before v5) with `[DEC]` added as its
    bos token, as LAVIS adds it, and left truncation (E.T. Chat's).
    `AutoTokenizer.from_pretrained(folder)` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer  # tokenizers-backed (BertTokenizerFast before v5)

    vocab = _wordpiece_vocab(vocab_size - 1)  # one id left for [DEC]
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = BertTokenizer(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
        truncation_side="left",
    )
    fast.add_special_tokens({"bos_token": DEC_TOKEN})
    if len(fast) > vocab_size:
        raise AssertionError(f"qformer tokenizer: {len(fast)} tokens, expected at most {vocab_size}")
    fast.save_pretrained(folder)


def write_tiny_lm(
    path: Path,
    tokenizer: Any,
    *,
    architecture: str,
    sizes: Mapping[str, Any],
    max_context: int,
    seed: int,
    eos_tokens: Sequence[str] = (),
) -> int:
    """Write a tiny causal LM of `architecture` (llama or phi3) with `tokenizer` into `path`.

    Args:
        path: The Hugging Face folder to write.
        tokenizer: Its tokenizer (saved alongside); must have bos, eos and pad tokens.
        architecture: "llama" (LlamaForCausalLM) or "phi3" (Phi3ForCausalLM, fused qkv_proj
            and gate_up_proj as Phi-3-mini).
        sizes: Config sizes (hidden_size, intermediate_size, num_hidden_layers, ...).
        max_context: Positions the model must cover (at least 64 are given).
        seed: Fixes the weights.
        eos_tokens: Tokens that also end a generation (Phi-3's "<|end|>"), added to the
            generation config's eos ids.

    Returns:
        The hidden size.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    classes: dict[str, tuple[Any, Any]] = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
    }
    if architecture not in classes:
        raise InvalidArgumentError(f"tiny LM: expected one of {sorted(classes)}, got {architecture!r}")
    config_cls, model_cls = classes[architecture]
    extra = {"sliding_window": None} if architecture == "phi3" else {}
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **(dict(sizes) | {"max_position_embeddings": max(max_context, 64)} | extra),
    )
    eos = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in eos_tokens)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return int(config.hidden_size)


# What the tiny any-to-any twin learns to answer with signal tokens (a trained NExT-GPT emits
# them when asked to draw, play or show; a random-weight LM never would).
SIGNAL_ASKS: dict[str, tuple[str, ...]] = {
    "image": ("draw a {x}", "draw me a {x}", "paint a {x}", "make a picture of a {x}"),
    "audio": ("play the sound of a {x}", "play a {x}", "make the sound of a {x}"),
    "video": ("show a clip of a {x}", "show me a video of a {x}", "make a video of a {x}"),
}
SIGNAL_OBJECTS = ("cat", "dog", "car", "tree", "house", "sun", "red square", "blue circle", "sky", "bird")
SIGNAL_REPLY = "Here is a {x}."
PLAIN_ASKS = ("tell me about a {x}", "what is a {x}?", "describe a {x}")
PLAIN_REPLY = "A {x} is nice."


def signal_examples(preset: Preset) -> list[tuple[str, str, str | None]]:
    """(user text, reply text, output modality or None) the twin is taught, for every object."""
    out: list[tuple[str, str, str | None]] = []
    for x in SIGNAL_OBJECTS:
        for modality in preset.outputs:
            out += [(ask.format(x=x), SIGNAL_REPLY.format(x=x), modality) for ask in SIGNAL_ASKS[modality]]
        out += [(ask.format(x=x), PLAIN_REPLY.format(x=x), None) for ask in PLAIN_ASKS]
    return out


def teach_signal_replies(path: Path, preset: Preset, *, seed: int, steps: int = 60) -> float:
    """Fine-tune the tiny LM at `path` (in place) to answer draw/play/show with signal tokens.

    The sequences are what serving builds: the preset's serving template
    (`llm.inference_template`, else `llm.template`, with its BOS rule) around one user turn, then
    the reply, the modality's signal tokens and the template's stop string; only the reply
    part is supervised. Greedy decoding of the taught asks then emits the span itself, so the
    model-emitted path of the any-to-any stack runs end to end on the twin.

    Returns:
        The last step's loss.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.content import TextPart, Turn
    from services.models.prompt.builder import PromptBuilder
    from services.models.prompt.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(path)
    template = get_template(preset.llm.inference_template or preset.llm.template)
    builder = PromptBuilder(tokenizer, {}, max_context_tokens=preset.llm.max_context_tokens)
    stop = template.stop[0] if template.stop else tokenizer.eos_token
    rows: list[tuple[list[int], list[int]]] = []
    for ask, reply, modality in signal_examples(preset):
        segments = template.render([Turn("user", [TextPart(ask)])])
        prompt = list(builder.build(segments, [], bos=template.bos).input_ids)
        signals = "".join(preset.outputs[modality].signal_tokens) if modality else ""
        answer = tokenizer(reply + signals + "\n" + stop, add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), int(tokenizer.pad_token_id))
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(a)
        mask[i, : len(seq)] = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(path)
    return float(loss.detach())
