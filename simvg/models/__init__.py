"""Named SimVG presets and ``create_model`` (timm's named constructors, without a registry).

Overrides apply to ``SimVGConfig`` fields by keyword (``num_queries=10``); encoder fields go either through
``encoder=dict(depth=2)`` (merged into the preset's encoder), ``encoder="tiny"`` (a ``beit3_config`` preset),
``encoder=BEiT3Config(...)`` (replaces it), or dotted keys ``**{"encoder.img_size": 224}``. Unknown names raise
``UserError``. The SynthRef presets default to ``vocab_size=1000``: set ``encoder.vocab_size`` from the SynthRef
tokenizer (it must be at least the tokenizer's id range).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from simvg.errors import UserError
from simvg.models.beit3 import BEiT3Config, beit3_config
from simvg.models.simvg import SimVG, SimVGConfig

SYNTH_VOCAB = 1000
# Trained from scratch: sinusoidal position tables and unit-scale word embeddings (beit3.py explains why; with BEiT's
# 0.02 init the model sat on the "average box" plateau for 1000+ steps, docs/results.md). The SynthRef recipes add
# ``encoder.stem: conv``; presets stay fixed so that checkpoints naming them keep loading.
_SYNTH_ENCODER = dict(
    embed_dim=192,
    depth=4,
    num_heads=3,
    ffn_dim=768,
    img_size=128,
    patch_size=16,
    pos_init="sincos",
    token_embed_std=0.5,
)
_SYNTH_HEAD = dict(embed_dim=128, num_heads=4, tqg_ffn_dim=256, decoder_ffn_dim=512)

MODEL_PRESETS: dict[str, SimVGConfig] = {
    # The released configurations: BEiT-3 at 640 px, patch 32 (20x20 grid), 20 text tokens from the tokenizer.
    "simvg_b32": SimVGConfig(encoder=beit3_config("base")),
    "simvg_l32": SimVGConfig(encoder=beit3_config("large")),
    "simvg_b32_grec": SimVGConfig(encoder=beit3_config("base"), num_queries=10),
    # Small models that train on a CPU in minutes on SynthRef (128 px, patch 16 -> 8x8 grid).
    "simvg_synth_s": SimVGConfig(
        encoder=beit3_config("base", **_SYNTH_ENCODER, vocab_size=SYNTH_VOCAB, drop_path_rate=0.0), **_SYNTH_HEAD
    ),
    "simvg_synth_s_grec": SimVGConfig(
        encoder=beit3_config("base", **_SYNTH_ENCODER, vocab_size=SYNTH_VOCAB, drop_path_rate=0.0),
        num_queries=10,
        **_SYNTH_HEAD,
    ),
    # For tests: 2-layer 64-d encoder at 64 px, a 32-d head (every part present, runs in milliseconds).
    "simvg_tiny_test": SimVGConfig(
        encoder=beit3_config("tiny", drop_path_rate=0.0),
        embed_dim=32,
        num_heads=4,
        tqg_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
}


def list_models() -> list[str]:
    """Names of the model presets."""
    return sorted(MODEL_PRESETS)


def _encoder_override(base: BEiT3Config, value: Any) -> BEiT3Config:
    if isinstance(value, BEiT3Config):
        return copy.deepcopy(value)
    if isinstance(value, str):
        return beit3_config(value)
    if isinstance(value, dict):
        return _replace(base, value, "encoder")
    raise UserError(f"model override encoder: expected a dict, a preset name or a BEiT3Config, got {type(value)}")


def _replace(cfg: Any, values: dict[str, Any], where: str) -> Any:
    """``dataclasses.replace`` that names the unknown field in a ``UserError``."""
    known = {f.name for f in dataclasses.fields(cfg)}
    for key in values:
        if key not in known:
            raise UserError(f"{where}: unknown field {key!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **values)


def model_config(name_or_cfg: str | SimVGConfig, **overrides: Any) -> SimVGConfig:
    """A preset (by name) or a config, copied, with overrides applied (see the module docstring)."""
    if isinstance(name_or_cfg, SimVGConfig):
        cfg = copy.deepcopy(name_or_cfg)
    elif name_or_cfg in MODEL_PRESETS:
        cfg = copy.deepcopy(MODEL_PRESETS[name_or_cfg])
    else:
        raise UserError(f"unknown model {name_or_cfg!r}; known: {', '.join(list_models())}")
    dotted = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("encoder.")}
    top = {k: v for k, v in overrides.items() if not k.startswith("encoder.")}
    if "encoder" in top:
        top["encoder"] = _encoder_override(cfg.encoder, top["encoder"])
    cfg = _replace(cfg, top, "model")
    return _replace(cfg, {"encoder": _replace(cfg.encoder, dotted, "model.encoder")}, "model") if dotted else cfg


def create_model(name_or_cfg: str | SimVGConfig, **overrides: Any) -> SimVG:
    """Build a randomly initialised SimVG; load BEiT-3 weights with ``load_beit3_pretrained(model.encoder, path)``."""
    return SimVG(model_config(name_or_cfg, **overrides))


__all__ = [
    "MODEL_PRESETS",
    "SimVG",
    "SimVGConfig",
    "create_model",
    "list_models",
    "model_config",
]
