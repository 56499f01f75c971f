"""SimVG parameter counts by part, and batch-1 latency of the token branch vs the decoder branch.

Usage: python benchmarks/model.py [--model simvg_b32] [--repeats 15] [--head-loops 30] [--clock thread|wall]

Latency: random weights, fp32, ``torch.inference_mode``, batch 1, the preset's image size (640 px for simvg_b32),
20 text tokens of which 12 real. "Whole model" times ``model(image, ids, mask, branch=...)``; "head only" times
``model.forward_head`` on precomputed encoder outputs (the projections, TQG and the branch). All cases are
interleaved round-robin and the ratios are taken within the same run.

``--clock thread`` (default) runs torch on one thread and measures that thread's CPU time (``time.thread_time``):
the work done, unaffected by other processes competing for the cores of a shared machine, where wall-clock
latencies of a 1-2 s forward swing by tens of percent. ``--clock wall`` measures wall time with ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simvg.models import create_model  # noqa: E402
from simvg.models.simvg import SimVG  # noqa: E402

TEXT_LEN, TEXT_REAL = 20, 12
BRANCHES = ("token", "decoder", "both")


def count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def parameter_table(model: SimVG) -> list[tuple[str, int]]:
    """(part, parameters) rows; the last rows group the parts the paper's "token branch" figure may cover."""
    proj = (model.input_proj, model.text_proj, model.cls_proj)
    c, d = model.cfg, model.cfg.embed_dim
    rows = [
        ("encoder (BEiT-3)", count(model.encoder)),
        ("projections (Conv1x1 patches, Linear text, Linear CLS)", count(*proj)),
        (f"TQG (query embed + {c.tqg_layers} layers, FFN {c.tqg_ffn_dim}, final LN)", count(model.tqg)),
        (f"decoder branch ({c.decoder_layers} layers, FFN {c.decoder_ffn_dim}, final LN, heads)", count(model.decoder)),
        (f"token branch head (Linear {d}x{d}, class Linear, box MLP)", count(model.token)),
        ("total", count(model)),
        ("token head + TQG", count(model.token, model.tqg)),
        ("token head + TQG + text/CLS projections", count(model.token, model.tqg, model.text_proj, model.cls_proj)),
        ("decoder branch + TQG + all projections", count(model.decoder, model.tqg, *proj)),
    ]
    return rows


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, loops: dict[str, int], clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of each case in each round, timing the cases round-robin."""
    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = clock()
            for _ in range(loops[name]):
                fn()
            times[name].append((clock() - start) / loops[name])
    return times


def latency(model: SimVG, repeats: int, head_loops: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    side = model.cfg.encoder.img_size
    image = torch.randn(1, 3, side, side)
    ids = torch.randint(4, 1000, (1, TEXT_LEN))
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.bool)
    mask[:, TEXT_REAL:] = True
    grid = (side // model.cfg.encoder.patch_size,) * 2
    with torch.inference_mode():
        x, split = model.encoder(image, ids, mask)
        cases: dict[str, Callable[[], object]] = {}
        loops: dict[str, int] = {}
        for b in BRANCHES:
            cases[f"model/{b}"] = lambda b=b: model(image, ids, mask, branch=b)
            cases[f"head/{b}"] = lambda b=b: model.forward_head(x, split, grid, mask, branch=b)
            loops[f"model/{b}"], loops[f"head/{b}"] = 1, head_loops
        return interleaved(cases, repeats, loops, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="simvg_b32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--head-loops", type=int, default=30)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --clock wall")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.clock == "thread" else args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    print(f"## {args.model}: parameters by part\n\n| part | parameters | M |\n|---|---|---|")
    for name, n in parameter_table(model):
        print(f"| {name} | {n:,} | {n / 1e6:.3f} |")
    times = latency(model, args.repeats, args.head_loops, clock)
    threads = torch.get_num_threads()
    print(f"\n## latency, batch 1, fp32, {threads} thread(s), {args.clock} clock, {args.repeats} interleaved rounds\n")
    print("Medians; the paired ratios are medians over rounds of (time / time of the same round's decoder call).\n")
    print("| path | token | decoder | both | token / decoder (paired) | both / decoder (paired) | token faster |")
    print("|---|---|---|---|---|---|---|")
    for part in ("model", "head"):
        t, d, b = (times[f"{part}/{br}"] for br in BRANCHES)
        tok_ratio = statistics.median(x / y for x, y in zip(t, d))
        both_ratio = statistics.median(x / y for x, y in zip(b, d))
        faster = sum(x < y for x, y in zip(t, d))
        ms = [f"{statistics.median(v) * 1e3:.2f} ms" for v in (t, d, b)]
        print(f"| {part} | {' | '.join(ms)} | {tok_ratio:.3f} | {both_ratio:.3f} | {faster}/{len(t)} |")


if __name__ == "__main__":
    main()
