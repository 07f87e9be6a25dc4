"""Presets: one YAML file per system, validated by a typed schema.

A preset names, per input modality (any registered in `services.common.modalities`: image,
video, audio, event), the encoder backbone and
its checkpoint, the layer and tokens it takes, how frames or clips are sampled, the connector
and the placeholder; the LLM (architecture, checkpoint,
conversation template); and the adapter bundle served at start. Paths may use ${VAR}
environment references; ${MODALMESH_CACHE_DIR} defaults to the settings' cache folder and
${MODALMESH_MODELS_DIR} (where real presets look for released checkpoints) to its `models/`.

Shipped presets live in the `presets` package; MODALMESH_PRESETS_DIR adds a folder that is
searched first. A preset can also be named by the path of its YAML file.
"""

from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common import modalities as registry
from services.common.errors import InvalidArgumentError, NotFoundError, validation_problems


def _input_modality(name: str) -> str:
    if name not in registry.input_names():
        raise ValueError(f"expected one of {list(registry.input_names())}, got {name!r}")
    return name


def _output_modality(name: str) -> str:
    if name not in registry.output_names():
        raise ValueError(f"expected one of {list(registry.output_names())}, got {name!r}")
    return name


# A modality name the registry knows (its records say what each one takes and needs).
Modality = Annotated[str, AfterValidator(_input_modality)]
MODALITIES: tuple[str, ...] = registry.input_names()
TemplateName = Literal[
    "vicuna_v1", "llava_v1", "plain", "vicuna_v0", "nextgpt_demo", "videochat", "phi3", "eventgpt_v1"
]
INFERENCE_ONLY_TEMPLATES = ("nextgpt_demo",)  # serving forms a training sample cannot take
DType = Literal["float32", "float16", "bfloat16"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]

BACKBONES: tuple[str, ...] = ("clip_vision", "eva_vit", "imagebind")
# Which backbones can read which modality (the encoder service decodes the modality, the
# backbone reads the frames or clips it yields): the registry records' `backbones`.
BACKBONE_MODALITIES: dict[str, tuple[str, ...]] = {b: registry.backbone_modalities(b) for b in BACKBONES}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingSpec(_Strict):
    """How one item becomes the frames or clips its backbone reads.

    video: exactly one of `num_frames` (N frames near the middle of N equal segments,
    VideoChat), `fps` (+ `max_frames`, E.T. Chat's 1 fps), `clips` (ImageBind: `clips` clips of
    `clip_seconds`, `frames_per_clip` frames each, `crops` spatial crops). audio (ImageBind):
    `clips` clips of `clip_seconds` at 16 kHz. event (EventGPT): `event_frames` chunks of
    equal event count drawn as red/blue frames.
    """

    num_frames: PositiveInt | None = None
    fps: PositiveFloat | None = None
    max_frames: PositiveInt | None = None
    clips: PositiveInt | None = None
    clip_seconds: PositiveFloat = 2.0
    frames_per_clip: PositiveInt = 2
    crops: Literal[1, 3] = 1
    event_frames: PositiveInt = 5
    last_clip_at_end: bool = Field(
        False,
        description="ImageBind clips: space clip starts by (duration - clip_seconds) / (clips - 1), "
        "so the last clip ends at the end (pytorchvideo from git, which PandaGPT's video needs), "
        "instead of / clips (PyPI pytorchvideo 0.1.5, which NExT-GPT pins).",
    )

    def frames_per_item(self, modality: str) -> int | None:
        """Frames an item yields, or None where it depends on the item (fps sampling); the
        modality's record names the field that fixes it (`frames_field`)."""
        field = registry.get(modality).frames_field
        frames: int | None = getattr(self, field) if field else None
        return frames


