"""Runners for inference: a loaded model (``simvg.artifact``) or an exported ONNX graph, behind one call, plus the
image and text input helpers ``Grounder`` uses.

``load_bundle`` reads every kind of model file through ``simvg.artifact.load_artifact``; an ``.onnx`` file is read
with the ``model.yaml`` and ``tokenizer.spm`` that ``simvg export onnx`` writes beside it, and answers with the
branch it holds. Every failure a user can cause is a ``UserError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor

from simvg import artifact
from simvg.data.image_io import load_image, to_rgb
from simvg.data.tokenizer import UNK_ID, BEiT3Tokenizer
from simvg.errors import UserError
from simvg.models.beit3 import compile_for_inference
from simvg.models.quantize import check_precision, set_threads

# (images [B,3,S,S], text_ids [B,L], text_pad_mask [B,L], branch) -> (logits [B,Q,2], boxes [B,Q,4]) on CPU.
# A runner may also offer ``run`` (``RunOutput`` of several branches from one forward pass, optionally with the
# attention maps) and ``branches`` (those it can run); ``run_branches`` uses them when present.
Runner = Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]]


@dataclass
class RunOutput:
    """One forward pass: per branch run (logits [B,Q,2], boxes [B,Q,4] cxcywh) on CPU, and on request the
    attention ``SimVG.capture_attention`` records ("token" [B,N], "token_patch_share" [B], "decoder" [B,Q,N],
    "grid" (h, w)), else None."""

    outputs: dict[str, tuple[Tensor, Tensor]]
    attention: dict[str, Any] | None = None


@dataclass
class Bundle:
    """Everything ``Grounder`` needs: a runner, the tokenizer, the model's spec, where it came from, the branch."""

    runner: Runner
    tokenizer: Any
    spec: artifact.ModelSpec
    source: Path
    branch: str
    notices: list[str]


class TorchRunner:
    """Runs the PyTorch model, only the requested branch, in inference mode; ``compile``: under ``torch.compile``
    with freezing (``simvg.models.beit3.compile_for_inference``)."""

    branches = ("token", "decoder")

    def __init__(self, model: torch.nn.Module, device: torch.device, compile: bool = False) -> None:
        self.model = model.eval().to(device)
        self.eager = self.model  # attention capture hooks into the eager modules (a compiled graph has none)
        if compile:
            self.model = compile_for_inference(self.model)
        # Inductor's freezing applies under no_grad; eager runs take inference_mode (a little leaner)
        self.grad_off = torch.no_grad if compile else torch.inference_mode
        self.device = device

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor, branch: str) -> tuple[Tensor, Tensor]:
        return self.run(images, ids, mask, (branch,)).outputs[branch]

    def run(
        self, images: Tensor, ids: Tensor, mask: Tensor, branches: tuple[str, ...], attention: bool = False
    ) -> RunOutput:
        """``branches`` ("token", "decoder" or both) from one forward pass; ``attention``: also what
        ``SimVG.capture_attention`` records (run eagerly; the outputs are the same as without it)."""
        branch = branches[0] if len(set(branches)) == 1 else "both"
        inputs = (images.to(self.device), ids.to(self.device), mask.to(self.device))
        maps = None
        with self.grad_off():
            if attention:
                with self.eager.capture_attention() as store:
                    out = self.eager(*inputs, branch=branch)
                maps = {k: v.float().cpu() if isinstance(v, Tensor) else v for k, v in store.items()}
            else:
                out = self.model(*inputs, branch=branch)
        outputs = {b: (out[b]["pred_logits"].float().cpu(), out[b]["pred_boxes"].float().cpu()) for b in branches}
        return RunOutput(outputs, maps)


