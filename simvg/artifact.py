"""The model artifact: every kind of SimVG weights file read through one door, one model-folder format, and the one
post-processing of a branch's outputs.

``load_model(path)`` / ``load_artifact(path)`` take any of:

- a **model folder**: ``model.safetensors`` (weights), ``model.yaml`` (``ModelSpec``: architecture, preprocessing,
  task, tokenizer file, default branch, provenance) and ``tokenizer.spm``. ``save_folder`` writes it, with a sha256
  of the tensors in the weights' metadata that loading checks (folders without one load too); the embedded
  defaults in ``simvg/assets`` are such folders. A folder of an older release (``config.yaml``, a whole training
  config) still loads;
- a **run folder** (``simvg train --output``): its ``best.pth``, else ``last.pth``;
- a **training checkpoint** ``.pth`` written by ``simvg train`` (its config inside);
- a ``.safetensors`` file (with ``model.yaml`` beside it, or holding official names);
- an **official SimVG file**: the dict the authors' ``save_checkpoint`` writes (``state_dict``, optional
  ``ema_state_dict``, optional DDP ``module.`` prefixes) or a bare official state dict. Names are mapped strictly
  (``simvg.models.official``), the architecture is read off the tensor shapes, the text pooling and positions are
  the authors' (bugs B1, B2), and the EMA weights are used when present (the authors evaluate the EMA shadow).

``weights`` picks "ema" or "raw" weights of a file that holds both ("auto": EMA when present). Every failure a user
can cause is a ``UserError`` naming the file. Nothing here knows the training config's schema beyond the model
section and a handful of data fields, so renaming a training option never breaks a model folder.

A training run's model comes from here too: ``build_model`` (the ``model`` section's architecture, BEiT-3 weights,
then ``init_from`` through ``init_weights``: any file this module reads, partially and checked).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from simvg.config import SCORE_THRESHOLD, DataConfig, ModelSection, from_dict, model_settings
from simvg.data.datasets import tokenizer_path
from simvg.data.tokenizer import BEiT3Tokenizer, check_vocab
from simvg.errors import UserError
from simvg.models import SimVG, SimVGConfig
from simvg.models.beit3 import VISION_POS_KEY, is_square_grid, load_beit3_pretrained, resample_vision_positions
from simvg.models.official import infer_config, is_official_state, official_to_ours
from simvg.models.quantize import build_int8, check_precision
from simvg.utils.checkpoint import (
    atomic_write_bytes,
    clean_state_dict,
    content_hash,
    load_checkpoint,
    load_model_state,
)

FORMAT = "simvg-model/1"
WEIGHTS_FILE, SPEC_FILE, TOKENIZER_FILE = "model.safetensors", "model.yaml", "tokenizer.spm"
LEGACY_CONFIG_FILE = "config.yaml"  # model folders of the first releases held the whole training config
RUN_CHECKPOINTS = ("best.pth", "last.pth")
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODELS = {"rec": ASSETS / "default", "grec": ASSETS / "default_grec"}
WEIGHT_CHOICES = ("auto", "ema", "raw")
BRANCHES = ("token", "decoder")
TASKS = ("rec", "grec")
SYNTHREF_PROVENANCE = "SynthRef synthetic shapes only (coloured shapes on plain or textured backgrounds)"
OFFICIAL_PROVENANCE = (
    "the authors' released SimVG weights ({name}): trained on real photographs (RefCOCO/+/g, ReferIt, Flickr30K or "
    "gRefCOCO; the file does not say which)"
)
log = logging.getLogger("simvg")


@dataclass
class Preprocess:
    """How an image and an expression become the model's input (the test-time pipeline)."""

    image_size: int = 640
    resize_mode: str = "stretch"  # "stretch" | "letterbox" | "letterbox_center" (simvg.data.transforms)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    max_tokens: int = 20


