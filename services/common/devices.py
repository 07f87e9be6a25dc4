"""Where the model services run: the first CUDA device when there is one, else the CPU.

torch is imported on call, so importing this module costs the gateway nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
