"""Experiment configuration: nested dataclasses loaded from complete YAML files plus ``--set key=value`` overrides.

``Config(model, data, loss, train, eval)``: ``model`` names a preset of ``simvg.models.create_model`` plus overrides
and the weights to start from; ``data``, ``loss``, ``train`` and ``eval`` say what to read, what to optimise, how, and
how to validate. Every section is defined here (the one rule: a config section lives in this module, its consumers
import it). Files are complete (no ``_base_``
inheritance, docs/design.md S7.3), so every effective value is visible in one file. Unknown keys and wrong
types raise ``UserError`` naming the key and the file; ``--set`` values are parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from simvg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES
from simvg.errors import UserError
from simvg.models import MODEL_PRESETS, SimVGConfig, model_config
from simvg.models.beit3 import BEiT3Config

# GREC: a prediction counts when its object probability reaches this (the official value). Defined with the
# config sections (EvalConfig's default); the metrics, the post-processing and the CLI defaults import it.
SCORE_THRESHOLD = 0.7


@dataclass
class DataConfig:
    """What to read and how to transform it. The batch size belongs to the engine.

    ``ann_file`` and ``img_dir`` override the spec's paths (relative to ``root`` unless absolute); ``tokenizer``
    is a ``.spm`` path (empty: ``root/tokenizer.spm``, where SynthRef writes it). ``data_sources`` filters the
    train split by ``data_source`` (empty: the spec's default; ``vg`` and ``visual-genome`` are the same).
    """

    dataset: str = "synthref"
    root: str = "data"
    ann_file: str = ""
    img_dir: str = ""
    image_size: int = 640
    resize_mode: str = "stretch"  # "stretch" | "letterbox" (pad bottom/right) | "letterbox_center"
    lsj: bool = True
    jitter_min: float = 0.3
    jitter_max: float = 1.4
    flip_prob: float = 0.0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    max_tokens: int = 20
    tokenizer: str = ""
    train_split: str = "train"
    val_splits: list[str] = field(default_factory=lambda: ["val"])  # validated during training (best.pth)
    test_splits: list[str] = field(default_factory=list)  # never during training; simvg eval --split all adds them
    data_sources: list[str] = field(default_factory=list)
    train_kinds: list[str] = field(default_factory=list)
    skip_bad: bool = False
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"data.resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if not 0 < self.jitter_min <= self.jitter_max:
            raise UserError(f"data.jitter_min/jitter_max {self.jitter_min}/{self.jitter_max} must be 0 < min <= max")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("data.mean and data.std must hold 3 values each, std > 0")


@dataclass
class LossConfig:
    """Loss weights. A branch weight of 0 switches its term off; ``token = distill = 0`` trains the decoder only.

    ``distill_mode``: "dynamic" (DWBD, w from the teacher), "fixed" (w = ``fixed_weight``), or "none" (token
    branch on ground truth only: w = 0 and no distillation term).
    """

    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    eos_coef: float = 0.1
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    decoder: float = 1.0
    token: float = 2.0
    distill: float = 1.0
    distill_mode: str = "dynamic"
    fixed_weight: float = 0.5


@dataclass
class ModelSection:
    """Which model to build and which weights to start from.

    ``preset`` names an entry of ``simvg.models.MODEL_PRESETS``; ``overrides`` replaces fields of its
    ``SimVGConfig`` (nested dicts for nested dataclasses, e.g. ``{"encoder": {"drop_path_rate": 0.0}}``).
    ``pretrained`` is a BEiT-3 checkpoint loaded into the encoder; ``init_from`` any model file ``simvg.artifact``
    reads (a run, a model folder, an official SimVG checkpoint) loaded into the whole model before training (stage 2,
    fine-tuning, the official pre-train -> fine-tune flow); ``init_use_ema`` takes its EMA
    weights instead of the raw ones (the official stage 2 ignores EMA, docs/design.md B15). ``init_reset`` lists key
    prefixes of the model that keep their fresh initialisation instead (e.g. ``tqg.query_embed`` to start a GREC
    model, 10 queries, from a REC one, 1 query); any other shape mismatch is an error.
    """

    preset: str = "simvg_b32"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    init_from: str | None = None
    init_use_ema: bool = False
    init_reset: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing. Defaults are the official ViT-B/32 one-stage recipe (section 4)."""

    output_dir: str = "runs/default"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    threads: int = 0  # CPU threads per process (0: torch's default; torchrun sets 1 per process)
    seed: int = 6666
    epochs: int = 30
    batch_size: int = 32  # per process (data.num_workers loader processes each)
    lr: float = 5e-4  # head; the encoder gets lr * encoder_lr_scale
    encoder_lr_scale: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    amsgrad: bool = True
    schedule_unit: Literal["epoch", "step"] = "epoch"  # what `warmup` and `milestones` count
    warmup: int = 3
    milestones: list[int] = field(default_factory=lambda: [25])
    gamma: float = 0.1
    clip_grad_norm: float = 0.15  # 0 disables clipping
    ema: bool = False
    ema_decay: float = 0.999
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # CUDA only; CPU runs in float32
    compile: bool = False
    max_steps: int = 0  # stop after this many optimisation steps in total (0: run every epoch)
    checkpoint_every_steps: int = 0  # also write last.pth every K steps (0: at the end of each epoch only)
    eval_every_epochs: int = 1
    eval_start_epoch: int = 0
    log_every_steps: int = 50
    deterministic: bool = False  # cuDNN/cuBLAS deterministic algorithms (slower)


@dataclass
class EvalConfig:
    """Validation during training and ``simvg eval`` defaults (metric definitions in ``simvg.engine.metrics``).

    The validation splits are ``data.val_splits``; their mean score selects ``best.pth``.
    """

    batch_size: int = 64
    branch: Literal["both", "token", "decoder"] = "both"
    iou_threshold: float = 0.5  # REC Acc@IoU
    score_threshold: float = SCORE_THRESHOLD  # GREC: keep boxes with score >= this
    match_threshold: float = 0.5  # GREC: greedy matching threshold
    match_metric: Literal["giou", "iou"] = "giou"  # GREC: the official evaluator uses GIoU
    max_samples: int = 0  # evaluate only the first N expressions of each split (0: all)


@dataclass
class Config:
    """A complete experiment."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's form (lists for tuples kept)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _convert_scalar(value, tp, where)


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; missing keys take defaults, unknown keys raise ``UserError``."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, str, numbers, None) fit for YAML and for ``torch.load(weights_only=True)``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


# ----------------------------------------------------------------------------------------------------------------
# files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value goes through ``yaml.safe_load``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: cannot parse value {raw!r} ({str(exc).splitlines()[0]})") from None
    return key.strip().split("."), value


def _check_override_path(path: list[str], text: str, schema: type) -> None:
    """Refuse an override whose key does not exist in the schema (values inside free-form dicts are allowed)."""
    cls: Any = schema
    for depth, name in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            if typing.get_origin(cls) is dict or cls is Any:
                return
            raise UserError(f"--set {text}: {'.'.join(path[:depth])} is not a section")
        hints = _hints(cls)
        if name not in hints:
            raise UserError(f"--set {text}: unknown key {'.'.join(path[: depth + 1])}")
        tp = hints[name]
        cls = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if _is_optional(tp) else tp


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type | None = None) -> dict[str, Any]:
    """Return a copy of the raw config dict with each ``key=value`` set (dotted keys into sections); a key that
    ``schema`` (default ``Config``) does not have is a ``UserError``."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        _check_override_path(path, text, schema or Config)
        node = data
        for name in path[:-1]:
            child = node.get(name)
            if not isinstance(child, dict):
                child = node[name] = {}
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of sections")
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    """Validate a raw dict (e.g. the one stored in a checkpoint) plus overrides into a ``Config``."""
    try:
        cfg = from_dict(Config, apply_overrides(data, list(overrides or [])), where="")
        model_settings(cfg.model)
        return cfg
    except UserError as exc:
        raise UserError(f"{source}: {str(exc).lstrip('.')}") from None


def model_settings(section: ModelSection) -> SimVGConfig:
    """The ``SimVGConfig`` that ``section`` describes: its preset with the overrides applied by
    ``simvg.models.model_config`` (the one place that resolves them: plain fields by name, ``encoder`` as a dict
    merged into the preset's or as a BEiT-3 preset name, dotted ``encoder.<field>`` keys), each value type-checked
    here first (``UserError`` naming the key, e.g. ``model.overrides.encoder.depth``)."""
    if section.preset not in MODEL_PRESETS:
        raise UserError(f"model.preset: unknown preset {section.preset!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
    return model_config(section.preset, **_typed_overrides(section.overrides))


def _typed_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``model.overrides`` with every value checked against its field's annotation (and converted: ``1`` for a
    float field becomes ``1.0``); the keys stay as they are for ``model_config``."""
    model, encoder = _hints(SimVGConfig), _hints(BEiT3Config)
    typed: dict[str, Any] = {}
    for key, value in overrides.items():
        where = f"model.overrides.{key}"
        head, _, name = key.partition(".")
        if name and head == "encoder":
            typed[key] = _field_value(encoder, name, value, where)
        elif key == "encoder" and isinstance(value, dict):
            typed[key] = {k: _field_value(encoder, k, v, f"{where}.{k}") for k, v in value.items()}
        elif key == "encoder" and isinstance(value, str):
            typed[key] = value  # a BEiT-3 preset name, which model_config checks
        else:
            typed[key] = _field_value(model, key, value, where)
    return typed


def _field_value(hints: dict[str, Any], name: str, value: Any, where: str) -> Any:
    if name not in hints:
        raise UserError(f"{where}: unknown key (valid keys: {', '.join(sorted(hints))})")
    return _convert(value, hints[name], where)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (what a resumed run reports)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file and apply ``--set`` overrides; errors name the file and the key."""
    return config_from_dict(read_yaml(path), overrides, source=str(path))


class _Dumper(yaml.SafeDumper):
    """Block-style sections with one-line lists, so a config file reads like a table."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def dump_config(cfg: Config | dict[str, Any]) -> str:
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
