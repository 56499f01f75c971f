"""Grounding latency and peak memory: fp32 / int8 PyTorch and fp32 / int8 ONNX Runtime, token branch (TB) and
decoder branch (DB), batch 1 and 8, two model sizes.

Peak memory: each configuration runs alone in a subprocess (load + 3 groundings at the batch size), and its peak
resident set (``VmHWM``, which counts what torch and onnxruntime allocate outside Python, unlike tracemalloc) is its
own. Latency: one subprocess per size loads every configuration and times them in interleaved rounds (so a busy
shared machine slows them alike), end to end through ``Grounder.ground_batch``: PNG bytes of a 640x480 image in,
boxes in original pixels out (decode, resize, tokenize, forward, post-process); median wall time and median process
CPU time (with one thread, CPU time is immune to other processes taking the core) after a warm-up.
Threads: ``--threads`` (default 1) for torch and onnxruntime alike.

int8: PyTorch's dynamic int8 (``Grounder.from_checkpoint(precision="int8")``, simvg/models/quantize.py) and ONNX
Runtime's dynamic int8 of the exported graph (``simvg export onnx --int8``).

Sizes: the embedded default (``simvg/assets/default`` when present, else ``simvg_synth_s`` with random weights,
the size it is trained at) and ``simvg_b32`` (BEiT-3 base, 640 px, random weights).

    .venv/bin/python benchmarks/inference.py [--repeats 20] [--b32-repeats 5] [--skip-b32] [--batches 1,8]
        [--branches token,decoder]
    .venv/bin/python benchmarks/inference.py --threads-sweep 1,2    # fp32 / int8 PyTorch, 1 vs 2 threads (wall)
    .venv/bin/python benchmarks/inference.py --smoke                # every code path in seconds; figures meaningless

``--smoke`` (the smoke test, tests/test_benchmarks_smoke.py): ``simvg_tiny_test`` with random weights in place of
both sizes, the four paths of the token branch at batch 2, one timed run, then the thread sweep at one thread. The
workers run in this process (their arguments and results still make the JSON round trip they make between
processes), which saves a torch import per configuration but makes the peak RSS the driver's; only the first
configuration's memory is measured in its own process, so that the protocol between the two is exercised too.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["the red circle on the left", "the blue square right of the green triangle", "a small yellow star",
          "the second circle from the left", "all red shapes", "the large purple square below the circle"]  # fmt: skip
TEXT = "the second red circle from the left"
THREADS = 1  # set by --threads; on a shared 2-core VM two spinning OpenMP threads are ~10x slower than one
IN_PROCESS = False  # set by --smoke: the workers (but one) run in the driver instead of a subprocess each


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's ``VmHWM`` belongs to the process image itself; ``ru_maxrss`` would start at the parent's peak (it
    survives fork + exec), which here is the much larger benchmark driver.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def make_folder(preset: str, out: Path) -> Path:
    """A model folder (random weights) of ``preset`` with a small tokenizer, in the embedded default's format."""
    import torch

    from simvg.artifact import ModelSpec, Preprocess, save_folder
    from simvg.data.tokenizer import train_tokenizer
    from simvg.models import create_model, model_config

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS * 4, out / "tokenizer.spm", vocab_size=60)
    cfg = model_config(preset)
    torch.manual_seed(0)
    spec = ModelSpec(architecture=cfg, preprocess=Preprocess(image_size=cfg.encoder.img_size),
                     trained_on="nothing: random weights for benchmarking")  # fmt: skip
    save_folder(out, create_model(preset).state_dict(), spec, tokenizer)
    return out


def sample_png() -> bytes:
    """A 640x480 PNG with one red disc (the image every configuration grounds)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((100, 100, 300, 300), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


TEXTS = [TEXT, "the blue square", "a small yellow star", "the large purple square below the circle",
         "all red shapes", "the left one", "the second circle from the left", "the red disc"]  # fmt: skip


def load(model: str, backend: str, branch: str, precision: str):
    """A ``Grounder`` of one configuration (the ONNX file carries its own precision)."""
    from simvg.inference.grounder import Grounder

    return Grounder.from_checkpoint(model, branch=branch, backend=backend,
                                    precision=precision if backend == "torch" else None)  # fmt: skip


def memory_worker(config: list[str], batch: int, threads: int) -> dict:
    """Subprocess: load one configuration and ground 3 batches; its peak RSS is the configuration's alone."""
    import torch

    torch.set_num_threads(threads)  # also sizes onnxruntime's pool (OnnxRunner reads it)
    imports = rss_mb()
    start = time.perf_counter()
    grounder = load(*config)
    load_s = time.perf_counter() - start
    data = sample_png()
    for _ in range(3):
        grounder.ground_batch([data] * batch, TEXTS[:batch])
    return {"peak_mb": rss_mb(), "imports_mb": imports, "load_s": load_s}