class PreprocessSpec(_Strict):
    """How an item's pictures (images, video frames, event frames) become the backbone's pixels.

    The seeds agree on CLIP's mean/std but not on the rest, and each choice moves pixels:
    `resize` "shortest_edge" (the shorter side to the backbone's size, then a centre crop) or
    "squash" (straight to size x size, no crop: VideoChat's image upload); `interpolation`
    "pil_bicubic" (PIL on uint8; clip_vision: its preprocessor_config's `resample`) or
    "torch_bilinear_antialias" (float pixels in [0, 1], torch bilinear with antialias: E.T.
    Chat's torchvision tensor transforms); `crop`, where a centre crop's odd margin goes:
    "floor" (Hugging Face's CLIPImageProcessor, E.T. Chat), "round" (torchvision CenterCrop:
    Python's round, halves to even) or "ceil" (ImageBind's video `uniform_crop`);
    `transparency` "drop" (PIL convert('RGB'), the colour under the alpha: every seed) or
    "white" (composited onto white, as current Hugging Face processors and vLLM);
    `negative_polarity`, which events are drawn blue: "zero_only" (EventGPT: p == 0 blue, any
    other value red, so the -1 of a -1/1 stream is red) or "zero_or_negative" (p <= 0 blue).
    """

    resize: Literal["shortest_edge", "squash"] = "shortest_edge"
    interpolation: Literal["pil_bicubic", "torch_bilinear_antialias"] = "pil_bicubic"
    crop: Literal["floor", "round", "ceil"] = "floor"
    transparency: Literal["drop", "white"] = "drop"
    negative_polarity: Literal["zero_only", "zero_or_negative"] = "zero_only"


class EncoderSpec(_Strict):
    """A frozen backbone served by the encoder service as one Triton model.

    An item's features are (frames * max(taps, 1) * tokens, dim): `tokens` per frame (an
    image is one frame; ImageBind gives one joint-embedding vector per item, its clips
    averaged), frame-major. The LLM service's connector knows the layout from the same spec.
    """

    backbone: Literal["clip_vision", "eva_vit", "imagebind"]
    checkpoint: Path = Field(
        description="clip_vision: a Hugging Face folder; eva_vit: eva_vit_g.pth or a folder "
        "written by modalmesh; imagebind: imagebind_huge.pth or a folder written by modalmesh."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture overrides for the backbone builder (sizes of a tiny twin); "
        "empty means the published architecture.",
    )
    select_layer: int = Field(-2, description="Index into the backbone's hidden states.")
    select_feature: Literal["patch", "cls_patch", "embedding"] = Field(
        "patch", description="patch: drop CLS; cls_patch: keep it; embedding: ImageBind's joint embedding."
    )
    taps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="eva_vit: also return the outputs of this many blocks up to select_layer "
        "(VideoChat's temporal layers read 8).",
    )
    sampling: SamplingSpec | None = None
    preprocess: PreprocessSpec = Field(
        default_factory=PreprocessSpec,
        description="Resize, crop, transparency and event-colour rules (each seed's in its preset).",
    )
    tokens: PositiveInt = Field(description="Tokens per frame (per tap) the backbone returns.")
    dim: PositiveInt = Field(description="Width of each returned token.")
    dtype: DType = "float32"
    max_batch_size: PositiveInt = 8
    batch_delay_us: Annotated[int, Field(ge=0)] = 5000
    triton_model: str | None = Field(
        default=None, description="Triton model name; default <modality>_<backbone>."
    )

    def tokens_per_frame(self) -> int:
        """Feature rows one frame contributes (taps included)."""
        return self.tokens * max(self.taps, 1)


class QFormerSpec(_Strict):
    """Sizes of a BLIP-2 / InstructBLIP Q-Former connector (defaults: BERT-base, as the seeds)."""

    width: PositiveInt = 768
    layers: PositiveInt = 12
    heads: PositiveInt = 12
    mlp_dim: PositiveInt = 3072
    cross_attention_every: PositiveInt = 2
    num_query_tokens: PositiveInt = 32
    num_extra_query_tokens: Annotated[int, Field(ge=0)] = 0
    gmhra_layers: Annotated[int, Field(ge=0)] = 0
    gmhra_heads: PositiveInt = 16
    vocab_size: PositiveInt = 30523
    max_text_positions: PositiveInt = 512
    max_text_tokens: PositiveInt = 256


