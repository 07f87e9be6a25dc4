"""The multimodal LM: connectors composed with a Hugging Face causal LM, the one model that
serves and trains.

`MultimodalLM.embed_batch` turns a batch whose placeholders are already expanded into input
embeddings: text ids through the LM's embedding table, each media item (`MediaInBatch`: its row,
span, modality, features and instruction) through its modality's connector, the connector outputs
written at the items' spans in one `index_put`. Modalities that share a connector (PandaGPT's one
`llama_proj`) run through the same module; items that share a span (`media_combine: sum`) are
summed there. Serving calls it through `embed` (one prompt, its items checked first); training
through `services.models.lm.training.TrainingModel`, which subclasses this model and adds the
losses, with `keep_unused` so that a trainable connector no item uses still takes part (ZeRO).

An item's frames come from its features: rows / tokens per frame, which must divide exactly
and fit the modality's sampling (`FeatureLayout`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.common.content import MediaFeatures
from services.common.errors import InvalidArgumentError
from services.common.presets import ModalitySpec, Preset
from services.models.connectors.connector import Connector


@dataclass(frozen=True)
class FeatureLayout:
    """How one modality's features are laid out, and which connector reads them.

    Attributes:
        connector: The connector's name (its key in the bundle and in `connectors`).
        tokens_per_frame: Feature rows per frame (taps included).
        dim: Feature width.
        frames: The fixed frame count of every item, or None where it varies.
        max_frames: The most frames an item may have where it varies (None: no limit).
    """

    connector: str
    tokens_per_frame: int
    dim: int
    frames: int | None = 1
    max_frames: int | None = None

    @classmethod
    def from_spec(cls, modality: str, spec: ModalitySpec) -> FeatureLayout:
        """The layout the preset's encoder gives a modality's items."""
        enc, sampling = spec.encoder, spec.encoder.sampling
        frames: int | None = 1
        max_frames = None
        if enc.backbone != "imagebind" and sampling is not None:
            frames = sampling.frames_per_item(modality)
            max_frames = sampling.max_frames if frames is None else None
        return cls(spec.connector_name(modality), enc.tokens_per_frame(), enc.dim, frames, max_frames)

    @property
    def typical_frames(self) -> int:
        """The fixed frame count, else the maximum, else 1 (for reporting token counts)."""
        return self.frames or self.max_frames or 1

    def expected(self) -> str:
        """The expected features shape, in words."""
        t = self.tokens_per_frame
        if self.frames is not None:
            return f"({self.frames * t}, {self.dim}) = {self.frames} frame(s) x {t} rows"
        limit = f", frames <= {self.max_frames}" if self.max_frames else ""
        return f"(frames * {t}, {self.dim}){limit}"

    def frames_of(self, shape: Sequence[int]) -> int | None:
        """Frames of an item with features of `shape`, or None if the shape does not fit."""
        if len(shape) != 2 or shape[1] != self.dim or shape[0] <= 0 or shape[0] % self.tokens_per_frame:
            return None
        frames = shape[0] // self.tokens_per_frame
        if self.frames is not None and frames != self.frames:
            return None
        if self.max_frames is not None and frames > self.max_frames:
            return None
        return frames


def feature_layouts(preset: Preset) -> dict[str, FeatureLayout]:
    """Per modality of the preset, how its features are laid out and which connector reads them."""
    return {str(m): FeatureLayout.from_spec(m, s) for m, s in preset.modalities.items()}


@dataclass(frozen=True)
class MediaInBatch:
    """One media item of a batch.

    Attributes:
        row: Its row in the batch.
        start: Where its span starts.
        length: Positions its span holds.
        modality: Its modality.
        features: Encoder features (frames * tokens_per_frame, D_in).
        instruction: The text of the user turn holding it (for text-reading connectors).
    """

    row: int
    start: int
    length: int
    modality: str
    features: torch.Tensor  # (F*T, D_in)
    instruction: str = ""


class MultimodalLM(nn.Module):
    """Connectors + causal LM, composed.

    Args:
        lm: A Hugging Face causal LM (anything with get_input_embeddings() and a forward that
            takes inputs_embeds / input_ids and past_key_values).
        connectors: Per connector name, encoder features -> LLM embeddings.
        layouts: Per modality, its features' layout and its connector's name.
    """

    lm: Any  # a transformers PreTrainedModel; typed loosely as HF's own annotations are

    def __init__(
        self,
        lm: nn.Module,
        connectors: Mapping[str, Connector],
        layouts: Mapping[Any, FeatureLayout],
    ) -> None:
        super().__init__()
        missing = sorted({m for m, lay in layouts.items() if lay.connector not in connectors})
        if missing:
            raise ValueError(f"no connector for modalities {missing}")
        self.lm = lm
        self.connectors = nn.ModuleDict(dict(connectors))
        self.layouts = dict(layouts)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LM's embeddings."""
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the LM's embeddings."""
        return self.lm.get_input_embeddings().weight.device

    def connector(
        self, modality: str, connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None
    ) -> Connector:
        """The connector a modality's items go through (of `connectors`, default this model's)."""
        module = (self.connectors if connectors is None else connectors)[self.layouts[modality].connector]
        assert isinstance(module, Connector)
        return module

    def llm_tokens(self, modality: str, frames: int) -> int:
        """LLM tokens an item of `frames` frames becomes."""
        return self.connector(modality).num_tokens(frames)

    def frames(self, item: MediaFeatures[torch.Tensor]) -> int:
        """Frames of a checked item (see `check_media`)."""
        return int(item.features.shape[0]) // self.layouts[item.modality].tokens_per_frame

    def check_media(self, media: Sequence[MediaFeatures[torch.Tensor]]) -> None:
        """Validate each item's modality, shape, frames, times, dtype and values.

        Raises:
            InvalidArgumentError: e.g. "media[0]: video features: expected (40, 32) = 4 frame(s)
                x 10 rows, got (30, 32)".
        """
        for i, item in enumerate(media):
            where = f"media[{i}]"
            if item.modality not in self.layouts:
                raise InvalidArgumentError(
                    f"{where}.modality: expected one of {sorted(self.layouts)}, got {item.modality!r}",
                    param=f"{where}.modality",
                )
            layout = self.layouts[item.modality]
            got = tuple(item.features.shape)
            frames = layout.frames_of(got)
            if frames is None:
                raise InvalidArgumentError(
                    f"{where}: {item.modality} features: expected {layout.expected()}, got {got}",
                    param=f"{where}.features",
                )
            if item.times and len(item.times) != frames:
                raise InvalidArgumentError(
                    f"{where}: {item.modality} frame times: expected {frames} (one per frame), "
                    f"got {len(item.times)}",
                    param=f"{where}.frame_times",
                )
            if not all(t == t and abs(t) != float("inf") and t >= 0 for t in item.times):
                raise InvalidArgumentError(
                    f"{where}: {item.modality} frame times: expected finite seconds >= 0, got {list(item.times)}",
                    param=f"{where}.frame_times",
                )
            if not item.features.is_floating_point():
                raise InvalidArgumentError(
                    f"{where}: {item.modality} features: expected a floating-point dtype "
                    f"(FP32, FP16, BF16), got {item.features.dtype}",
                    param=f"{where}.features",
                )
            if not bool(torch.isfinite(item.features).all()):
                raise InvalidArgumentError(
                    f"{where}: {item.modality} features contain NaN or infinity",
                    param=f"{where}.features",
                )

    def embed(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        media_spans: Sequence[tuple[int, int]],
        features: Sequence[MediaFeatures[torch.Tensor]],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
        instructions: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Input embeddings of one prompt with each media item's features at its span (serving).

        The items are checked (`check_media`), then embedded as a batch of one row by
        `embed_batch`, the path training takes too.

        Args:
            input_ids: Prompt ids with placeholders expanded, (L,).
            media_spans: (start, length) per media item, in the order of `features`; items
                with the same span (media_combine sum) are summed into it.
            features: The media items.
            connectors: The connectors to project with (an adapter version's); default the
                ones this model was built with.
            instructions: Per item, the text a text-reading connector reads (the user's turn);
                None: empty text.

        Returns:
            Embeddings of shape (1, L, D).
        """
        if len(media_spans) != len(features):
            raise InvalidArgumentError(
                f"media: {len(features)} items but {len(media_spans)} spans in the prompt"
            )
        self.check_media(features)
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).view(1, -1)  # (1, L)
        texts = instructions if instructions is not None else [""] * len(features)
        media = [
            MediaInBatch(0, int(start), int(length), item.modality, item.features, text)
            for (start, length), item, text in zip(media_spans, features, texts, strict=True)
        ]
        return self.embed_batch(ids, media, connectors)[0]

    def embed_batch(
        self,
        input_ids: torch.Tensor,
        media: Sequence[MediaInBatch],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
        *,
        keep_unused: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input embeddings of a batch with each media item's connector output at its span.

        Text ids go through the LM's embedding table, each item through its modality's
        connector (`_project`), and the outputs are written at the items' spans (`scatter`).

        Args:
            input_ids: (B, L), placeholders expanded.
            media: The batch's items, each with its row and span.
            connectors: The connectors to project with; default this model's.
            keep_unused: Training under ZeRO: every trainable connector that no item uses runs
                once on zeros and its output, times zero, is added to the embeddings, so that
                every rank produces every gradient in the same order.

        Returns:
            The embeddings (B, L, D), and per item its connector output (T_i, D).
        """
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, D)
        if not media and not keep_unused:
            return embeds, []
        projected, unused = self._project(
            [m.modality for m in media],
            [m.features for m in media],
            [m.instruction for m in media],
            connectors,
            dtype=embeds.dtype,
            device=embeds.device,
            keep_unused=keep_unused,
        )
        if keep_unused:
            # Added to the embeddings, not the loss, so that its gradient arrives in the same
            # backward order as a real item's: ZeRO-3 reduces gradients in the order they
            # become ready, and ranks must agree on it.
            embeds = embeds + unused
        return self.scatter(embeds, media, projected), projected

    @staticmethod
    def scatter(
        embeds: torch.Tensor, media: Sequence[MediaInBatch], projected: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """`embeds` (B, L, D) with each item's output written at its row's span, in one
        `index_put`; the outputs of items that share a span (media_combine sum) are summed there.

        Raises:
            InvalidArgumentError: An output's length is not its span's, or a span lies outside
                the rows.
        """
        if not media:
            return embeds
        length = embeds.shape[1]
        summed: dict[tuple[int, int, int], torch.Tensor] = {}
        for i, (item, out) in enumerate(zip(media, projected, strict=True)):
            if out.shape[0] != item.length:
                raise InvalidArgumentError(
                    f"media[{i}]: span of {item.length} tokens, connector gave {out.shape[0]}"
                )
            if item.start < 0 or item.start + item.length > length:
                raise InvalidArgumentError(f"media: a span lies outside the prompt of {length} tokens")
            key = (item.row, item.start, item.length)
            summed[key] = summed[key] + out if key in summed else out
        device = embeds.device
        rows = torch.tensor([r for r, _, _ in summed], device=device)  # (N,)
        starts = torch.tensor([s for _, s, _ in summed], device=device)  # (N,)
        lengths = torch.tensor([n for _, _, n in summed], device=device)  # (N,)
        offsets = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )  # (sum T_i,) position within its item
        positions = torch.repeat_interleave(starts, lengths) + offsets  # (sum T_i,)
        values = torch.cat(list(summed.values())).to(embeds.dtype)  # (sum T_i, D)
        return embeds.index_put((torch.repeat_interleave(rows, lengths), positions), values)  # (B, L, D)

    def project(
        self,
        features: Sequence[MediaFeatures[torch.Tensor]],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
        instructions: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Run every item through its connector; item order kept (see `_project`).

        Returns:
            Per item, (num_tokens(frames), D).
        """
        texts = instructions if instructions is not None else [""] * len(features)
        projected, _ = self._project(
            [f.modality for f in features],
            [f.features for f in features],
            texts,
            connectors,
            dtype=self.dtype,
            device=self.device,
        )
        return projected

    def _project(
        self,
        modalities: Sequence[str],
        features: Sequence[torch.Tensor],
        instructions: Sequence[str],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None,
        *,
        dtype: torch.dtype,
        device: torch.device,
        keep_unused: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per item its connector output (T_out, D), and the unused connectors' zero term.

        Connectors run in their order in `connectors` (every rank of a training run calls them
        in the same order, as ZeRO-3's parameter gathering needs); modalities that share a
        connector (PandaGPT's `llama_proj`) run through it together. Items of one connector
        with the same frame count run as one batch; items whose connector reads text run one
        at a time with their instruction. With `keep_unused`, a trainable connector that no
        item uses runs once on zeros (`_dummy`) and the sum of its output, times zero, is
        the second result (else a zero scalar).
        """
        modules = self.connectors if connectors is None else connectors
        out: list[torch.Tensor | None] = [None] * len(features)
        unused = torch.zeros((), dtype=dtype, device=device)
        for name, module in modules.items():
            assert isinstance(module, Connector)
            mine = [i for i, m in enumerate(modalities) if self.layouts[m].connector == name]
            if not mine:
                if keep_unused and any(p.requires_grad for p in module.parameters()):
                    unused = unused + 0.0 * self._dummy(name, module, dtype, device).sum()
                continue
            groups: dict[tuple[int, int], list[int]] = {}
            for i in mine:
                frames = features[i].shape[0] // module.tokens_per_frame
                groups.setdefault((frames, i if module.reads_text else -1), []).append(i)
            for (frames, single), idx in groups.items():
                x = torch.stack([features[i] for i in idx]).to(device=device, dtype=dtype)  # (N, F*T, D_in)
                x = x.view(len(idx), frames, module.tokens_per_frame, -1)  # (N, F, T, D_in)
                instruction = module.encode_instructions([instructions[single]]) if single >= 0 else None
                projected = module(x, instruction)  # (N, T_out, D)
                for j, i in enumerate(idx):
                    out[i] = projected[j]  # (T_out, D)
        missing = sorted({modalities[i] for i, t in enumerate(out) if t is None})
        if missing:
            raise ValueError(f"no connector for modalities {missing} among {sorted(modules)}")
        return [t for t in out if t is not None], unused

    def _dummy(
        self, name: str, connector: Connector, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A connector's output on one all-zero item of its layout (1, T_out, D)."""
        layout = next(lay for lay in self.layouts.values() if lay.connector == name)
        x = torch.zeros(
            (1, layout.frames or 1, layout.tokens_per_frame, layout.dim), dtype=dtype, device=device
        )
        instruction = connector.encode_instructions([""]) if connector.reads_text else None
        return connector(x, instruction)  # (1, T_out, D)
