"""BEiT-3 multiway encoder, parameter-compatible with torchscale's ``BEiT3`` (and the unilm/SimVG checkpoints).

Follows microsoft/torchscale ``torchscale/model/BEiT3.py`` with the settings unilm and SimVG use (``multiway=True``,
Magneto ``subln=True``, pre-LN, no relative position bias, no layer scale, exact GELU, final multiway LayerNorm);
see docs/design.md E1. Every per-token module exists twice, ``A`` for vision tokens and ``B`` for
text tokens; only the softmax attention runs over the joint sequence ``[cls, patches, text]``.

Differences from torchscale that do not change the maths:
- The hidden state is carried as two tensors (vision part, text part) instead of one sequence that every multiway
  module splits and re-concatenates; the split is therefore an argument, never mutable module state.
- Attention runs through ``F.scaled_dot_product_attention``; q/k/v of each expert run as one fused matmul whose
  weight is concatenated from the original ``q_proj``/``k_proj``/``v_proj`` parameters (cached when no gradient is
  needed), so ``state_dict`` keys stay the official ones. Projections that are no longer float ``nn.Linear`` (after
  ``torch.ao.quantization.quantize_dynamic``) run one by one; ``MultiwayAttention.pack_qkv`` replaces them by one
  ``nn.Linear`` per expert for inference-only models (``simvg.models.quantize`` packs, then quantises).

``load_beit3_pretrained`` reads an official checkpoint (``{"model": {"beit3.<key>": tensor}}``), resamples the vision
position table and the patch kernel when the image/patch size differs (224/16 -> 640/32 as SimVG does) and reports
what it loaded, resized and ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from simvg.errors import UserError
from simvg.models.layers import sine_position_1d, sine_position_2d

Pair = tuple[Tensor | None, Tensor | None]  # (vision part [B, Nv, D] | None, text part [B, L, D] | None)

# fairseq convention kept by torchscale: position rows 0 and 1 are never read, tokens start at row 2.
POSITION_OFFSET = 2


@dataclass
class BEiT3Config:
    """Sizes of a BEiT-3 encoder. ``img_size`` is the (square) input side the vision position table is built for."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 640
    patch_size: int = 32
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    drop_path_rate: float = 0.1  # SimVG's value, linearly increasing over depth (also for "large": bug B3 fixed)
    layernorm_eps: float = 1e-5
    normalize_output: bool = True  # final multiway LayerNorm (`encoder.layer_norm.{A,B}`)
    grad_checkpointing: bool = False
    fuse_qkv: bool = True  # one matmul per expert for q, k and v
    # Initial position tables. "trunc_normal" (BEiT's) is what pretrained weights replace anyway. "sincos" (MAE's
    # fixed 2-D / 1-D sinusoids, still learned afterwards) is for training from scratch: at std 0.02 the random table
    # is ~25x weaker than the patch content, so a scratch model long cannot tell where a patch is.
    pos_init: str = "trunc_normal"
    # Std of the initial text embedding. BEiT's 0.02 is fine under pretrained weights; from scratch, every sub-LN
    # residual branch adds ~0.4 RMS per layer, so 0.02-scale word identities are drowned after the first layer.
    token_embed_std: float = 0.02
    # "patch": BEiT-3's Conv2d(kernel = stride = patch). "conv": for training from scratch, a stack of 3x3 stride-2
    # convolutions before a 2x2 stride-2 ``proj`` (Xiao et al. 2021, "Early convolutions help transformers see
    # better"): same token grid, ~20% more train-step time at the SynthRef size; on standard SynthRef it lowered the
    # loss at step 1000 from 23.4 to 23.1 (benchmarks/RESULTS.md), a small gain. Not loadable from BEiT-3 weights.
    stem: str = "patch"

    def __post_init__(self) -> None:
        positive = ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size", "in_chans", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"beit3 config: {name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"beit3 config: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise UserError(f"beit3 config: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise UserError(f"beit3 config: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.max_text_positions <= POSITION_OFFSET:
            raise UserError(f"beit3 config: max_text_positions must exceed {POSITION_OFFSET}")
        if self.token_embed_std <= 0:
            raise UserError(f"beit3 config: token_embed_std must be positive, got {self.token_embed_std}")
        if self.pos_init not in ("trunc_normal", "sincos"):
            raise UserError(f"beit3 config: pos_init must be 'trunc_normal' or 'sincos', got {self.pos_init!r}")
        if self.stem not in ("patch", "conv"):
            raise UserError(f"beit3 config: stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 4 or self.patch_size & (self.patch_size - 1)):
            raise UserError(f"beit3 config: stem 'conv' needs a power-of-two patch_size >= 4, got {self.patch_size}")
        if self.pos_init == "sincos" and self.embed_dim % 4:
            raise UserError(f"beit3 config: pos_init 'sincos' needs embed_dim divisible by 4, got {self.embed_dim}")


BEIT3_PRESETS: dict[str, dict] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096),
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, ffn_dim=128, img_size=64, patch_size=16),
}


