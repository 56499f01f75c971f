"""Forward latency of the BEiT-3 base encoder (random weights, fp32, inference_mode) against a matmul peak.

Usage: python benchmarks/encoder.py [--repeats 5] [--cases 640/32x1,640/32x8,224/16x1,224/16x8] [--threads N]
       [--clock wall|cpu|thread] [--ablation] [--torchscale DIR [--compile]]

``--torchscale DIR`` times our encoder against torchscale's ``BEiT3`` (the reference implementation, same weights,
outputs compared within 1e-4) at each case, interleaved; ``--compile`` adds ours under ``torch.compile`` with freezing
(``simvg.models.beit3.compile_for_inference``). torchscale 0.3.0 cannot be installed next to this project's torch
(its timm pins pull another torch build), so DIR is its unpacked wheel (``pip download torchscale==0.3.0 --no-deps``,
then unzip); its imports of timm (``drop_path``, an identity at drop rate 0) and fairscale (activation checkpointing
wrappers, unused in eval) are stubbed. Use ``--threads 1 --clock thread``: the CPU time of the one compute thread is
immune to other processes on a shared machine.

FLOPs are counted analytically (2*M*N*K for every matmul: patch projection, q/k/v, q@k^T, attn@v, out_proj, FFN) and
cross-checked against ``torch.utils.flop_counter.FlopCounterMode``. The peak is the throughput of
``torch.matmul([1024, 1024] @ [1024, 1024])`` timed in the same run, interleaved with the encoder timings so that
load from other processes on a shared machine affects both alike. "GEMM-bound" is the time the encoder's own
matmuls (same shapes, bare ``torch.matmul``) take; encoder time / GEMM-bound time shows the non-GEMM overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simvg.models import beit3 as beit3_module  # noqa: E402
from simvg.models.beit3 import BEiT3, BEiT3Config, beit3_config  # noqa: E402

TEXT_LEN, TEXT_REAL = 20, 12  # SimVG's max_token; 8 padded positions as in a typical referring expression


def matmul_shapes(cfg: BEiT3Config, batch: int, n_text: int) -> list[tuple[int, int, int, int]]:
    """(count, M, K, N) of every matmul of one forward (per modality for the multiway projections)."""
    d, f, grid = cfg.embed_dim, cfg.ffn_dim, cfg.img_size // cfg.patch_size
    n_vis = grid * grid + 1
    seq, heads = n_vis + n_text, cfg.num_heads
    shapes = [(1, batch * grid * grid, cfg.in_chans * cfg.patch_size**2, d)]  # patch projection
    for n in (n_vis, n_text):
        m = batch * n
        shapes += [(cfg.depth, m, d, 3 * d), (cfg.depth, m, d, d), (cfg.depth, m, d, f), (cfg.depth, m, f, d)]
    hd = d // heads
    shapes += [(cfg.depth * batch * heads, seq, hd, seq), (cfg.depth * batch * heads, seq, seq, hd)]
    return shapes


def encoder_flops(cfg: BEiT3Config, batch: int, n_text: int) -> int:
    return sum(2 * c * m * k * n for c, m, k, n in matmul_shapes(cfg, batch, n_text))


def attention_flops(cfg: BEiT3Config, batch: int, n_text: int) -> int:
    """q@k^T and attn@v: the last two entries of ``matmul_shapes``."""
    return sum(2 * c * m * k * n for c, m, k, n in matmul_shapes(cfg, batch, n_text)[-2:])


CLOCK = time.perf_counter  # --clock cpu: process CPU time, immune to time-sharing on a busy machine (use 1 thread)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (allocator, oneDNN primitive caches)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return times


def matmul_peak(repeats: int, size: int = 1024) -> float:
    """Median GFLOP/s of [size, size] @ [size, size] (10 products per sample)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = timed(lambda: [torch.matmul(a, b) for _ in range(10)], repeats)
    return 10 * 2 * size**3 / statistics.median(times) / 1e9


def gemm_bound(cfg: BEiT3Config, batch: int, n_text: int, repeats: int) -> float:
    """Median seconds of the encoder's matmuls alone (attention products batched over heads as in SDPA)."""
    ops = []
    for count, m, k, n in matmul_shapes(cfg, batch, n_text):
        heads_batched = count >= cfg.depth * batch * cfg.num_heads and k != cfg.embed_dim
        if heads_batched:
            per_layer = count // cfg.depth
            a, b = torch.randn(per_layer, m, k), torch.randn(per_layer, k, n)
            ops.append((cfg.depth, a, b))
        else:
            ops.append((count, torch.randn(m, k), torch.randn(k, n)))

    def run() -> None:
        for count, a, b in ops:
            for _ in range(count):
                torch.matmul(a, b)

    return statistics.median(timed(run, repeats))


