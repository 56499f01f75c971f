"""Where the model looked: per-branch attention over the image patches, placed on the original image.

``SimVG.capture_attention`` gives, per sample, a distribution over the N = h * w patches of the network input for
each branch (the object token's attention in the encoder's last layer; the decoder query's cross-attention in the
decoder's last layer). ``place_on_original`` puts such a grid onto the original image by sending every patch cell
through ``simvg.data.transforms.boxes_to_original``, the function that places the predicted boxes: whatever the resize
(stretched, letterboxed top-left or centred), a map and a box of the same input cell cover the same original pixels,
and padding cells (letterbox) fall outside the image and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from simvg.data.transforms import boxes_to_original


@dataclass
class AttentionMaps:
    """Per branch, where the model looked for one expression.

    ``grids[branch]``: [h, w] float, the attention over the input's patch grid, non-negative, summing to 1.
    ``maps[branch]``: [H, W] float32 in original-image pixels (H, W the image's height and width): each pixel holds
    the probability of the patch cell it lies in (piecewise constant; pixels of one patch share one value).
    ``boxes[branch]``: that branch's answer (xyxy original pixels, best first), to draw beside its map.
    ``token_patch_share``: the share of the object token's attention that went to image patches at all (the rest
    went to the token itself and to the text tokens) before the token map was renormalised over the patches.
    ``decoder_query``: the decoder query the decoder map belongs to (its highest-scoring one; 0 for REC).
    """

    grids: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)
    token_patch_share: float = float("nan")
    decoder_query: int = 0


def place_on_original(grid: np.ndarray | Tensor, meta: dict) -> np.ndarray:
    """A [h, w] grid over the network input -> [H, W] float32 over the original image (``meta`` from
    ``simvg.data.transforms.preprocess``: ``size``, ``orig_size``, ``input_to_orig``).

    Each patch cell is a box of the input frame (cell (r, c) spans columns c/w..(c+1)/w and rows r/h..(r+1)/h of
    it); ``boxes_to_original`` maps and clips it. A pixel takes the value of the cell that contains its centre.
    """
    values = torch.as_tensor(np.asarray(grid), dtype=torch.float64)
    h, w = values.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    cells = torch.stack(((cols + 0.5) / w, (rows + 0.5) / h, torch.full_like(cols, 1 / w),
                         torch.full_like(rows, 1 / h)), dim=-1)  # fmt: skip
    placed = boxes_to_original(cells.reshape(-1, 4), meta).reshape(h, w, 4)  # xyxy original pixels, clipped
    height, width = (int(v) for v in meta["orig_size"])
    # The mapping is one affine per axis, so the cells' right (bottom) edges are the same along every row (column).
    # A pixel centre lies in the first cell whose right edge is beyond it; a cell outside the image (letterbox
    # padding) was clipped to an edge and holds no centre.
    col = np.searchsorted(placed[0, :, 2].numpy(), np.arange(width) + 0.5, side="right")
    row = np.searchsorted(placed[:, 0, 3].numpy(), np.arange(height) + 0.5, side="right")
    col, row = np.minimum(col, w - 1), np.minimum(row, h - 1)  # rounding at the far edge of the last cell
    return values.numpy().astype(np.float32)[row[:, None], col[None, :]]