def beit3_config(name: str, **overrides) -> BEiT3Config:
    """Preset ``"base"``, ``"large"`` or ``"tiny"`` (tests) with field overrides, e.g. ``img_size=224``."""
    if name not in BEIT3_PRESETS:
        raise UserError(f"unknown BEiT-3 preset {name!r}; known: {', '.join(BEIT3_PRESETS)}")
    known = {f.name for f in dataclasses.fields(BEiT3Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"beit3 config: unknown field(s) {', '.join(unknown)}")
    return BEiT3Config(**{**BEIT3_PRESETS[name], **overrides})


class Multiway(nn.Module):
    """Two experts: ``A`` for the vision part, ``B`` for the text part (torchscale's ``MultiwayNetwork`` names)."""

    def __init__(self, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.A = vision
        self.B = text

    def forward(self, xv: Tensor | None, xt: Tensor | None) -> Pair:
        return (None if xv is None else self.A(xv)), (None if xt is None else self.B(xt))


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> sub-LN (Magneto) -> fc2 for one modality."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, n, D] -> [B, n, D]."""
        h = self.fc1(x)
        # torchscale evaluates the activation in fp32 (matters under autocast; a no-op for fp32 inputs).
        return self.fc2(self.ffn_layernorm(F.gelu(h.float()).type_as(h)))


class MultiwayAttention(nn.Module):
    """Per-modality q/k/v/out projections and sub-LN; joint softmax attention over ``[vision | text]``."""

    def __init__(self, dim: int, num_heads: int, eps: float, fuse_qkv: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fuse_qkv = fuse_qkv
        # Order as in torchscale's MultiheadAttention (k, v, q, out) so state_dict iteration order matches.
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, Multiway(nn.Linear(dim, dim), nn.Linear(dim, dim)))
        self.inner_attn_ln = Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))
        self.qkv: Multiway | None = None  # set by pack_qkv: one [D -> 3D] projection per expert (q | k | v)
        self._fused: dict[str, tuple[tuple, Tensor, Tensor]] = {}

    def clear_cache(self) -> None:
        self._fused.clear()

    @torch.no_grad()
    def pack_qkv(self) -> None:
        """Replace ``q_proj``/``k_proj``/``v_proj`` by ``qkv``: per expert one float ``nn.Linear`` [D -> 3D] holding
        their weights stacked (q, k, v), so that a later ``quantize_dynamic`` quantises one fused projection.

        For inference only: the packed module's ``state_dict`` names ``qkv.{A,B}`` instead of the official keys, and
        the three projections are gone (their memory with them). A no-op when already packed; the projections must
        still be float ``nn.Linear`` (pack before quantising).
        """
        if self.qkv is not None:
            return
        if not all(self._float_projections(expert) for expert in ("A", "B")):
            raise TypeError("pack_qkv needs the float nn.Linear q/k/v projections: pack before quantising")
        packed = []
        for expert in ("A", "B"):
            linears = [getattr(getattr(self, name), expert) for name in ("q_proj", "k_proj", "v_proj")]
            weight, bias = torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])
            lin = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            lin.weight.copy_(weight)
            lin.bias.copy_(bias)
            packed.append(lin.requires_grad_(False))
        self.qkv = Multiway(*packed)
        for name in ("q_proj", "k_proj", "v_proj"):
            delattr(self, name)
        self.clear_cache()

    def _float_projections(self, expert: str) -> bool:
        """Whether q/k/v of ``expert`` are plain float Linears (their ``weight`` a tensor, not a quantised packing)."""
        return all(type(getattr(getattr(self, name), expert)) is nn.Linear for name in ("q_proj", "k_proj", "v_proj"))

    def fused_qkv_weight(self, expert: str) -> tuple[Tensor, Tensor]:
        """Weight [3D, D] and bias [3D] of q, k, v of expert ``"A"`` or ``"B"``, stacked in that order."""
        linears = [getattr(getattr(self, name), expert) for name in ("q_proj", "k_proj", "v_proj")]
        params = [p for lin in linears for p in (lin.weight, lin.bias)]
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if needs_grad or torch.jit.is_tracing() or torch.compiler.is_compiling():
            # Concatenating inside the graph keeps gradients flowing to the original parameters (and keeps
            # tracers/compilers away from the data_ptr/_version cache key).
            return torch.cat(params[0::2]), torch.cat(params[1::2])
        # The key changes whenever a parameter is replaced (.to, load) or updated in place (optimizer, copy_).
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        cached = self._fused.get(expert)
        if cached is None or cached[0] != key:
            # Built as normal tensors even under inference_mode, so a later grad-enabled frozen run can use them.
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, torch.cat(params[0::2]), torch.cat(params[1::2]))
            self._fused[expert] = cached
        return cached[1], cached[2]

    def _qkv(self, h: Tensor, expert: str) -> Tensor:
        """[B, n, D] -> [B, n, 3D] (q | k | v)."""
        if self.qkv is not None:
            return getattr(self.qkv, expert)(h)
        if self.fuse_qkv and self._float_projections(expert):
            return F.linear(h, *self.fused_qkv_weight(expert))
        return torch.cat([getattr(getattr(self, name), expert)(h) for name in ("q_proj", "k_proj", "v_proj")], dim=-1)

    def _heads(self, hv: Tensor | None, ht: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, S, hd] of the joint sequence ``[vision | text]`` (S = vision + text tokens)."""
        parts = [self._qkv(h, e) for h, e in ((hv, "A"), (ht, "B")) if h is not None]
        qkv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        batch, seq, width3 = qkv.shape
        dim = width3 // 3
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, hv: Tensor | None, ht: Tensor | None, attn_mask: Tensor | None) -> Pair:
        """``attn_mask`` [B, 1, 1, S] bool, True = attend (key padding only); returns the two parts after out_proj."""
        q, k, v = self._heads(hv, ht)
        batch, heads, seq, head_dim = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, S, hd]
        out = out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        n_vision = 0 if hv is None else hv.shape[1]
        ov = out[:, :n_vision] if hv is not None else None
        ot = out[:, n_vision:] if ht is not None else None
        return self.out_proj(*self.inner_attn_ln(ov, ot))

    def attention_scores(self, hv: Tensor | None, ht: Tensor | None, attn_mask: Tensor | None, rows: slice) -> Tensor:
        """The softmax input of ``forward`` for the query positions ``rows`` of the joint sequence: fp32 logits
        [B, H, R, S] (q.k scaled by head_dim^-0.5, keys that ``attn_mask`` hides at -inf). Not used by ``forward``
        (whose fused kernel never materialises them); for attention maps (``simvg.models.simvg.capture_attention``).
        """
        q, k, _ = self._heads(hv, ht)
        q = q[:, :, rows].float()
        scores = q @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores

    def attention_probs(self, hv: Tensor | None, ht: Tensor | None, attn_mask: Tensor | None, rows: slice) -> Tensor:
        """The attention probabilities [B, H, R, S] of the query positions ``rows`` over every key (each row sums to
        1): what ``forward`` weights the values with, recomputed in fp32."""
        return self.attention_scores(hv, ht, attn_mask, rows).softmax(-1)


def _layer_norms(dim: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))


class EncoderLayer(nn.Module):
    """Pre-LN multiway layer: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x))); per-modality LN and FFN."""

    def __init__(self, cfg: BEiT3Config, drop_path: float) -> None:
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.layernorm_eps
        self.self_attn = MultiwayAttention(dim, cfg.num_heads, eps, cfg.fuse_qkv)
        self.self_attn_layer_norm = _layer_norms(dim, eps)
        self.ffn = Multiway(FeedForward(dim, cfg.ffn_dim, eps), FeedForward(dim, cfg.ffn_dim, eps))
        self.final_layer_norm = _layer_norms(dim, eps)
        self.drop_path = drop_path

    def _keep(self, ref: Tensor) -> Tensor | None:
        """Per-sample stochastic-depth factor [B, 1, 1] (0 or 1/keep), shared by the vision and text parts."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        return torch.empty(ref.shape[0], 1, 1, device=ref.device, dtype=ref.dtype).bernoulli_(keep) / keep

    def _add_branch(self, x: Pair, branch: Pair) -> Pair:
        """x + DropPath(branch) for both parts; torchscale drops whole samples, so one draw covers both parts."""
        keep = self._keep(branch[0] if branch[0] is not None else branch[1])

        def add(residual: Tensor | None, update: Tensor | None) -> Tensor | None:
            if residual is None or update is None:
                return None
            return residual + (update if keep is None else update * keep)

        return add(x[0], branch[0]), add(x[1], branch[1])

    def forward(self, xv: Tensor | None, xt: Tensor | None, attn_mask: Tensor | None) -> Pair:
        """Both parts [B, n, D] (either may be None); ``attn_mask`` as in ``MultiwayAttention.forward``."""
        x = self._add_branch((xv, xt), self.self_attn(*self.self_attn_layer_norm(xv, xt), attn_mask))
        return self._add_branch(x, self.ffn(*self.final_layer_norm(*x)))


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> nn.Sequential:
    """3x3 stride-2 convolutions with GELU, halving the resolution each time, up to ``patch_size / 2``; channels
    double up to ``embed_dim / 2`` (e.g. patch 16, 192-d: 3 -> 24 -> 48 -> 96 at 1/2, 1/4, 1/8 resolution)."""
    num = int(math.log2(patch_size)) - 1
    widths = [in_chans] + [max(embed_dim >> (num - i), 8) for i in range(num)]
    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers)


