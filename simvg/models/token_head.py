"""SimVG's token branch (docs/design.md O2.6): predictions straight from the object token, no decoder.

``z = o + q`` (the projected vision [CLS] token plus each text-guided query), ``h = MLP(z)`` with
``num_mlp_layers`` Linear layers (1 in every released config: a single Linear without activation), then a
2-way class Linear and a 3-layer box MLP with sigmoid. Its weights are separate from the decoder branch's heads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from simvg.models.decoder import NUM_LOGITS
from simvg.models.layers import MLP


class TokenBranch(nn.Module):
    """Object token + queries -> ``{"pred_logits" [B, Q, 2], "pred_boxes" [B, Q, 4], "aux_outputs": []}``."""

    def __init__(self, dim: int, num_mlp_layers: int = 1) -> None:
        super().__init__()
        self.mlp = MLP(dim, dim, dim, num_mlp_layers) if num_mlp_layers > 0 else nn.Identity()
        self.class_embed = nn.Linear(dim, NUM_LOGITS)
        self.bbox_embed = MLP(dim, dim, 4, 3)

    def forward(self, obj: Tensor, queries: Tensor) -> dict[str, Any]:
        """obj [B, D] (one object token per image, shared by all queries), queries [B, Q, D] -> output dict."""
        h = self.mlp(obj[:, None, :] + queries)
        return {"pred_logits": self.class_embed(h), "pred_boxes": self.bbox_embed(h).sigmoid(), "aux_outputs": []}