@dataclass
class ModelSpec:
    """Everything about a model except its weights: what ``model.yaml`` holds."""

    architecture: SimVGConfig
    preprocess: Preprocess = field(default_factory=Preprocess)
    branch: str = "decoder"  # the branch that answers by default ("token" = SimVG-TB, "decoder" = SimVG-DB)
    tokenizer: str = TOKENIZER_FILE  # file name inside the folder; "" when the model comes without one
    trained_on: str = "not recorded"  # provenance: what the weights have seen
    weights: str = "raw"  # "ema" or "raw": which weights of the source these are
    source: str = ""  # the file they came from

    @property
    def task(self) -> str:
        """ "rec" (one query: one box) or "grec" (several queries: zero, one or many boxes)."""
        return "rec" if self.architecture.num_queries == 1 else "grec"

    @property
    def synthetic_only(self) -> bool:
        return self.trained_on.startswith("SynthRef")


@dataclass
class Weights:
    """A state dict in our names, with its spec and tokenizer; what ``read_weights`` returns."""

    state: Mapping[str, Tensor]  # a dict, or ``LazyTensors`` when read with ``lazy=True``
    spec: ModelSpec
    tokenizer: Path | None  # the sentencepiece model that goes with the weights, when one is known
    path: Path  # the file the weights were read from
    kind: str  # "folder", "checkpoint", "safetensors" or "official"
    notices: list[str] = field(default_factory=list)


@dataclass
class Artifact:
    """A loaded model (eval mode) with everything needed to use it."""

    model: SimVG
    spec: ModelSpec
    tokenizer: Path | None
    path: Path
    kind: str
    notices: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# model.yaml


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """Plain dict of ``model.yaml`` (format tag first)."""
    return {"format": FORMAT, **dataclasses.asdict(spec)}


def spec_from_dict(data: Any, where: str) -> ModelSpec:
    """Parse ``model.yaml``'s content; a wrong field is a UserError naming ``where`` and the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{where}: not a simvg model spec (expected format: {FORMAT})")
    data = {k: v for k, v in data.items() if k != "format"}
    spec = from_dict(ModelSpec, data, where=where)
    if spec.branch not in BRANCHES:
        raise UserError(f"{where}: branch must be one of {', '.join(BRANCHES)}, got {spec.branch!r}")
    return spec


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable YAML ({str(exc).splitlines()[0][:200]})") from None


def read_spec(folder: Path) -> ModelSpec:
    """The spec of a model folder (or of the folder beside an ``.onnx`` or ``.safetensors``)."""
    if (folder / SPEC_FILE).is_file():
        return spec_from_dict(read_yaml(folder / SPEC_FILE), str(folder / SPEC_FILE))
    if (folder / LEGACY_CONFIG_FILE).is_file():
        config = read_yaml(folder / LEGACY_CONFIG_FILE)
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise UserError(f"{folder / LEGACY_CONFIG_FILE}: not a simvg config (no 'model' section)")
        return spec_from_training_config(config, str(folder / LEGACY_CONFIG_FILE), weights="raw")
    raise UserError(f"{folder}: not a model folder (no {SPEC_FILE})")


def spec_from_training_config(config: dict[str, Any], source: str, weights: str) -> ModelSpec:
    """The spec of a ``simvg train`` run from its stored config (only ``model`` and a few ``data`` fields are read)."""
    model = dict(config.get("model") or {})
    section = from_dict(ModelSection, model, where=f"{source}: model")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    defaults = Preprocess()
    preprocess = Preprocess(
        image_size=int(data.get("image_size", defaults.image_size)),
        resize_mode=str(data.get("resize_mode", defaults.resize_mode)),
        mean=[float(v) for v in data.get("mean", defaults.mean)],
        std=[float(v) for v in data.get("std", defaults.std)],
        max_tokens=int(data.get("max_tokens", defaults.max_tokens)),
    )
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    decoder_only = float(loss.get("token", 1.0)) == 0.0 and float(loss.get("distill", 1.0)) == 0.0
    return ModelSpec(
        architecture=model_settings(section),
        preprocess=preprocess,
        branch="decoder" if decoder_only or not loss else "token",
        trained_on=describe_training_data(data, section),
        weights=weights,
        source=source,
    )


def describe_training_data(data: dict[str, Any], section: Any) -> str:
    """One line of provenance from a run's data section (and its starting weights)."""
    dataset = str(data.get("dataset", "unknown"))
    text = SYNTHREF_PROVENANCE if dataset == "synthref" else f"{dataset} (data root {data.get('root', '?')})"
    if getattr(section, "pretrained", None):
        text += f"; encoder started from {Path(section.pretrained).name}"
    return text


