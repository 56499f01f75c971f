"""Loading a model for inference: the embedded default, exported folders, training checkpoints and ONNX files.

A *model folder* holds ``model.safetensors`` (weights), ``config.yaml`` (the training config as a plain dict) and
``tokenizer.spm``; ``simvg.utils.checkpoint.export_weights`` writes the first two. An ONNX export keeps the same
``config.yaml`` and ``tokenizer.spm`` beside the ``.onnx`` file. A training checkpoint ``.pth`` carries its config
inside; its tokenizer is found beside it or at the path its config names.

Every failure a user can cause (missing file, someone else's checkpoint, corrupt bytes, a config that does not
match the weights) is a ``UserError`` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image, ImageOps
from torch import Tensor

from simvg.errors import UserError

# (images [B,3,S,S], text_ids [B,L], text_pad_mask [B,L], branch) -> (logits [B,Q,2], boxes [B,Q,4]) on CPU
Runner = Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]]
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "default"
DEFAULT_GREC_MODEL = ASSETS / "default_grec"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.spm"


@dataclass
class Bundle:
    """Everything ``Grounder`` needs: a runner, the tokenizer, the preprocessing config and where it came from."""

    runner: Runner
    tokenizer: Any
    data_cfg: Any
    source: Path
    config: dict[str, Any]


class TorchRunner:
    """Runs the PyTorch model, only the requested branch, in inference mode."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.device = device

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor, branch: str) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            out = self.model(images.to(self.device), ids.to(self.device), mask.to(self.device), branch=branch)
        return out[branch]["pred_logits"].float().cpu(), out[branch]["pred_boxes"].float().cpu()


class OnnxRunner:
    """Runs an exported branch on ONNX Runtime (CPU, or CUDA when asked for and available)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the ONNX backend needs onnxruntime: pip install 'simvg[export]'") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one knob (torch.set_num_threads) for both backends
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own (non-exported) exception classes for bad files
            raise UserError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("simvg_format") != "1":
            raise UserError(f"{path}: not an ONNX model exported by 'simvg export onnx'")
        self.branch = meta["branch"]
        self.path = path

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor, branch: str) -> tuple[Tensor, Tensor]:
        if branch != self.branch:
            raise UserError(f"{self.path} holds the {self.branch} branch only; export the {branch} branch too")
        feeds = {"image": images.float().numpy(), "text_ids": ids.long().numpy(), "text_pad_mask": mask.numpy()}
        logits, boxes = self.session.run(["logits", "boxes"], feeds)
        return torch.from_numpy(logits), torch.from_numpy(boxes)


def resolve(path: str | Path | None) -> Path:
    """The file or folder to load; None is the embedded default."""
    if path is None:
        if not (DEFAULT_MODEL / WEIGHTS).is_file():
            raise UserError(f"no embedded default model in {DEFAULT_MODEL}; pass --checkpoint (folder, .pth or .onnx)")
        return DEFAULT_MODEL
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    return path


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.yaml`` as a dict; UserError when missing or not a mapping."""
    if not path.is_file():
        raise UserError(f"{path}: missing (a model needs its config.yaml beside the weights)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a simvg config (no 'model' section)")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Weights from a ``.safetensors`` file; UserError for a missing, corrupt or foreign file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{path}: missing (a model folder needs {WEIGHTS})")
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != "simvg":
                raise UserError(f"{path}: not a simvg model (its metadata lacks format=simvg)")
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable weights ({str(exc).splitlines()[0][:200]})") from None


