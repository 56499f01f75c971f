"""SimVG (Dai et al., NeurIPS 2024): BEiT-3 multimodal fusion, text-guided queries, decoder and token branches.

Composition as in the official ``MIXDETRMB`` + ``TextGuidedQuerySelectKDDETRHead`` (docs/design.md O2.1-O2.6):

    BEiT-3 on [vision CLS, N patches, L text]       -> x [B, 1+N+L, C]
    o = Linear(x[:, 0])        memory = Conv1x1(patches as a grid)        t = Linear(text)      (all -> D)
    q = TQG(t, pad mask)                                                    [B, Q, D]
    decoder branch: DETR decoder(content 0, query_pos q, keys memory + 2-D sine) -> per-layer logits and boxes
    token branch:   MLP(o + q) -> logits and boxes  (runs without the decoder: branch="token" is the fast path)

The model returns DETR's output dicts and nothing else: losses live in ``simvg.losses``, post-processing in
``simvg.artifact.postprocess``. ``SimVG.capture_attention`` records, on request only, where each branch looked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from simvg.errors import UserError
from simvg.models.beit3 import BEiT3, BEiT3Config
from simvg.models.decoder import (
    TEXT_POOLS,
    TEXT_POSITIONS,
    DecoderBranch,
    TextGuidedQueryGenerator,
    cross_attention_probs,
)
from simvg.models.layers import sine_position_2d
from simvg.models.token_head import TokenBranch

BRANCHES = ("both", "token", "decoder")


@dataclass
class SimVGConfig:
    """Everything that shapes a SimVG model. Defaults are the released ViT-B/32 REC configuration's head.

    ``text_pool`` "max" is a masked max over real tokens; "official" emulates bug B1. ``text_pos`` "sine" is a
    correct 1-D sinusoid; "official" emulates bug B2. ``use_tqg=False`` uses plain learned queries.
    """

    encoder: BEiT3Config = field(default_factory=BEiT3Config)
    embed_dim: int = 256
    num_queries: int = 1
    use_tqg: bool = True
    tqg_layers: int = 2
    tqg_ffn_dim: int = 512
    decoder_layers: int = 3
    num_heads: int = 8
    decoder_ffn_dim: int = 2048
    dropout: float = 0.1
    token_mlp_layers: int = 1
    text_pool: str = "max"
    text_pos: str = "sine"

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_queries", "tqg_layers", "tqg_ffn_dim", "decoder_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise UserError(f"model config: embed_dim {self.embed_dim} must divide by num_heads and by 4")
        if self.text_pool not in TEXT_POOLS:
            raise UserError(f"model config: text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.text_pos not in TEXT_POSITIONS:
            raise UserError(f"model config: text_pos must be one of {TEXT_POSITIONS}, got {self.text_pos!r}")
        if not 0.0 <= self.dropout < 1.0 or self.token_mlp_layers < 0:
            raise UserError("model config: dropout must be in [0, 1) and token_mlp_layers >= 0")


class SimVG(nn.Module):
    """SimVG: ``forward(image, text_ids, text_pad_mask, branch)`` -> ``{"decoder": {...}, "token": {...}}``."""

    def __init__(self, cfg: SimVGConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = BEiT3(cfg.encoder)
        width, dim = cfg.encoder.embed_dim, cfg.embed_dim
        self.input_proj = nn.Conv2d(width, dim, kernel_size=1)
        self.text_proj = nn.Linear(width, dim)
        self.cls_proj = nn.Linear(width, dim)
        self.tqg = TextGuidedQueryGenerator(
            dim, cfg.num_queries, cfg.tqg_layers, cfg.num_heads, cfg.tqg_ffn_dim, cfg.dropout,
            cfg.use_tqg, cfg.text_pool, cfg.text_pos,
        )  # fmt: skip
        self.decoder = DecoderBranch(dim, cfg.decoder_layers, cfg.num_heads, cfg.decoder_ffn_dim, cfg.dropout)
        self.token = TokenBranch(dim, cfg.token_mlp_layers)

    def forward(self, image: Tensor, text_ids: Tensor, text_pad_mask: Tensor, branch: str = "both") -> dict[str, Any]:
        """Ground each expression in its image.

        Args:
            image: [B, 3, H, W] normalised, H and W the encoder's ``img_size``.
            text_ids: [B, L] token ids; text_pad_mask: [B, L] bool, True at padding.
            branch: "both", "token" (the decoder is not run at all) or "decoder".

        Returns:
            ``{"decoder": out, "token": out}`` with only the branches run; each ``out`` is
            ``{"pred_logits": [B, Q, 2] (index 0 = object), "pred_boxes": [B, Q, 4] cxcywh in [0, 1],
            "aux_outputs": [{"pred_logits", "pred_boxes"} for decoder layers 0..n-2] (empty for the token branch)}``.
        """
        x, split = self.encoder(image, text_ids, text_pad_mask)
        patch = self.cfg.encoder.patch_size
        return self.forward_head(x, split, (image.shape[-2] // patch, image.shape[-1] // patch), text_pad_mask, branch)

    def forward_head(
        self, x: Tensor, split: int, grid: tuple[int, int], text_pad_mask: Tensor, branch: str = "both"
    ) -> dict[str, Any]:
        """The head on encoder outputs x [B, 1+N+L, C] (``split`` = 1+N, ``grid`` = (h, w) with h*w = N)."""
        if branch not in BRANCHES:
            raise UserError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        obj = self.cls_proj(x[:, 0])  # [B, D]
        text = self.text_proj(x[:, split:])  # [B, L, D]
        queries = self.tqg(text, text_pad_mask.bool())  # [B, Q, D]
        out: dict[str, Any] = {}
        if branch in ("both", "decoder"):
            memory = self.project_patches(x[:, 1:split], grid)  # [B, N, D]
            pos = sine_position_2d(*grid, num_feats=self.cfg.embed_dim // 2, device=x.device).to(memory.dtype)
            out["decoder"] = self.decoder(memory, pos, queries)
        if branch in ("both", "token"):
            out["token"] = self.token(obj, queries)
        return out

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[dict[str, Any]]:
        """Record where the model looks in the forward passes run inside the block (for inference).

        Yields a dict that each forward fills (batch-first; N = h * w patches, row-major as the patch tokens):
        ``"token"`` [B, N]: the object token's (the vision [CLS]'s) attention over the image patches in the
        encoder's last layer, mean over heads, renormalised over the patches (each row sums to 1);
        ``"token_patch_share"`` [B]: the share of that attention the patches had before renormalising (the rest
        went to the token itself and to the text); ``"decoder"`` [B, Q, N] (only when the decoder ran): each query's
        cross-attention over the patches in the decoder's last layer, mean over heads (rows sum to 1);
        ``"grid"``: (h, w).

        Forward pre-hooks recompute the probabilities from the inputs of the two attention modules
        (``MultiwayAttention.attention_probs``, ``cross_attention_probs``), so the forward pass and its outputs are
        a plain call's, bit for bit; the hooks are removed when the block ends, and outside it nothing is added to
        a forward pass.
        """
        store: dict[str, Any] = {"grid": self.encoder.grid_size}

        def encoder_hook(module: nn.Module, args: tuple) -> None:
            hv, ht, attn_mask = args
            probs = module.attention_probs(hv, ht, attn_mask, slice(0, 1))[:, :, 0].mean(1)  # [B, S], CLS row
            patches = probs[:, 1 : hv.shape[1]]  # [cls, patches..., text...]: keys 1..N are the patches
            share = patches.sum(-1)
            store["token"] = patches / share.clamp(min=torch.finfo(share.dtype).tiny)[:, None]
            store["token_patch_share"] = share

        def decoder_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            query, key = args[0], args[1]
            store["decoder"] = cross_attention_probs(module, query, key, kwargs.get("key_padding_mask")).mean(1)

        handles = [
            self.encoder.encoder.layers[-1].self_attn.register_forward_pre_hook(encoder_hook),
            self.decoder.decoder.layers[-1].cross_attn.register_forward_pre_hook(decoder_hook, with_kwargs=True),
        ]
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def project_patches(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens [B, N, C] -> Conv1x1 on the [B, C, h, w] grid -> memory [B, N, D] (row-major)."""
        b, n, c = patches.shape
        fmap = patches.transpose(1, 2).reshape(b, c, *grid)
        return self.input_proj(fmap).flatten(2).transpose(1, 2)
