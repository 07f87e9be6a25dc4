"""NExT-GPT's output side: signal-token states -> output projector -> decoder conditioning.

What belongs here (SEEDS_SPEC 2.A, "Output side", "Loss", "Inference"; section 9, 2-4):

- `OutputProjector`: the legacy `layers.py::TextFcLayer` in mode `transformer`, one per
  output modality. For the N signal tokens of a modality, with h their LLM hidden states and
  e their input embeddings (both (B, N, D_llm)):

      x   = fc(h + e)                                    # (B, N, 512)
      y   = tfm(src=x, tgt=query_embs.repeat(B, 1, 1))   # (B, n_out, 512)
      out = model(y)                                     # (B, n_out, D_out)

  `tfm` is `nn.Transformer(d_model=512, nhead=4, 4 encoder + 4 decoder layers,
  dim_feedforward=2048, dropout=0.0, batch_first=True, norm_first=True)`; `query_embs` is a
  learned (1, n_out, 512) parameter, `randn` at init (the new code base zero-inits it:
  `query_init="zeros"`). Every size is a constructor argument, so the tiny twins use small
  ones; the defaults of the hidden part are the seed's.
- `gather_signal_input`: the projector's input cut out of a sequence at the span of a
  modality's signal tokens, at a configurable hidden layer (the seed: `[-1]`, the last layer
  after the final norm) and at an explicit `position`:

      "at"      the states AT the signal tokens (training, `_train_with_mode`; the new code
                base at inference too);
      "before"  the states one position BEFORE them, i.e. the states that predict them: what
                legacy inference does (`embeddings[:, gen_idx-1 : gen_idx-1+N]`, SEEDS_SPEC 9.2).

  The input embeddings are always those of the signal tokens themselves (both seed paths).
- `signal_distance`: the stage-2 alignment loss, mean over tokens and batch of the per-token
  Euclidean distance `||out - target||_2` (not a squared MSE; SEEDS_SPEC 9.4), and
  `stage2_loss`, which adds it to the LM loss with per-modality weights (the seed's
  `loss_scale`: 1, video 2 in stage 3). With the LLM frozen (stage 2) the LM part trains
  nothing (SEEDS_SPEC 9.3); it is kept for logging and for stage 3.

Parameter names follow the seed, so the released checkpoint loads by renaming only:

    seed (pytorch_model.pt)                   bundle heads.safetensors           OutputProjector
    gen_text_hidden_fcs.0.<p>          (image) gen_text_hidden_fcs.0.<p>         <p>
    gen_text_hidden_fcs_video.0.<p>    (video) gen_text_hidden_fcs_video.0.<p>   <p>
    gen_text_hidden_fcs_audio.0.<p>    (audio) gen_text_hidden_fcs_audio.0.<p>   <p>

with <p> one of `fc.{weight,bias}`, `tfm.{encoder,decoder}.*`, `model.{weight,bias}`,
`query_embs`. The `.0` is the seed's ModuleList slot of layer -1 (`text_emb_to_*_layers:
[-1]`, one projector per modality). `bundle_heads` and `load_output_projector` write and read
that layout, which is the one `modalmesh import nextgpt` already produces.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import OutputSpec, Preset
from services.models.checkpoints.bundle import check_state_dict

logger = logging.getLogger(__name__)

Position = Literal["at", "before"]
POSITIONS: tuple[Position, ...] = ("at", "before")
TRAIN_POSITION: Position = "at"  # SEEDS_SPEC 2.A "Loss": the states at the signal tokens
LEGACY_INFERENCE_POSITION: Position = "before"  # SEEDS_SPEC 9.2: legacy `generate` (gen_idx - 1)
DEFAULT_LAYER = -1  # `text_emb_to_*_layers: [-1]`: the last hidden layer, after the final norm
SEED_SLOT = "0"  # the ModuleList index of the layer -1 projector in the seed's key names


@dataclass(frozen=True)
class SeedOutput:
    """One legacy NExT-GPT output modality (SEEDS_SPEC 2.A table).

    Attributes:
        head: The seed's (and the bundle's) head name.
        num_signal_tokens: Signal tokens N ([IMG0..3] -> 4).
        num_output_tokens: Conditioning rows n_out.
        out_dim: Conditioning width D_out.
        decoder: The decoder's Hugging Face id.
    """

    head: str
    num_signal_tokens: int
    num_output_tokens: int
    out_dim: int
    decoder: str


SEED_OUTPUTS: dict[str, SeedOutput] = {
    "image": SeedOutput("gen_text_hidden_fcs", 4, 77, 768, "runwayml/stable-diffusion-v1-5"),
    "video": SeedOutput("gen_text_hidden_fcs_video", 24, 77, 1024, "cerspense/zeroscope_v2_576w"),
    "audio": SeedOutput("gen_text_hidden_fcs_audio", 8, 1, 512, "cvssp/audioldm-l-full"),
}


class OutputProjector(nn.Module):
    """NExT-GPT's TextFcLayer (mode `transformer`): (B, N, D_in) x2 -> (B, n_out, D_out).

    Args:
        in_dim: LLM hidden size D_in (4096 for Vicuna-7B).
        out_dim: Decoder conditioning width D_out (768 SD1.5, 1024 ZeroScope, 512 AudioLDM).
        num_input_tokens: Signal tokens N of the modality (4, 24, 8); inputs are checked against it.
        num_output_tokens: Conditioning rows n_out (77, 77, 1).
        hidden_dim: The transformer's d_model (seed: 512).
        num_heads: Attention heads (seed: 4).
        num_encoder_layers: Encoder layers (seed: 4).
        num_decoder_layers: Decoder layers (seed: 4).
        ffn_dim: Feed-forward width (seed: 4 * hidden_dim).
        dropout: The transformer's dropout (seed: 0.0).
        query_init: "randn" (legacy seed) or "zeros" (the new code base's `normal_(std=0.0)`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_input_tokens: int,
        num_output_tokens: int,
        *,
        hidden_dim: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        query_init: Literal["randn", "zeros"] = "randn",
    ) -> None:
        super().__init__()
        sizes = {
            "in_dim": in_dim,
            "out_dim": out_dim,
            "num_input_tokens": num_input_tokens,
            "num_output_tokens": num_output_tokens,
            "hidden_dim": hidden_dim,
            "num_heads": num_heads,
        }
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise InvalidArgumentError(f"output projector: expected positive sizes, got {bad}")
        if hidden_dim % num_heads:
            raise InvalidArgumentError(
                f"output projector: hidden_dim {hidden_dim} must divide into num_heads {num_heads}"
            )
        if query_init not in ("randn", "zeros"):
            raise InvalidArgumentError(
                f"output projector: query_init expected randn or zeros, got {query_init!r}"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_input_tokens = num_input_tokens
        self.num_output_tokens = num_output_tokens
        self.fc = nn.Linear(in_dim, hidden_dim)
        with warnings.catch_warnings():
            # norm_first disables the nested-tensor fast path; torch warns about it on build.
            warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
            self.tfm = nn.Transformer(
                d_model=hidden_dim,
                nhead=num_heads,
                num_encoder_layers=num_encoder_layers,
                num_decoder_layers=num_decoder_layers,
                dim_feedforward=ffn_dim or 4 * hidden_dim,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
            )
        self.model = nn.Linear(hidden_dim, out_dim)
        init = torch.randn if query_init == "randn" else torch.zeros
        self.query_embs = nn.Parameter(init(1, num_output_tokens, hidden_dim))

    def forward(self, hidden: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        """Conditioning for the decoder.

        Args:
            hidden: LLM hidden states at the signal tokens (B, N, D_in).
            input_embs: The signal tokens' input embeddings (B, N, D_in).

        Returns:
            (B, n_out, D_out), in the projector's dtype.

        Raises:
            InvalidArgumentError: A shape other than (B, N, D_in), or the two differ.
        """
        want = (self.num_input_tokens, self.in_dim)
        for name, t in (("hidden states", hidden), ("input embeddings", input_embs)):
            if t.ndim != 3 or tuple(t.shape[1:]) != want:
                raise InvalidArgumentError(
                    f"output projector {name}: expected (B, {want[0]}, {want[1]}), got {tuple(t.shape)}"
                )
        if hidden.shape != input_embs.shape:
            raise InvalidArgumentError(
                f"output projector: hidden states {tuple(hidden.shape)} and input embeddings "
                f"{tuple(input_embs.shape)} differ"
            )
        dtype = self.fc.weight.dtype
        x = self.fc(hidden.to(dtype) + input_embs.to(dtype))  # (B, N, H)
        q = self.query_embs.repeat(x.shape[0], 1, 1)  # (B, n_out, H)
        y = self.tfm(x, q)  # (B, n_out, H)
        return self.model(y)  # (B, n_out, D_out)


# ---- signal-token capture ----------------------------------------------------------------


@dataclass
class SignalInput:
    """The projector's input of K signal spans (K = B with `per_row="one"`).

    Attributes:
        hidden: Hidden states (K, N, D), at or before the spans as asked.
        embeds: The signal tokens' input embeddings (K, N, D).
        rows: Per span, its batch row.
        starts: Per span, the position of its first signal token in the sequence.
    """

    hidden: torch.Tensor
    embeds: torch.Tensor
    rows: list[int]
    starts: list[int]


def signal_token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """The ids of a modality's signal tokens, each of which must be one token of the tokenizer.

    Raises:
        FailedPreconditionError: A token is not a single id, or two tokens share an id.
    """
    ids = []
    for token in tokens:
        got = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise FailedPreconditionError(
                f"signal token {token!r}: expected one token of the LLM's tokenizer, got {len(got)} id(s) {got}"
            )
        ids.append(int(got[0]))
    if len(set(ids)) != len(ids):
        raise FailedPreconditionError(f"signal tokens {list(tokens)}: expected distinct ids, got {ids}")
    return ids


def find_signal_spans(token_ids: torch.Tensor | Sequence[int], signal_ids: Sequence[int]) -> list[int]:
    """Start positions of the complete spans `signal_ids` in one sequence.

    A span is the N signal ids in order and contiguous (legacy NExT-GPT: `[IMG0][IMG1][IMG2]
    [IMG3]`, no tokens between them).

    Args:
        token_ids: One sequence's ids (L,).
        signal_ids: The modality's signal ids in order (N,).

    Raises:
        InvalidArgumentError: A malformed span: a first signal token not followed by the rest
            in order (cut off, reordered, interleaved), or a signal token outside any span.
    """
    sig = [int(i) for i in signal_ids]
    if not sig or len(set(sig)) != len(sig):
        raise InvalidArgumentError(f"signal ids: expected distinct ids, got {sig}")
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [int(i) for i in token_ids]
    if isinstance(ids, int) or any(isinstance(i, list) for i in ids):
        raise InvalidArgumentError("signal spans: expected one sequence of ids (L,)")
    members, n = set(sig), len(sig)
    starts: list[int] = []
    j = 0
    while j < len(ids):
        if ids[j] == sig[0]:
            got = ids[j : j + n]
            if got != sig:
                raise InvalidArgumentError(
                    f"signal span at position {j}: expected ids {sig}, got {got}"
                    + (" (cut off at the end of the sequence)" if len(got) < n else "")
                )
            starts.append(j)
            j += n
        elif ids[j] in members:
            raise InvalidArgumentError(
                f"signal token id {ids[j]} at position {j} is outside a span starting with {sig[0]}"
            )
        else:
            j += 1
    return starts


def _layer_states(hidden_states: torch.Tensor | Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    if isinstance(hidden_states, torch.Tensor):
        return hidden_states  # already the chosen layer's (B, L, D)
    if not -len(hidden_states) <= layer < len(hidden_states):
        raise InvalidArgumentError(
            f"signal capture: layer {layer} is out of range for {len(hidden_states)} hidden-state layers"
        )
    return hidden_states[layer]


def gather_signal_input(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    embeds: torch.Tensor | nn.Module,
    token_ids: torch.Tensor,
    signal_ids: Sequence[int],
    *,
    layer: int = DEFAULT_LAYER,
    position: Position = TRAIN_POSITION,
    per_row: Literal["one", "any"] = "one",
) -> SignalInput:
    """Cut the projector's input out of a sequence at its signal-token spans.

    Position j of `hidden_states` must be the state computed with token j of `token_ids` as
    input (a training forward; or, in generation, the prompt's states followed by each fed
    token's). The states may stop short of the ids (a sampled token is never fed): a span whose
    states were not computed is refused.

    Args:
        hidden_states: Per layer (B, L_h, D) (Hugging Face `hidden_states`: the embeddings
            then every layer), picked by `layer`; or one tensor, taken as that layer already.
        embeds: The sequence's input embeddings (B, L, D), or the LM's input embedding table,
            applied to the signal ids. Always the signal tokens' own rows, whatever `position`.
        token_ids: The sequence (B, L).
        signal_ids: The modality's signal token ids in order (N,).
        layer: Which hidden layer (seed: -1, the last, after the final norm).
        position: "at" the signal tokens (training) or "before" them (legacy inference).
        per_row: "one": every row holds exactly one span (training, as the seed asserts);
            "any": zero or more per row (generation).

    Returns:
        The spans' states and embeddings, in row then position order.

    Raises:
        InvalidArgumentError: An unknown position, a malformed span, a row without exactly
            one span under "one", shapes that do not line up, or states not computed.
    """
    if position not in POSITIONS:
        raise InvalidArgumentError(f"signal capture: position expected one of {POSITIONS}, got {position!r}")
    if token_ids.ndim != 2:
        raise InvalidArgumentError(f"signal capture: token ids expected (B, L), got {tuple(token_ids.shape)}")
    states = _layer_states(hidden_states, layer)  # (B, L_h, D)
    b, length = token_ids.shape
    if states.ndim != 3 or states.shape[0] != b or states.shape[1] > length:
        raise InvalidArgumentError(
            f"signal capture: hidden states expected (B={b}, L_h<={length}, D), got {tuple(states.shape)}"
        )
    table = embeds if isinstance(embeds, nn.Module) else None
    if isinstance(embeds, torch.Tensor) and (embeds.ndim != 3 or tuple(embeds.shape[:2]) != (b, length)):
        raise InvalidArgumentError(
            f"signal capture: input embeddings expected (B={b}, L={length}, D), got {tuple(embeds.shape)}"
        )
    n = len(signal_ids)
    shift = 0 if position == "at" else 1
    hidden, embs, rows, starts = [], [], [], []
    for r in range(b):
        found = find_signal_spans(token_ids[r], signal_ids)
        if per_row == "one" and len(found) != 1:
            raise InvalidArgumentError(f"signal capture: row {r}: expected one signal span, got {len(found)}")
        for s in found:
            lo, hi = s - shift, s - shift + n
            if lo < 0:
                raise InvalidArgumentError(
                    f"signal capture: row {r}: the span starts at position 0, so there is no state before it"
                )
            if hi > states.shape[1]:
                raise InvalidArgumentError(
                    f"signal capture: row {r}: states up to position {hi - 1} needed (position {position!r}), "
                    f"got {states.shape[1]} positions; feed the last signal token first"
                )
            hidden.append(states[r, lo:hi])  # (N, D)
            if table is not None:
                embs.append(table(token_ids[r, s : s + n]))  # (N, D)
            else:
                assert isinstance(embeds, torch.Tensor)
                embs.append(embeds[r, s : s + n])  # (N, D)
            rows.append(r)
            starts.append(s)
    d = states.shape[-1]
    if not hidden:
        empty = states.new_zeros((0, n, d))
        return SignalInput(empty, empty.clone(), rows, starts)
    return SignalInput(torch.stack(hidden), torch.stack(embs), rows, starts)  # (K, N, D) each


# ---- losses --------------------------------------------------------------------------------


def signal_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stage-2 alignment loss: mean over tokens and batch of ||output - target||_2 per token.

    The seed's `l2_loss(u, v) = ((u - v) ** 2).sum(-1) ** 0.5`, then `.mean()`. Computed in
    float32 with `vector_norm`, whose gradient at a zero distance is 0 rather than NaN.

    Args:
        output: Projector output (B, n_out, D).
        target: Caption embeddings (B, n_out, D); for n_out = 1 also (B, D) (AudioLDM's
            `text_embeds`, reshaped to (B, 1, D) as the seed does).

    Raises:
        InvalidArgumentError: The shapes do not match.
    """
    if output.ndim == 3 and output.shape[1] == 1 and target.ndim == 2:
        target = target.unsqueeze(1)  # (B, D) -> (B, 1, D)
    if output.ndim != 3 or target.shape != output.shape:
        raise InvalidArgumentError(
            f"signal distance: caption embeddings expected {tuple(output.shape)} (the projector's "
            f"output), got {tuple(target.shape)}"
        )
    diff = output.float() - target.to(output.device).float()  # (B, n_out, D)
    return torch.linalg.vector_norm(diff, dim=-1).mean()


def stage2_loss(
    lm_loss: torch.Tensor,
    distances: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """LM loss plus the weighted signal distances: `lm + sum_m weights[m] * distances[m]`.

    The seed's `loss += loss_scale * mse_loss` (loss_scale 1; 2 for video in stage 3).

    Args:
        lm_loss: The LM's cross-entropy (a scalar).
        distances: Per output modality in the batch, its `signal_distance`.
        weights: Per modality, its scale (default 1.0; modalities absent from the batch are
            ignored).

    Raises:
        InvalidArgumentError: A negative weight, or a distance that is not a scalar.
    """
    weights = weights or {}
    bad = {m: w for m, w in weights.items() if w < 0}
    if bad:
        raise InvalidArgumentError(f"stage-2 loss: weights expected >= 0, got {bad}")
    total = lm_loss
    for modality, dist in distances.items():
        if dist.ndim != 0:
            raise InvalidArgumentError(
                f"stage-2 loss: distance of {modality} expected a scalar, got shape {tuple(dist.shape)}"
            )
        total = total + float(weights.get(modality, 1.0)) * dist.to(lm_loss.dtype)
    return total


# ---- bundle heads ---------------------------------------------------------------------------


def bundle_heads(
    projectors: Mapping[str, OutputProjector], head_names: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """The `heads` argument of `adapters.write_bundle`: per head name, "0.<p>" -> tensor.

    Args:
        projectors: Per modality, its projector.
        head_names: Per modality, its head name (the seed's: `SEED_OUTPUTS[m].head`).

    Raises:
        InvalidArgumentError: A modality without a head name.
    """
    missing = sorted(set(projectors) - set(head_names))
    if missing:
        raise InvalidArgumentError(f"output projector heads: no head name for {missing}")
    return {
        head_names[m]: {f"{SEED_SLOT}.{k}": v.detach() for k, v in p.state_dict().items()}
        for m, p in projectors.items()
    }


def load_output_projector(
    flat: Mapping[str, torch.Tensor], head: str, projector: OutputProjector
) -> OutputProjector:
    """Load a bundle's flat heads ("gen_text_hidden_fcs.0.fc.weight" -> tensor) into `projector`.

    Build `projector` with the preset's sizes on the device it will serve on; the tensors are
    copied into it. Returns it in eval mode with gradients off.

    Raises:
        FailedPreconditionError: A key is missing or unexpected, or a shape does not fit.
    """
    prefix = f"{head}.{SEED_SLOT}."
    got = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    stray = sorted(k for k in flat if k.startswith(head + ".") and not k.startswith(prefix))
    if stray:
        raise FailedPreconditionError(
            f"adapter bundle: {head} heads: unexpected key {stray[0]} (one projector per modality, slot {SEED_SLOT})"
        )
    check_state_dict(f"{head} heads", projector.state_dict(), got, prefix=prefix)
    projector.load_state_dict(dict(got), strict=True)
    return projector.eval().requires_grad_(False)


# ---- from a preset ---------------------------------------------------------------------------

PROJECTORS_SEED = 0  # the initialisation of projectors a bundle lacks


def build_projector(spec: OutputSpec, llm_dim: int) -> OutputProjector:
    """A fresh projector with the sizes an output spec of the preset names."""
    rows, width = spec.conditioning
    p = spec.projector
    return OutputProjector(
        llm_dim,
        width,
        len(spec.signal_tokens),
        rows,
        hidden_dim=p.hidden_dim,
        num_heads=p.num_heads,
        num_encoder_layers=p.encoder_layers,
        num_decoder_layers=p.decoder_layers,
        ffn_dim=p.ffn_dim,
        query_init=p.query_init,
    )


def initial_projectors(
    preset: Preset, llm_dim: int, *, seed: int = PROJECTORS_SEED
) -> dict[str, OutputProjector]:
    """Per output modality, a fresh projector fixed by `seed` (the same at every call)."""
    out: dict[str, OutputProjector] = {}
    for k, (modality, spec) in enumerate(preset.outputs.items()):
        torch.manual_seed(seed + k)
        out[modality] = build_projector(spec, llm_dim)
    return out


def load_projectors(
    preset: Preset, flat: Mapping[str, torch.Tensor], *, llm_dim: int, dtype: torch.dtype
) -> dict[str, OutputProjector]:
    """The output projectors of a preset with `outputs`, from a bundle's flat heads.

    A bundle without a modality's head (a stage-1 bundle) gets that projector initialised from
    `PROJECTORS_SEED`, the same at every load: the decoders then get conditioning that means
    nothing until stage 2 trains it (a warning says so).

    Raises:
        FailedPreconditionError: A head key is missing, unexpected or of the wrong shape.
    """
    fresh = initial_projectors(preset, llm_dim)
    out: dict[str, OutputProjector] = {}
    for modality, spec in preset.outputs.items():
        projector = fresh[modality]
        if any(k.startswith(f"{spec.head}.") for k in flat):
            load_output_projector(flat, spec.head, projector)
        else:
            logger.warning(
                "preset %s outputs %s but the adapter bundle has no %s head: serving an untrained "
                "projector (seed %s) until stage 2 trains it",
                preset.name,
                modality,
                spec.head,
                PROJECTORS_SEED,
            )
        out[modality] = projector.to(dtype=dtype).eval().requires_grad_(False)
    return out


def preset_heads(
    preset: Preset, projectors: Mapping[str, OutputProjector]
) -> dict[str, dict[str, torch.Tensor]]:
    """`bundle_heads` with the preset's head names."""
    return bundle_heads(projectors, {m: s.head for m, s in preset.outputs.items()})
