"""The ``simvg pretrain`` experiment file: encoder, caption data, objectives and optimisation, every field read.

Loaded and type-checked like ``simvg train``'s (``simvg.config.from_dict``: unknown keys and wrong types are errors
naming the key; ``--set key=value`` overrides any field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simvg.config import ModelSection, apply_overrides, from_dict, model_settings, read_yaml
from simvg.errors import UserError
from simvg.models.beit3 import BEiT3Config
from simvg.synthref.scene import BACKGROUNDS, MAX_OBJECTS, MIN_OBJECTS


@dataclass
class EncoderSection:
    """The encoder to pre-train: the ``encoder`` of a SimVG preset with overrides (as in ``simvg train``'s
    ``model`` section, so that a fine-tuning config names the same architecture), optionally started from a BEiT-3
    checkpoint (``pretrained``, e.g. an earlier pre-training stage's ``beit3.pth``)."""

    preset: str = "simvg_synth_s"
    overrides: dict[str, Any] = field(default_factory=lambda: {"encoder.stem": "conv"})
    pretrained: str | None = None

    def beit3(self) -> BEiT3Config:
        return model_settings(ModelSection(preset=self.preset, overrides=self.overrides)).encoder


@dataclass
class CaptionData:
    """SynthRef scenes drawn on the fly (sample ``i`` of a stream is a pure function of (seed, stream, i)), each
    described by a caption whose words are linked to objects (``simvg.synthref.captions``)."""

    tokenizer: str = "data/synthref_rec_starter/tokenizer.spm"  # the fine-tuning runs' word ids
    max_objects: int = 4
    background: Literal["plain", "textured"] = "plain"
    max_tokens: int = 32  # captions of several phrases; fine-tuning reads the first 20 text positions
    mask_prob: float = 0.15  # share of the object words replaced by <mask> for masked language modelling
    seed: int = 0
    val_samples: int = 256
    num_workers: int = 0


@dataclass
class Objectives:
    """Loss weights: word-region alignment (contrastive, both directions) and masked language modelling."""

    align: float = 1.0
    mlm: float = 1.0
    # Object-token alignment: the vision [CLS] token (SimVG's object token) against the patches of the object the
    # caption's first phrase singles out; 0 leaves the [CLS] token untrained, as BEiT-3-style pre-training does.
    object: float = 0.0
    align_dim: int = 64  # width of the alignment projections
    temperature: float = 0.07


@dataclass
class PretrainTrain:
    """Optimisation (AdamW, linear warm-up, step decay at ``milestones``) and bookkeeping; steps, not epochs."""

    output_dir: str = "runs/pretrain_synthref"
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup: int = 200
    milestones: list[int] = field(default_factory=list)
    clip_grad_norm: float = 1.0
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # CUDA only; CPU runs in float32
    max_steps: int = 4000
    checkpoint_every_steps: int = 250
    eval_every_steps: int = 250
    log_every_steps: int = 50


@dataclass
class PretrainConfig:
    encoder: EncoderSection = field(default_factory=EncoderSection)
    data: CaptionData = field(default_factory=CaptionData)
    loss: Objectives = field(default_factory=Objectives)
    train: PretrainTrain = field(default_factory=PretrainTrain)


def check(cfg: PretrainConfig) -> PretrainConfig:
    """Range checks that types cannot express; ``UserError`` naming the field."""
    d, t, loss = cfg.data, cfg.train, cfg.loss
    cfg.encoder.beit3()  # the preset and overrides resolve
    if not MIN_OBJECTS <= d.max_objects <= MAX_OBJECTS:
        raise UserError(f"data.max_objects must be in [{MIN_OBJECTS}, {MAX_OBJECTS}], got {d.max_objects}")
    if d.background not in BACKGROUNDS:
        raise UserError(f"data.background must be one of {', '.join(BACKGROUNDS)}, got {d.background!r}")
    if d.max_tokens < 8:
        raise UserError(f"data.max_tokens must be at least 8 (one phrase and <s>, </s>), got {d.max_tokens}")
    if not 0.0 <= d.mask_prob < 1.0:
        raise UserError(f"data.mask_prob must be in [0, 1), got {d.mask_prob}")
    if min(loss.align, loss.mlm, loss.object) < 0 or loss.align + loss.mlm + loss.object == 0:
        raise UserError("loss.align, loss.mlm and loss.object must be >= 0 and not all 0")
    if loss.temperature <= 0:
        raise UserError(f"loss.temperature must be positive, got {loss.temperature}")
    for name in ("batch_size", "max_steps", "checkpoint_every_steps", "eval_every_steps", "log_every_steps", "threads"):
        if getattr(t, name) <= 0:
            raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
    if d.val_samples < 0:
        raise UserError(f"data.val_samples must be >= 0, got {d.val_samples}")
    return cfg


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a ``simvg pretrain`` YAML file with ``--set`` overrides; errors name the file and the key."""
    try:
        return check(
            from_dict(PretrainConfig, apply_overrides(read_yaml(path), list(overrides or []), PretrainConfig), where="")
        )
    except UserError as exc:
        raise UserError(f"{path}: {str(exc).lstrip('.')}") from None
