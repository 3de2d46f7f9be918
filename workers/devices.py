"""Device choice, written once for the workers: "auto" is CUDA when a GPU is visible, else the CPU.

torch is imported inside the functions, so importing this module (and the modules that use it,
such as workers.lasso, which the orchestrator imports for its config) does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch.device for a config's device setting: "auto" -> "cuda" if available, else "cpu";
    any other name ("cpu", "cuda", "cuda:1", ...) as torch spells it."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_cuda(device: str | torch.device) -> bool:
    """Whether `device` ("cuda", "cuda:1", a torch.device, ...) is a CUDA device."""
    import torch
    return torch.device(device).type == "cuda"