class ConnectorSpec(_Strict):
    """Maps encoder tokens into the LLM's embedding space (trained; part of the adapter bundle).

    Types: linear and mlp2x_gelu keep the token count; qformer (VideoChat: [Global MHRA] +
    BLIP-2 Q-Former with extra queries + Linear) gives num_query + num_extra tokens;
    instruct_qformer (E.T. Chat: InstructBLIP Q-Former reading the user's text + attention
    pooling) gives one token per frame; event_adaptor (EventGPT: mlp2x_gelu + Linear adaptor +
    spatio-temporal mean pooling) gives frames + tokens.
    """

    type: Literal["linear", "mlp2x_gelu", "qformer", "instruct_qformer", "event_adaptor"]
    name: Name | None = Field(
        default=None,
        description="Connector key in the bundle; modalities naming the same one share it "
        "(PandaGPT's one llama_proj for image, video and audio). Default: the modality.",
    )
    qformer: QFormerSpec | None = None
    base: Path | None = Field(
        default=None,
        description="Frozen weights of the connector (the pretrained Q-Former and its "
        "queries), a safetensors file loaded under the bundle's trained tensors.",
    )
    tokenizer: Path | None = Field(
        default=None,
        description="instruct_qformer: the Q-Former's text tokenizer folder (bert-base-uncased + [DEC]).",
    )
    ln_vision_dtype: DType | None = Field(
        default=None,
        description="Q-Former types: the dtype ln_vision keeps its weights and computes in, its "
        "output cast back (VideoChat: float32, its LayerNorm subclass under autocast); None: the "
        "connector's dtype (E.T. Chat's plain LayerNorm).",
    )

    @model_validator(mode="after")
    def _qformer_options(self) -> ConnectorSpec:
        if self.type in ("qformer", "instruct_qformer") and self.qformer is None:
            raise ValueError(f"connector type {self.type} needs a qformer: section (sizes)")
        if self.type not in ("qformer", "instruct_qformer") and (self.qformer or self.base):
            raise ValueError(f"connector type {self.type}: qformer: and base: are for the Q-Former types")
        if self.type != "instruct_qformer" and self.tokenizer is not None:
            raise ValueError("connector tokenizer: only instruct_qformer reads text")
        if self.type == "instruct_qformer" and self.tokenizer is None:
            raise ValueError(
                "connector type instruct_qformer needs tokenizer: (the Q-Former's text tokenizer)"
            )
        if self.ln_vision_dtype is not None and self.type not in ("qformer", "instruct_qformer"):
            raise ValueError(
                f"connector ln_vision_dtype: only the Q-Former types have ln_vision, not {self.type}"
            )
        return self


class ModalitySpec(_Strict):
    encoder: EncoderSpec
    connector: ConnectorSpec
    placeholder: str = Field("<image>", description="Token standing for one item in the prompt.")
    max_per_prompt: PositiveInt = 4
    attention: Literal["causal", "bidirectional"] = Field(
        "causal",
        description="How the LLM positions of one item's span attend to each other: causal, or "
        "bidirectional (every position of the span sees the whole span; E.T. Chat's stage 3 "
        "`--bi_attention True`). Text and other items stay causal; applied at serving prefill "
        "and in stage-3 training.",
    )

    def connector_name(self, modality: str) -> str:
        """The bundle key of this modality's connector."""
        return self.connector.name or modality