# ----------------------------------------------------------------------------------------------------------------
# reading weights


def resolve(path: str | Path | None, task: str = "rec") -> Path:
    """The file or folder to read; None is the embedded default model of ``task``."""
    if path is None:
        folder = DEFAULT_MODELS[task]
        if not (folder / WEIGHTS_FILE).is_file():
            raise UserError(f"no embedded default model in {folder}; pass --checkpoint")
        return folder
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file():
        for name in RUN_CHECKPOINTS:  # a run folder
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: neither a model folder ({WEIGHTS_FILE}) nor a run folder (best.pth or last.pth)")
    return path


def read_safetensors(path: Path, lazy: bool = False) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; UserError for a missing, truncated or corrupt one.

    ``lazy``: the tensors come as a ``LazyTensors`` mapping that reads each one only when asked for (the header is
    checked now), so that a loader can hold one layer in memory at a time.
    """
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            if lazy:
                return LazyTensors(path, list(f.keys())), dict(f.metadata() or {})
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: unreadable weights ({str(exc).splitlines()[0][:200]})") from None


class LazyTensors(Mapping[str, Tensor]):
    """The tensors of a ``.safetensors`` file, each read (a fresh CPU tensor) when indexed, nothing cached.

    The file is opened per read and closed again, and each tensor is copied out of the file's memory map, so that
    no part of the map stays resident once the caller drops the tensor.
    """

    def __init__(self, path: Path, keys: list[str]) -> None:
        self.path, self._keys = path, list(keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                # a copy that owns its memory: the tensor safetensors returns keeps a map of the file alive
                return f.get_tensor(key).clone()
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{self.path}: unreadable weights ({str(exc).splitlines()[0][:200]})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _pick(weights: str, has_ema: bool, path: Path, ema_key: str) -> bool:
    """Whether to use the EMA weights."""
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if weights == "ema" and not has_ema:
        raise UserError(f"{path}: EMA weights asked for, but the file holds no EMA weights (no {ema_key!r})")
    return has_ema if weights == "auto" else weights == "ema"


def _official(state: dict[str, Any], path: Path, weights_kind: str, notices: list[str]) -> Weights:
    """Official names -> ours, the architecture inferred, a notice saying so."""
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if len(tensors) != len(state):
        raise UserError(f"{path}: the state dict holds non-tensor entries; not a SimVG checkpoint")
    try:
        ours = official_to_ours(tensors)
        arch = infer_config(ours, official=True)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    spec = ModelSpec(
        architecture=arch,
        preprocess=Preprocess(image_size=arch.encoder.img_size),
        branch="decoder",  # a decoder-only stage (pre-training, fine-tuning, two-stage 1) leaves TB untrained
        tokenizer="",
        trained_on=OFFICIAL_PROVENANCE.format(name=path.name),
        weights=weights_kind,
        source=str(path),
    )
    notices.append(
        f"{path.name}: official SimVG checkpoint ({arch.encoder.embed_dim}-d, {arch.encoder.depth} layers, "
        f"{arch.encoder.img_size} px, {arch.num_queries} quer{'y' if arch.num_queries == 1 else 'ies'}, "
        f"{weights_kind} weights); text_pool and text_pos set to 'official' (the authors' B1/B2 behaviour)"
    )
    return Weights(ours, spec, None, path, "official", notices)


def read_weights(path: str | Path | None, weights: str = "auto", task: str = "rec", lazy: bool = False) -> Weights:
    """Weights in our names plus their spec, from any kind of file this module knows (see the module docstring).

    ``lazy``: a model folder's or ``.safetensors`` file's tensors are read only when indexed (``LazyTensors``).
    """
    source = resolve(path, task)
    if source.is_dir() or source.suffix == ".safetensors":
        return _read_folder(source, lazy)
    obj = load_checkpoint(source)
    notices: list[str] = []
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict):  # ours, from simvg train
        use_ema = _pick(weights, bool(obj.get("ema")), source, "ema")
        state = clean_state_dict(obj["ema"]["module"] if use_ema else obj["model"])
        kind = "ema" if use_ema else "raw"
        try:
            spec = spec_from_training_config(obj["config"], str(source), weights=kind)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
        return Weights(state, spec, _run_tokenizer(source, obj["config"]), source, "checkpoint", notices)
    if isinstance(obj.get("state_dict"), dict):  # the authors' save_checkpoint layout
        use_ema = _pick(weights, isinstance(obj.get("ema_state_dict"), dict), source, "ema_state_dict")
        state = obj["ema_state_dict"] if use_ema else obj["state_dict"]
        if is_official_state(state):
            return _official(state, source, "ema" if use_ema else "raw", notices)
    elif is_official_state(obj):  # a bare official state dict
        if weights == "ema":
            raise UserError(f"{source}: EMA weights asked for, but a bare state dict holds no EMA weights")
        return _official(obj, source, "raw", notices)
    found = ", ".join(sorted(map(str, obj))[:8]) + (", ..." if len(obj) > 8 else "")
    raise UserError(
        f"{source}: not a SimVG checkpoint this version knows (top-level keys: {found}); expected a model folder, "
        "a 'simvg train' checkpoint (model, config) or an official SimVG file (state_dict of vis_enc.*/head.*)"
    )


def _read_folder(source: Path, lazy: bool = False) -> Weights:
    folder = source if source.is_dir() else source.parent
    weights_path = source if source.is_file() else source / WEIGHTS_FILE
    tensors, metadata = read_safetensors(weights_path, lazy)
    if is_official_state(tensors):
        return _official(tensors, weights_path, "raw", [])
    if metadata.get("format") != "simvg":
        raise UserError(f"{weights_path}: not a simvg model (its metadata lacks format=simvg)")
    if isinstance(tensors, dict) and "sha256" in metadata and content_hash(tensors) != metadata["sha256"]:
        raise UserError(f"{weights_path}: corrupt weights: their content does not match the sha256 stored with them "
                        "(the file changed after it was written); export or copy the model again")  # fmt: skip
    spec = read_spec(folder)
    tokenizer = folder / spec.tokenizer if spec.tokenizer else None
    if tokenizer is None and not (folder / SPEC_FILE).is_file():  # a legacy folder names the run's tokenizer
        tokenizer = _run_tokenizer(folder / LEGACY_CONFIG_FILE, read_yaml(folder / LEGACY_CONFIG_FILE))
    spec.weights = metadata.get("weights", spec.weights)
    return Weights(tensors, spec, tokenizer, weights_path, "folder")


def _run_tokenizer(source: Path, config: dict[str, Any]) -> Path | None:
    """``tokenizer.spm`` beside a checkpoint, else the one its run read (``data.tokenizer`` or ``data.root``)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    candidates = [source.parent / TOKENIZER_FILE]
    if data.get("tokenizer"):
        candidates.append(Path(data["tokenizer"]))
    if data.get("root"):
        candidates.append(Path(data["root"]) / TOKENIZER_FILE)
    return next((c for c in candidates if c.is_file()), None)


