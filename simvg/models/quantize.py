"""Dynamic int8 inference: the one place where a SimVG model becomes int8, used by every path that loads a model
(``Grounder.from_checkpoint``, ``ground``/``predict``/``serve``/``eval --precision int8``, the benchmarks), and the
``--precision``/``--threads`` options that ask for it. It depends on the model modules only, so ``simvg.artifact``
(which loads int8 models) and both command layers (``engine``, ``inference``) import it downwards.

What is quantised, with PyTorch's own eager-mode quantisation (``torch.ao.quantization``, no new dependency):
- every float ``nn.Linear`` of the encoder and of the heads (``quantize_dynamic``): weights int8 per output channel,
  activations quantised per call from their observed range, the matmul in int8. The encoder's q/k/v projections are
  first packed into one ``nn.Linear`` per expert (``MultiwayAttention.pack_qkv``), so the fused q/k/v path stays one
  (int8) matmul;
- the encoder's word embedding (197 MB of BEiT-3 base's fp32 weights): int8 rows with a float scale and offset each
  (weight-only; a looked-up row is dequantised).
Everything else stays fp32: LayerNorm, GELU, softmax attention, the position tables, the patch projection, the
decoder's ``nn.MultiheadAttention`` and the Conv1x1 input projection. Dynamic int8 runs on the CPU only. The
accuracy cost is measured in benchmarks/RESULTS.md ("int8 inference").

Kernel: oneDNN where the CPU has VNNI int8 dot products (AVX512-VNNI / AVX-VNNI; there it was ~1.5x faster than
fbgemm on the BEiT-3 base encoder), else PyTorch's x86 default (fbgemm). The choice is made when weights are packed.

``build_int8`` reads and quantises one part at a time (the word embedding, each encoder layer, the rest) from a
lazily read state dict, so the fp32 model never exists whole: an int8 load peaks near the int8 model's size.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from simvg.errors import UserError
from simvg.models.beit3 import MultiwayAttention
from simvg.models.simvg import SimVG, SimVGConfig

PRECISIONS = ("fp32", "int8")
QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig


def check_precision(precision: str | None, device: str | torch.device) -> str:
    """``precision`` (None: "fp32") checked against the device asked for; a UserError says what is supported.

    Checked before the device itself, so that int8 on CUDA is refused for what it is even where no GPU is present.
    """
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = "cpu"  # not a device name: artifact.torch_device says so
    if precision == "int8" and kind != "cpu":
        raise UserError(f"--precision int8 runs on the CPU only (dynamic int8), not on {device}; use --device cpu "
                        "(eval: --set train.device=cpu) or --precision fp32")  # fmt: skip
    return precision


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` (None: leave torch's setting); ONNX Runtime sessions read the same value."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a whole number of at least 1, got {threads!r}")
    torch.set_num_threads(threads)


def quantization_engine() -> str:
    """The quantised engine to pack weights for: "onednn" on CPUs with VNNI int8 dot products, else "x86"."""
    supported = torch.backends.quantized.supported_engines
    cpu = getattr(torch, "cpu", None)
    vnni = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_vnni_supported", "_is_vnni_supported"))
    if vnni and "onednn" in supported:
        return "onednn"
    return "x86" if "x86" in supported else supported[-1]


def quantize_module(module: nn.Module) -> nn.Module:
    """Pack the q/k/v projections of every ``MultiwayAttention`` in ``module``, then swap every float ``nn.Linear``
    inside it (not ``module`` itself) for a dynamic int8 Linear, in place; returns ``module`` (eval mode).

    Linears that are already quantised are left alone, so calling it on a partly quantised model is safe.
    """
    for sub in module.modules():
        if isinstance(sub, MultiwayAttention):
            sub.pack_qkv()
    torch.backends.quantized.engine = quantization_engine()
    with _quiet():
        torch.ao.quantization.quantize_dynamic(module, {nn.Linear: QCONFIG}, dtype=torch.qint8, inplace=True)
    return module.eval()


def quantize_text_embedding(model: SimVG) -> None:
    """The encoder's word embedding (64010 x 768 in BEiT-3 base: 197 MB in fp32) as int8 rows with a float scale and
    offset per row (PyTorch's weight-only ``quantized.Embedding``), in place; a no-op when already done."""
    embedding = model.encoder.text_embed
    if type(embedding) is not nn.Embedding:
        return
    embedding.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    with _quiet():
        model.encoder.text_embed = torch.ao.nn.quantized.Embedding.from_float(embedding)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's notices that eager-mode quantisation is moving to the separate torchao package (it ships with
    torch and works here; torchao would be a new dependency)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)")
        yield