class LLMSpec(_Strict):
    architecture: Literal["llama", "phi3"]
    checkpoint: Path = Field(description="A Hugging Face model folder (config, weights, tokenizer).")
    template: TemplateName = "vicuna_v1"
    dtype: DType = "float32"
    max_context_tokens: PositiveInt = 2048
    added_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens the system adds to the tokenizer (e.g. E.T. Chat's <vid>); each must "
        "be one token of the checkpoint's tokenizer.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Generated presets only: the LM's config sizes over the tiny generator's "
        "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, ...).",
    )
    inference_template: TemplateName | None = Field(
        default=None,
        description="The conversation format serving renders, where the seed's inference text "
        "differs from its training text (NExT-GPT's demo: nextgpt_demo); training always renders "
        "`template`. Unset: `template`.",
    )
    dummy_prefix: Literal["every_run", "first_run", "none"] | None = Field(
        default=None,
        description="SentencePiece tokenizers (Llama, Phi-3): where the word-start mark '▁' is "
        "written besides the text's own spaces. every_run: before every run of text between "
        "special or added tokens, as the slow LlamaTokenizer of transformers < 4.31 and Llama's "
        "legacy tokenizer.json do (PandaGPT, NExT-GPT, VideoChat); first_run: at the start of "
        "the text only, as transformers >= 4.31 with legacy=False (EventGPT); none: nowhere, as "
        "E.T. Chat's tokenizer (converted with add_prefix_space=False). Unset: as the tokenizer "
        "files load. Byte-level tokenizers have no such mark and ignore it.",
    )
    sliding_window: Literal["checkpoint", "none"] = Field(
        default="checkpoint",
        description="Whether the LM attends within its config's sliding window (Phi-3-mini's "
        "2047/2048). checkpoint: as transformers 5 applies config.sliding_window; none: no window, "
        "as E.T. Chat's eager Phi-3 on transformers 4.44 attends (only its flash-attention path "
        "had one).",
    )

    @model_validator(mode="after")
    def _training_template(self) -> LLMSpec:
        if self.template in INFERENCE_ONLY_TEMPLATES:
            raise ValueError(
                f"llm.template: {self.template} is an inference form only (training cannot render it); "
                "set it as llm.inference_template and train with vicuna_v0"
            )
        return self


class TimestampHeadSpec(_Strict):
    """E.T. Chat's `<vid>` matching: the token's query is matched against the frame keys.

    `token` must be one of `llm.added_tokens`; `alpha` is the soft-target base (target_j =
    alpha^-|j - t|); `modality` names the media whose frames are matched.
    """

    token: str = "<vid>"
    alpha: PositiveFloat = 2.0
    modality: Modality = "video"


class HeadsSpec(_Strict):
    timestamps: TimestampHeadSpec | None = None


# A modality the registry can produce (its record has an `output` pipeline).
OutputModality = Annotated[str, AfterValidator(_output_modality)]
OUTPUT_MODALITIES: tuple[str, ...] = registry.output_names()


def output_formats(modality: str) -> tuple[str, ...]:
    """The file formats an output modality is written in, the default first."""
    out = registry.get(modality).output
    return out.formats if out is not None else ()


class ProjectorSpec(_Strict):
    """The transformer output projector's hidden sizes (NExT-GPT's TextFcLayer; seed defaults)."""

    hidden_dim: PositiveInt = 512
    num_heads: PositiveInt = 4
    encoder_layers: PositiveInt = 4
    decoder_layers: PositiveInt = 4
    ffn_dim: PositiveInt | None = Field(
        default=None, description="Feed-forward width; 4 x hidden_dim when unset."
    )
    query_init: Literal["randn", "zeros"] = "randn"


class DecodeDefaults(_Strict):
    """Per-decoder defaults over the pipeline's own; a request's values override them."""

    steps: PositiveInt | None = None
    guidance_scale: Annotated[float, Field(ge=0.0)] | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    duration_s: PositiveFloat | None = None
    num_frames: PositiveInt | None = None
    fps: PositiveInt | None = None


class DecodeLimits(_Strict):
    """What one request may ask of a decoder (the defaults suit SD 1.5 / ZeroScope / AudioLDM)."""

    max_steps: PositiveInt = 100
    max_guidance_scale: PositiveFloat = 30.0
    min_side: PositiveInt = 8
    max_side: PositiveInt = 1024
    min_duration_s: PositiveFloat = 0.5
    max_duration_s: PositiveFloat = 10.24
    max_frames: PositiveInt = 32
    max_fps: PositiveInt = 30