# ----------------------------------------------------------------------------------------------------------------
# building and loading


def build(spec: ModelSpec, state: dict[str, Tensor], source: str) -> SimVG:
    """The model of ``spec`` with ``state`` loaded strictly (every key, every shape), in eval mode on CPU."""
    model = SimVG(spec.architecture)
    load_model_state(model, state, strict=True, source=source)
    return model.eval()


def check_tokenizer(path: Path, spec: ModelSpec) -> None:
    """The tokenizer must exist and its ids must fit the model's text embedding table."""
    check_vocab(spec.architecture.encoder.vocab_size, BEiT3Tokenizer(path, max_len=spec.preprocess.max_tokens),
                "this tokenizer is not the model's (official models read BEiT-3's beit3.spm)")  # fmt: skip


def pick_tokenizer(read: Weights, tokenizer: str | Path | None, need: bool) -> Path | None:
    """``tokenizer`` (the user's) or the model's own, checked against the embedding table.

    With ``need``, a model without a usable tokenizer is a UserError saying to pass one; without it, a missing
    model-named file only means no tokenizer (``load_model`` reads weights alone).
    """
    tok = Path(tokenizer) if tokenizer is not None else read.tokenizer
    if tok is None or not tok.is_file():
        if tok is not None and (need or tokenizer is not None):
            raise UserError(f"{tok}: tokenizer not found")
        if need:
            hint = " (BEiT-3's beit3.spm for official SimVG files)" if read.kind == "official" else ""
            raise UserError(f"{read.path}: no tokenizer comes with this model; pass --tokenizer SPM{hint}")
        return None
    check_tokenizer(tok, read.spec)
    return tok