def latency_worker(configs: list[list[str]], batches: list[int], repeats: int, threads: int) -> list[dict]:
    """Subprocess: every configuration loaded together and timed in interleaved rounds, so that the load of a
    shared machine falls on all of them alike; returns per configuration and batch size the median wall ms, min
    wall ms and median process-CPU ms."""
    import torch

    torch.set_num_threads(threads)
    grounders = [load(*config) for config in configs]
    data = sample_png()
    results = []
    for batch in batches:
        images, texts = [data] * batch, TEXTS[:batch]
        for grounder in grounders:
            grounder.ground_batch(images, texts)
        wall: list[list[float]] = [[] for _ in grounders]
        cpu: list[list[float]] = [[] for _ in grounders]
        for _ in range(repeats):
            for grounder, w, c in zip(grounders, wall, cpu):
                start, start_cpu = time.perf_counter(), time.process_time()
                grounder.ground_batch(images, texts)
                c.append(time.process_time() - start_cpu)
                w.append(time.perf_counter() - start)
        results += [{"batch": batch, "median_ms": 1000 * statistics.median(w), "min_ms": 1000 * min(w),
                     "cpu_ms": 1000 * statistics.median(c)} for w, c in zip(wall, cpu)]  # fmt: skip
    return results


def threads_worker(configs: list[list[str]], counts: list[int], repeats: int) -> list[dict]:
    """Subprocess: PyTorch configurations timed at batch 1 with each thread count in turn, interleaved (wall time:
    what a user waits); median ms per configuration and thread count."""
    import torch

    grounders = [load(*config) for config in configs]
    data = sample_png()
    times = {(i, n): [] for i in range(len(grounders)) for n in counts}
    for round_ in range(repeats + 1):
        for n in counts:
            torch.set_num_threads(n)
            for i, grounder in enumerate(grounders):
                start = time.perf_counter()
                grounder.ground(data, TEXT)
                if round_:  # the first round warms up
                    times[i, n].append(time.perf_counter() - start)
    return [{"config": i, "threads": n, "median_ms": 1000 * statistics.median(t)} for (i, n), t in times.items()]


def threads_sweep(folder: Path, label: str, counts: list[int], repeats: int) -> None:
    """fp32 and int8 PyTorch (token branch) at each thread count: the advice in README."""
    configs = [[str(folder), "torch", "token", "fp32"], [str(folder), "torch", "token", "int8"]]
    rows = subprocess_json("--threads-worker", json.dumps(configs), json.dumps(counts), str(repeats),
                           fresh=not IN_PROCESS)  # fmt: skip
    print(f"| size | path | {' | '.join(f'{n} thread(s), median ms' for n in counts)} |")
    print("|---|---|" + "---|" * len(counts))
    for i, name in enumerate(("PyTorch fp32 TB", "PyTorch int8 TB")):
        cells = [next(r["median_ms"] for r in rows if r["config"] == i and r["threads"] == n) for n in counts]
        print(f"| {label} | {name} | {' | '.join(f'{c:.1f}' for c in cells)} |", flush=True)


def worker(args: list[str]) -> Any:
    """Run the worker that ``args`` name (``--memory``, ``--latency`` or ``--threads-worker`` and its JSON
    arguments); returns its JSON-able result."""
    if args[0] == "--memory":
        return memory_worker(json.loads(args[1]), int(args[2]), int(args[3]))
    if args[0] == "--threads-worker":
        return threads_worker(json.loads(args[1]), json.loads(args[2]), int(args[3]))
    if args[0] == "--latency":
        return latency_worker(json.loads(args[1]), json.loads(args[2]), int(args[3]), int(args[4]))
    raise ValueError(f"unknown worker {args[0]!r}")


def subprocess_json(*args: str, fresh: bool = True) -> Any:
    """The result of ``worker(args)``, computed in a fresh process (``fresh``) or in this one."""
    if not fresh:
        return json.loads(json.dumps(worker(list(args))))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_graphs(label: str, folder: Path, branch: str) -> tuple[Path, Path]:
    """The fp32 graph (``simvg export onnx``, its parity checked) and its int8 version (as ``--int8`` makes it)."""
    from simvg.artifact import load_artifact
    from simvg.data.tokenizer import BEiT3Tokenizer
    from simvg.export.onnx import PARITY_TEXTS, BranchModel, example_inputs, export_onnx, max_difference, quantize_graph

    start = time.perf_counter()
    fp32, diff = export_onnx(folder, branch, folder / "onnx" / f"{branch}.onnx")
    int8 = fp32.with_name(f"{branch}_int8.onnx")
    quantize_graph(fp32, int8)
    loaded = load_artifact(folder, need_tokenizer=True)
    tok = BEiT3Tokenizer(loaded.tokenizer, max_len=loaded.spec.preprocess.max_tokens)
    inputs = example_inputs(tok, loaded.spec.preprocess.image_size, PARITY_TEXTS)
    diff8 = max_difference(BranchModel(loaded.model, branch).eval(), int8, inputs)
    print(f"  exported {label} {branch} in {time.perf_counter() - start:.1f} s (max |ONNX - PyTorch| fp32 "
          f"{diff:.1e}, int8 {diff8:.1e})", flush=True)  # fmt: skip
    return fp32, int8


