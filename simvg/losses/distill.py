"""SimVG's total loss with Dynamic Weight-Balance Distillation (DWBD, docs/design.md O3.2).

The teacher is the model's own decoder branch (final layer, detached). ``teacher_targets`` turns its matched
predictions into hard pseudo targets and the scalar ``w`` = mean over all matched pairs of (object probability x
IoU with the ground truth). The total is

    L = decoder * L(decoder, GT) + token * (1 - w) * L(token, GT) + distill * w * L(token, pseudo)

where each ``L`` is the DETR set loss summed over supervised layers. ``w`` is 0 when nothing is matched (a GREC
batch without targets; the official code gives NaN there, docs/design.md B6). It is a per-process batch mean, as in the
official code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from simvg.config import LossConfig
from simvg.losses.criterion import SetCriterion
from simvg.losses.matcher import HungarianMatcher
from simvg.utils.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou

DISTILL_MODES = ("dynamic", "fixed", "none")
LOSS_KEYS = ("loss_dgt", "loss_tgt", "loss_kd", "distill_w", "loss")


def teacher_targets(
    decoder_out: dict[str, Any], targets: list[dict[str, Tensor]], matcher: HungarianMatcher
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Pseudo targets from the decoder's final layer and the DWBD weight.

    Args:
        decoder_out: ``pred_logits`` [B, Q, 2] and ``pred_boxes`` [B, Q, 4] of the final decoder layer.
        targets: ground truth, B dicts with ``labels`` [n_i] and ``boxes`` [n_i, 4].
        matcher: the matcher pairing decoder queries with ground truth.

    Returns:
        B dicts ``{"labels": zeros [m_i], "boxes": matched decoder boxes [m_i, 4] (detached), "weight": p*IoU [m_i]}``
        and ``w`` (0-d tensor in [0, 1]): the mean of p*IoU over all matched pairs of the batch, 0 if there are none.
    """
    with torch.no_grad():  # a block, not a decorator: make mutate skips decorated functions (docs/mutation.md)
        logits, boxes = decoder_out["pred_logits"].detach(), decoder_out["pred_boxes"].detach()
        pairs = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        prob = logits.float().softmax(-1)[..., 0]  # [B, Q] object probability
        pseudo, weights = [], []
        for i, (q, t) in enumerate(pairs):
            q, t = q.to(boxes.device), t.to(boxes.device)
            pred, gt = boxes[i, q].float(), targets[i]["boxes"][t].to(boxes.device).float()
            weight = prob[i, q] * elementwise_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))
            pseudo.append({"labels": torch.zeros_like(q), "boxes": pred, "weight": weight})
            weights.append(weight)
        all_w = torch.cat(weights) if weights else boxes.new_zeros(0)
        w = all_w.mean() if all_w.numel() else boxes.new_zeros((), dtype=torch.float32)
        return pseudo, w


def uses_distill(cfg: LossConfig) -> bool:
    """Whether ``cfg`` has a distillation term (the token branch learning from the decoder's boxes)."""
    return cfg.distill_mode != "none" and cfg.distill > 0


def required_branch(cfg: LossConfig) -> str:
    """The ``branch`` argument the model must be called with under ``cfg``: "both", "decoder" or "token"."""
    needs_decoder = cfg.decoder > 0 or uses_distill(cfg)  # the pseudo boxes come from the decoder
    needs_token = cfg.token > 0 or uses_distill(cfg)
    if needs_decoder and needs_token:
        return "both"
    return "token" if needs_token else "decoder"


class SimVGLoss(nn.Module):
    """``loss_fn(outputs, targets) -> {"loss_dgt", "loss_tgt", "loss_kd", "distill_w", "loss"}``.

    ``outputs`` is the model's dict; a branch may be absent when no term needs it (``required_branch`` says which
    branches must be run). Every key is always present; a switched-off term is a zero tensor. ``loss`` is the sum
    of the three ``loss_*`` terms; ``distill_w`` is detached, for logging.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        if cfg.distill_mode not in DISTILL_MODES:
            raise ValueError(f"LossConfig.distill_mode must be one of {DISTILL_MODES}, got {cfg.distill_mode!r}")
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)
        self.criterion = SetCriterion(self.matcher, cfg.eos_coef, cfg.weight_class, cfg.weight_bbox, cfg.weight_giou)

    @property
    def uses_distill(self) -> bool:
        return uses_distill(self.cfg)

    @property
    def required_branch(self) -> str:
        """The ``branch`` argument the model must be called with: "both", "decoder" or "token"."""
        return required_branch(self.cfg)

    def branch_loss(self, out: dict[str, Any], targets: list[dict[str, Tensor]]) -> Tensor:
        """Sum of the weighted set-loss terms over all supervised layers of one branch (0-d)."""
        return sum(self.criterion(out, targets).values())

    def distill_weight(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> tuple[list | None, Tensor]:
        """(pseudo targets or None, w) according to ``distill_mode``."""
        device = next(iter(outputs.values()))["pred_boxes"].device
        if not self.uses_distill:
            return None, torch.zeros((), device=device)
        if "decoder" not in outputs:
            raise ValueError("distillation needs the decoder branch; call the model with branch='both'")
        pseudo, w = teacher_targets(outputs["decoder"], targets, self.matcher)
        if self.cfg.distill_mode == "fixed":
            w = torch.full((), self.cfg.fixed_weight, device=device)
        return pseudo, w

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: ``{"decoder": {...}, "token": {...}}`` (either may be absent); targets: B target dicts."""
        for name, needed in (("decoder", self.cfg.decoder > 0), ("token", self.cfg.token > 0 or self.uses_distill)):
            if needed and name not in outputs:
                raise ValueError(
                    f"the loss needs the {name} branch; call the model with branch={self.required_branch!r}"
                )
        pseudo, w = self.distill_weight(outputs, targets)
        zero = w.new_zeros(())
        terms = {"loss_dgt": zero, "loss_tgt": zero, "loss_kd": zero}
        if self.cfg.decoder > 0:
            terms["loss_dgt"] = self.cfg.decoder * self.branch_loss(outputs["decoder"], targets)
        if self.cfg.token > 0:
            terms["loss_tgt"] = self.cfg.token * (1 - w) * self.branch_loss(outputs["token"], targets)
        if pseudo is not None:
            terms["loss_kd"] = self.cfg.distill * w * self.branch_loss(outputs["token"], pseudo)
        return {**terms, "distill_w": w.detach(), "loss": terms["loss_dgt"] + terms["loss_tgt"] + terms["loss_kd"]}