def load_artifact(
    path: str | Path | None = None,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
    need_tokenizer: bool = False,
    task: str = "rec",
    precision: str | None = None,
) -> Artifact:
    """Load any model file (see the module docstring) as an ``Artifact``; ``path=None`` is the embedded default.

    ``tokenizer`` replaces (or supplies, for official files) the model's sentencepiece file; with
    ``need_tokenizer`` a model without one is a UserError saying to pass it. ``precision`` "int8" quantises the
    Linear layers dynamically on the CPU (``simvg.models.quantize``), reading the weights one layer at a time;
    None or "fp32" loads them as they are.
    """
    precision = check_precision(precision, device)
    dev = torch_device(device)
    read = read_weights(path, weights, task, lazy=precision == "int8")
    tok = pick_tokenizer(read, tokenizer, need_tokenizer)
    if precision == "int8":
        model = build_int8(read.spec.architecture, read.state, read.path)
    else:
        model = build(read.spec, read.state, str(read.path)).to(dev)
    for notice in read.notices:
        log.info("%s", notice)
    return Artifact(model, read.spec, tok, read.path, read.kind, read.notices)


def load_model(path: str | Path | None, weights: str = "auto", device: str | torch.device = "cpu") -> SimVG:
    """The SimVG model (eval mode) in any file this module reads: model or run folder, training checkpoint,
    ``.safetensors``, or an official SimVG checkpoint (EMA and DDP prefixes included)."""
    return load_artifact(path, weights=weights, device=device).model


def torch_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return dev


# ----------------------------------------------------------------------------------------------------------------
# the starting weights of a training run


def build_model(
    section: ModelSection, data: DataConfig, with_weights: bool = True, allow_pickle: bool = False
) -> SimVG:
    """The model of a run's ``model`` section (on CPU); with ``with_weights`` also its starting weights: BEiT-3's
    (``pretrained``), then a whole model's (``init_from``, through ``init_weights``; ``data`` is the run's, for the
    tokenizer check). ``allow_pickle`` lets a BEiT-3 file that needs full unpickling load (``simvg train
    --allow-pickle``; trusted files only)."""
    model = SimVG(model_settings(section))
    if not with_weights:
        return model
    if section.pretrained:
        loaded = load_beit3_pretrained(model.encoder, section.pretrained, allow_pickle=allow_pickle)
        log.info("BEiT-3 weights from %s: %s", section.pretrained, loaded)
    if section.init_from:
        init_weights(model, section.init_from, section.init_use_ema, data, section.init_reset)
    return model


def tokenizer_mismatch(source: Path | None, data: DataConfig) -> str | None:
    """``source`` (the tokenizer a checkpoint's run read) when it is a file that differs from ``data``'s, else None.

    Every SynthRef folder trains its own tokenizer, so a stage that moves to another folder must keep the first
    stage's (``data.tokenizer``); otherwise word ids change and the learned text embeddings mean nothing.
    """
    ours = tokenizer_path(data)
    if source is None or not (source.is_file() and ours.is_file()) or source.resolve() == ours.resolve():
        return None
    return None if source.read_bytes() == ours.read_bytes() else str(source)


