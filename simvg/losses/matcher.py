"""Hungarian matching between predicted queries and target boxes (DETR, Carion et al., ECCV 2020).

The cost is detrex's ``HungarianMatcher`` with ``cost_class_type="ce_cost"`` as SimVG configures it
(docs/design.md O3.1): ``C = cost_bbox * L1(cxcywh) - cost_class * p(target class) - cost_giou * GIoU(xyxy)``, solved
per image with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from simvg.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets; no gradients, no parameters."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    # No-grad blocks rather than @torch.no_grad() decorators: the same behaviour, and mutation testing (make mutate,
    # docs/mutation.md) does not skip decorated functions' bodies.
    def cost_matrix(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> Tensor:
        """Costs of every query of the batch against every target of the batch: [B*Q, sum(n_i)]."""
        with torch.no_grad():
            prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)  # [B*Q, 2]
            boxes = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
            tgt_labels = torch.cat([t["labels"] for t in targets]).long()
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
            cost_class = -prob[:, tgt_labels]
            cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
            return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        Args:
            outputs: ``pred_logits`` [B, Q, 2] and ``pred_boxes`` [B, Q, 4] (cxcywh, normalised).
            targets: B dicts with ``labels`` [n_i] and ``boxes`` [n_i, 4] (cxcywh, normalised); n_i may be 0.

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length ``min(Q, n_i)``, sorted by query.
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(batch)]
        with torch.no_grad():
            cost = self.cost_matrix(outputs, targets).view(batch, num_queries, -1).cpu()
        pairs = []
        for i, c in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            pairs.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return pairs