def check_flop_count(model: BEiT3, inputs: tuple, analytic: int, attention: int) -> None:
    """FlopCounterMode must agree; it may miss SDPA (its CPU kernels are not registered), so allow exactly that."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    counted = counter.get_total_flops()
    if counted not in (analytic, analytic - attention):
        raise SystemExit(f"analytic FLOPs {analytic} (attention {attention}) != FlopCounterMode {counted}")


def bench_case(img: int, patch: int, batch: int, repeats: int) -> dict:
    """Interleaves one peak sample with one encoder forward per repeat; ratios per pair and best-of."""
    cfg = beit3_config("base", img_size=img, patch_size=patch, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = BEiT3(cfg).eval()
    image = torch.randn(batch, 3, img, img)
    ids = torch.randint(3, cfg.vocab_size, (batch, TEXT_LEN))
    pad = torch.arange(TEXT_LEN).expand(batch, -1) >= TEXT_REAL
    flops = encoder_flops(cfg, batch, TEXT_LEN)
    peaks, times = [], []
    with torch.inference_mode():
        check_flop_count(model, (image, ids, pad), flops, attention_flops(cfg, batch, TEXT_LEN))
        for _ in range(repeats):
            peaks.append(matmul_peak(1))
            times += timed(lambda: model(image, ids, pad), 1)
        bound = gemm_bound(cfg, batch, TEXT_LEN, repeats)
    pair_ratios = [flops / t / 1e9 / p for t, p in zip(times, peaks)]
    return dict(
        case=f"{img}/p{patch} B={batch}",
        tokens=(img // patch) ** 2 + 1 + TEXT_LEN,
        gflop=flops / 1e9,
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
        gflops=flops / min(times) / 1e9,
        peak=max(peaks),
        median_peak=statistics.median(peaks),
        ratio_best=flops / min(times) / 1e9 / max(peaks),
        ratio_median=statistics.median(pair_ratios),
        bound_ratio=bound / min(times),
    )


def explicit_softmax_attention(q, k, v, attn_mask=None):
    """torchscale's attention maths (bmm, masked fill, softmax, bmm), for the ablation."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def conv_patch_embedding(self, image):
    patches = self.proj(image).flatten(2).transpose(1, 2)
    return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


def ablation(repeats: int) -> None:
    """640/p32, batch 1: the shipped encoder against one change at a time, interleaved, same weights."""
    cfg = beit3_config("base", drop_path_rate=0.0)
    torch.manual_seed(0)
    fast = BEiT3(cfg).eval()
    unfused = BEiT3(beit3_config("base", drop_path_rate=0.0, fuse_qkv=False)).eval()
    unfused.load_state_dict(fast.state_dict())
    image, ids = torch.randn(1, 3, 640, 640), torch.randint(3, cfg.vocab_size, (1, TEXT_LEN))
    pad = torch.arange(TEXT_LEN)[None] >= TEXT_REAL
    sdpa, patch_forward = beit3_module.F.scaled_dot_product_attention, beit3_module.VisionEmbedding.forward

    def variant(name: str) -> Callable[[], object]:
        def run() -> object:
            if name == "explicit softmax attention":
                beit3_module.F.scaled_dot_product_attention = explicit_softmax_attention
            if name == "Conv2d patch embedding":
                beit3_module.VisionEmbedding.forward = conv_patch_embedding
            try:
                return (unfused if name == "separate q/k/v matmuls" else fast)(image, ids, pad)
            finally:
                beit3_module.F.scaled_dot_product_attention = sdpa
                beit3_module.VisionEmbedding.forward = patch_forward

        return run

    names = ["shipped", "separate q/k/v matmuls", "Conv2d patch embedding", "explicit softmax attention"]
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(repeats):
            for name in names:
                times[name] += timed(variant(name), 1)
    base = min(times["shipped"])
    print("| variant (640/p32, B=1) | min ms | vs shipped |\n|---|---|---|")
    for name in names:
        print(f"| {name} | {min(times[name]) * 1e3:.0f} | {min(times[name]) / base:.3f}x |")


