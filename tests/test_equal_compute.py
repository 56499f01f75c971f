"""benchmarks/equal_compute.py: an arm's clock adds up its stages and skips the pause before a resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import equal_compute  # noqa: E402


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_clock_adds_stages_and_skips_resume_pause(tmp_path: Path) -> None:
    # Pre-training: starts at t=1000, validates at t=1120 (2 min), stops at t=1180; resumed at t=9000 (a pause of
    # 7820 s that must not count), validates at t=9060: 3 min + 1 min = 4 min on the arm's clock.
    pre = write_run(tmp_path / "pre", [
        {"event": "start", "time": 1000.0, "step": 0},
        {"event": "val", "time": 1120.0, "step": 100, "t2p_acc": 50.0, "mlm_acc": 10.0},
        {"event": "train", "time": 1180.0, "step": 150, "loss": 1.0},
        {"event": "start", "time": 9000.0, "step": 150},
        {"event": "val", "time": 9060.0, "step": 200, "t2p_acc": 60.0, "mlm_acc": 20.0},
    ])  # fmt: skip
    # Fine-tuning: starts at t=20000 (the gap between stages is not counted either), validates 6 min later.
    fine = write_run(tmp_path / "fine", [
        {"event": "start", "time": 20000.0, "step": 0},
        {"event": "val", "time": 20360.0, "step": 300, "val/decoder/acc": 25.0, "val/token/acc": 10.0},
        {"event": "val", "time": 20720.0, "step": 600, "val/decoder/acc": 55.0, "val/token/acc": 31.0},
    ])  # fmt: skip
    points = equal_compute.arm_points([pre, fine])
    assert [p.clock for p in points] == pytest.approx([2.0, 4.0, 10.0, 16.0])
    assert [p.stage for p in points] == ["pre", "pre", "fine", "fine"]
    assert points[1].values["t2p_acc"] == 60.0
    assert equal_compute.first_crossing(points, "val/decoder/acc", 20.0) == pytest.approx(10.0)
    assert equal_compute.first_crossing(points, "val/token/acc", 30.0) == pytest.approx(16.0)
    assert equal_compute.first_crossing(points, "val/token/acc", 50.0) is None


def test_main_prints_tables_and_draws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "a", [
        {"event": "start", "time": 0.0, "step": 0},
        {"event": "val", "time": 60.0, "step": 10, "val/decoder/acc": 21.0, "val/token/acc": 5.0},
    ])  # fmt: skip
    out = tmp_path / "curves.png"
    assert equal_compute.main(["--arm", f"scratch={run}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| a | 10 | 1.0 | 21.0 | 5.0 |" in text
    assert "a, decoder: >= 20 % at 1.0 min, >= 30 % never" in text
    assert out.stat().st_size > 0


def test_crossings_are_per_stage(tmp_path: Path) -> None:
    """A starter-level 60 % must not count as reaching 50 % on the easy level of the next stage."""
    starter = write_run(tmp_path / "starter", [
        {"event": "start", "time": 0.0, "step": 0},
        {"event": "val", "time": 120.0, "step": 10, "val/decoder/acc": 60.0, "val/token/acc": 60.0},
    ])  # fmt: skip
    easy = write_run(tmp_path / "easy", [
        {"event": "start", "time": 500.0, "step": 0},
        {"event": "val", "time": 560.0, "step": 10, "val/decoder/acc": 40.0, "val/token/acc": 20.0},
        {"event": "val", "time": 620.0, "step": 20, "val/decoder/acc": 51.0, "val/token/acc": 30.0},
    ])  # fmt: skip
    text = equal_compute.table("arm", equal_compute.arm_points([starter, easy]))
    assert "starter, decoder: >= 20 % at 2.0 min, >= 30 % at 2.0 min, >= 50 % at 2.0 min" in text
    assert "easy, decoder: >= 20 % at 3.0 min, >= 30 % at 3.0 min, >= 50 % at 4.0 min" in text
    assert "easy, token: >= 20 % at 3.0 min, >= 30 % at 4.0 min, >= 50 % never" in text


def test_step_clock_weights_pretraining_steps_and_ignores_time(tmp_path: Path) -> None:
    """--clock steps: a pre-training stage (records with t2p_acc) of 200 steps at cost 0.5 is 100 step-equivalents,
    whatever its minutes; the fine-tuning stage's step 300 then sits at 100 + 300 = 400."""
    pre = write_run(tmp_path / "pre", [
        {"event": "start", "time": 0.0, "step": 0},
        {"event": "val", "time": 9999.0, "step": 100, "t2p_acc": 50.0},
        {"event": "train", "time": 19999.0, "step": 200, "loss": 1.0},
    ])  # fmt: skip
    fine = write_run(tmp_path / "fine", [
        {"event": "start", "time": 30000.0, "step": 0},
        {"event": "val", "time": 30001.0, "step": 300, "val/decoder/acc": 25.0, "val/token/acc": 10.0},
    ])  # fmt: skip
    points = equal_compute.arm_points([pre, fine], clock="steps", pretrain_cost=0.5)
    assert [p.clock for p in points] == pytest.approx([50.0, 400.0])
    assert "fine, decoder: >= 20 % at 400.0 steps, >= 30 % never" in equal_compute.table("arm", points, "steps")
    assert "| fine | 300 | 400 | 25.0 | 10.0 |" in equal_compute.table("arm", points, "steps")
