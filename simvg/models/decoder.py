"""DETR-style transformer decoder, SimVG's text-guided query generator (TQG) and the decoder branch.

Layers follow detrex's ``DetrTransformerDecoder`` as configured by SimVG (docs/design.md O2.4-O2.5): post-norm
(self-attn -> add & LN -> cross-attn -> add & LN -> FFN -> add & LN), dropout on attention weights and inside the
FFN, and one final LayerNorm shared by every layer's output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simvg.models.layers import (
    MLP,
    masked_max_pool,
    masked_max_pool_official,
    sine_position_1d,
    sine_position_1d_official,
)

NUM_LOGITS = 2  # index 0 = object, index 1 = "no object" (DETR's num_classes + 1 with one class)
TEXT_POOLS = ("max", "official")
TEXT_POSITIONS = ("sine", "official")


def cross_attention_scores(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, pad_mask: Tensor | None) -> Tensor:
    """The softmax input of ``attn(query, key, value, key_padding_mask=pad_mask)`` (batch-first, equal q/k/v widths):
    fp32 logits [B, H, Q, N] (projected q.k scaled by head_dim^-0.5, padded keys at -inf). For attention maps
    (``simvg.models.simvg.capture_attention``); the forward pass never materialises them."""
    dim, heads = attn.embed_dim, attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    bias_q, bias_k = (None, None) if bias is None else (bias[:dim], bias[dim : 2 * dim])
    q = F.linear(query, weight[:dim], bias_q)  # [B, Q, D]; in_proj rows are q, k, v in that order
    k = F.linear(key, weight[dim : 2 * dim], bias_k)  # [B, N, D]
    q = q.unflatten(-1, (heads, dim // heads)).transpose(1, 2).float()  # [B, H, Q, hd]
    k = k.unflatten(-1, (heads, dim // heads)).transpose(1, 2).float()  # [B, H, N, hd]
    scores = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
    if pad_mask is not None:
        scores = scores.masked_fill(pad_mask.bool()[:, None, None, :], float("-inf"))
    return scores


def cross_attention_probs(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, pad_mask: Tensor | None) -> Tensor:
    """Attention probabilities [B, H, Q, N] of ``attn`` (each query's row sums to 1), recomputed in fp32."""
    return cross_attention_scores(attn, query, key, pad_mask).softmax(-1)


class DecoderLayer(nn.Module):
    """One post-norm DETR decoder layer. Positions are added to queries and keys, never to values."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(
        self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor, memory_pad_mask: Tensor | None
    ) -> Tensor:
        """tgt, query_pos [B, Q, D]; memory [B, N, D]; memory_pos broadcastable to it; pad mask [B, N] -> [B, Q, D]."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        attn = self.cross_attn(
            tgt + query_pos, memory + memory_pos, memory, key_padding_mask=memory_pad_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + attn)
        return self.norm3(tgt + self.ffn(tgt))


class TransformerDecoder(nn.Module):
    """A stack of ``DecoderLayer`` with a final LayerNorm; the content query starts at zeros.

    Returns [num_layers, B, Q, D] (the final LN applied to every layer's output) when ``return_intermediate``,
    else [1, B, Q, D] (the last layer only).
    """

    def __init__(
        self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, dropout: float, return_intermediate: bool
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.return_intermediate = return_intermediate
        # The official stack (detrex) deep-copies one attention module into self- and cross-attention and one layer
        # into every layer, so all start equal; the decoder branch then re-draws its matrices (Xavier), the TQG not.
        first = self.layers[0]
        first.cross_attn.load_state_dict(first.self_attn.state_dict())
        for layer in self.layers[1:]:
            layer.load_state_dict(first.state_dict())

    def forward(
        self, memory: Tensor, query_pos: Tensor, memory_pos: Tensor, memory_pad_mask: Tensor | None = None
    ) -> Tensor:
        """memory [B, N, D], query_pos [B, Q, D], memory_pos [N, D] or [B, N, D] -> [num_out, B, Q, D]."""
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, memory_pos, memory_pad_mask)
            if self.return_intermediate:
                outs.append(self.norm(tgt))
        return torch.stack(outs) if self.return_intermediate else self.norm(tgt)[None]


class TextGuidedQueryGenerator(nn.Module):
    """TQG (docs/design.md O2.4): ``q = TQGDecoder(0, Qe, text) + maxpool(text) + Qe`` -> [B, Q, D].

    With ``use_tqg=False`` the queries are the plain learned embeddings ``Qe`` (the "w/o TQG" ablation).
    ``text_pool`` / ``text_pos`` = "official" reproduce the official bugs B1 / B2 for checkpoint parity.
    The TQG layers keep PyTorch's default init, as in the official code: every layer starts as a copy of the first,
    and each layer's cross-attention as a copy of its self-attention (``TransformerDecoder``).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        use_tqg: bool = True,
        text_pool: str = "max",
        text_pos: str = "sine",
    ) -> None:
        super().__init__()
        if text_pool not in TEXT_POOLS or text_pos not in TEXT_POSITIONS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS} and text_pos one of {TEXT_POSITIONS}")
        self.query_embed = nn.Embedding(num_queries, dim)
        self.use_tqg, self.text_pool, self.text_pos = use_tqg, text_pool, text_pos
        self.decoder = TransformerDecoder(num_layers, dim, num_heads, ffn_dim, dropout, False) if use_tqg else None

    def forward(self, text: Tensor, text_pad_mask: Tensor) -> Tensor:
        """text [B, L, D] (projected), text_pad_mask [B, L] (True = pad) -> queries [B, Q, D]."""
        qe = self.query_embed.weight[None].expand(text.shape[0], -1, -1)
        if self.decoder is None:
            return qe
        length, dim = text.shape[1:]
        if self.text_pos == "sine":
            pos = sine_position_1d(length, dim, device=text.device)
        else:
            pos = sine_position_1d_official(length, dim, device=text.device)
        tq = self.decoder(text, qe, pos.to(text.dtype), text_pad_mask)[-1]
        pool = masked_max_pool if self.text_pool == "max" else masked_max_pool_official
        return tq + pool(text, text_pad_mask)[:, None] + qe


class DecoderBranch(nn.Module):
    """The decoder branch (docs/design.md O2.5): a DETR decoder over image memory with heads shared across layers.

    Xavier-uniform init of every >1-D decoder parameter (the official ``DetrTransformer.init_weights``); the
    prediction heads keep PyTorch's default init.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.decoder = TransformerDecoder(num_layers, dim, num_heads, ffn_dim, dropout, True)
        self.class_embed = nn.Linear(dim, NUM_LOGITS)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        for p in self.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, memory: Tensor, memory_pos: Tensor, queries: Tensor) -> dict[str, Any]:
        """memory [B, N, D], memory_pos [N, D], queries [B, Q, D] (used as query_pos) -> output dict.

        Returns ``{"pred_logits": [B, Q, 2], "pred_boxes": [B, Q, 4] cxcywh in [0, 1], "aux_outputs": [...]}``
        with the final layer on top and layers 0..n-2 in ``aux_outputs``.
        """
        hs = self.decoder(memory, queries, memory_pos)  # [n, B, Q, D]
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}
