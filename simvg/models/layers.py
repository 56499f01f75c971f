"""Small building blocks of the SimVG head: MLP, sine position embeddings, masked text pooling.

The 2-D sine embedding is DETR's (Carion et al., ECCV 2020) as used by detrex's ``PositionEmbeddingSine``; the 1-D
one is the Transformer's (Vaswani et al., 2017). Two functions emulate bugs of the official SimVG code (docs/design.md
B1, B2) so that official checkpoints can be run with parity; the clean versions are the defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last), as DETR's box head.

    ``num_layers=1`` is a single Linear without activation (the token branch's ``num_token_mlp_layers=1``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> [..., out_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_1d(length: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """Transformer sinusoid for positions 0..length-1: [L, D] with even channels sin, odd channels cos.

    Channel pair (2i, 2i+1) uses the frequency ``temperature ** (-2i / D)``.
    """
    if dim % 2:
        raise ValueError(f"sine_position_1d needs an even dim, got {dim}")
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = temperature ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angle = pos * freq  # [L, D/2]
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)


def sine_position_1d_official(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The official ``PositionEmbeddingSine1D`` output (docs/design.md B2), for checkpoint parity: [L, D].

    Its inverse frequencies are cast to integers, so only frequency 1 survives: channel 0 is sin(pos), channel 1
    is cos(pos), the other even channels are 0 and the other odd channels are 1.
    """
    pos = torch.arange(length, dtype=torch.float32, device=device)
    out = torch.zeros(length, dim, device=device)
    out[:, 1::2] = 1.0
    out[:, 0] = pos.sin()
    out[:, 1] = pos.cos()
    return out


def sine_position_2d(
    height: int,
    width: int,
    num_feats: int = 128,
    temperature: float = 10000.0,
    device: torch.device | None = None,
) -> Tensor:
    """DETR's normalised 2-D sine embedding of an all-valid ``height x width`` grid: [H*W, 2*num_feats].

    Rows are row-major grid cells (the order of flattened patch tokens). The first ``num_feats`` channels encode y,
    the last ``num_feats`` encode x; within each half, channels alternate sin/cos with frequencies
    ``temperature ** (-2*(i//2) / num_feats)``. Coordinates run 1..n and are scaled by ``2*pi / (n + 1e-6)``
    (``normalize=True``, the detrex default ``eps``).
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    idx = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_feats)

    def encode(coord: Tensor) -> Tensor:  # [n] -> [n, num_feats]
        a = coord[:, None] / dim_t
        return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=-1).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, 2 * num_feats)


def masked_max_pool(x: Tensor, pad_mask: Tensor) -> Tensor:
    """Element-wise max over the real (non-pad) tokens: x [B, L, D], pad_mask [B, L] (True = pad) -> [B, D].

    A row with no real token gives zeros rather than -inf.
    """
    filled = x.masked_fill(pad_mask[..., None], float("-inf"))
    pooled = filled.max(dim=1).values
    return torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)


def masked_max_pool_official(x: Tensor, pad_mask: Tensor) -> Tensor:
    """The official "max-pool" (docs/design.md B1), for checkpoint parity: [B, L, D] -> [B, D].

    ``~`` on the int64 padding mask turns 0/1 into -1/-2, which then index the sequence: the result is
    ``max(x[:, -1], x[:, -2])`` for a padded row and ``x[:, -1]`` for a row without padding.
    """
    padded = pad_mask.any(dim=1, keepdim=True)
    last, second = x[:, -1], x[:, -2] if x.shape[1] > 1 else x[:, -1]
    return torch.where(padded, torch.maximum(last, second), last)
