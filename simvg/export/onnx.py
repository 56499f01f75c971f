"""``simvg export onnx``: one branch of a model as an ONNX graph, runnable by ``Grounder(..., backend="onnx")``.

The graph takes ``image`` [B, 3, S, S] float (normalised as at test time), ``text_ids`` [B, L] int64 and
``text_pad_mask`` [B, L] bool (True = pad), with a dynamic batch B, and returns ``logits`` [B, Q, 2] and ``boxes``
[B, Q, 4] (cxcywh in [0, 1]) of the chosen branch only: the token branch graph contains no decoder at all (B14).
``config.yaml`` and ``tokenizer.spm`` are written beside the file, so the folder is self-contained, and the
model's metadata records the branch. After export the graph is run once on ONNX Runtime and compared with eager
PyTorch (batch 3, a batch size the export never saw); a difference over 1e-4 is an error.

We use the TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``, while the dynamo exporter would
add ``onnxscript`` as a dependency.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from simvg.errors import UserError

OPSET = 17
TOLERANCE = 1e-4
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
    import onnx

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


def max_difference(module: BranchModel, out: Path, inputs: tuple[Tensor, ...]) -> float:
    """Largest absolute difference between ONNX Runtime and eager PyTorch over both outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUTS, inputs)}
    got = session.run(list(OUTPUTS), feeds)
    with torch.inference_mode():
        want = module(*inputs)
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))


def export_onnx(checkpoint: str | Path | None, branch: str, out: str | Path) -> tuple[Path, float]:
    """Export ``branch`` of ``checkpoint`` (folder, .pth; None = embedded default) to ``out``.

    Returns (the .onnx path, the max |ONNX - PyTorch| on a fresh batch). Raises UserError past ``TOLERANCE``.
    """
    from simvg.inference.loading import load_bundle

    if branch not in ("token", "decoder"):
        raise UserError(f"--branch must be token or decoder, got {branch!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output name must end in .onnx")
    bundle = load_bundle(checkpoint, device="cpu", branch=branch, backend="torch")
    module = BranchModel(bundle.runner.model, branch).eval()
    size = bundle.data_cfg.image_size
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_graph(module, example_inputs(bundle.tokenizer, size, ["the left one", "a red circle"]), out)
    (out.parent / "config.yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    tokenizer = out.parent / "tokenizer.spm"
    if bundle.tokenizer.path.resolve() != tokenizer.resolve():
        shutil.copyfile(bundle.tokenizer.path, tokenizer)
    texts = ["the second circle from the left", "x", "a very long expression " * 4]
    difference = max_difference(module, out, example_inputs(bundle.tokenizer, size, texts))
    if not difference <= TOLERANCE:
        raise UserError(f"{out}: ONNX and PyTorch outputs differ by {difference:.2e} (> {TOLERANCE:g})")
    return out, difference


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="model folder or training .pth (default: embedded model)")
    parser.add_argument("--branch", choices=("token", "decoder"), default="token")
    parser.add_argument("--out", required=True, help="MODEL.onnx; config.yaml and tokenizer.spm go beside it")


def export_command(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("export needs onnx and onnxruntime: pip install 'simvg[export]'") from None
    path, difference = export_onnx(args.checkpoint, args.branch, args.out)
    print(f"wrote {path} ({args.branch} branch; max |ONNX - PyTorch| = {difference:.1e}) with config.yaml and "
          f"tokenizer.spm beside it")  # fmt: skip
    return 0
