"""``simvg export onnx``: one branch of a model as an ONNX graph, runnable by ``Grounder(..., backend="onnx")``.

The graph takes ``image`` [B, 3, S, S] float (normalised as at test time), ``text_ids`` [B, L] int64 and
``text_pad_mask`` [B, L] bool (True = pad), with a dynamic batch B, and returns ``logits`` [B, Q, 2] and ``boxes``
[B, Q, 4] (cxcywh in [0, 1]) of the chosen branch only: the token branch graph contains no decoder at all (B14).
``model.yaml`` (the model's spec, naming the exported branch) and ``tokenizer.spm`` are written beside the file, so
the folder is self-contained, and the model's metadata records the branch. After export the graph is run once on
ONNX Runtime and compared with eager PyTorch (batch 3, a batch size the export never saw); a difference over 1e-4
is an error.

With ``--int8`` the verified fp32 graph is then quantised by ONNX Runtime's own dynamic quantisation
(``onnxruntime.quantization.quantize_dynamic``: int8 weights per output channel for every MatMul/Gemm with a constant
weight, activations quantised per call), the file's metadata records ``precision: int8``, and the int8 graph is run
on the same batch: its max difference from fp32 PyTorch is printed, and over ``INT8_TOLERANCE`` it is an error.

Every file is written atomically: the graph is built, checked (and quantised) in a temporary folder beside ``--out``
and only then renamed over it, so a failed export (a parity error, a crash, a full disk) leaves an earlier file at
``--out`` as it was; ``model.yaml`` and ``tokenizer.spm`` follow only after the graph is in place. A folder that
cannot be written is a one-line error naming the file.

We use the TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``, while the dynamo exporter would
add ``onnxscript`` as a dependency. ``onnx`` and ``onnxruntime`` are the optional extra ``simvg[export]``: they are
imported inside the functions that use them, so that ``simvg`` without the extra runs every other command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from simvg.artifact import SPEC_FILE, TOKENIZER_FILE, load_artifact, spec_to_dict
from simvg.data.tokenizer import BEiT3Tokenizer
from simvg.errors import UserError
from simvg.utils.checkpoint import atomic_write_bytes, write_error

OPSET = 17
TOLERANCE = 1e-4
# int8 graph vs fp32 PyTorch, on logits and normalised boxes: a sanity bound, far above what int8 costs a trained model
# (benchmarks/RESULTS.md, "int8 inference"); a broken quantisation (wrong scales, wrong op) lands far beyond it.
INT8_TOLERANCE = 0.25
INPUTS = ("image", "text_ids", "text_pad_mask")
OUTPUTS = ("logits", "boxes")


class BranchModel(nn.Module):
    """A SimVG model reduced to one branch with tensor outputs (what ONNX can express)."""

    def __init__(self, model: nn.Module, branch: str) -> None:
        super().__init__()
        self.model, self.branch = model, branch

    def forward(self, image: Tensor, text_ids: Tensor, text_pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B,3,S,S], [B,L], [B,L] -> logits [B,Q,2], boxes [B,Q,4]."""
        out = self.model(image, text_ids, text_pad_mask, branch=self.branch)[self.branch]
        return out["pred_logits"], out["pred_boxes"]


def example_inputs(tokenizer, image_size: int, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Random images [B,3,S,S] and the tokenized ``texts`` (B = len(texts)), seeded for reproducibility."""
    generator = torch.Generator().manual_seed(0)
    ids, mask = tokenizer(texts)
    return torch.randn(len(texts), 3, image_size, image_size, generator=generator), ids, mask


def _write_graph(module: BranchModel, inputs: tuple[Tensor, ...], out: Path) -> None:
    """Trace ``module`` to ``out`` with a dynamic batch axis and record the branch in the model's metadata."""
    import onnx  # deferred: the optional extra simvg[export] (module docstring)

    dynamic = {name: {0: "batch"} for name in INPUTS + OUTPUTS}
    with warnings.catch_warnings():
        # The legacy exporter announces its own deprecation; the dynamo one would need onnxscript (see docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing warns on the model's shape checks (fixed image size and text length); the parity check after
        # export, on a batch size the trace never saw, is what proves the graph right.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, inputs, str(out), dynamo=False, input_names=list(INPUTS), output_names=list(OUTPUTS),
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True,
        )  # fmt: skip
    graph = onnx.load(str(out))
    onnx.helper.set_model_props(graph, {"simvg_format": "1", "branch": module.branch})
    onnx.save(graph, str(out))


def quantize_graph(fp32: Path, out: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of the graph at ``fp32`` into ``out`` (metadata kept, plus
    ``precision: int8``)."""
    # deferred: the optional extra simvg[export] (module docstring)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, _without_preprocessing_hint():
        staged = Path(tmp) / "int8.onnx"
        quantize_dynamic(fp32, staged, per_channel=True, weight_type=QuantType.QInt8)
        graph = onnx.load(str(staged))
    props = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    onnx.helper.set_model_props(graph, {**props, "precision": "int8"})
    atomic_write_bytes(graph.SerializeToString(), out)


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    """Drop onnxruntime's root-logger hint to run its pre-processing first (shape inference and graph fusions for
    static quantisation; dynamic int8 of a traced graph does not need it)."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` (the same file system, so a finished file is renamed into place),
    removed afterwards with whatever it still holds; ``WriteError`` naming ``out`` when it cannot be made."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    except OSError as exc:
        raise write_error(out, exc) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _publish(staged: Path, out: Path) -> None:
    """Rename the finished ``staged`` file over ``out`` durably (its data fsynced first, then the folder); an
    ``OSError`` is a ``WriteError`` naming ``out``. The file keeps the mode it was created with (0666 less the umask:
    ``onnx.save`` opens it as any file)."""
    try:
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, out)
    except OSError as exc:
        raise write_error(out, exc) from None
    with contextlib.suppress(OSError):  # makes the rename durable; some platforms cannot open a folder
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def max_difference(module: BranchModel, out: Path, inputs: tuple[Tensor, ...]) -> float:
    """Largest absolute difference between ONNX Runtime and eager PyTorch over both outputs."""
    import onnxruntime as ort  # deferred: the optional extra simvg[export] (module docstring)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUTS, inputs)}
    got = session.run(list(OUTPUTS), feeds)
    with torch.inference_mode():
        want = module(*inputs)
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))


