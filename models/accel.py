"""Device-side speed-ups applied when a model is loaded for inference: channels-last for the
ResNet tower on CUDA, and optional ``torch.compile`` (``VTFUSION_COMPILE=1``) that falls back
to eager mode, once and for good, if compiling or running the compiled graph fails.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)
COMPILE_ENV = "VTFUSION_COMPILE"


class CompiledOrEager(nn.Module):
    """``module`` behind ``torch.compile``; the first failure logs a warning and every later
    call runs the eager module. For inference only (state-dict keys gain an ``eager.`` prefix)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.eager = module
        object.__setattr__(self, "_compiled", torch.compile(module, dynamic=True))  # not a child module
        self._failed = False

    def forward(self, *args, **kwargs):
        if not self._failed:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: keep serving, eagerly
                self._failed = True
                log.warning("torch.compile failed (%s: %s); running %s eagerly", type(e).__name__, e, type(self.eager).__name__)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.eager, name)


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply the speed-ups in place (where they exist for this model) and return it."""
    vision = getattr(model, "vision", None)
    if device.type == "cuda" and vision is not None and getattr(getattr(model, "cfg", None), "vision", None) is not None:
        if model.cfg.vision.kind == "resnet":
            vision.to(memory_format=torch.channels_last)
    if os.environ.get(COMPILE_ENV, "") == "1" and hasattr(model, "vision") and not isinstance(model.vision, CompiledOrEager):
        model.vision = CompiledOrEager(model.vision)
    return model
