"""DETR's set criterion as SimVG uses it (docs/design.md O3.1): weighted CE + L1 + GIoU over matched pairs.

For one branch output with final-layer predictions and optional ``aux_outputs`` the criterion returns the
*weighted* terms ``loss_class``, ``loss_bbox``, ``loss_giou`` and, per auxiliary layer i, the same keys with the
suffix ``_i``; the branch loss is their sum.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from simvg.losses.matcher import HungarianMatcher
from simvg.utils.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

NO_OBJECT = 1  # logits index of the "no object" class


class FlatTargets(NamedTuple):
    """The batch's targets concatenated once and shared by every supervised layer."""

    labels: Tensor  # [T] long
    boxes: Tensor  # [T, 4] cxcywh
    offsets: Tensor  # [B] index of each image's first target in ``labels`` / ``boxes``
    num_boxes: float  # normaliser of the box terms (see ``num_target_boxes``)


def num_target_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes in the batch, averaged over processes when distributed, clamped at 1 (DETR)."""
    num = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


class SetCriterion(nn.Module):
    """Match, then score classes over all queries and boxes over the matched pairs.

    ``loss_class`` = cross entropy over all B*Q queries with class weights ``[1, eos_coef]`` and torch's weighted
    mean (sum of w*nll / sum of w); ``loss_bbox`` = L1 on cxcywh summed over coordinates / num_boxes;
    ``loss_giou`` = sum of (1 - GIoU) / num_boxes. Each term is multiplied by its weight.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_class": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.register_buffer("class_weight", torch.tensor([1.0, eos_coef]), persistent=False)

    def loss_class(self, logits: Tensor, matched_labels: Tensor, image: Tensor, query: Tensor) -> Tensor:
        """Weighted CE: logits [B, Q, 2]; queries (image[k], query[k]) get ``matched_labels[k]``, others "no object"."""
        labels = torch.full(logits.shape[:2], NO_OBJECT, dtype=torch.int64, device=logits.device)
        labels[image, query] = matched_labels
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), weight=self.class_weight)

    @staticmethod
    def loss_boxes(src: Tensor, tgt: Tensor, num_boxes: float) -> tuple[Tensor, Tensor]:
        """Matched boxes src, tgt [M, 4] cxcywh -> (summed L1, summed 1 - GIoU), each divided by ``num_boxes``."""
        l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return l1, (1 - giou).sum() / num_boxes

    def single(self, out: dict[str, Any], targets: list[dict[str, Tensor]], flat: FlatTargets) -> dict[str, Tensor]:
        """Weighted terms of one layer's predictions (``pred_logits`` [B, Q, 2], ``pred_boxes`` [B, Q, 4])."""
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        labels, tgt_boxes, offsets, num_boxes = flat
        pairs = self.matcher(out, targets)
        image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(pairs)]).to(boxes.device)
        query = torch.cat([q for q, _ in pairs]).to(boxes.device)
        target = torch.cat([t for _, t in pairs]).to(boxes.device) + offsets[image]  # index into the batch's targets
        l1, giou = self.loss_boxes(boxes[image, query].float(), tgt_boxes[target], num_boxes)
        terms = {
            "loss_class": self.loss_class(logits, labels[target], image, query),
            "loss_bbox": l1,
            "loss_giou": giou,
        }
        return {k: v * self.weights[k] for k, v in terms.items()}

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted terms of the final layer and of each ``aux_outputs`` layer (keys suffixed ``_0``, ``_1``...).

        Args:
            outputs: one branch's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs``).
            targets: B dicts with ``labels`` [n_i] (0 = object) and ``boxes`` [n_i, 4] cxcywh normalised.
        """
        device = outputs["pred_boxes"].device
        sizes = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=device)
        flat = FlatTargets(
            torch.cat([t["labels"] for t in targets]).long().to(device),
            torch.cat([t["boxes"] for t in targets]).float().to(device),
            sizes.cumsum(0),
            num_target_boxes(targets, device),
        )
        losses = self.single(outputs, targets, flat)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single(aux, targets, flat).items()})
        return losses