def quantize_model(model: SimVG) -> SimVG:
    """An fp32 SimVG model -> the same model with int8 Linears and word embedding, in place (what ``build_int8``
    makes of a file; see the module docstring)."""
    if next(model.parameters()).device.type != "cpu":
        raise UserError("dynamic int8 runs on the CPU only; move the model to the CPU first")
    quantize_text_embedding(model)
    quantize_module(model.eval())
    release_memory()
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any Linear of ``model`` is a dynamic int8 one."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def build_int8(cfg: SimVGConfig, state: Mapping[str, Tensor], source: str | Path) -> SimVG:
    """The int8 model of ``cfg`` with ``state`` (our names, fp32 or fp16) loaded strictly, one part at a time.

    The model is built on the meta device (no random init); then the word embedding, each encoder layer and last the
    rest (position tables, heads) have their tensors read (a lazy ``state`` reads them only now), cast to fp32,
    assigned and quantised before the next part is read. Missing, unexpected or mis-shaped keys are a UserError naming
    ``source`` and the key.
    """
    with torch.device("meta"):
        model = SimVG(cfg)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(keys)} {label} keys: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        raise UserError(f"{source}: {'; '.join(parts)}")
    parts: list[tuple[str, Callable[[], object]]] = [("encoder.text_embed.", lambda: quantize_text_embedding(model))]
    for i, layer in enumerate(model.encoder.encoder.layers):
        parts.append((f"encoder.encoder.layers.{i}.", functools.partial(quantize_module, layer)))
    parts.append(("", lambda: quantize_module(model)))
    done: set[str] = set()
    for prefix, quantize in parts:
        keys = [k for k in expected if k.startswith(prefix) and k not in done]
        for key in keys:
            _assign(model, key, state[key], expected[key], source)
        done.update(keys)
        quantize()
        release_memory()  # before the next part is read, so that the peak stays near the int8 model's size
    return model.eval()


def release_memory() -> None:
    """Free what quantising left behind: the swapped-out float modules sit in reference cycles (``gc``), and glibc
    keeps freed heap pages unless asked to return them (``malloc_trim``; skipped where there is no glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _assign(model: nn.Module, key: str, value: Tensor, shape: tuple[int, ...], source: str | Path) -> None:
    """Put ``value`` (cast to fp32 if floating) in place of the meta parameter or buffer ``key`` of ``model``."""
    if tuple(value.shape) != shape:
        raise UserError(f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {shape}")
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    value = value.float() if value.is_floating_point() else value
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def precision_arguments(parser: argparse.ArgumentParser, compile: bool = True) -> None:
    """``--precision`` and ``--threads`` (shared by ``ground``, ``predict``, ``serve`` and ``eval``), and with
    ``compile`` the ``--compile`` switch of the grounding commands."""
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="int8: dynamic int8 Linear layers on the CPU (~2.5x faster at ViT-B size, see README), "
                             "or an ONNX graph exported with --int8; fp32 (default): the model as stored")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads of torch and ONNX Runtime (default: torch's; on a busy machine 1 "
                             "per process is often fastest)")  # fmt: skip
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="fp32 PyTorch: torch.compile with freezing; minutes of compiling per input shape, "
                                 "then ~15%% faster (for a long-running serve)")  # fmt: skip