class OnnxRunner:
    """Runs an exported branch on ONNX Runtime (CPU, or CUDA when asked for and available)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort  # deferred: an optional extra ([export]), needed by ONNX files only
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
        self.precision = meta.get("precision", "fp32")  # "int8": written by 'simvg export onnx --int8'
        self.path = path

    @property
    def branches(self) -> tuple[str, ...]:
        return (self.branch,)

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor, branch: str) -> tuple[Tensor, Tensor]:
        if branch != self.branch:
            raise UserError(f"{self.path} holds the {self.branch} branch only; export the {branch} branch too")
        feeds = {"image": images.float().numpy(), "text_ids": ids.long().numpy(), "text_pad_mask": mask.numpy()}
        logits, boxes = self.session.run(["logits", "boxes"], feeds)
        return torch.from_numpy(logits), torch.from_numpy(boxes)

    def run(
        self, images: Tensor, ids: Tensor, mask: Tensor, branches: tuple[str, ...], attention: bool = False
    ) -> RunOutput:
        """The one exported branch (``branches`` must name only it); an exported graph records no attention."""
        if attention:
            raise UserError(f"{self.path}: attention maps need the PyTorch model, not an exported ONNX graph")
        return RunOutput({b: self(images, ids, mask, b) for b in dict.fromkeys(branches)})


def runnable_branches(runner: Runner) -> tuple[str, ...]:
    """The branches ``runner`` can run: its ``branches`` attribute, else (a plain callable) both."""
    return tuple(getattr(runner, "branches", ("token", "decoder")))


def run_branches(
    runner: Runner, images: Tensor, ids: Tensor, mask: Tensor, branches: tuple[str, ...], attention: bool = False
) -> RunOutput:
    """``branches`` through ``runner``: one forward pass for runners with ``run``; a plain callable is called once
    per branch and records no attention."""
    if hasattr(runner, "run"):
        return runner.run(images, ids, mask, branches, attention)
    if attention:
        raise UserError("attention maps need the PyTorch model runner")
    return RunOutput({b: runner(images, ids, mask, b) for b in dict.fromkeys(branches)})


def open_rgb(image: str | Path | bytes | Image.Image, max_pixels: int) -> Image.Image:
    """A path, encoded bytes or PIL image -> 8-bit RGB, EXIF-rotated, at most ``max_pixels`` pixels."""
    if not isinstance(image, Image.Image):
        return load_image(image, max_pixels=max_pixels)
    if image.width * image.height > max_pixels:
        raise UserError(f"<image>: {image.width}x{image.height} pixels is over the limit of {max_pixels}")
    return to_rgb(ImageOps.exif_transpose(image))


def tokenize(tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """ids [B, L], pad mask [B, L] and per text {num_tokens, truncated, warnings}; tokenizer errors are UserErrors."""
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


def load_bundle(
    path: str | Path | None,
    device: str | torch.device = "cpu",
    branch: str | None = None,
    backend: str = "torch",
    tokenizer: str | Path | None = None,
    weights: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    compile: bool = False,
) -> Bundle:
    """Load the model at ``path`` for ``backend`` "torch" or "onnx"; ``branch=None`` takes the model's default (an
    ONNX file's own branch).

    ``precision``: "int8" quantises a PyTorch model (``simvg.models.quantize``; CPU only) or asks for an ONNX
    graph exported with ``--int8``; "fp32" the model as stored; None: fp32 for PyTorch, an ONNX graph as exported.
    ``threads``: intra-op threads of torch and ONNX Runtime (None: torch's current setting). ``compile``: run an fp32
    PyTorch model under ``torch.compile`` with freezing (slow first call per input shape, then faster).
    """
    if backend not in ("torch", "onnx"):
        raise UserError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    if branch is not None and branch not in artifact.BRANCHES:
        raise UserError(f"branch must be one of {', '.join(artifact.BRANCHES)}, got {branch!r}")
    set_threads(threads)
    source = artifact.resolve(path)
    onnx = source.suffix == ".onnx" or backend == "onnx"
    if compile and (onnx or precision == "int8"):
        raise UserError("--compile applies to fp32 PyTorch models only (not to ONNX graphs or --precision int8)")
    if onnx:
        source = source if source.is_file() else source / "model.onnx"
        if precision is not None:
            check_precision(precision, device)
        runner: Any = OnnxRunner(source, artifact.torch_device(device))
        if branch is not None and runner.branch != branch:
            raise UserError(f"{source} holds the {runner.branch} branch; ask for branch={runner.branch!r}")
        if precision is not None and precision != runner.precision:
            how = "export one with 'simvg export onnx --int8'" if precision == "int8" else "drop --precision"
            raise UserError(f"{source}: an {runner.precision} ONNX graph, not {precision}; {how}, or run the PyTorch "
                            f"model with --precision {precision}")  # fmt: skip
        spec = artifact.read_spec(source.parent)
        tok = Path(tokenizer) if tokenizer is not None else source.parent / (spec.tokenizer or artifact.TOKENIZER_FILE)
        if not tok.is_file():
            raise UserError(f"{tok}: tokenizer not found (pass --tokenizer SPM)")
        artifact.check_tokenizer(tok, spec)
        chosen, notices = runner.branch, []
    else:
        loaded = artifact.load_artifact(source, weights=weights, device=device, tokenizer=tokenizer,
                                        need_tokenizer=True, precision=precision)  # fmt: skip
        runner = TorchRunner(loaded.model, artifact.torch_device(device), compile=compile)
        spec, tok, notices, chosen = loaded.spec, loaded.tokenizer, loaded.notices, branch or loaded.spec.branch
    return Bundle(runner, BEiT3Tokenizer(tok, max_len=spec.preprocess.max_tokens), spec, source, chosen, notices)
