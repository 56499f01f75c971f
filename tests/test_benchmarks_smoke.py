"""Every script in ``benchmarks/`` runs, at tiny sizes, so that none of them rots.

Each script runs as a user runs it (``python benchmarks/X.py ...``, one thread) with the smallest sizes its options
allow; the checks are on what it prints. The scripts in ``COVERED_ELSEWHERE`` have their own end to end tests;
``test_every_benchmark_script_is_smoke_tested`` makes sure a new script cannot be added without one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SMOKED_HERE = {"data.py", "encoder.py", "inference.py", "model.py", "rec_confidence.py", "synthref.py"}
COVERED_ELSEWHERE = {  # script -> the test file that runs it end to end (a test named *end_to_end* or its main())
    "ablate.py": "test_ablate.py",
    "binding_probe.py": "test_binding_probe.py",
    "equal_compute.py": "test_equal_compute.py",
    "grec_failures.py": "test_grec_failures.py",
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
        name = script.removesuffix(".py")
        assert name in text and ("end_to_end" in text or f"{name}.main(" in text), (script, test_file)


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


def test_inference_benchmark_smoke_run() -> None:
    """``--smoke``: the tiny preset with random weights, the four paths (PyTorch / ONNX, fp32 / int8) of the token
    branch at batch 2, the table, and the thread sweep; the workers run in-process but for one, so ~10 s of CPU
    instead of ~30. Bites if a path drops out of the table, a ratio is taken against the wrong reference row, the
    ONNX graph disagrees with PyTorch, or the driver and its worker process no longer understand each other."""
    out = run(["benchmarks/inference.py", "--smoke"])
    export = re.search(r"exported simvg_tiny_test \(random\) token in [0-9.]+ s \(max \|ONNX - PyTorch\| fp32 (\S+), "
                       r"int8 (\S+)\)", out)  # fmt: skip
    assert export and float(export.group(1)) < 1e-4 and float(export.group(2)) >= 0, out
    cells = r" \| ".join([r"([0-9.]+)"] * 2 + [r"([0-9.]+)x"] * 2 + [r"([0-9]+)", r"([0-9.]+)x", r"([0-9.]+)"])
    rows = re.findall(rf"^\| simvg_tiny_test \(random\) \| (.+?) \| 2 \| {cells} \|$", out, re.M)
    paths = {row[0]: [float(v) for v in row[1:]] for row in rows}
    assert sorted(paths) == ["ONNX fp32 TB", "ONNX int8 TB", "PyTorch fp32 TB", "PyTorch int8 TB"], out
    ref_ms, ref_cpu, _, _, ref_mb, _, _ = paths["PyTorch fp32 TB"]
    for median_ms, cpu_ms, vs_cpu, vs_wall, peak_mb, vs_mb, load_s in paths.values():
        assert median_ms > 0 and cpu_ms > 0 and peak_mb > 0 and load_s >= 0, out
        # each ratio against PyTorch fp32 of the same batch (the printed values are rounded: 0.1 ms, 1 MiB, 0.01)
        assert vs_cpu == pytest.approx(cpu_ms / ref_cpu, abs=0.02), out
        assert vs_wall == pytest.approx(median_ms / ref_ms, abs=0.02), out
        assert vs_mb == pytest.approx(peak_mb / ref_mb, abs=0.02), out
    for path in ("PyTorch fp32 TB", "PyTorch int8 TB"):
        assert re.search(rf"^\| simvg_tiny_test \(random\) \| {path} \| [0-9.]+ \|$", out, re.M), out


def test_rec_confidence_benchmark_counts_every_expression_once(tmp_path: Path) -> None:
    """Three fresh scenes through the embedded model: every expression falls in exactly one confidence bin (bites
    if the last bin's upper edge drops a confidence of exactly 1.0, or bins overlap), in the table and the JSON."""
    out = run(["benchmarks/rec_confidence.py", "--num-images", "3", "--json", str(tmp_path / "r.json")])
    total = re.search(r": ([0-9]+) expressions on 3 fresh scenes", out)
    assert total and int(total.group(1)) >= 3, out  # at least one object per scene
    n = int(total.group(1))
    counts = [int(c) for c in re.findall(r"^\| [\[(][0-9.]+, [0-9.]+[\])] \| ([0-9]+) \|", out, re.M)]
    assert len(counts) == 5 and sum(counts) == n, out
    assert re.search(rf"^\| all \| {n} \| [0-9.]+ % \| [0-9.]+ % \|$", out, re.M), out
    record = json.loads((tmp_path / "r.json").read_text())
    bins = record["bins"]
    assert [b["n"] for b in bins] == counts
    assert bins[0]["low"] == 0.0 and bins[-1]["high"] == 1.0
    assert all(a["high"] == b["low"] for a, b in zip(bins, bins[1:]))
