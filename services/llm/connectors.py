"""Connectors: trainable maps from encoder tokens into the LLM's embedding space.

A connector is chosen by the preset's `connector.type` and built from flat dimensions. Every
connector reports how many LLM tokens an item of N encoder tokens becomes, which is what the
prompt builder expands each placeholder to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from services.common.errors import InvalidArgumentError


class Connector(nn.Module):
    """Base: (B, T_in, D_in) -> (B, T_out, D_out)."""

    in_dim: int
    out_dim: int

    def num_tokens(self, in_tokens: int) -> int:
        """LLM tokens produced for an item of `in_tokens` encoder tokens."""
        return in_tokens

    def check_input(self, features: torch.Tensor) -> None:
        if features.ndim != 3 or features.shape[-1] != self.in_dim:
            raise InvalidArgumentError(
                f"connector input: expected (batch, tokens, {self.in_dim}), got {tuple(features.shape)}"
            )


class LinearConnector(Connector):
    """One Linear layer (PandaGPT, NExT-GPT legacy)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_input(features)
        return self.proj(features)  # (B, T, D_out)


class MLP2xGeluConnector(Connector):
    """Linear -> GELU -> Linear (LLaVA-1.5's `mlp2x_gelu`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_input(features)
        return self.fc2(self.act(self.fc1(features)))  # (B, T, D_out)


CONNECTORS: dict[str, Callable[..., Connector]] = {
    "linear": LinearConnector,
    "mlp2x_gelu": MLP2xGeluConnector,
}


def build_connector(type: str, *, in_dim: int, out_dim: int) -> Connector:
    """Build the connector named `type` (a key of CONNECTORS)."""
    try:
        builder = CONNECTORS[type]
    except KeyError:
        raise InvalidArgumentError(
            f"connector type: expected one of {sorted(CONNECTORS)}, got {type!r}"
        ) from None
    return builder(in_dim=in_dim, out_dim=out_dim)