def measure_size(label: str, folder: Path, repeats: int, batches: list[int], branches: list[str]) -> list[dict]:
    """fp32 / int8 PyTorch and fp32 / int8 ONNX, per branch, for one model folder; one row per config and batch."""
    configs: list[tuple[str, list[str]]] = []
    for branch in branches:
        short = branch[0].upper() + "B"
        fp32, int8 = export_graphs(label, folder, branch)
        if IN_PROCESS:
            # The driver now holds torch.onnx's whole import graph; frozen, it is not scanned again by the
            # gc.collect() of every int8 load (quantize.release_memory), as it would not be in a fresh worker.
            gc.freeze()
        configs += [(f"PyTorch fp32 {short}", [str(folder), "torch", branch, "fp32"]),
                    (f"PyTorch int8 {short}", [str(folder), "torch", branch, "int8"]),
                    (f"ONNX fp32 {short}", [str(fp32), "onnx", branch, "fp32"]),
                    (f"ONNX int8 {short}", [str(int8), "onnx", branch, "int8"])]  # fmt: skip
    latency = subprocess_json("--latency", json.dumps([c for _, c in configs]), json.dumps(batches), str(repeats),
                              str(THREADS), fresh=not IN_PROCESS)  # fmt: skip
    rows = []
    for i, batch in enumerate(batches):
        for j, (name, config) in enumerate(configs):
            memory = subprocess_json("--memory", json.dumps(config), str(batch), str(THREADS),
                                     fresh=not IN_PROCESS or not rows)  # fmt: skip
            rows.append({"size": label, "path": name, **latency[i * len(configs) + j], **memory})
            print(f"  {name} B={batch}: {rows[-1]['cpu_ms']:.0f} ms CPU, {memory['peak_mb']:.0f} MiB", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table; ratios are against PyTorch fp32 of the same size, branch and batch."""
    lines = ["| size | path | batch | median ms | CPU ms | vs fp32 (CPU) | vs fp32 (wall) | peak RSS MiB | vs fp32 "
             "| load s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ref = next(x for x in rows if x["size"] == r["size"] and x["batch"] == r["batch"]
                   and x["path"] == "PyTorch fp32 " + r["path"].split()[-1])  # fmt: skip
        lines.append(f"| {r['size']} | {r['path']} | {r['batch']} | {r['median_ms']:.1f} | {r['cpu_ms']:.1f} | "
                     f"{r['cpu_ms'] / ref['cpu_ms']:.2f}x | {r['median_ms'] / ref['median_ms']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {r['peak_mb'] / ref['peak_mb']:.2f}x | {r['load_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs at the default size")
    parser.add_argument("--b32-repeats", type=int, default=5, help="timed runs at simvg_b32")
    parser.add_argument("--skip-b32", action="store_true")
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--branches", default="token,decoder", help="branches, comma-separated")
    parser.add_argument("--threads-sweep", help="instead: PyTorch fp32/int8 at these thread counts, e.g. 1,2")
    parser.add_argument("--smoke", action="store_true", help="every code path at the tiniest size, in seconds")
    args = parser.parse_args()
    global THREADS, IN_PROCESS
    THREADS = args.threads
    batches, branches = [int(b) for b in args.batches.split(",")], args.branches.split(",")
    rows = []
    if args.smoke:
        IN_PROCESS = True
        with tempfile.TemporaryDirectory() as tmp:
            label, folder = "simvg_tiny_test (random)", make_folder("simvg_tiny_test", Path(tmp) / "tiny")
            print(f"measuring {label}", flush=True)
            print(table(measure_size(label, folder, 1, [2], ["token"])))
            threads_sweep(folder, label, [1], 1)
        return
    if args.threads_sweep:
        counts = [int(n) for n in args.threads_sweep.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            if not args.skip_default:
                threads_sweep(ROOT / "simvg" / "assets" / "default", "default (embedded)", counts, args.repeats)
            if not args.skip_b32:
                folder = make_folder("simvg_b32", Path(tmp) / "b32")
                threads_sweep(folder, "simvg_b32 (random)", counts, args.b32_repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_default:
            default = ROOT / "simvg" / "assets" / "default"
            if (default / "model.safetensors").is_file():
                label = "default (embedded)"
                # exports go next to the weights; keep the package folder clean by copying it first
                folder = Path(tmp) / "default"
                subprocess.run(["cp", "-r", str(default), str(folder)], check=True)
            else:
                label, folder = "default (simvg_synth_s, random)", make_folder("simvg_synth_s", Path(tmp) / "default")
            print(f"measuring {label}", flush=True)
            rows += measure_size(label, folder, args.repeats, batches, branches)
        if not args.skip_b32:
            print("measuring simvg_b32", flush=True)
            folder = make_folder("simvg_b32", Path(tmp) / "b32")
            rows += measure_size("simvg_b32 (random)", folder, args.b32_repeats, batches, branches)
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--memory", "--threads-worker", "--latency"):
        print(json.dumps(worker(sys.argv[1:])))
    else:
        main()
