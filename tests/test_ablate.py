"""End to end smoke run of ``benchmarks/ablate.py`` on a 16-image SynthRef: real CLI trainings and evaluations."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "benchmarks" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablate"] = module  # dataclasses resolve string annotations through the module's entry
    spec.loader.exec_module(module)
    return module


def test_schedule_overrides_scale_with_the_budget():
    ablate = load_ablate()
    assert ablate.schedule_overrides(4000)[1:] == [
        "train.epochs=4000",
        "train.schedule_unit=step",
        "train.milestones=[3400]",  # 85 % of 4000
        "train.warmup=200",  # min(200, 400)
    ]
    assert ablate.schedule_overrides(1000)[3:] == ["train.milestones=[850]", "train.warmup=100"]


def test_validation_interval_counts_steps_not_epochs():
    ablate = load_ablate()
    # 16000 entries / 32 = 500 steps per epoch: every epoch; a 10 % subset (50 steps per epoch): every 4th epoch
    assert ablate.validation_overrides(16000, 32, 200) == ["train.eval_every_epochs=1"]
    assert ablate.validation_overrides(1600, 32, 200) == ["train.eval_every_epochs=4"]
    assert ablate.validation_overrides(1601, 32, 200) == ["train.eval_every_epochs=4"]  # 51 steps: 3.9 epochs
    assert ablate.validation_overrides(5, 32, 200) == ["train.eval_every_epochs=200"]
    cfg = {"train": {"batch_size": 32}}
    assert ablate.batch_size(cfg, []) == 32
    assert ablate.batch_size(cfg, ["train.batch_size=18", "train.lr=1", "train.batch_size=8"]) == 8


@pytest.mark.slow
def test_ablation_end_to_end(tmp_path, capsys):
    ablate = load_ablate()
    data = tmp_path / "data"
    synth = ["data", "synth", "--out", str(data), "--task", "rec", "--num-images", "16", "--image-size", "64"]
    subprocess.run([sys.executable, "-m", "simvg", *synth, "--seed", "0", "--workers", "1"], check=True, cwd=ROOT)
    out, report = tmp_path / "runs", tmp_path / "report"
    # Batch 18 of 54 train entries, validation about every 2 steps: the full set (3 steps per epoch) validates at
    # step 3, the half set (27 entries, 2 steps per epoch) at step 2.
    argv = ["--config", "configs/synthref_smoke.yaml", "--data-root", str(data), "--variants", "decoder_only",
            "twostage", "--seeds", "0", "--steps", "3", "--fractions", "1.0", "0.5", "--out", str(out),
            "--report", str(report), "--parallel", "2", "--set", "train.batch_size=18", "--val-every", "2"]  # fmt: skip
    assert ablate.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["splits"] == ["testA", "testB"]
    runs = {(r["variant"], r["fraction"]): r for r in results["runs"]}
    assert set(runs) == {("decoder_only", 1.0), ("decoder_only", 0.5), ("twostage", 1.0), ("twostage", 0.5)}
    for r in runs.values():
        assert r["final_step"] == 3
        assert set(r["test"]) == {"testA", "testB"}
        assert all(set(v) == {"decoder", "token"} for v in r["test"].values())  # untrained token branch too
        assert r["gap"]["testA"] == pytest.approx(r["test"]["testA"]["token"] - r["test"]["testA"]["decoder"])
    # decoder_only validates its decoder only; twostage's stage-2 point (step 2 of 2 after a 1-step stage 1).
    assert [sorted(p) for p in runs[("decoder_only", 1.0)]["curve"]] == [["decoder", "step"]]
    assert runs[("decoder_only", 1.0)]["curve"][0]["step"] == 3
    assert [p["step"] for p in runs[("decoder_only", 0.5)]["curve"]] == [2]
    assert [sorted(p) for p in runs[("twostage", 0.5)]["curve"]] == [["decoder", "step", "token"]]
    assert runs[("twostage", 0.5)]["curve"][0]["step"] == 3
    subset = json.loads((out / "data" / "data_f0.5" / "instances.json").read_text())
    assert len(subset["train"]) == 27 and len(subset["testB"]) == 6

    table = (report / "ablation.md").read_text()
    assert table.count("| decoder_only | 1 | 3 |") == 2  # one mean row per fraction
    assert table.count("| twostage | 1 | 3 |") == 2
    assert table.count("| decoder_only | 1 | 0 | 3 |") == 1 and table.count("| twostage | 0.5 | 0 | 3 |") == 1
    for name in ("ablation_curves.png", "ablation_fractions.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert ablate.main(argv) == 0  # everything stored: nothing is trained again
    assert "4 runs stored, 0 to run" in capsys.readouterr().out
