"""Every script in ``benchmarks/`` runs, at tiny sizes, so that none of them rots.

Each script runs as a user runs it (``python benchmarks/X.py ...``, one thread) with the smallest sizes its options
allow; the checks are on what it prints. ``ablate.py``, ``binding_probe.py`` and ``targets.py`` have their own end
to end tests (``COVERED_ELSEWHERE``); ``test_every_benchmark_script_is_smoke_tested`` makes sure a new script cannot
be added without one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SMOKED_HERE = {"data.py", "encoder.py", "inference.py", "model.py", "synthref.py"}
COVERED_ELSEWHERE = {  # script -> the test file that runs it end to end
    "ablate.py": "test_ablate.py",
    "binding_probe.py": "test_binding_probe.py",
    "int8_accuracy.py": "test_quantize.py",
    "targets.py": "test_targets.py",
}


def run(args: list[str], timeout: int = 300) -> str:
    """Run ``python ARGS`` from the repository root on one thread; return stdout (stderr in the failure message)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_benchmark_script_is_smoke_tested() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == SMOKED_HERE | set(COVERED_ELSEWHERE), "a benchmark script without a smoke test (or a stale name)"
    for script, test_file in COVERED_ELSEWHERE.items():
        text = (ROOT / "tests" / test_file).read_text()
        assert "end_to_end" in text and script.removesuffix(".py") in text, (script, test_file)


def test_data_loader_benchmark() -> None:
    out = run(["benchmarks/data.py", "--images", "4", "--batch", "2", "--epochs", "1", "--workers", "0",
               "--model", "simvg_tiny_test", "--model-batch", "1"])  # fmt: skip
    loader = re.search(r"loader num_workers=0: ([0-9.]+) samples/s", out)
    model = re.search(r"model simvg_tiny_test training step at batch 1 \(forward \+ SimVGLoss \+ backward\): "
                      r"([0-9.]+) samples/s", out)  # fmt: skip
    assert loader and model, out
    assert float(loader.group(1)) > 0 and float(model.group(1)) > 0


def test_synthref_generation_benchmark() -> None:
    out = run(["benchmarks/synthref.py", "--images", "3", "--size", "64", "--e2e-images", "6"])
    for task in ("rec", "grec"):
        for size in (64, 128):
            assert re.search(rf"^\| {task} \| {size} \| [0-9]+ \| [0-9]+ \|$", out, re.M), (task, size, out)
    for workers in (1, 2):
        assert re.search(rf"^\| rec 64 px \| {workers} \| 6 \| [0-9.]+ \| [0-9.]+ \|$", out, re.M), out


def test_model_benchmark_parameter_table_adds_up() -> None:
    """The five parts of the parameter table are the whole model: bites if a new submodule is left out of it."""
    import torch

    from simvg.models import create_model

    out = run(["benchmarks/model.py", "--model", "simvg_tiny_test", "--repeats", "1", "--head-loops", "1"])
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([0-9,]+) \| [0-9.]+ \|$", out, re.M))
    counts = {name: int(n.replace(",", "")) for name, n in rows.items()}
    parts = [v for k, v in counts.items() if k.split(" (")[0] in
             ("encoder", "projections", "TQG", "decoder branch", "token branch head")]  # fmt: skip
    torch.manual_seed(0)
    assert len(parts) == 5 and sum(parts) == counts["total"]
    assert counts["total"] == sum(p.numel() for p in create_model("simvg_tiny_test").parameters())
    for part in ("model", "head"):
        assert re.search(rf"^\| {part} \| [0-9.]+ ms \| [0-9.]+ ms \| [0-9.]+ ms \|", out, re.M), out


def test_encoder_benchmark_flops_agree_at_a_tiny_size() -> None:
    """The script at its smallest case, with BEiT-3 "base" swapped for the "tiny" preset (the script takes no model
    option, and base costs seconds to build): it exits non-zero when its analytic FLOP count disagrees with torch's
    ``FlopCounterMode``, so this also checks the formula. The ``--ablation`` variants (640 px base only) are not
    run here."""
    code = (
        "import runpy, sys\n"
        "import simvg.models.beit3 as b\n"
        "real = b.beit3_config\n"
        "b.beit3_config = lambda name, **kw: real('tiny', **kw)\n"
        "sys.argv = ['encoder.py', '--cases', '64/16x1,32/16x2', '--repeats', '1', '--threads', '1']\n"
        "runpy.run_path('benchmarks/encoder.py', run_name='__main__')\n"
    )
    out = run(["-c", code])
    assert re.search(r"^\| 64/p16 B=1 \| 37 \| [0-9.]+ \|", out, re.M), out  # 16 patches + CLS + 20 text tokens
    assert re.search(r"^\| 32/p16 B=2 \| 25 \| [0-9.]+ \|", out, re.M), out


@pytest.mark.slow
def test_inference_benchmark_smallest_run() -> None:
    """The latency/memory script at its smallest options: the embedded default only, batch 1, token branch, one
    timed run. It exports ONNX graphs and starts one process per configuration, so it takes ~15-20 s of CPU."""
    out = run(["benchmarks/inference.py", "--skip-b32", "--repeats", "1", "--batches", "1", "--branches", "token"],
              timeout=600)  # fmt: skip
    rows = re.findall(r"^\| default \(embedded\) \| (.+?) \| 1 \| ([0-9.]+) \|", out, re.M)
    assert {path for path, _ in rows} >= {"PyTorch fp32 TB", "ONNX fp32 TB"}, out
    assert all(float(ms) > 0 for _, ms in rows)
