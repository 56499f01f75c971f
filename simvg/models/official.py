"""The authors' SimVG checkpoints: their state-dict names mapped onto ours, and the architecture read off the tensors.

The official model (``MIXDETRMB`` with ``TextGuidedQuerySelectKDDETRHead``, Dmmm1997/SimVG at 29df6a4) names its
weights ``vis_enc.beit3.*`` (torchscale's BEiT-3, the same names as our ``encoder.*``) and ``head.*`` (detrex
layers: ``attentions.0`` is self-attention, ``attentions.1`` cross-attention, ``ffns.0.layers.0.0`` / ``.layers.1``
the FFN's two Linears, ``norms.0/1/2`` the three post-norms, ``post_norm_layer`` the final LayerNorm). Their
``save_checkpoint`` stores the model under ``state_dict`` and the EMA shadow under ``ema_state_dict``; a DDP run
prefixes every name with ``module.``. The map is strict: every official name maps to one of ours or is one of the
criterion's ``empty_weight`` buffers (loss constants, not weights), and an unknown name is an error.

``official_config`` infers the architecture from tensor shapes only (width, depth, FFN size, image size from the
vision position table, patch size from the patch kernel, vocabulary, query count, head sizes), never from the file
name. Two things shapes cannot tell are the official constants: 8 attention heads in the head, and BEiT-3's 64
channels per encoder head (12 for base, 16 for large). The text pooling and the 1-D text position encoding are
set to "official" (the authors' behaviour, bugs B1 and B2 in docs/design.md), which their weights were trained with.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from simvg.errors import UserError
from simvg.models.beit3 import POSITION_OFFSET, BEiT3Config
from simvg.models.simvg import SimVGConfig

HEAD_HEADS = 8  # attention heads of the official head (TQG and decoder); not visible in any tensor shape
ENCODER_HEAD_DIM = 64  # BEiT-3 base (768 / 12) and large (1024 / 16)
DDP_PREFIX = "module."
DROPPED = re.compile(r"^head\.criterion[a-z_]*\.empty_weight$")  # the loss's class weights, not model weights

# Inside one detrex post-norm layer: official suffix -> ours (``DecoderLayer``).
_LAYER_PARTS = (
    ("attentions.0.attn.", "self_attn."),
    ("attentions.1.attn.", "cross_attn."),
    ("ffns.0.layers.0.0.", "ffn.0."),
    ("ffns.0.layers.1.", "ffn.3."),
    ("norms.0.", "norm1."),
    ("norms.1.", "norm2."),
    ("norms.2.", "norm3."),
)
# Official prefix -> ours, for everything outside the detrex layer stacks.
_PREFIXES = (
    ("vis_enc.beit3.", "encoder."),
    ("head.input_proj.", "input_proj."),
    ("head.input_text_proj.", "text_proj."),
    ("head.input_cls_proj.", "cls_proj."),
    ("head.query_embed.", "tqg.query_embed."),
    ("head.text_guided_query_generation_transformer.post_norm_layer.", "tqg.decoder.norm."),
    ("head.transformer.decoder.post_norm_layer.", "decoder.decoder.norm."),
    ("head.class_embed_decoder.", "decoder.class_embed."),
    ("head.bbox_embed_decoder.", "decoder.bbox_embed."),
    ("head.mlp.", "token.mlp."),
    ("head.class_embed_token.", "token.class_embed."),
    ("head.bbox_embed_token.", "token.bbox_embed."),
)
_STACKS = (
    ("head.text_guided_query_generation_transformer.layers.", "tqg.decoder.layers."),
    ("head.transformer.decoder.layers.", "decoder.decoder.layers."),
)


def strip_ddp(state: dict[str, Any]) -> dict[str, Any]:
    """Names without the ``module.`` prefix that DistributedDataParallel adds."""
    return {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}


def is_official_state(state: dict[str, Any]) -> bool:
    """True when the (prefix-stripped) names are the official model's: ``vis_enc.beit3.*`` and ``head.*``."""
    keys = [str(k).removeprefix(DDP_PREFIX) for k in state]
    return bool(keys) and any(k.startswith("vis_enc.beit3.") for k in keys) and any(k.startswith("head.") for k in keys)