def init_weights(
    model: nn.Module, path: str, use_ema: bool, data: DataConfig | None = None, reset: Sequence[str] = ()
) -> None:
    """Stage 2 / fine-tuning start: a checked partial load of any model file this module reads (a run's
    checkpoint, a model folder, an official SimVG file: the authors' pre-train -> fine-tune flow); missing keys are
    reported.

    With ``data``, a warning names the checkpoint's tokenizer when this run reads a different one. Keys starting
    with a prefix in ``reset`` are not loaded (they keep this model's initialisation); a prefix that matches no
    key of the model is an error, so that a typo cannot silently load everything.
    """
    read = read_weights(path, weights="ema" if use_ema else "raw")
    for notice in read.notices:
        log.info("init_from %s", notice)
    other = tokenizer_mismatch(read.tokenizer, data) if data is not None else None
    if other:
        log.warning(
            "init_from %s was trained with tokenizer %s, this run reads %s (other word ids): set data.tokenizer=%s",
            path, other, tokenizer_path(data), other,
        )  # fmt: skip
    state, dropped = without_prefixes(read.state, model, reset)
    state = with_image_size(state, model, path)
    hint = " (to start it fresh instead: --set model.init_reset=[{key}])"
    missing, unexpected = load_model_state(model, state, strict=False, source=path, mismatch_hint=hint)
    if len(missing) == len(model.state_dict()):
        raise UserError(f"{path}: no key of this checkpoint matches the model (is it a simvg checkpoint?)")
    log.info("initialised from %s (%s weights): %d keys loaded", path, read.spec.weights, len(state) - len(unexpected))
    if dropped:
        log.info("init_from %s: %d keys keep their fresh initialisation (model.init_reset): %s", path, len(dropped),
                 ", ".join(dropped[:10]))  # fmt: skip
    missing = sorted(set(missing) - set(dropped))
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            log.warning("init_from %s: %d %s keys: %s", path, len(keys), label, ", ".join(keys[:10]))


def with_image_size(state: Mapping[str, Tensor], model: nn.Module, path: str) -> dict[str, Tensor]:
    """``state`` with its vision position table [3 + s*s, D] resampled (bicubic, as the BEiT-3 loader does) to the
    model's grid when the two image sizes differ: a stage may fine-tune at another resolution than the run it starts
    from (e.g. 64 px, then 128 px). Any other shape mismatch stays an error of ``load_model_state``."""
    state = dict(state)
    key = f"encoder.{VISION_POS_KEY}"
    own = model.state_dict().get(key)
    value = state.get(key)
    if own is None or value is None or value.shape == own.shape:
        return state
    if value.dim() == 2 and value.shape[1] == own.shape[1] and is_square_grid(value.shape[0], own.shape[0]):
        state[key] = resample_vision_positions(value, own.shape[0]).to(own.dtype)
        log.info("init_from %s: resized %s %s -> %s (another image size)", path, key, list(value.shape),
                 list(own.shape))  # fmt: skip
    return state


