"""Optimiser and learning-rate schedule of the official recipe (docs/design.md O4.1).

Adam(amsgrad, betas 0.9/0.98, eps 1e-9, no weight decay) with two parameter groups: the BEiT-3 encoder at
``lr * encoder_lr_scale`` (0.1) and everything else at ``lr``. ``MultiStepLRWarmUp`` multiplies the base rates by
``(i + 1) / (warmup + 1)`` while ``i < warmup`` and by ``gamma ** k`` afterwards, k = number of milestones ``m`` with
``i + 1 >= m``. The official code steps it once per epoch (``i`` = 0-based epoch); for short runs the same factor
can be stepped per optimisation step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def lr_factor(i: int, warmup: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at 0-based epoch (or step) ``i``."""
    if i < warmup:
        return (i + 1) / (warmup + 1)
    return gamma ** sum(i + 1 >= m for m in milestones)


class MultiStepLRWarmUp(LRScheduler):
    """Linear warm-up then step decay; see ``lr_factor``. Its state dict holds only plain types."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup: int,
        milestones: Sequence[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.warmup = int(warmup)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = lr_factor(self.last_epoch, self.warmup, self.milestones, self.gamma)
        return [base * factor for base in self.base_lrs]


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float, encoder_prefix: str) -> list[dict]:
    """Split trainable parameters into the encoder group (names starting with ``encoder_prefix``) and the rest.

    Empty groups are dropped (a model without an encoder gets a single group).
    """
    encoder, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (encoder if name.startswith(encoder_prefix) else rest).append(param)
    groups = [
        {"name": "encoder", "params": encoder, "lr": lr * encoder_lr_scale},
        {"name": "head", "params": rest, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    encoder_lr_scale: float = 0.1,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-9,
    weight_decay: float = 0.0,
    amsgrad: bool = True,
    encoder_prefix: str = "encoder.",
) -> torch.optim.Adam:
    """The official Adam; ``model`` must be the unwrapped module so that parameter names carry no prefix."""
    groups = param_groups(model, lr, encoder_lr_scale, encoder_prefix)
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
