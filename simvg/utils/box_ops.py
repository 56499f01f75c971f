"""Box utilities: format conversion, IoU and generalised IoU (Rezatofighi et al., CVPR 2019).

Every box helper in the project lives here. Conventions: ``cxcywh`` boxes are normalised to [0, 1] unless a name
says ``_abs``; ``xyxy`` boxes are (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; ``xywh`` is COCO's (x, y, w, h).
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] COCO (x, y, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N]; degenerate (inverted) boxes have area 0."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection and union areas, [N, M] each."""
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    # Clamping at 0 is what makes disjoint boxes overlap 0 (the official LSJ forgot it, docs/design.md B4).
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M]. Two empty boxes have IoU 0, not NaN."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M], in [-1, 1]."""
    inter, union = _inter_union(boxes1, boxes2)
    eps = torch.finfo(union.dtype).tiny
    iou = inter / union.clamp(min=eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=eps)


def _aligned_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of aligned pairs, [N] each."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter, box_area(boxes1) + box_area(boxes2) - inter


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of aligned pairs: [N, 4] x [N, 4] xyxy -> [N] (mmdet's ``is_aligned=True``)."""
    inter, union = _aligned_inter_union(boxes1, boxes2)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of aligned pairs: [N, 4] x [N, 4] xyxy -> [N], in [-1, 1]."""
    inter, union = _aligned_inter_union(boxes1, boxes2)
    eps = torch.finfo(union.dtype).tiny
    wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = wh[:, 0] * wh[:, 1]
    return inter / union.clamp(min=eps) - (hull - union) / hull.clamp(min=eps)


def clip_boxes_xyxy(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clamp [..., 4] xyxy pixel boxes into the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1)