def official_name_to_ours(name: str) -> str | None:
    """Our name for one official state-dict name; None for a dropped buffer; UserError for an unknown name."""
    if DROPPED.match(name):
        return None
    for official, ours in _STACKS:
        if name.startswith(official):
            index, _, rest = name[len(official) :].partition(".")
            for part, our_part in _LAYER_PARTS:
                if index.isdigit() and rest.startswith(part):
                    return f"{ours}{index}.{our_part}{rest[len(part) :]}"
            raise UserError(f"unknown official SimVG weight {name!r}")
    for official, ours in _PREFIXES:
        if name.startswith(official):
            return ours + name[len(official) :]
    raise UserError(f"unknown official SimVG weight {name!r}")


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official state dict (``module.`` prefixes allowed) in our names; the criterion buffers are dropped."""
    mapped: dict[str, Tensor] = {}
    for name, value in strip_ddp(state).items():
        ours = official_name_to_ours(name)
        if ours is not None:
            mapped[ours] = value
    return mapped


def _count(state: dict[str, Any], pattern: str) -> int:
    """How many distinct indices ``{i}`` the names matching ``pattern`` (a regex with one group) use."""
    regex = re.compile(pattern)
    return len({m.group(1) for key in state if (m := regex.match(key))})


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise UserError(f"not a SimVG model: no weight {key!r}")
    return tuple(state[key].shape)


def infer_config(state: dict[str, Tensor], official: bool = True) -> SimVGConfig:
    """The ``SimVGConfig`` whose weights have the shapes of ``state`` (our names, e.g. from ``official_to_ours``).

    ``official=True`` adds the official behaviour that shapes cannot show (text pooling and positions "official",
    bugs B1 and B2). A square vision position table of ``2 + 1 + (S/p)^2`` rows gives the image side ``S``.
    """
    vocab, width = _shape(state, "encoder.text_embed.weight")
    depth = _count(state, r"^encoder\.encoder\.layers\.(\d+)\.")
    kernel = _shape(state, "encoder.vision_embed.proj.weight")
    stem = "conv" if any(k.startswith("encoder.vision_embed.stem.") for k in state) else "patch"
    vision_rows = _shape(state, "encoder.encoder.embed_positions.A.weight")[0]
    grid = vision_rows - POSITION_OFFSET - 1
    side = round(grid**0.5)
    if grid <= 0 or side * side != grid:
        raise UserError(f"vision position table of {vision_rows} rows is not 3 + a square patch grid")
    patch = kernel[-1] * (2 ** (len([k for k in state if k.startswith("encoder.vision_embed.stem.")]) // 2))
    encoder = BEiT3Config(
        embed_dim=width,
        depth=depth,
        num_heads=max(1, width // ENCODER_HEAD_DIM),
        ffn_dim=_shape(state, "encoder.encoder.layers.0.ffn.A.fc1.weight")[0],
        img_size=side * patch,
        patch_size=patch,
        in_chans=kernel[1] if stem == "patch" else 3,
        vocab_size=vocab,
        max_text_positions=_shape(state, "encoder.encoder.embed_positions.B.weight")[0],
        normalize_output="encoder.encoder.layer_norm.A.weight" in state,
        stem=stem,
    )
    num_queries, dim = _shape(state, "tqg.query_embed.weight")
    use_tqg = any(k.startswith("tqg.decoder.") for k in state)
    return SimVGConfig(
        encoder=encoder,
        embed_dim=dim,
        num_queries=num_queries,
        use_tqg=use_tqg,
        tqg_layers=_count(state, r"^tqg\.decoder\.layers\.(\d+)\.") if use_tqg else 2,
        tqg_ffn_dim=_shape(state, "tqg.decoder.layers.0.ffn.0.weight")[0] if use_tqg else 512,
        decoder_layers=_count(state, r"^decoder\.decoder\.layers\.(\d+)\."),
        num_heads=HEAD_HEADS,
        decoder_ffn_dim=_shape(state, "decoder.decoder.layers.0.ffn.0.weight")[0],
        token_mlp_layers=_count(state, r"^token\.mlp\.layers\.(\d+)\."),
        text_pool="official" if official else "max",
        text_pos="official" if official else "sine",
    )
