"""ImageBind's vision, audio and thermal towers, written here, loading `imagebind_huge.pth` strictly.

NExT-GPT (legacy) and PandaGPT encode every image, video and audio item into one (1024,)
vector with the frozen ImageBind-Huge (SEEDS_SPEC 2.A, 3); PandaGPT's demo also takes thermal
images (`encode_thermal` in its code/model/openllama.py). This module rebuilds the three towers
they use with the parameter names and shapes of facebookresearch/ImageBind
(`imagebind/models/imagebind_model.py`, `multimodal_preprocessors.py`, `transformer.py`,
`helpers.py`, read at 53680b02d7e37b19b124fa37bae4b6c98c38f5be), so the published checkpoint
loads into it key for key. Each tower is

    preprocessor  patch conv (+ LayerNorm for audio and thermal) -> CLS token + learned positions
    trunk         pre-LN transformer blocks (nn.MultiheadAttention, GELU MLP x4), LayerNorm
                  before the blocks for vision, learned bias_k/bias_v in audio's and thermal's
                  attention
    head          LayerNorm -> CLS token -> Linear(width -> out, no bias)
    postprocessor L2 normalise (audio also holds a fixed logit scale of 20, thermal one of 10;
                  see below)

Items with several clips (video: (B, S, 3, 2, H, W), audio: (B, S, 1, mel, frames)) are
encoded clip by clip and the normalised clip embeddings are averaged without renormalising, as
`ImageBindModel.forward` does; so a clip average is not unit-norm. Images go through the
video tower as a 2-frame clip of the repeated image (`PadIm2Video`).

Audio's postprocessor multiplies by exp(log_logit_scale) = 20 in ImageBind; PandaGPT's and
NExT-GPT's copies apply only its Normalize, which is what `audio_logit_scale=False` (default)
does. The buffer is still built so the checkpoint loads strictly. Thermal's postprocessor
(Normalize, then a fixed x10) is applied whole, by ImageBind and by PandaGPT's copy alike
(its forward drops the scale for audio only), so a thermal embedding has norm 10, not 1.

The thermal tower (imagebind_huge: 768 wide, 12 blocks, 12 heads, drop-path 0) reads one
(1, 224, 224) grey image in [0, 1] (ImageBind's `load_and_transform_thermal_data`, no
normalisation: `services.models.media.thermal`) through a Conv2d kernel = stride = 16 -> 14 x 14
patches; it is built like audio's (LayerNorm after the stem, bias_k/bias_v, no LayerNorm
before the blocks).

Unlike ImageBind, inputs of another size are refused rather than interpolated, and the
modality is named by the caller ("image", "video", "audio", "thermal") instead of guessed from
`ndim`. `build_imagebind` builds the towers asked for (vision and audio by default); the text,
depth and IMU towers are never built, and `load_imagebind_state_dict` drops the keys of every
tower not loaded. There is no dropout or drop-path (ImageBind's audio drop-path 0.1 only acts
in training), so train() and eval() compute the same thing; freezing is the caller's decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.models.backbones.base import Backbone

logger = logging.getLogger(__name__)

Modality = Literal["image", "video", "audio", "thermal"]
TOWERS: tuple[str, ...] = ("vision", "audio", "thermal")  # the towers this module can build
DEFAULT_TOWERS: tuple[str, ...] = ("vision", "audio")  # built when none are named
CHECKPOINT_TOWERS: tuple[str, ...] = ("vision", "text", "audio", "depth", "thermal", "imu")
_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
_TOWER_OF: dict[str, str] = {"image": "vision", "video": "vision", "audio": "audio", "thermal": "thermal"}
_SINGLE: tuple[str, ...] = ("image", "thermal")  # modalities that are one picture per item, no clips
_MAX_LISTED = 12  # problems named in one load error


class PadToClip(nn.Module):
    """ImageBind's PadIm2Video(pad_type="repeat"): (B, C, H, W) or (B, C, 1, H, W) -> (B, C, T, H, W)."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)  # (B, C, T, H, W)
        return x