class VisionEmbedding(nn.Module):
    """Patch projection (Conv2d, kernel = stride = patch) with a prepended ``cls_token``; ``mask_token`` is kept
    only so pretraining checkpoints load (it is used by masked-image pretraining, never here). With ``stem="conv"``
    a convolutional stem (``conv_stem``) runs first and ``proj`` is a 2x2 stride-2 Conv2d on its output."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        if cfg.stem == "conv":
            self.stem = conv_stem(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
            self.proj = nn.Conv2d(self.stem[-2].out_channels, cfg.embed_dim, kernel_size=2, stride=2)
        else:
            self.stem = None
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, 1 + N, D], patches in row-major order."""
        if tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"BEiT-3 expects {self.img_size}x{self.img_size} images, got {tuple(image.shape[-2:])}")
        if self.stem is not None:
            patches = self.proj(self.stem(image)).flatten(2).transpose(1, 2)  # [B, N, D], row-major
            return torch.cat([self.cls_token.expand(image.shape[0], -1, -1), patches], dim=1)
        # The conv (kernel = stride) as one matmul over flattened patches: same result, and on CPU ~1.5x faster at
        # patch 32 than the convolution kernel (benchmarks/RESULTS.md).
        b, c, h, w = image.shape
        p = self.patch_size
        flat = image.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        patches = F.linear(flat, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        return torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)


