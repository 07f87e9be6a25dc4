"""Connectors: trainable maps from encoder tokens into the LLM's embedding space.

A connector is chosen by the preset's `connector.type` and built from the connector spec, the
encoder spec it reads and the LLM width (`connector_from_spec`). Every connector has the same
interface:

- input: an item's features as (B, F, T, D): F frames of T = `encoder.tokens_per_frame()` rows
  (taps included, frame-major as the encoder returns them); (B, F*T, D) is accepted too;
- `forward(features, instruction=None)` -> (B, num_tokens(F), llm_dim);
- `num_tokens(frames)`: the LLM tokens an item of that many frames becomes, which is what the
  prompt builder expands its placeholder to:

    linear, mlp2x_gelu  F * T (every row projected)
    qformer             num_query + num_extra (VideoChat: 96 whatever the frames)
    instruct_qformer    F (one per frame; reads the user's text: `reads_text`)
    event_adaptor       F + T (EventGPT's temporal then spatial mean tokens: 5 + 577)

Parameter names are what importers and bundles rely on: LinearConnector `proj.*`;
MLP2xGeluConnector `fc1.*`, `fc2.*`; EventAdaptorConnector `fc1.*`, `fc2.*`, `adaptor.*`; the
Q-Former connectors keep `services.models.connectors.qformer`'s names. The Q-Former types have frozen
pretrained parts (`base_prefixes`: the Q-Former, its queries and ln_vision) that come from
`connector.base`, not from the adapter bundle; `bundle_state` gives the tensors a bundle holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.common.presets import ConnectorSpec, EncoderSpec, QFormerSpec
from services.models.connectors.qformer import InstructQFormerPooler, QFormerCompressor

# (input_ids, attention_mask), each (B, L): the instruction in a connector's own tokenizer.
Instruction = tuple[torch.Tensor, torch.Tensor]

# Frozen pretrained parts of the Q-Former connectors, loaded from `connector.base`.
QFORMER_BASE_PREFIXES = ("qformer.", "query_tokens", "ln_vision.")


class Connector(nn.Module):
    """Base: (B, F, T, D_in) encoder rows of F frames -> (B, num_tokens(F), D_out).

    Attributes:
        in_dim: Encoder width D_in.
        out_dim: LLM width D_out.
        tokens_per_frame: Rows per frame T (taps included).
        reads_text: Whether `forward` needs an `instruction` (instruct_qformer).
        base_prefixes: State-dict key prefixes of the frozen part loaded from `connector.base`.
    """

    in_dim: int
    out_dim: int
    tokens_per_frame: int = 1
    reads_text: bool = False
    base_prefixes: tuple[str, ...] = ()

    def num_tokens(self, frames: int) -> int:
        """LLM tokens an item of `frames` frames becomes (default: every row)."""
        return frames * self.tokens_per_frame

    def frames_view(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, T, D) or (B, F*T, D) -> (B, F, T, D), checked against this connector's layout.

        Raises:
            InvalidArgumentError: Wrong rank, width, tokens per frame, or rows that do not
                divide into frames.
        """
        t, d = self.tokens_per_frame, self.in_dim
        if (
            features.ndim == 3
            and features.shape[-1] == d
            and features.shape[1] % t == 0
            and features.shape[1]
        ):
            return features.view(features.shape[0], features.shape[1] // t, t, d)  # (B, F, T, D)
        if features.ndim == 4 and tuple(features.shape[2:]) == (t, d) and features.shape[1]:
            return features
        raise InvalidArgumentError(
            f"connector input: expected (batch, frames, {t}, {d}) or (batch, frames * {t}, {d}), "
            f"got {tuple(features.shape)}"
        )

    def encode_instructions(self, texts: Sequence[str]) -> Instruction:
        """Tokenize instructions for a text-reading connector (see `reads_text`)."""
        raise TypeError(f"{type(self).__name__} reads no text")

    def is_base_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to the frozen part loaded from `connector.base`."""
        return any(key == p or key.startswith(p) for p in self.base_prefixes)


class LinearConnector(Connector):
    """One Linear layer (PandaGPT's and NExT-GPT's `llama_proj`)."""

    def __init__(self, in_dim: int, out_dim: int, *, tokens_per_frame: int = 1) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.tokens_per_frame = in_dim, out_dim, tokens_per_frame
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor, instruction: Instruction | None = None) -> torch.Tensor:
        x = self.frames_view(features).flatten(1, 2)  # (B, F*T, D_in)
        return self.proj(x)  # (B, F*T, D_out)


class MLP2xGeluConnector(Connector):
    """Linear -> GELU -> Linear (LLaVA-1.5's `mlp2x_gelu`)."""

    def __init__(self, in_dim: int, out_dim: int, *, tokens_per_frame: int = 1) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.tokens_per_frame = in_dim, out_dim, tokens_per_frame
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor, instruction: Instruction | None = None) -> torch.Tensor:
        x = self.frames_view(features).flatten(1, 2)  # (B, F*T, D_in)
        return self.fc2(self.act(self.fc1(x)))  # (B, F*T, D_out)


class EventAdaptorConnector(Connector):
    """EventGPT: per-frame mlp2x_gelu + Linear feature adaptor, then spatio-temporal means.

    Output rows: the mean over each frame's tokens (F temporal rows), then the mean over the
    frames of each token position (T spatial rows): (B, F + T, D_out), 5 + 577 = 582 for
    EventGPT (`get_spatio_temporal_features`; only means, no max).
    """

    def __init__(self, in_dim: int, out_dim: int, *, tokens_per_frame: int = 1) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.tokens_per_frame = in_dim, out_dim, tokens_per_frame
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.adaptor = nn.Linear(out_dim, out_dim)

    def num_tokens(self, frames: int) -> int:
        """Temporal rows (one per frame) plus spatial rows (one per token position)."""
        return frames + self.tokens_per_frame

    def forward(self, features: torch.Tensor, instruction: Instruction | None = None) -> torch.Tensor:
        x = self.frames_view(features)  # (B, F, T, D_in)
        x = self.adaptor(self.fc2(self.act(self.fc1(x))))  # (B, F, T, D_out)
        temporal = x.mean(dim=2)  # (B, F, D_out)
        spatial = x.mean(dim=1)  # (B, T, D_out)
        return torch.cat([temporal, spatial], dim=1)  # (B, F + T, D_out)


class QFormerConnector(QFormerCompressor, Connector):
    """VideoChat's connector over the interface: [Global MHRA] + ln_vision + Q-Former + Linear.

    The input rows of a frame are the encoder's taps ([tap 0 tokens, tap 1 tokens, ...]) when
    the connector has temporal layers, else the frame's tokens. Gives num_query + num_extra
    tokens per item whatever its frames (an image is one frame).
    """

    base_prefixes = QFORMER_BASE_PREFIXES

    def __init__(self, core: QFormerCompressor, *, tokens_per_frame: int, freeze_base: bool = True) -> None:
        taps = len(core.gmhra.layers) if core.gmhra is not None else 0
        if taps and tokens_per_frame % taps:
            raise ValueError(f"qformer: {tokens_per_frame} rows per frame do not split into {taps} taps")
        QFormerCompressor.__init__(
            self,
            core.qformer,
            vision_width=core.in_dim,
            out_dim=core.out_dim,
            num_query_tokens=core.query_tokens.shape[1],
            num_extra_query_tokens=core.extra_query_tokens.shape[1],
            gmhra=core.gmhra,
            freeze_qformer=freeze_base,
        )
        self.tokens_per_frame, self.taps = tokens_per_frame, taps

    def num_tokens(self, frames: int) -> int:
        """The query count, whatever the frames."""
        return int(self.query_tokens.shape[1] + self.extra_query_tokens.shape[1])

    def forward(self, features: torch.Tensor, instruction: Instruction | None = None) -> torch.Tensor:
        x = self.frames_view(features)  # (B, F, T, D)
        if self.taps:
            b, f, t, d = x.shape
            x = x.reshape(b, f, self.taps, t // self.taps, d)  # (B, F, K, N, D)
        return QFormerCompressor.forward(self, x)  # (B, Q, D_out)


class InstructQFormerConnector(InstructQFormerPooler, Connector):
    """E.T. Chat's connector over the interface: instruction-aware Q-Former + pooling, 1 token/frame.

    Args:
        core: The pooler (`services.models.connectors.eva_qformer.etchat_qformer`).
        tokenizer: The Q-Former's text tokenizer (bert-base-uncased + [DEC]); None builds a
            connector that cannot read text (for writing or checking weights only).
        max_text_tokens: Instructions are truncated from the left to this many ids.
        tokens_per_frame: Patch rows per frame.
        freeze_base: Freeze the pretrained Q-Former, queries and ln_vision.
    """

    base_prefixes = QFORMER_BASE_PREFIXES
    reads_text = True

    def __init__(
        self,
        core: InstructQFormerPooler,
        *,
        tokenizer: Any,
        max_text_tokens: int,
        tokens_per_frame: int,
        freeze_base: bool = True,
    ) -> None:
        InstructQFormerPooler.__init__(
            self,
            core.qformer,
            vision_width=core.in_dim,
            out_dim=core.out_dim,
            num_query_tokens=core.query_tokens.shape[1],
            freeze_qformer=freeze_base,
        )
        config: Any = core.qformer.config
        vocab = int(config.vocab_size)
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"instruct_qformer tokenizer: expected at most {vocab} tokens (qformer.vocab_size), got {len(tokenizer)}"
            )
        self.tokenizer, self.max_text_tokens = tokenizer, max_text_tokens
        self.tokens_per_frame = tokens_per_frame

    def num_tokens(self, frames: int) -> int:
        """One per frame."""
        return frames

    def encode_instructions(self, texts: Sequence[str]) -> Instruction:
        """Tokenize instructions as E.T. Chat does: [CLS] ... [SEP], left-truncated, padded.

        Returns:
            (input_ids, attention_mask), each (len(texts), L).
        """
        tok = self.tokenizer
        if tok is None:
            raise TypeError("this instruct_qformer connector was built without its tokenizer")
        tok.truncation_side = "left"
        enc = tok(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        device = self.query_tokens.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def forward(  # type: ignore[override]  # the interface's signature, not the pooler's
        self, features: torch.Tensor, instruction: Instruction | None = None
    ) -> torch.Tensor:
        x = self.frames_view(features)  # (B, F, N, D)
        if instruction is None:
            instruction = self.encode_instructions([""] * x.shape[0])
        ids, mask = instruction
        return InstructQFormerPooler.forward(self, x, ids, mask)  # (B, F, D_out)


def _qformer_sizes(q: QFormerSpec, encoder: EncoderSpec, llm_dim: int) -> dict[str, Any]:
    """The builder arguments both Q-Former connectors take from the spec."""
    return {
        "vision_width": encoder.dim,
        "out_dim": llm_dim,
        "num_query_tokens": q.num_query_tokens,
        "width": q.width,
        "layers": q.layers,
        "heads": q.heads,
        "mlp_dim": q.mlp_dim,
        "cross_attention_every": q.cross_attention_every,
    }


def _qformer_connector(spec: ConnectorSpec, encoder: EncoderSpec, llm_dim: int, **kw: Any) -> Connector:
    from services.models.connectors.eva_qformer import videochat_qformer

    q = spec.qformer
    assert q is not None  # ConnectorSpec validates it
    core = videochat_qformer(
        **_qformer_sizes(q, encoder, llm_dim),
        num_extra_query_tokens=q.num_extra_query_tokens,
        gmhra_layers=q.gmhra_layers,
        gmhra_heads=q.gmhra_heads,
    )
    return QFormerConnector(
        core, tokens_per_frame=encoder.tokens_per_frame(), freeze_base=kw.get("freeze_base", True)
    )


def _instruct_qformer_connector(
    spec: ConnectorSpec, encoder: EncoderSpec, llm_dim: int, **kw: Any
) -> Connector:
    from services.models.connectors.eva_qformer import etchat_qformer

    q = spec.qformer
    assert q is not None  # ConnectorSpec validates it
    tokenizer = kw.get("tokenizer")
    if tokenizer is None and kw.get("load_tokenizer", True):
        tokenizer = load_qformer_tokenizer(spec)
    core = etchat_qformer(
        **_qformer_sizes(q, encoder, llm_dim),
        vocab_size=q.vocab_size,
        max_text_positions=q.max_text_positions,
    )
    return InstructQFormerConnector(
        core,
        tokenizer=tokenizer,
        max_text_tokens=q.max_text_tokens,
        tokens_per_frame=encoder.tokens_per_frame(),
        freeze_base=kw.get("freeze_base", True),
    )


def cast_connector(connector: Connector, spec: ConnectorSpec, dtype: torch.dtype) -> Connector:
    """Put a connector's weights in `dtype`, keeping `ln_vision` in `spec.ln_vision_dtype` if set.

    VideoChat runs its visual side under CUDA autocast with ln_vision a float32 LayerNorm that
    casts its input up and its output back (`models/blip2.py` LayerNorm, `videochat.py`
    `encode_img`); `ln_vision_dtype: float32` keeps that while the rest serves in `dtype`, its
    weights never passing through `dtype`. The Q-Former connectors cast ln_vision's output back
    to their own dtype.
    """
    ln_vision = getattr(connector, "ln_vision", None)
    if spec.ln_vision_dtype is None or not isinstance(ln_vision, nn.LayerNorm):
        return connector.to(dtype=dtype)
    ln_vision.to(dtype=getattr(torch, spec.ln_vision_dtype))  # "float32" -> torch.float32
    for child in connector.children():
        if child is not ln_vision:
            child.to(dtype=dtype)
    for tensor in [*connector.parameters(recurse=False), *connector.buffers(recurse=False)]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return connector


def load_qformer_tokenizer(spec: ConnectorSpec) -> Any:
    """The instruct_qformer's text tokenizer from `spec.tokenizer` (a Hugging Face folder)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, truncation_side="left")
    tokenizer.truncation_side = "left"
    return tokenizer


def _simple(
    cls: type[LinearConnector | MLP2xGeluConnector | EventAdaptorConnector],
) -> Callable[..., Connector]:
    def build(spec: ConnectorSpec, encoder: EncoderSpec, llm_dim: int, **kw: Any) -> Connector:
        return cls(encoder.dim, llm_dim, tokens_per_frame=encoder.tokens_per_frame())

    return build


# type -> builder(spec, encoder, llm_dim, **options)
CONNECTORS: dict[str, Callable[..., Connector]] = {
    "linear": _simple(LinearConnector),
    "mlp2x_gelu": _simple(MLP2xGeluConnector),
    "event_adaptor": _simple(EventAdaptorConnector),
    "qformer": _qformer_connector,
    "instruct_qformer": _instruct_qformer_connector,
}


def connector_from_spec(
    spec: ConnectorSpec,
    encoder: EncoderSpec,
    llm_dim: int,
    *,
    tokenizer: Any = None,
    load_tokenizer: bool = True,
    freeze_base: bool = True,
) -> Connector:
    """Build the connector a preset's modality names (randomly initialised; load weights after).

    Args:
        spec: The modality's connector spec.
        encoder: The encoder spec whose features it reads (width, tokens per frame, taps).
        llm_dim: The LLM's hidden size.
        tokenizer: instruct_qformer: its text tokenizer (default: loaded from `spec.tokenizer`).
        load_tokenizer: instruct_qformer without `tokenizer`: False builds it without one
            (it then cannot read text; for writing or checking weights).
        freeze_base: Q-Former types: freeze the pretrained part (serving; VideoChat; E.T.
            Chat stage 1).
    """
    try:
        builder = CONNECTORS[spec.type]
    except KeyError:
        raise InvalidArgumentError(
            f"connector type: expected one of {sorted(CONNECTORS)}, got {spec.type!r}"
        ) from None
    return builder(
        spec, encoder, llm_dim, tokenizer=tokenizer, load_tokenizer=load_tokenizer, freeze_base=freeze_base
    )


_SIMPLE: dict[str, type[LinearConnector | MLP2xGeluConnector | EventAdaptorConnector]] = {
    "linear": LinearConnector,
    "mlp2x_gelu": MLP2xGeluConnector,
    "event_adaptor": EventAdaptorConnector,
}


def build_connector(type: str, *, in_dim: int, out_dim: int, tokens_per_frame: int = 1) -> Connector:
    """Build a connector without pretrained parts (linear, mlp2x_gelu, event_adaptor) from sizes."""
    simple = _SIMPLE
    if type not in simple:
        raise InvalidArgumentError(
            f"connector type: expected one of {sorted(simple)} (the Q-Former types are built with "
            f"connector_from_spec), got {type!r}"
        )
    return simple[type](in_dim, out_dim, tokens_per_frame=tokens_per_frame)


def bundle_state(connector: Connector, *, include: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors an adapter bundle holds for `connector`: all but its frozen base part.

    Args:
        connector: The connector.
        include: Base-part keys to keep anyway (they were trained, e.g. E.T. Chat stages 2-3
            train the Q-Former).
    """
    keep = set(include)
    return {
        k: v.detach() for k, v in connector.state_dict().items() if k in keep or not connector.is_base_key(k)
    }
