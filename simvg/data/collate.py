"""The data -> engine contract: one ``Batch`` dataclass and the collate function that builds it.

A dataset sample is ``(image [3,H,W] float, text_ids [L] long, text_pad_mask [L] bool, target dict)``.
The target dict follows DETR's convention (docs/design.md S7.2):

- ``boxes``         [n, 4] float, cxcywh normalised to the network input (H, W); n == 1 for REC, n >= 0 for GREC
- ``labels``        [n] long, all 0 (the single "object" class; index 1 of the logits is "no object")
- ``size``          [2] long, network input (h, w)
- ``orig_size``     [2] long, original image (h, w)
- ``input_to_orig`` [4] float (sx, sy, dx, dy): ``x_orig = (x_input_px - dx) / sx`` (same for y); this maps
                    predictions back to original-image pixels for every resize / letterbox transform
                    (``simvg.data.transforms.boxes_to_original``)
- ``orig_boxes``    [n, 4] float, ground truth xyxy in original-image pixels (for dumps and demos)
- ``image_id``      int, ``sample_id`` str (unique per expression), ``expression`` str
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch. ``text_pad_mask`` is True at padding positions."""

    images: Tensor  # [B, 3, H, W]
    text_ids: Tensor  # [B, L] long
    text_pad_mask: Tensor  # [B, L] bool
    targets: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor (including those inside the targets) to ``device``."""
        targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in self.targets]
        return Batch(self.images.to(device), self.text_ids.to(device), self.text_pad_mask.to(device), targets)


def collate(samples: list[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]) -> Batch:
    """Stack samples of equal image size and text length into a ``Batch``."""
    images, ids, masks, targets = zip(*samples)
    return Batch(torch.stack(images), torch.stack(ids), torch.stack(masks), list(targets))
