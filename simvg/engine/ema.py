"""Exponential moving average of the weights, as in the official code (``simvg/models/utils.py``).

Per optimisation step ``t`` (0-based) the decay is ``min(decay, (t + 1) / (t + 10))``: the warm-up lets the average
follow the fast early changes instead of being anchored to the initial weights. Floating-point parameters and
buffers are averaged; integer buffers are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of a model whose weights track an EMA of the training weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (self.updates + 1) / (self.updates + 10))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s weights in (``model`` must be the unwrapped module with the same keys)."""
        d = self.current_decay()
        source = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = source[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(d).add_(value.to(ema_value.dtype), alpha=1.0 - d)
            else:
                ema_value.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