def read_training_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state, config) from a ``simvg train`` checkpoint; the EMA weights when it has them."""
    from simvg.utils.checkpoint import load_checkpoint, model_state_from

    with warnings.catch_warnings():
        # A plain pickle (not torch's zip format) makes torch warn about its protocol before refusing it.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        obj = load_checkpoint(path)
    if not isinstance(obj.get("model"), dict) or not isinstance(obj.get("config"), dict):
        raise UserError(f"{path}: not a simvg checkpoint (expected 'model' and 'config' entries)")
    if not isinstance(obj["config"].get("model"), dict):
        raise UserError(f"{path}: not a simvg checkpoint (its config has no 'model' section)")
    return model_state_from(obj, use_ema=bool(obj.get("ema"))), obj["config"]


def open_rgb(image: str | Path | bytes | Image.Image, max_pixels: int) -> Image.Image:
    """A path, encoded bytes or PIL image -> 8-bit RGB, EXIF-rotated, at most ``max_pixels`` pixels."""
    from simvg.data.image_io import load_image, to_rgb

    if not isinstance(image, Image.Image):
        return load_image(image, max_pixels=max_pixels)
    if image.width * image.height > max_pixels:
        raise UserError(f"<image>: {image.width}x{image.height} pixels is over the limit of {max_pixels}")
    return to_rgb(ImageOps.exif_transpose(image))


def preprocess_image(image: Image.Image, data_cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """RGB image -> (tensor [3, S, S], meta with size / orig_size / input_to_orig), exactly as at test time."""
    from simvg.data.transforms import preprocess

    return preprocess(image, data_cfg)


def tokenize(tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """ids [B, L], pad mask [B, L] and per text {num_tokens, truncated, warnings}; tokenizer errors are UserErrors."""
    from simvg.data.tokenizer import UNK_ID

    infos = []
    try:
        for text in texts:
            pieces = tokenizer.piece_ids(text)
            room = tokenizer.max_len - 2  # <s> and </s> take two positions
            notes = []
            if len(pieces) > room:
                notes.append(f"expression cut to its first {room} of {len(pieces)} pieces (the model reads "
                                f"{tokenizer.max_len} tokens)")  # fmt: skip
            unknown = sum(p == UNK_ID for p in pieces)
            if unknown:
                notes.append(f"{unknown} of {len(pieces)} pieces are unknown to the tokenizer")
            infos.append({"num_tokens": min(len(pieces), room) + 2, "truncated": len(pieces) > room,
                          "warnings": notes})  # fmt: skip
        ids, mask = tokenizer(list(texts))
    except (RuntimeError, UnicodeError) as exc:
        raise UserError(f"text cannot be tokenized ({str(exc).splitlines()[0][:200]})") from None
    return ids, mask, infos


def _find_tokenizer(folder: Path, config: Any) -> Path:
    """``tokenizer.spm`` beside the weights, else the path the training config names."""
    candidates = [folder / TOKENIZER]
    if config.data.tokenizer:
        candidates.append(Path(config.data.tokenizer))
    candidates.append(Path(config.data.root) / TOKENIZER)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{folder / TOKENIZER}: tokenizer not found (also looked at {', '.join(map(str, candidates[1:]))})")


def _build_model(config: Any, state: dict[str, Tensor], source: Path) -> torch.nn.Module:
    """The model the config describes, with ``state`` loaded strictly (a mismatch is a UserError)."""
    from simvg.config import model_settings
    from simvg.models import SimVG
    from simvg.utils.checkpoint import load_model_state

    # The same preset + overrides resolution as training (type-checked), so a run's config always rebuilds its model.
    model = SimVG(model_settings(config.model))
    load_model_state(model, state, strict=True, source=str(source))
    return model


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def load_bundle(path: str | Path | None, device: str | torch.device, branch: str, backend: str) -> Bundle:
    """Load the model at ``path`` (see the module docstring) for ``backend`` "torch" or "onnx"."""
    from simvg.config import config_from_dict
    from simvg.data.tokenizer import BEiT3Tokenizer

    if backend not in ("torch", "onnx"):
        raise UserError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    source, dev = resolve(path), _device(device)
    if source.suffix == ".onnx" or backend == "onnx":
        source = source if source.is_file() else source / "model.onnx"
        folder, state = source.parent, None
        raw = read_config(folder / CONFIG)
    elif source.is_dir() or source.suffix == ".safetensors":
        folder = source if source.is_dir() else source.parent
        raw = read_config(folder / CONFIG)
        state = read_safetensors(source if source.is_file() else source / WEIGHTS)
    else:
        folder = source.parent
        state, raw = read_training_checkpoint(source)
    config = config_from_dict(raw, source=str(source))
    tokenizer = BEiT3Tokenizer(_find_tokenizer(folder, config), max_len=config.data.max_tokens)
    if state is None:
        runner: Runner = OnnxRunner(source, dev)
        if runner.branch != branch:
            raise UserError(f"{source} holds the {runner.branch} branch; ask for branch={runner.branch!r}")
    else:
        runner = TorchRunner(_build_model(config, state, source), dev)
    return Bundle(runner, tokenizer, config.data, source, raw)
