"""Grounding latency and peak memory: token branch (TB), decoder branch (DB) and ONNX Runtime, two model sizes.

Peak memory: each configuration runs alone in a subprocess (load + 3 groundings), and its peak resident set
(``VmHWM``, which counts what torch and onnxruntime allocate outside Python, unlike tracemalloc) is its own.
Latency: one subprocess per size loads all four configurations and times them in interleaved rounds (so a busy
shared machine slows them alike), end to end through ``Grounder.ground``: PNG bytes of a 640x480 image in, boxes
in original pixels out (decode, resize, tokenize, forward, post-process); median and min after a warm-up.
Threads: ``--threads`` (default 1) for torch and onnxruntime alike.

Sizes: the embedded default (``simvg/assets/default`` when present, else ``simvg_synth_s`` with random weights,
the size it is trained at) and ``simvg_b32`` (BEiT-3 base, 640 px, random weights).

    .venv/bin/python benchmarks/inference.py [--repeats 20] [--b32-repeats 5] [--skip-b32]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["the red circle on the left", "the blue square right of the green triangle", "a small yellow star",
          "the second circle from the left", "all red shapes", "the large purple square below the circle"]  # fmt: skip
TEXT = "the second red circle from the left"
THREADS = 1  # set by --threads; on a shared 2-core VM two spinning OpenMP threads are ~10x slower than one


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


def memory_worker(model: str, backend: str, branch: str, threads: int) -> dict:
    """Subprocess: load one configuration and ground 3 times; its peak RSS is the configuration's alone."""
    import torch

    from simvg.inference.grounder import Grounder

    torch.set_num_threads(threads)  # also sizes onnxruntime's pool (OnnxRunner reads it)
    imports = rss_mb()
    start = time.perf_counter()
    grounder = Grounder.from_checkpoint(model, branch=branch, backend=backend)
    load_s = time.perf_counter() - start
    data = sample_png()
    for _ in range(3):
        grounder.ground(data, TEXT)
    return {"peak_mb": rss_mb(), "imports_mb": imports, "load_s": load_s}


def latency_worker(specs: list[tuple[str, str, str]], repeats: int, threads: int) -> list[dict]:
    """Subprocess: every configuration loaded together and timed in interleaved rounds, so that the load of a
    shared machine falls on all of them alike; returns median and min ms per configuration."""
    import torch

    from simvg.inference.grounder import Grounder

    torch.set_num_threads(threads)
    grounders = [Grounder.from_checkpoint(m, branch=br, backend=be) for m, be, br in specs]
    data = sample_png()
    for grounder in grounders:
        grounder.ground(data, TEXT)
    times: list[list[float]] = [[] for _ in grounders]
    for _ in range(repeats):
        for grounder, bucket in zip(grounders, times):
            start = time.perf_counter()
            grounder.ground(data, TEXT)
            bucket.append(time.perf_counter() - start)
    return [{"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t)} for t in times]


def subprocess_json(*args: str):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_size(label: str, folder: Path, repeats: int) -> list[tuple[str, str, dict]]:
    """TB, DB (PyTorch) and TB, DB (ONNX) for one model folder."""
    from simvg.export.onnx import export_onnx

    specs = [("PyTorch TB", folder, "torch", "token"), ("PyTorch DB", folder, "torch", "decoder")]
    for branch in ("token", "decoder"):
        start = time.perf_counter()
        path, diff = export_onnx(folder, branch, folder / "onnx" / f"{branch}.onnx")
        print(f"  exported {label} {branch} in {time.perf_counter() - start:.1f} s (max diff {diff:.1e})", flush=True)
        specs.append((f"ONNX {branch[0].upper()}B", path, "onnx", branch))
    flat = [str(x) for _, m, be, br in specs for x in (m, be, br)]
    latency = subprocess_json("--latency", str(repeats), str(THREADS), *flat)
    rows = []
    for (name, model, backend, branch), lat in zip(specs, latency):
        memory = subprocess_json("--memory", str(model), backend, branch, str(THREADS))
        rows.append((label, name, {**lat, **memory}))
    return rows


def table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table; ratios are against PyTorch TB of the same size."""
    lines = ["| size | path | median ms | min ms | vs PyTorch TB | peak RSS MiB | vs PyTorch TB | after imports MiB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, path, r in rows:
        ref = next(x for lab, p, x in rows if lab == label and p == "PyTorch TB")
        speed, memory = r["median_ms"] / ref["median_ms"], r["peak_mb"] / ref["peak_mb"]
        lines.append(f"| {label} | {path} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {speed:.2f}x | "
                     f"{r['peak_mb']:.0f} | {memory:.2f}x | {r['imports_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs at the default size")
    parser.add_argument("--b32-repeats", type=int, default=5, help="timed runs at simvg_b32")
    parser.add_argument("--skip-b32", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        default = ROOT / "simvg" / "assets" / "default"
        if (default / "model.safetensors").is_file():
            label, folder = "default (embedded)", default
            # exports go next to the weights; keep the package folder clean by copying it first
            folder = Path(tmp) / "default"
            subprocess.run(["cp", "-r", str(default), str(folder)], check=True)
        else:
            label, folder = "default (simvg_synth_s, random)", make_folder("simvg_synth_s", Path(tmp) / "default")
        print(f"measuring {label}", flush=True)
        rows += measure_size(label, folder, args.repeats)
        if not args.skip_b32:
            print("measuring simvg_b32", flush=True)
            rows += measure_size("simvg_b32 (random)", make_folder("simvg_b32", Path(tmp) / "b32"), args.b32_repeats)
    print(table(rows))
    print(json.dumps([{"size": s, "path": p, **r} for s, p, r in rows]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        print(json.dumps(memory_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--latency":
        rest = sys.argv[4:]
        triples = [(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
        print(json.dumps(latency_worker(triples, int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
