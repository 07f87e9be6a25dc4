"""The multimodal LM: connectors per modality composed with a Hugging Face causal LM.

`MultimodalLM.embed` turns a prompt whose placeholders are already expanded into input
embeddings: text ids through the LM's embedding table, each media item through its modality's
connector, the connector outputs written at the items' spans in one `index_put`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.llm.connectors import Connector
from services.llm.domain import MediaItem


class MultimodalLM(nn.Module):
    """Connectors + causal LM, composed.

    Args:
        lm: A Hugging Face causal LM (anything with get_input_embeddings() and a forward that
            takes inputs_embeds / input_ids and past_key_values).
        connectors: Per modality, encoder features -> LLM embeddings.
        feature_shapes: Per modality, the (tokens, dim) each item's features must have.
    """

    lm: Any  # a transformers PreTrainedModel; typed loosely as HF's own annotations are

    def __init__(
        self,
        lm: nn.Module,
        connectors: Mapping[str, Connector],
        feature_shapes: Mapping[str, tuple[int, int]],
    ) -> None:
        super().__init__()
        missing = sorted(set(feature_shapes) - set(connectors))
        if missing:
            raise ValueError(f"no connector for modalities {missing}")
        self.lm = lm
        self.connectors = nn.ModuleDict(dict(connectors))
        self.feature_shapes = dict(feature_shapes)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LM's embeddings."""
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the LM's embeddings."""
        return self.lm.get_input_embeddings().weight.device

    def llm_tokens(self, modality: str, encoder_tokens: int) -> int:
        """LLM tokens an item of `encoder_tokens` encoder tokens becomes."""
        connector = self.connectors[modality]
        assert isinstance(connector, Connector)
        return connector.num_tokens(encoder_tokens)

    def check_media(self, media: Sequence[MediaItem]) -> None:
        """Validate each item's modality, shape, dtype and values against the preset.

        Raises:
            InvalidArgumentError: e.g. "media[0]: image features: expected (16, 64), got (15, 64)".
        """
        for i, item in enumerate(media):
            where = f"media[{i}]"
            if item.modality not in self.feature_shapes:
                raise InvalidArgumentError(
                    f"{where}.modality: expected one of {sorted(self.feature_shapes)}, got {item.modality!r}",
                    param=f"{where}.modality",
                )
            expected = self.feature_shapes[item.modality]
            got = tuple(item.features.shape)
            if got != expected:
                raise InvalidArgumentError(
                    f"{where}: {item.modality} features: expected {expected}, got {got}",
                    param=f"{where}.features",
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
        features: Sequence[MediaItem],
        connectors: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
    ) -> torch.Tensor:
        """Input embeddings of a prompt with each media item's features at its span.

        Args:
            input_ids: Prompt ids with placeholders expanded, (L,).
            media_spans: (start, length) per media item, in the order of `features`.
            features: The media items.
            connectors: The connectors to project with (an adapter version's); default the
                ones this model was built with.

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
        projected = self._project(features, connectors)  # list of (T_i, D)
        for i, ((_, length), out) in enumerate(zip(media_spans, projected, strict=True)):
            if out.shape[0] != length:
                raise InvalidArgumentError(
                    f"media[{i}]: span of {length} tokens, connector gave {out.shape[0]}"
                )
        starts = torch.tensor([s for s, _ in media_spans], device=self.device)  # (N,)
        lengths = torch.tensor([n for _, n in media_spans], device=self.device)  # (N,)
        offsets = torch.arange(int(lengths.sum()), device=self.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )  # (sum T_i,) position within its item
        positions = torch.repeat_interleave(starts, lengths) + offsets  # (sum T_i,)
        if int(positions.max()) >= ids.shape[1] or int(positions.min()) < 0:
            raise InvalidArgumentError(f"media: a span lies outside the prompt of {ids.shape[1]} tokens")
        values = torch.cat(projected).to(embeds.dtype)  # (sum T_i, D)
        return embeds.index_put((torch.zeros_like(positions), positions), values)  # (1, L, D)

    def _project(
        self, features: Sequence[MediaItem], connectors: nn.ModuleDict | Mapping[str, nn.Module] | None
    ) -> list[torch.Tensor]:
        """Run every item through its connector, one batch per modality; item order kept."""
        connectors = self.connectors if connectors is None else connectors
        out: list[torch.Tensor | None] = [None] * len(features)
        for modality in dict.fromkeys(item.modality for item in features):
            idx = [i for i, item in enumerate(features) if item.modality == modality]
            batch = torch.stack([features[i].features for i in idx]).to(
                device=self.device, dtype=self.dtype
            )  # (B, T_in, D_in)
            projected = connectors[modality](batch)  # (B, T_out, D)
            for j, i in enumerate(idx):
                out[i] = projected[j]  # (T_out, D)
        return [t for t in out if t is not None]