class DecoderSpec(_Strict):
    """A diffusion decoder: a diffusers pipeline folder and how requests to it are served."""

    checkpoint: Path = Field(description="A diffusers pipeline folder (save_pretrained layout).")
    dtype: DType = "float32"
    format: Literal["png", "wav", "mp4", "gif"] | None = Field(
        default=None, description="Media format of the replies; png, wav or mp4 when unset."
    )
    negative: Literal["empty_prompt", "zeros"] = Field(
        default="empty_prompt",
        description="The unconditional embedding for guidance: the pipeline's text encoder on "
        "'' (NExT-GPT) or zeros.",
    )
    defaults: DecodeDefaults = Field(default_factory=DecodeDefaults)
    limits: DecodeLimits = Field(default_factory=DecodeLimits)
    max_batch_size: PositiveInt = Field(default=4, description="Triton dynamic batching bound.")
    triton_model: Name | None = Field(default=None, description="Default: '<modality>_decoder'.")


class OutputSpec(_Strict):
    """An output modality (NExT-GPT): signal tokens -> output projector -> decoder.

    `position` says which hidden states feed the projector at inference: "at" the signal
    tokens (how it is trained; NExT-GPT's new code base) or one position "before" them (legacy
    NExT-GPT's `generate`, SEEDS_SPEC 2.A "Surprise"). Training always uses "at".
    """

    signal_tokens: list[str] = Field(min_length=1, description="In order; each one of llm.added_tokens.")
    head: Name = Field(description="The adapter bundle's head name of this projector.")
    conditioning: tuple[PositiveInt, PositiveInt] = Field(
        description="The decoder's conditioning per item, (rows, width): (77, 768) for SD 1.5."
    )
    position: Literal["at", "before"]
    hidden_layer: int = Field(default=-1, description="Which hidden layer feeds the projector (-1: last).")
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec)
    loss_weight: Annotated[float, Field(ge=0.0)] = 1.0
    stage3_loss_weight: Annotated[float, Field(ge=0.0)] | None = Field(
        default=None, description="The distance loss weight in stage 3; loss_weight when unset."
    )
    decoder: DecoderSpec

    def media_format(self, modality: str) -> str:
        """The format replies are encoded in."""
        return self.decoder.format or output_formats(modality)[0]


class GenerationSpec(_Strict):
    """The seed's decoding defaults and how it returns its text (the `generation:` section).

    A request's own value of a sampling field wins; an unset field of both takes the engine's
    neutral default (temperature 1, top_p 1, top_k off, penalties off, max_tokens from
    MODALMESH_DEFAULT_MAX_TOKENS). The text rules reproduce what a seed's own decode returns
    (docs/presets.md cites each seed's file and line).
    """

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="0: off. Hugging Face's generate samples with top_k 50 unless told otherwise.",
    )
    max_tokens: PositiveInt | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = Field(
        default=1.0,
        description="Hugging Face's: over the prompt's and the reply's ids (media positions and the "
        "timestamp token left out), positive logits divided, negative ones multiplied; 1: off.",
    )
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Stop strings; unset: the template's (e.g. '###'), [] : none."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Ids of the checkpoint's tokenizer that end a reply."
    )
    include_stop_str_in_output: bool = Field(
        default=False, description="Keep the text of the stop string or stop token that ended the reply."
    )
    drop_last_tokens: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Leave the text of the reply's last N tokens out, whatever ended it (PandaGPT: 2).",
    )
    decode_reply_alone: bool = Field(
        default=False,
        description="Decode the reply without the prompt before it, as the seeds decode their generated "
        "ids (SentencePiece then drops the first token's leading space).",
    )
    strip: bool = Field(default=False, description="Strip whitespace from both ends of the reply.")


class AdapterSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path = Field(description="The adapter bundle folder served at start.")