class Encoder(nn.Module):
    """torchscale ``Encoder`` subset: position tables, layers and the final multiway LayerNorm."""

    def __init__(self, cfg: BEiT3Config, num_vision_positions: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.embed_positions = Multiway(
            nn.Embedding(num_vision_positions + POSITION_OFFSET, dim), nn.Embedding(cfg.max_text_positions, dim)
        )
        # Drop-path rising linearly over depth (torchscale's linspace), computed on the CPU so that a model can
        # be built on the meta device.
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.layers = nn.ModuleList(EncoderLayer(cfg, rate) for rate in rates)
        self.layer_norm = _layer_norms(dim, cfg.layernorm_eps) if cfg.normalize_output else None


class BEiT3(nn.Module):
    """BEiT-3 multiway Transformer encoder (module tree and parameter names of torchscale's ``BEiT3``)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg, self.num_patches + 1)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (H / patch, W / patch) of the image tokens."""
        side = self.cfg.img_size // self.cfg.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def reset_parameters(self) -> None:
        """BEiT-style init (truncated normal 0.02, LayerNorm 1/0) plus Magneto's sub-LN gain on fc1/fc2/out/v."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.vision_embed.stem is not None:  # He init: at std 0.02 the signal would shrink ~10x per conv
            for conv in self.vision_embed.stem[::2]:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.kaiming_normal_(self.vision_embed.proj.weight, nonlinearity="linear")
        nn.init.trunc_normal_(self.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.text_embed.weight, std=self.cfg.token_embed_std)
        if self.cfg.pos_init == "sincos":
            self._init_sincos_positions()
        gain = math.sqrt(math.log(2 * self.cfg.depth))
        with torch.no_grad():
            for name, param in self.encoder.layers.named_parameters():
                if name.endswith("weight") and any(k in name for k in ("fc1", "fc2", "out_proj", "v_proj")):
                    param.mul_(gain)

    @torch.no_grad()
    def _init_sincos_positions(self) -> None:
        """Vision rows: CLS 0, patches a 2-D sinusoid of their grid cell; text rows: a 1-D sinusoid of the index."""
        table_v, table_t = self.encoder.embed_positions.A.weight, self.encoder.embed_positions.B.weight
        rows, cols = self.grid_size
        table_v[POSITION_OFFSET].zero_()
        table_v[POSITION_OFFSET + 1 :] = sine_position_2d(rows, cols, num_feats=self.embed_dim // 2)
        table_t[POSITION_OFFSET:] = sine_position_1d(table_t.shape[0] - POSITION_OFFSET, self.embed_dim)

    def train(self, mode: bool = True) -> BEiT3:
        if mode:  # the fused q/k/v cache is only used without gradients; do not hold its memory while training
            for module in self.modules():
                if isinstance(module, MultiwayAttention):
                    module.clear_cache()
        return super().train(mode)

    def embed(self, image: Tensor | None, text_ids: Tensor | None, text_pad_mask: Tensor | None) -> Pair:
        """Token + position embeddings: vision [B, 1 + N, D] | None, text [B, L, D] | None (pad rows zeroed)."""
        table_v, table_t = self.encoder.embed_positions.A.weight, self.encoder.embed_positions.B.weight
        xv = xt = None
        if image is not None:
            xv = self.vision_embed(image)
            xv = xv + table_v[POSITION_OFFSET : POSITION_OFFSET + xv.shape[1]]
        if text_ids is not None:
            length = text_ids.shape[1]
            if length + POSITION_OFFSET > table_t.shape[0]:
                raise ValueError(f"text length {length} exceeds max_text_positions - 2 = {table_t.shape[0] - 2}")
            xt = self.text_embed(text_ids) + table_t[POSITION_OFFSET : POSITION_OFFSET + length]
            if text_pad_mask is not None:
                xt = xt.masked_fill(text_pad_mask.unsqueeze(-1), 0.0)
        return xv, xt

    def forward(
        self, image: Tensor | None = None, text_ids: Tensor | None = None, text_pad_mask: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """Encode an image, a text, or both jointly.

        Args:
            image: [B, C, H, W] with H = W = ``cfg.img_size``, or None.
            text_ids: [B, L] token ids, or None.
            text_pad_mask: [B, L] bool, True = padding (not attended, embedding zeroed), or None.

        Returns:
            x [B, 1 + N + L, D] (vision CLS, N patches, L text tokens; a missing modality contributes no tokens) and
            split_position = number of vision tokens (1 + N, or 0 for text only), so ``x[:, :split]`` is vision.
        """
        if image is None and text_ids is None:
            raise ValueError("BEiT3.forward needs an image, text ids, or both")
        xv, xt = self.embed(image, text_ids, text_pad_mask)
        attn_mask = self._attention_mask(xv, xt, text_pad_mask)
        use_ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            if use_ckpt:
                xv, xt = checkpoint(layer, xv, xt, attn_mask, use_reentrant=False)
            else:
                xv, xt = layer(xv, xt, attn_mask)
        if self.encoder.layer_norm is not None:
            xv, xt = self.encoder.layer_norm(xv, xt)
        parts = [t for t in (xv, xt) if t is not None]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return x, (0 if xv is None else xv.shape[1])

    @staticmethod
    def _attention_mask(xv: Tensor | None, xt: Tensor | None, text_pad_mask: Tensor | None) -> Tensor | None:
        """Key-padding mask [B, 1, 1, S] bool (True = attend) over ``[vision | text]``, or None without padding."""
        if xt is None or text_pad_mask is None:
            return None
        keep = ~text_pad_mask.bool()
        if xv is not None:
            keep = torch.cat([keep.new_ones(xv.shape[:2]), keep], dim=1)
        return keep[:, None, None, :]


class FrozenCompiled(nn.Module):
    """``module`` under ``torch.compile`` (static shapes), compiled with Inductor's freezing on: the weights become
    constants, so the GEMMs run on pre-packed weights and the bias, GELU, LayerNorm and residual passes are fused into
    generated kernels; the maths is unchanged (parity with torchscale stays within 1e-4). Call it under
    ``torch.no_grad()`` only (freezing is an inference transform).

    Measured on a CPU, BEiT-3 base encoder at 640/p32, batch 1, one thread: 0.66x torchscale's time against 0.83x
    eager (benchmarks/RESULTS.md). The price: each new input shape (batch size, branch) compiles first (~1.5-3
    minutes for the base encoder on one busy core), and a C++ compiler must be present. For a long-running server;
    not for one grounding.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, *args, **kwargs):
        # Inductor reads its config when it compiles, i.e. inside the first call of each shape; a
        # torch.compile(options={"freezing": True}) did not freeze (measured: no gain).
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``FrozenCompiled(module)``: ``torch.compile`` with Inductor's freezing, for ``torch.no_grad`` inference."""
    return FrozenCompiled(module)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What ``load_beit3_pretrained`` did: keys loaded as-is, resampled (old shape -> new shape) and ignored."""

    path: str
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded) + len(self.resized)} tensors"]
        for key, (old, new) in self.resized.items():
            lines.append(f"  resized {key}: {list(old)} -> {list(new)}")
        if self.ignored:
            more = f", ... ({len(self.ignored) - 10} more)" if len(self.ignored) > 10 else ""
            shown = ", ".join(self.ignored[:10]) + more
            lines.append(f"  ignored {len(self.ignored)} key(s) not in the encoder: {shown}")
        return "\n".join(lines)


VISION_POS_KEY = "encoder.embed_positions.A.weight"
_PATCH_KERNEL_KEY = "vision_embed.proj.weight"
_KEEP_ROWS = POSITION_OFFSET + 1  # 2 unused offset rows + CLS are copied unchanged


def _read_checkpoint(path: Path, allow_pickle: bool) -> object:
    """Load a .pth/.zip torch file (weights only unless ``allow_pickle``) or a .safetensors file, on CPU."""
    if not path.is_file():
        raise UserError(f"{path}: BEiT-3 checkpoint not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable .safetensors file ({_first_line(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found and not allow_pickle:
            raise UserError(
                f"{path}: needs full unpickling (contains {found.group(1)}); if you trust the file, "
                "pass allow_pickle=True (CLI: --allow-pickle)"
            ) from None
        raise UserError(f"{path}: corrupt or not a torch checkpoint (unpickling failed)") from None
    except (AttributeError, ImportError) as err:  # allow_pickle: a class the file names is not importable here
        raise UserError(f"{path}: cannot unpickle ({_first_line(err)})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{path}: corrupt or not a torch checkpoint ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _state_dict_of(obj: object, path: Path) -> dict[str, tuple[str, object]]:
    """Unwrap ``{"model": sd}``, ``{"module": sd}``, ``{"state_dict": sd}`` or ``sd``; map each key with ``module.``
    and ``beit3.`` stripped to (key as in the file, value)."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    state: dict[str, tuple[str, object]] = {}
    for key, value in obj.items():
        name = str(key)
        for prefix in ("module.", "beit3."):
            name = name.removeprefix(prefix)
        state[name] = (str(key), value)
    return state