def export_onnx(
    checkpoint: str | Path | None,
    branch: str | None,
    out: str | Path,
    tokenizer: str | Path | None = None,
    weights: str = "auto",
    int8: bool = False,
) -> tuple[Path, float]:
    """Export ``branch`` (None: the model's default) of ``checkpoint`` (any file ``simvg.artifact`` reads; None =
    embedded default) to ``out``; ``int8``: then quantise it (ONNX Runtime's dynamic int8).

    Returns (the .onnx path, the max |ONNX - PyTorch| on a fresh batch: of the fp32 graph, or with ``int8`` of the
    int8 graph against fp32 PyTorch). Raises UserError past ``TOLERANCE`` (fp32 graph) or ``INT8_TOLERANCE``.
    """
    if branch not in (None, "token", "decoder"):
        raise UserError(f"--branch must be token or decoder, got {branch!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output name must end in .onnx")
    loaded = load_artifact(checkpoint, weights=weights, tokenizer=tokenizer, need_tokenizer=True)
    branch = branch or loaded.spec.branch
    module = BranchModel(loaded.model, branch).eval()
    size = loaded.spec.preprocess.image_size
    tok = BEiT3Tokenizer(loaded.tokenizer, max_len=loaded.spec.preprocess.max_tokens)
    with _staging(out) as staging:
        graph = staging / out.name  # checked (and quantised) here; ``out`` sees only a finished graph
        difference = _export_checked(module, tok, size, staging / "fp32.onnx", out)
        if int8:
            quantize_graph(staging / "fp32.onnx", graph)
            difference = max_difference(module, graph, example_inputs(tok, size, PARITY_TEXTS))
            if not difference <= INT8_TOLERANCE:
                raise UserError(f"{out}: int8 ONNX and fp32 PyTorch outputs differ by {difference:.2e} "
                                f"(> {INT8_TOLERANCE:g}): the quantised graph is broken")  # fmt: skip
        else:
            (staging / "fp32.onnx").rename(graph)
        _publish(graph, out)
    spec = dataclasses.replace(loaded.spec, branch=branch, tokenizer=TOKENIZER_FILE)
    atomic_write_bytes(yaml.safe_dump(spec_to_dict(spec), sort_keys=False).encode("utf-8"), out.parent / SPEC_FILE)
    if loaded.tokenizer.resolve() != (out.parent / TOKENIZER_FILE).resolve():
        atomic_write_bytes(loaded.tokenizer.read_bytes(), out.parent / TOKENIZER_FILE)
    return out, difference


PARITY_TEXTS = ["the second circle from the left", "x", "a very long expression " * 4]


def _export_checked(module: BranchModel, tok, size: int, path: Path, out: Path) -> float:
    """Write the fp32 graph of ``module`` to ``path`` and check it against eager PyTorch (batch 3); the difference.
    Errors name ``out``, the file being made."""
    try:
        _write_graph(module, example_inputs(tok, size, ["the left one", "a red circle"]), path)
    except OSError as exc:  # a full disk while writing the graph
        raise write_error(out, exc) from None
    difference = max_difference(module, path, example_inputs(tok, size, PARITY_TEXTS))
    if not difference <= TOLERANCE:
        raise UserError(f"{out}: ONNX and PyTorch outputs differ by {difference:.2e} (> {TOLERANCE:g})")
    return difference


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="model or run folder, .pth (ours or official), .safetensors (default: embedded model)",
    )
    parser.add_argument("--tokenizer", default=None, help="sentencepiece file for models without one (beit3.spm)")
    parser.add_argument(
        "--branch", choices=("token", "decoder"), default=None, help="the branch to export (default: the model's own)"
    )
    parser.add_argument("--out", required=True, help="MODEL.onnx; model.yaml and tokenizer.spm go beside it")
    parser.add_argument("--int8", action="store_true",
                        help="quantise the graph to dynamic int8 (ONNX Runtime's; CPU, see README)")  # fmt: skip


def export_command(args: argparse.Namespace) -> int:
    try:  # the extra's modules, probed first so that a missing one is the pip hint, not a traceback
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("export needs onnx and onnxruntime: pip install 'simvg[export]'") from None
    path, difference = export_onnx(args.checkpoint, args.branch, args.out, tokenizer=args.tokenizer, int8=args.int8)
    branch = args.branch or "the model's default"
    parity = f"int8; max |int8 ONNX - fp32 PyTorch| = {difference:.1e}" if args.int8 else \
        f"max |ONNX - PyTorch| = {difference:.1e}"  # fmt: skip
    print(f"wrote {path} ({branch} branch; {parity}) with model.yaml and tokenizer.spm beside it")
    return 0