class LoraSpec(_Strict):
    """LoRA on the LLM for instruction tuning (stage 3): rank, scale, dropout, target modules.

    `targets` are module-name suffixes inside the LLM only (e.g. q_proj): the trainer resolves
    them to full paths under the LLM, so encoder towers never receive LoRA. `enabled: false`
    keeps the LLM frozen in stage 3, as VideoChat's instruction tuning does (a job's
    `lora: {enabled: true}` still adds it).
    """

    enabled: bool = Field(
        default=True,
        description="Whether stage 3 adds LoRA to the LLM by default; false trains the "
        "connectors (and heads) alone with the LLM frozen (VideoChat).",
    )
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class Preset(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    generate: Literal["tiny"] | None = Field(
        None, description="Generator that writes the checkpoints on first use (built-in presets)."
    )
    modalities: dict[Modality, ModalitySpec]
    llm: LLMSpec
    adapter: AdapterSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    heads: HeadsSpec = Field(default_factory=HeadsSpec)
    outputs: dict[OutputModality, OutputSpec] = Field(
        default_factory=dict, description="What the LLM can produce besides text (NExT-GPT)."
    )
    media_combine: Literal["separate", "sum", "sum_per_modality"] = Field(
        "separate",
        description="sum: the media items of one user turn become one token, the sum of their "
        "connector outputs (PandaGPT); sum_per_modality: the items of each modality of a user "
        "turn become one token each, in the order the modalities first appear (legacy NExT-GPT "
        "sums the files of one <Image>/<Video>/<Audio> segment); every connector must give 1 token.",
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="The seed's decoding defaults (a request's values override them) and text rules.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        seen = [m.placeholder for m in self.modalities.values()]
        if len(seen) != len(set(seen)):
            raise ValueError(f"each modality needs its own placeholder, got {seen}")
        for modality, spec in self.modalities.items():
            _check_modality(modality, spec)
        shared: dict[str, tuple[str, ConnectorSpec, int]] = {}
        for modality, spec in self.modalities.items():
            name = spec.connector_name(modality)
            mine = (spec.connector.model_dump_json(exclude={"name"}), spec.encoder.dim)
            if (
                name in shared
                and (shared[name][1].model_dump_json(exclude={"name"}), shared[name][2]) != mine
            ):
                raise ValueError(
                    f"modalities {shared[name][0]} and {modality} share connector {name!r}: expected the "
                    "same connector settings and encoder width"
                )
            shared.setdefault(name, (modality, spec.connector, spec.encoder.dim))
        if self.media_combine != "separate":
            bad = [m for m, s in self.modalities.items() if not _one_token(s)]
            if bad:
                raise ValueError(
                    f"media_combine {self.media_combine}: every modality must give one LLM token per item "
                    f"(linear/mlp2x_gelu over one embedding), {bad} do not"
                )
        ts = self.heads.timestamps
        if ts is not None:
            if ts.token not in self.llm.added_tokens:
                raise ValueError(f"heads.timestamps.token {ts.token!r}: expected one of llm.added_tokens")
            if ts.modality not in self.modalities:
                raise ValueError(
                    f"heads.timestamps.modality {ts.modality!r}: the preset has no such modality"
                )
        _check_outputs(self)
        if self.generation.drop_last_tokens and (self.outputs or ts is not None):
            raise ValueError(
                "generation.drop_last_tokens: only for presets without outputs and heads.timestamps "
                "(their tokens place media and times in the text)"
            )
        return self

    def connector_names(self) -> dict[str, str]:
        """Per modality, the bundle key of its connector."""
        return {m: s.connector_name(m) for m, s in self.modalities.items()}

    def bidirectional_modalities(self) -> frozenset[str]:
        """The modalities whose items' spans attend bidirectionally (`attention`)."""
        return frozenset(m for m, s in self.modalities.items() if s.attention == "bidirectional")

    def triton_model(self, modality: str) -> str:
        """The Triton model name of a modality's encoder."""
        enc = self.modalities[modality].encoder
        return enc.triton_model or f"{modality}_{enc.backbone}"

    def decoder_model(self, modality: str) -> str:
        """The Triton model name of an output modality's decoder."""
        return self.outputs[modality].decoder.triton_model or f"{modality}_decoder"

    def encoder_id(self, modality: str) -> str:
        """Identity of a modality's encoder output, for caching features by content.

        The Triton model name plus a digest of the whole encoder spec (backbone, checkpoint,
        layer, tokens, dtype...), so that features made by another configuration are never
        served for this one.
        """
        spec = self.modalities[modality].encoder
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        return f"{self.triton_model(modality)}-{digest}"


def _check_outputs(preset: Preset) -> None:
    if preset.outputs and preset.heads.timestamps is not None:
        raise ValueError(
            "outputs and heads.timestamps together: expected one of them (no seed system has both)"
        )
    seen_tokens: dict[str, str] = {}
    heads: dict[str, str] = {}
    for modality, out in preset.outputs.items():
        where = f"outputs.{modality}"
        if len(set(out.signal_tokens)) != len(out.signal_tokens):
            raise ValueError(f"{where}.signal_tokens: expected distinct tokens, got {out.signal_tokens}")
        for token in out.signal_tokens:
            if token not in preset.llm.added_tokens:
                raise ValueError(f"{where}.signal_tokens: {token!r} is not one of llm.added_tokens")
            if token in seen_tokens:
                raise ValueError(
                    f"{where}.signal_tokens: {token!r} is already a signal token of {seen_tokens[token]}"
                )
            seen_tokens[token] = modality
        if out.head in heads or out.head == "timestamps":
            raise ValueError(
                f"{where}.head {out.head!r}: expected a head name no other part of the bundle uses"
            )
        heads[out.head] = modality
        if out.projector.hidden_dim % out.projector.num_heads:
            raise ValueError(
                f"{where}.projector: hidden_dim {out.projector.hidden_dim} must divide into "
                f"num_heads {out.projector.num_heads}"
            )
        fmt, pipeline = out.decoder.format, registry.get(modality).output
        assert pipeline is not None  # OutputModality
        if fmt is not None and fmt not in pipeline.formats:
            raise ValueError(f"{where}.decoder.format: expected one of {pipeline.formats}, got {fmt!r}")
        rows = pipeline.conditioning_rows
        if rows is not None and out.conditioning[0] != rows:
            raise ValueError(
                f"{where}.conditioning: {pipeline.pipeline} takes {rows} row{'s' if rows > 1 else ''} "
                f"({rows}, width), got {out.conditioning}"
            )


def _one_token(spec: ModalitySpec) -> bool:
    enc = spec.encoder
    return (
        spec.connector.type in ("linear", "mlp2x_gelu")
        and enc.tokens_per_frame() == 1
        and (enc.backbone == "imagebind" or spec.encoder.sampling is None)
    )


def _check_modality(modality: str, spec: ModalitySpec) -> None:
    """Cross-field rules of one modality: backbone, sampling and connector fit together."""
    enc, where, record = spec.encoder, f"modalities.{modality}", registry.get(modality)
    readers = registry.backbone_modalities(enc.backbone)
    if modality not in readers:
        raise ValueError(f"{where}.encoder.backbone: {enc.backbone} reads {list(readers)}, not {modality}")
    sampling = enc.sampling
    if record.sampling == "none" and sampling is not None:
        raise ValueError(f"{where}.encoder.sampling: {_a(record.noun[0])} has no frames to sample; remove it")
    if record.sampling == "required" and sampling is None:
        raise ValueError(f"{where}.encoder.sampling: expected one for {modality}")
    if record.preset_rules is not None:
        record.hook("preset_rules")(where, spec)
    if sampling is not None and sampling.last_clip_at_end and sampling.clips is None:
        raise ValueError(f"{where}.encoder.sampling.last_clip_at_end: only with clips (ImageBind)")
    if (enc.backbone == "imagebind") != (enc.select_feature == "embedding"):
        raise ValueError(
            f"{where}.encoder.select_feature: 'embedding' is imagebind's output and imagebind gives only that"
        )
    if enc.taps and enc.backbone != "eva_vit":
        raise ValueError(f"{where}.encoder.taps: only eva_vit returns block taps")
    q = spec.connector.qformer
    if spec.connector.type == "qformer" and q is not None and q.gmhra_layers != enc.taps:
        raise ValueError(
            f"{where}.connector.qformer.gmhra_layers: the temporal layers read one tap each, "
            f"expected {enc.taps} (encoder.taps), got {q.gmhra_layers}"
        )
    owners = [m.name for m in registry.MODALITIES.values() if spec.connector.type in m.adaptors]
    if owners and modality not in owners:
        raise ValueError(
            f"{where}.connector.type: {spec.connector.type} reads only {', '.join(owners)}; {modality} has none"
        )
    if spec.attention == "bidirectional" and _one_token(spec):
        raise ValueError(
            f"{where}.attention: bidirectional attention over a span needs items of several LLM "
            f"tokens; a {spec.connector.type} connector over one embedding gives one token per item"
        )


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def video_rules(where: str, spec: ModalitySpec) -> None:
    """Video's preset rules (its registry record's `preset_rules`): one sampling mode, clips
    only for ImageBind and always for it, and ImageBind's own scaling."""
    enc = spec.encoder
    sampling, pre = enc.sampling, enc.preprocess
    assert sampling is not None  # the record's sampling="required", checked before
    chosen = [k for k in ("num_frames", "fps", "clips") if getattr(sampling, k) is not None]
    if len(chosen) != 1:
        raise ValueError(
            f"{where}.encoder.sampling: expected exactly one of num_frames, fps, clips; got {chosen}"
        )
    if sampling.max_frames is not None and sampling.fps is None:
        raise ValueError(f"{where}.encoder.sampling.max_frames: only with fps")
    if sampling.clips is not None and enc.backbone != "imagebind":
        raise ValueError(f"{where}.encoder.sampling.clips: only the imagebind backbone reads clips")
    if enc.backbone == "imagebind" and sampling.clips is None:
        raise ValueError(f"{where}.encoder.sampling: imagebind reads clips (clips: 5 as ImageBind)")
    if enc.backbone == "imagebind" and (pre.resize != "shortest_edge" or pre.interpolation != "pil_bicubic"):
        raise ValueError(
            f"{where}.encoder.preprocess: ImageBind video is scaled as pytorchvideo's ShortSideScale "
            f"and cut into `crops` squares; only crop applies (resize {pre.resize!r}, "
            f"interpolation {pre.interpolation!r} given)"
        )


def audio_rules(where: str, spec: ModalitySpec) -> None:
    """Audio's preset rules (its registry record's `preset_rules`): ImageBind's clips."""
    sampling = spec.encoder.sampling
    if sampling is not None and sampling.clips is None:
        raise ValueError(f"{where}.encoder.sampling.clips: expected the number of audio clips (ImageBind: 3)")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                raise InvalidArgumentError(f"{where}: ${{{m.group(1)}}} is not set in the environment")
            return env[m.group(1)]

        return _VAR.sub(sub, value)
    return value


def _candidates(name: str, presets_dir: Path | None) -> list[Path]:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return [Path(name)]
    out = []
    if presets_dir is not None:
        out.append(presets_dir / f"{name}.yaml")
    out.append(Path(str(resources.files("presets").joinpath(f"{name}.yaml"))))
    return out


def shipped_presets() -> list[str]:
    """Names of the presets that ship with modalmesh."""
    folder = resources.files("presets")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_preset(text: str, *, cache_dir: Path, source: str = "<string>") -> Preset:
    """Validate preset YAML text; errors name the file and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"preset {source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"preset {source}: expected a mapping, got {type(raw).__name__}")
    env = dict(os.environ)
    env.setdefault("MODALMESH_CACHE_DIR", str(cache_dir))
    env.setdefault("MODALMESH_MODELS_DIR", str(Path(env["MODALMESH_CACHE_DIR"]) / "models"))
    try:
        return Preset.model_validate(_expand(raw, env, ""))
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"preset {source}: {e.message}") from e
    except ValidationError as e:
        problems = validation_problems(e.errors())
        raise InvalidArgumentError(f"preset {source}: {problems}") from e


def load_preset(name: str, *, cache_dir: Path, presets_dir: Path | None = None) -> Preset:
    """Find and validate a preset by name (or YAML path).

    Raises:
        NotFoundError: No such preset; the message lists the shipped ones.
        InvalidArgumentError: The file does not satisfy the schema.
    """
    for path in _candidates(name, presets_dir):
        if path.is_file():
            return parse_preset(path.read_text(), cache_dir=cache_dir, source=str(path))
    raise NotFoundError(f"preset {name!r} not found; shipped presets: {', '.join(shipped_presets())}")