def resample_vision_positions(table: Tensor, rows: int) -> Tensor:
    """[3 + s*s, D] -> [rows, D] (fp32): first 3 rows unchanged, the s x s patch grid resized bicubically."""
    head, grid = table[:_KEEP_ROWS].float(), table[_KEEP_ROWS:].float()
    old_side, new_side = math.isqrt(grid.shape[0]), math.isqrt(rows - _KEEP_ROWS)
    dim = grid.shape[1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, dim)
    return torch.cat([head, grid], dim=0)


def _fit(key: str, value: Tensor, target: Tensor, path: Path, report: LoadReport) -> Tensor:
    """``value`` itself, or resampled (in fp32) to ``target``'s shape where allowed; otherwise a UserError naming the
    key. ``load_state_dict`` casts to the model's dtype."""
    if value.shape == target.shape:
        report.loaded.append(key)
        return value
    old, new = tuple(value.shape), tuple(target.shape)
    if key == VISION_POS_KEY and value.dim() == 2 and old[1] == new[1] and is_square_grid(old[0], new[0]):
        resized = resample_vision_positions(value, new[0])
    elif key == _PATCH_KERNEL_KEY and value.dim() == 4 and old[:2] == new[:2]:
        # SimVG's 16 -> 32 kernel resize: bicubic, without rescaling magnitudes (docs/design.md B13).
        resized = F.interpolate(value.float(), size=new[2:], mode="bicubic", align_corners=False)
    else:
        raise UserError(f"{path}: {key} has shape {list(old)} in the checkpoint but {list(new)} in the model")
    report.resized[key] = (old, new)
    return resized