def load_torchscale(path: Path, img: int, patch: int) -> torch.nn.Module:
    """torchscale's BEiT3, base size (unilm's ``_get_base_config``), from the unpacked wheel at ``path``."""
    import types

    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob and training:
            raise RuntimeError("the timm stub only covers inference")
        return x

    stubs = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers", "fairscale",
                                                        "fairscale.nn")}  # fmt: skip
    stubs["timm.models.layers"].drop_path = drop_path
    stubs["fairscale.nn"].checkpoint_wrapper = stubs["fairscale.nn"].wrap = lambda module, **_: module
    for name, module in stubs.items():
        sys.modules.setdefault(name, module)
    sys.path.insert(0, str(path))
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3

    cfg = EncoderConfig(img_size=img, patch_size=patch, vocab_size=64010, multiway=True, layernorm_embedding=False,
                        normalize_output=True, no_output_layer=True, drop_path_rate=0.0, encoder_embed_dim=768,
                        encoder_attention_heads=12, encoder_ffn_embed_dim=3072, encoder_layers=12)  # fmt: skip
    return TorchscaleBEiT3(cfg).eval()


def versus_torchscale(path: Path, img: int, patch: int, batch: int, repeats: int, compile: bool) -> None:
    """Ours (eager, and compiled with ``compile``) against torchscale with the same weights: parity on every
    non-padding token (must be <= 1e-4), then median and min time of interleaved runs."""
    from simvg.models.beit3 import compile_for_inference

    cfg = beit3_config("base", img_size=img, patch_size=patch, drop_path_rate=0.0)
    torch.manual_seed(0)
    ours = BEiT3(cfg).eval()
    reference = load_torchscale(path, img, patch)
    reference.load_state_dict(ours.state_dict(), strict=True)
    image = torch.randn(batch, 3, img, img)
    ids = torch.randint(3, cfg.vocab_size, (batch, TEXT_LEN))
    pad = torch.arange(TEXT_LEN).expand(batch, -1) >= TEXT_REAL
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "torchscale": lambda: reference(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)[
            "encoder_out"
        ],
        "ours (eager)": lambda: ours(image, ids, pad)[0],
    }
    with torch.no_grad():  # Inductor's freezing applies under no_grad; the same for every variant
        if compile:
            compiled = compile_for_inference(ours)
            start = time.perf_counter()
            compiled(image, ids, pad)
            print(f"compiled in {time.perf_counter() - start:.0f} s (wall)", flush=True)
            variants["ours (torch.compile, freezing)"] = lambda: compiled(image, ids, pad)[0]
        want = variants["torchscale"]()
        real = torch.cat([torch.ones(batch, want.shape[1] - TEXT_LEN, dtype=torch.bool), ~pad], dim=1)
        parity = {name: float((fn() - want)[real].abs().max()) for name, fn in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name] += timed(fn, 1)
    base = statistics.median(times["torchscale"])
    print(f"| variant ({img}/p{patch}, B={batch}) | median ms | min ms | vs torchscale (median) | max abs diff |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.0f} | {min(t) * 1e3:.0f} | "
              f"{statistics.median(t) / base:.3f}x | {parity[name]:.1e} |", flush=True)  # fmt: skip
    if max(parity.values()) > 1e-4:
        raise SystemExit(f"parity with torchscale broken: {parity}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="640/32x1,640/32x8,224/16x1,224/16x8", help="IMG/PATCHxBATCH,...")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu", "thread"),
        default="wall",
        help="cpu: process CPU time, thread: this thread's CPU time (meaningful with --threads 1 on a busy machine)",
    )
    parser.add_argument("--ablation", action="store_true", help="also time one-change variants at 640/p32, B=1")
    parser.add_argument("--torchscale", type=Path, help="unpacked torchscale 0.3.0 wheel: time ours against it instead")
    parser.add_argument("--compile", action="store_true", help="with --torchscale: also ours under torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = {"cpu": time.process_time, "thread": time.thread_time}.get(args.clock, time.perf_counter)
    if args.torchscale:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, fp32, no_grad")
        for spec in args.cases.split(","):
            size, rest = spec.split("/")
            patch, batch = rest.split("x")
            versus_torchscale(args.torchscale, int(size), int(patch), int(batch), args.repeats, args.compile)
        return 0
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, fp32, inference_mode, "
        f"text {TEXT_LEN} tokens ({TEXT_LEN - TEXT_REAL} padded)"
    )
    print(
        "| case | tokens | GFLOP | median ms | min ms | GFLOP/s (min) | peak GFLOP/s max (median) "
        "| % of peak, best | % of peak, median of pairs | GEMM-only / min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.cases.split(","):
        size, rest = spec.split("/")
        patch, batch = rest.split("x")
        r = bench_case(int(size), int(patch), int(batch), args.repeats)
        print(
            f"| {r['case']} | {r['tokens']} | {r['gflop']:.1f} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
            f"{r['gflops']:.0f} | {r['peak']:.0f} ({r['median_peak']:.0f}) | {100 * r['ratio_best']:.0f}% | "
            f"{100 * r['ratio_median']:.0f}% | {100 * r['bound_ratio']:.0f}% |",
            flush=True,
        )
    if args.ablation:
        ablation(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