class PatchEmbed(nn.Module):
    """Conv stem -> (B, N, D) tokens, then an optional LayerNorm (ImageBind's PatchEmbedGeneric)."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, [T,] h, w) -> (B, N, D)
        return self.norm_layer(x) if self.norm_layer is not None else x


class Positions(nn.Module):
    """Learned positions for CLS + patches (ImageBind's SpatioTemporalPosEmbeddingHelper)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * dim**-0.5)  # (1, 1 + N, D)


class Preprocessor(nn.Module):
    """Media -> (B, 1 + N, D): patch tokens after a CLS token, plus learned positions."""

    def __init__(self, stem: PatchEmbed, num_patches: int, dim: int) -> None:
        super().__init__()
        self.rgbt_stem = stem  # ImageBind's name, for the audio tower too
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)  # (1, 1, D)
        self.pos_embedding_helper = Positions(1 + num_patches, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat((cls, tokens), dim=1) + self.pos_embedding_helper.pos_embed  # (B, 1 + N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (ImageBind's BlockWithMasking without masking or layer scale)."""

    def __init__(self, dim: int, num_heads: int, *, bias_kv: bool, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_1(x)  # (B, L, D)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))  # (B, L, D)


class Trunk(nn.Module):
    """Optional LayerNorm, then the blocks: (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, *, pre_ln: bool, bias_kv: bool) -> None:
        super().__init__()
        # A Sequential so the checkpoint's `pre_transformer_layer.0.*` names fit (ImageBind's
        # index 1 is a parameter-free rearrange to (L, B, D), not needed with batch_first).
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_ln else nn.Identity())
        self.blocks = nn.Sequential(*[Block(dim, num_heads, bias_kv=bias_kv) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pre_transformer_layer(x))


class SelectCls(nn.Module):
    """(B, L, D) -> (B, D): the CLS token (ImageBind's SelectElement(index=0))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), max_scale), fixed (ImageBind's LearnableLogitScaling(learnable=False))."""

    log_logit_scale: torch.Tensor  # () buffer, in the checkpoint

    def __init__(self, scale: float, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_scale = max_scale
        self.register_buffer("log_logit_scale", torch.full((), math.log(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale) * x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 and 2 are the checkpoint's `modality_heads.<tower>.{0,2}.*`.
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectCls(), nn.Linear(dim, out_dim, bias=False))


class ImageBindEncoder(nn.Module):
    """ImageBind towers: `forward(modality, inputs)` -> (B, out_dim) embeddings.

    Args:
        preprocessors, trunks, heads, postprocessors: The parts of each tower, keyed by tower
            name ("vision", "audio", "thermal"); the attribute names are ImageBind's checkpoint
            prefixes.
        clip_shapes: Per tower, the shape of one clip without batch: vision (3, T, H, W),
            audio (1, mel, frames), thermal (1, H, W).
        audio_logit_scale: Apply audio's x20 logit scale as ImageBind does (False: only
            normalise, as PandaGPT and NExT-GPT do).
    """

    def __init__(
        self,
        *,
        preprocessors: Mapping[str, nn.Module],
        trunks: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        postprocessors: Mapping[str, nn.Module],
        clip_shapes: Mapping[str, tuple[int, ...]],
        audio_logit_scale: bool = False,
    ) -> None:
        super().__init__()
        self.modality_preprocessors = nn.ModuleDict(preprocessors)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(postprocessors)
        self.clip_shapes = dict(clip_shapes)
        self.audio_logit_scale = audio_logit_scale

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers built, in ImageBind's order."""
        return tuple(t for t in CHECKPOINT_TOWERS if t in self.modality_trunks)

    def embed_clips(self, tower: str, clips: torch.Tensor) -> torch.Tensor:
        """(N, *clip_shape) clips (or (N, 3, H, W) images for vision) -> (N, out_dim) embeddings:
        unit vectors, but x10 for thermal (its logit scale, which PandaGPT keeps)."""
        x = self.modality_preprocessors[tower](clips)  # (N, 1 + P, D)
        x = self.modality_trunks[tower](x)  # (N, 1 + P, D)
        x = self.modality_heads[tower](x)  # (N, out_dim)
        post = self.modality_postprocessors[tower]
        if tower == "audio" and not self.audio_logit_scale and isinstance(post, nn.Sequential):
            post = post[0]  # audio: Normalize only, as PandaGPT and NExT-GPT
        return post(x)

    def forward(self, modality: Modality, inputs: torch.Tensor) -> torch.Tensor:
        """Embed a batch of items of one modality.

        Args:
            modality: "image": (B, 3, H, W); "video": (B, S, 3, T, H, W) clips or (B, 3, T, H, W)
                single clips; "audio": (B, S, 1, mel, frames) clips or (B, 1, mel, frames);
                "thermal": (B, 1, H, W).
            inputs: Preprocessed media (`prepare.imagebind_video`, `audio.imagebind_audio`,
                `thermal.prepare_thermal`, CLIP-style pictures for images).

        Returns:
            (B, out_dim): the normalised embedding (thermal: times 10), averaged over the S
            clips when there are several.

        Raises:
            InvalidArgumentError: Unknown or unbuilt modality, or inputs of another shape.
        """
        clips, batch, num_clips = self._as_clips(modality, inputs)
        tower = _TOWER_OF[modality]
        dtype = next(self.modality_trunks[tower].parameters()).dtype
        out = self.embed_clips(tower, clips.to(dtype))  # (B * S, out_dim)
        return out.reshape(batch, num_clips, -1).mean(dim=1)  # (B, out_dim)

    def _as_clips(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tower = _TOWER_OF.get(modality)
        if tower is None or tower not in self.modality_trunks:
            can = [m for m, t in _TOWER_OF.items() if t in self.modality_trunks]
            raise InvalidArgumentError(f"imagebind modality: expected one of {can}, got {modality!r}")
        clip = self.clip_shapes[tower]
        if modality == "image":
            clip = (clip[0], *clip[2:])  # (3, H, W): PadToClip repeats it to T frames
        # one picture per item; otherwise one clip per item, or S clips per item
        forms = [clip] if modality in _SINGLE else [clip, (-1, *clip)]
        for form in forms:
            if x.ndim == len(form) + 1 and all(f in (-1, g) for f, g in zip(form, x.shape[1:], strict=True)):
                batch, num_clips = x.shape[0], (x.shape[1] if form[0] == -1 else 1)
                if batch < 1 or num_clips < 1:
                    break
                return x.reshape(batch * num_clips, *clip), batch, num_clips
        want = " or ".join(
            "(B, " + ", ".join("S" if f == -1 else str(f) for f in form) + ")" for form in forms
        )
        sizes = "B >= 1" if modality in _SINGLE else "B, S >= 1"
        raise InvalidArgumentError(
            f"imagebind {modality}: expected {want} with {sizes}, got {tuple(x.shape)}"
        )


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _check_heads(tower: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise InvalidArgumentError(f"imagebind {tower}: embed dim {dim} is not divisible by {heads} heads")


_Tower = tuple[nn.Module, nn.Module, nn.Module, nn.Module, tuple[int, ...]]  # pre, trunk, head, post, clip


def _vision_tower(dim: int, blocks: int, heads: int, out: int, size: int, patch: int, frames: int) -> _Tower:
    _check_heads("vision", dim, heads)
    side = _conv_out(size, patch, patch)
    if side < 1:
        raise InvalidArgumentError(f"imagebind vision: image_size {size} is under one patch ({patch})")
    kernel = (frames, patch, patch)
    conv = nn.Conv3d(3, dim, kernel_size=kernel, stride=kernel, bias=False)
    stem = PatchEmbed(nn.Sequential(PadToClip(frames), conv))  # proj.1 = the conv
    # Built in this order (stem, positions, trunk, head) so that a seed gives the same weights.
    pre = Preprocessor(stem, side * side, dim)
    trunk = Trunk(dim, blocks, heads, pre_ln=True, bias_kv=False)
    return pre, trunk, _head(dim, out), Normalize(), (3, frames, size, size)


def _audio_tower(
    dim: int, blocks: int, heads: int, out: int, mel: int, frames: int, kernel: int, stride: int
) -> _Tower:
    _check_heads("audio", dim, heads)
    rows, cols = _conv_out(mel, kernel, stride), _conv_out(frames, kernel, stride)
    if rows < 1 or cols < 1:
        raise InvalidArgumentError(
            f"imagebind audio: a ({mel}, {frames}) spectrogram is under one {kernel}x{kernel} patch"
        )
    conv = nn.Conv2d(1, dim, kernel_size=kernel, stride=stride, bias=False)
    stem = PatchEmbed(conv, nn.LayerNorm(dim))  # eps 1e-5 here, as in ImageBind
    pre = Preprocessor(stem, rows * cols, dim)
    trunk = Trunk(dim, blocks, heads, pre_ln=False, bias_kv=True)
    post = nn.Sequential(Normalize(), LogitScale(20.0))
    return pre, trunk, _head(dim, out), post, (1, mel, frames)


def _thermal_tower(dim: int, blocks: int, heads: int, out: int, size: int, kernel: int) -> _Tower:
    """ImageBind's thermal tower: Conv2d(1 -> dim, kernel = stride) + LayerNorm, audio-style trunk."""
    _check_heads("thermal", dim, heads)
    side = _conv_out(size, kernel, kernel)
    if side < 1:
        raise InvalidArgumentError(
            f"imagebind thermal: thermal_image_size {size} is under one patch ({kernel})"
        )
    conv = nn.Conv2d(1, dim, kernel_size=kernel, stride=kernel, bias=False)
    stem = PatchEmbed(conv, nn.LayerNorm(dim))  # eps 1e-5, as ImageBind's thermal stem
    pre = Preprocessor(stem, side * side, dim)
    trunk = Trunk(dim, blocks, heads, pre_ln=False, bias_kv=True)
    post = nn.Sequential(Normalize(), LogitScale(10.0))
    return pre, trunk, _head(dim, out), post, (1, size, size)


def build_imagebind(
    *,
    towers: Sequence[str] = DEFAULT_TOWERS,
    out_embed_dim: int = 1024,
    vision_embed_dim: int = 1280,
    vision_num_blocks: int = 32,
    vision_num_heads: int = 16,
    image_size: int = 224,
    patch: int = 14,
    video_frames: int = 2,
    audio_embed_dim: int = 768,
    audio_num_blocks: int = 12,
    audio_num_heads: int = 12,
    audio_mel_bins: int = 128,
    audio_frames: int = 204,
    audio_kernel: int = 16,
    audio_stride: int = 10,
    audio_logit_scale: bool = False,
    thermal_embed_dim: int = 768,
    thermal_num_blocks: int = 12,
    thermal_num_heads: int = 12,
    thermal_image_size: int = 224,
    thermal_kernel: int = 16,
) -> ImageBindEncoder:
    """Build ImageBind's vision, audio and/or thermal towers; the defaults are `imagebind_huge`.

    The vision stem is Conv3d with kernel = stride = (video_frames, patch, patch), so a clip is
    one temporal patch, as in ImageBind (2 frames). The thermal stem is Conv2d(1 channel) with
    kernel = stride = thermal_kernel on thermal_image_size squares (ImageBind: 16 on 224).
    Weights are random; load a checkpoint with `load_imagebind_state_dict`. Build under
    `torch.device("meta")` to get shapes for free.

    Args:
        towers: Which of `TOWERS` to build; default vision and audio.

    Raises:
        InvalidArgumentError: An unknown tower, a width not divisible by its heads, or an
            input size smaller than one patch.
    """
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise InvalidArgumentError(f"imagebind towers: expected a non-empty subset of {TOWERS}, got {towers}")
    parts: dict[str, _Tower] = {}
    if "vision" in towers:
        parts["vision"] = _vision_tower(
            vision_embed_dim,
            vision_num_blocks,
            vision_num_heads,
            out_embed_dim,
            image_size,
            patch,
            video_frames,
        )
    if "audio" in towers:
        parts["audio"] = _audio_tower(
            audio_embed_dim,
            audio_num_blocks,
            audio_num_heads,
            out_embed_dim,
            audio_mel_bins,
            audio_frames,
            audio_kernel,
            audio_stride,
        )
    if "thermal" in towers:
        parts["thermal"] = _thermal_tower(
            thermal_embed_dim,
            thermal_num_blocks,
            thermal_num_heads,
            out_embed_dim,
            thermal_image_size,
            thermal_kernel,
        )
    return ImageBindEncoder(
        preprocessors={t: p[0] for t, p in parts.items()},
        trunks={t: p[1] for t, p in parts.items()},
        heads={t: p[2] for t, p in parts.items()},
        postprocessors={t: p[3] for t, p in parts.items()},
        clip_shapes={t: p[4] for t, p in parts.items()},
        audio_logit_scale=audio_logit_scale,
    )


def imagebind_huge_shapes(towers: Sequence[str] = DEFAULT_TOWERS) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of `build_imagebind()` (ImageBind-Huge), built on the meta device."""
    with torch.device("meta"):
        model = build_imagebind(towers=towers)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tower_of_key(key: str) -> str | None:
    group, _, rest = key.partition(".")
    tower = rest.partition(".")[0]
    return tower if group in _GROUPS and tower in CHECKPOINT_TOWERS else None


def load_imagebind_state_dict(
    model: ImageBindEncoder,
    state_dict: Mapping[str, torch.Tensor],
    *,
    towers: Sequence[str] | None = None,
) -> None:
    """Load an ImageBind state dict (e.g. `imagebind_huge.pth`) into `model`, strictly per tower.

    Keys of ImageBind towers not in `towers` (text, depth, IMU, ...) are dropped; every
    key of the chosen towers must be present with the model's shape, and no other key may come.

    Args:
        model: The encoder to fill.
        state_dict: ImageBind's `ImageBindModel.state_dict()` or a part of it.
        towers: The towers to load; default all the model has. Others keep their weights.

    Raises:
        InvalidArgumentError: `towers` names a tower the model does not have.
        FailedPreconditionError: Missing, unexpected or mis-shaped keys; the message names
            each (up to 12) with the expected and the given shape. Nothing is loaded then.
    """
    chosen = tuple(model.towers if towers is None else towers)
    if not chosen or any(t not in model.towers for t in chosen):
        raise InvalidArgumentError(
            f"imagebind towers to load: expected a subset of {model.towers}, got {chosen}"
        )
    want = {k: v for k, v in model.state_dict().items() if _tower_of_key(k) in chosen}
    given = {k: v for k, v in state_dict.items() if _tower_of_key(k) in chosen}
    stray = sorted(k for k in state_dict if _tower_of_key(k) is None)
    dropped = len(state_dict) - len(given) - len(stray)
    problems = [f"missing {k} (expected {tuple(want[k].shape)})" for k in want if k not in given]
    problems += [f"unexpected {k} {tuple(given[k].shape)}" for k in given if k not in want]
    problems += [f"unexpected {k} (not an ImageBind tower key)" for k in stray]
    problems += [
        f"{k}: expected {tuple(want[k].shape)}, got {tuple(v.shape)}"
        for k, v in given.items()
        if k in want and v.shape != want[k].shape
    ]
    if problems:
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise FailedPreconditionError(
            f"imagebind checkpoint does not fit the {'+'.join(chosen)} towers "
            f"({len(problems)} problems): {'; '.join(problems[:_MAX_LISTED])}{more}"
        )
    model.load_state_dict(given, strict=set(chosen) == set(model.towers))
    logger.info(
        "loaded imagebind towers %s: %d tensors, %d other-tower keys dropped", chosen, len(given), dropped
    )


class ImageBindBackbone(Backbone):
    """An `ImageBindEncoder` as a frozen backbone: one joint-embedding row per item.

    `encode("image", (B, 3, S, S))`, `encode("video", (B, clips, 3, frames, S, S))`,
    `encode("audio", (B, clips, 1, mel, frames))` and `encode("thermal", (B, 1, T, T))` give
    (B, 1, out_dim): the normalised embedding, averaged over the clips (SEEDS_SPEC 2.A);
    thermal's is 10 times a unit vector (its postprocessor's logit scale, as PandaGPT).
    `image_size` is the vision tower's side (0 without it), `thermal_size` the thermal tower's
    (0 without it): the sizes the preprocessing must produce.
    """

    joint_embedding = True

    def __init__(self, model: ImageBindEncoder) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        vision = model.clip_shapes.get("vision")
        self.image_size = int(vision[-1]) if vision else 0
        self.clip_frames = int(vision[1]) if vision else 0
        self.audio_shape = model.clip_shapes.get("audio")
        thermal = model.clip_shapes.get("thermal")
        self.thermal_size = int(thermal[-1]) if thermal else 0
        head: Any = next(iter(model.modality_heads.values()))
        self.tokens = 1
        self.dim = int(head[2].out_features)
        self.eval()

    @property
    def towers(self) -> tuple[str, ...]:
        return self.model.towers

    def encode(self, modality: Modality, inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with torch.inference_mode():
            return self.model(modality, inputs.to(self.device))[:, None]

    def dummy_input(self, modality: str) -> torch.Tensor:
        if modality == "audio":
            return torch.zeros(1, 1, *(self.audio_shape or ()))  # (1, 1 clip, 1, mel, frames)
        if modality == "video":
            return torch.zeros(1, 1, 3, self.clip_frames, self.image_size, self.image_size)
        if modality == "thermal":
            return torch.zeros(1, 1, self.thermal_size, self.thermal_size)  # (1, 1, T, T)
        return torch.zeros(1, 3, self.image_size, self.image_size)