def is_square_grid(*rows: int) -> bool:
    return all(r > _KEEP_ROWS and math.isqrt(r - _KEEP_ROWS) ** 2 == r - _KEEP_ROWS for r in rows)


def load_beit3_pretrained(encoder: BEiT3, path: str | os.PathLike, allow_pickle: bool = False) -> LoadReport:
    """Load official BEiT-3 weights (unilm/SimVG ``.pth``/``.zip`` or ``.safetensors``) into ``encoder``.

    Keys not in the encoder (pretraining/task heads) are ignored and listed; the vision position table and the patch
    kernel are resampled when the image or patch size differs. A missing key or any other shape mismatch raises a
    ``UserError``. ``allow_pickle=True`` permits files that need full unpickling: only for trusted files.
    """
    path = Path(path)
    state = _state_dict_of(_read_checkpoint(path, allow_pickle), path)
    target = encoder.state_dict()
    report = LoadReport(path=str(path))
    fitted: dict[str, Tensor] = {}
    for key, (original, value) in state.items():
        if key not in target or not isinstance(value, Tensor):
            report.ignored.append(original)
            continue
        fitted[key] = _fit(key, value, target[key], path, report)
    missing = [key for key in target if key not in fitted]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{path}: missing BEiT-3 key(s) {', '.join(missing[:5])}{more}")
    encoder.load_state_dict(fitted, strict=True)
    return report