def without_prefixes(
    state: Mapping[str, Tensor], model: nn.Module, prefixes: Sequence[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """(``state`` without the keys under ``prefixes``, the model's keys under them); ``UserError`` for a prefix
    that names no key of the model."""
    own = list(model.state_dict())
    for prefix in prefixes:
        if not any(_under(key, prefix) for key in own):
            raise UserError(f"model.init_reset: {prefix!r} names no weight of this model (e.g. tqg.query_embed)")
    dropped = [key for key in own if any(_under(key, p) for p in prefixes)]
    kept = {key: value for key, value in state.items() if not any(_under(key, p) for p in prefixes)}
    return kept, dropped


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix.rstrip(".") + ".")


# ----------------------------------------------------------------------------------------------------------------
# writing a model folder


def save_folder(
    out: str | Path, state: dict[str, Tensor], spec: ModelSpec, tokenizer: Path | None, half: bool = False
) -> Path:
    """Write ``out/model.safetensors`` (fp16 with ``half``), ``out/model.yaml`` and ``out/tokenizer.spm``, each
    atomically; returns the weights' path. Loading casts fp16 weights back to the model's dtype."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # safetensors refuses shared or non-contiguous storage; a contiguous copy of each tensor is always valid.
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        if half:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        spec = dataclasses.replace(spec, tokenizer=TOKENIZER_FILE if tokenizer is not None else "")
        metadata = {"format": "simvg", "version": "1", "weights": spec.weights, "sha256": content_hash(tensors)}
        if tokenizer is not None and tokenizer.resolve() != (out / TOKENIZER_FILE).resolve():
            atomic_write_bytes(tokenizer.read_bytes(), out / TOKENIZER_FILE)
        atomic_write_bytes(save(tensors, metadata=metadata), out / WEIGHTS_FILE)
        text = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
        atomic_write_bytes(text.encode("utf-8"), out / SPEC_FILE)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the model folder ({exc.strerror or exc})") from None
    return out / WEIGHTS_FILE


def export_folder(
    path: str | Path, out: str | Path, weights: str = "auto", half: bool = False, tokenizer: str | Path | None = None
) -> tuple[Path, Weights]:
    """Any model file as a model folder (what ``simvg export weights`` does); returns (weights path, what was read).

    The folder's spec keeps the source's provenance; a model without a tokenizer needs ``tokenizer``.
    """
    read = read_weights(path, weights)
    tok = pick_tokenizer(read, tokenizer, need=True)
    build(read.spec, read.state, str(read.path))  # refuse to write a folder that would not load
    return save_folder(out, read.state, read.spec, tok, half=half), read


# ----------------------------------------------------------------------------------------------------------------
# post-processing


@dataclass
class Detections:
    """One sample's post-processed branch output: what a user sees (kept queries, best first) and every query."""

    keep: Tensor  # [K] long, indices of the reported queries, best first
    scores: Tensor  # [Q] object probability of every query
    boxes: Tensor  # [Q, 4] normalised cxcywh of every query (the network input's frame)

    @property
    def kept_scores(self) -> Tensor:
        return self.scores[self.keep]

    @property
    def kept_boxes(self) -> Tensor:
        return self.boxes[self.keep]


def object_scores(logits: Tensor) -> Tensor:
    """[..., 2] logits -> [...] object probability (index 0 = object, index 1 = no object)."""
    return logits.float().softmax(-1)[..., 0]


def postprocess(logits: Tensor, boxes: Tensor, score_threshold: float = SCORE_THRESHOLD) -> list[Detections]:
    """A branch's outputs -> per sample the queries to report (the official ``head.inference`` and selection).

    Args:
        logits: [B, Q, 2] class logits; boxes: [B, Q, 4] normalised cxcywh.
        score_threshold: GREC only (Q > 1): keep every query whose object probability is >= this, best first,
            possibly none ("no target"). REC (Q == 1) reports its one query whatever its score. NaN is never kept.

    Returns:
        One ``Detections`` per sample; ``simvg.data.transforms.boxes_to_original(d.kept_boxes, meta)`` gives xyxy
        pixels of the original image.
    """
    scores = object_scores(logits)  # [B, Q]
    out = []
    for s, b in zip(scores, boxes.float()):
        if s.numel() == 1:
            keep = torch.zeros(1, dtype=torch.long)
        else:
            keep = torch.nonzero(s >= score_threshold).flatten()
            keep = keep[s[keep].argsort(descending=True, stable=True)]
        out.append(Detections(keep, s, b))
    return out


__all__ = [
    "Artifact",
    "Detections",
    "ModelSpec",
    "Preprocess",
    "SCORE_THRESHOLD",
    "Weights",
    "build_model",
    "export_folder",
    "init_weights",
    "load_artifact",
    "load_model",
    "postprocess",
    "read_weights",
    "save_folder",
]
