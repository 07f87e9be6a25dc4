"""The multimodal LM: connectors composed with a Hugging Face causal LM.

`MultimodalLM.embed` turns a prompt whose placeholders are already expanded into input
embeddings: text ids through the LM's embedding table, each media item through its modality's
connector, the connector outputs written at the items' spans in one `index_put`. Modalities
that share a connector (PandaGPT's one `llama_proj`) run through the same module; items that
share a span (`media_combine: sum`) are summed there.

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
from services.common.presets import ModalitySpec
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
        """Input embeddings of a prompt with each media item's features at its span.

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
        embeds = self.lm.get_input_embeddings()(ids)  # (1, L, D)
        if not features:
            return embeds
        projected = self.project(features, connectors, instructions)  # list of (T_i, D)
        summed: dict[tuple[int, int], torch.Tensor] = {}
        for i, (span, out) in enumerate(zip(media_spans, projected, strict=True)):
            if out.shape[0] != span[1]:
                raise InvalidArgumentError(
                    f"media[{i}]: span of {span[1]} tokens, connector gave {out.shape[0]}"
                )
            summed[span] = summed[span] + out if span in summed else out
        spans = list(summed)
        starts = torch.tensor([s for s, _ in spans], device=self.device)  # (N,)
        lengths = torch.tensor([n for _, n in spans], device=self.device)  # (N,)
        offsets = torch.arange(int(lengths.sum()), device=self.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )  # (sum T_i,) position within its item
        positions = torch.repeat_interleave(starts, lengths) + offsets  # (sum T_i,)
        if int(positions.max()) >= ids.shape[1] or int(positions.min()) < 0:
            raise InvalidArgumentError(f"media: a span lies outside the prompt of {ids.shape[1]} tokens")
        values = torch.cat(list(summed.values())).to(embeds.dtype)  # (sum T_i, D)
        return embeds.index_put((torch.zeros_like(positions), positions), values)  # (1, L, D)

    def project(
        self,
        features: Sequence[MediaFeatures[torch.Tensor]],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
        instructions: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Run every item through its connector; item order kept.

        Items of one modality with the same frame count run as one batch; items whose
        connector reads text run one at a time with their instruction.

        Returns:
            Per item, (num_tokens(frames), D).
        """
        out: list[torch.Tensor | None] = [None] * len(features)
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, item in enumerate(features):
            reads_text = self.connector(item.modality, connectors).reads_text
            groups.setdefault((item.modality, self.frames(item), i if reads_text else -1), []).append(i)
        for (modality, frames, single), idx in groups.items():
            connector = self.connector(modality, connectors)
            batch = torch.stack([features[i].features for i in idx]).to(device=self.device, dtype=self.dtype)
            batch = batch.view(len(idx), frames, -1, batch.shape[-1])  # (B, F, T, D_in)
            instruction = None
            if single >= 0:
                text = instructions[single] if instructions is not None else ""
                instruction = connector.encode_instructions([text])
            projected = connector(batch, instruction)  # (B, T_out, D)
            for j, i in enumerate(idx):
                out[i] = projected[j]  # (T_out, D)
        return [t for t in out if t is not None]
