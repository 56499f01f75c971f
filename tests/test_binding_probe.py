"""``benchmarks/binding_probe.py``: targets from scenes.json, and a two-step run end to end on a tiny SynthRef."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from simvg.synthref.generator import generate_synthref

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from binding_probe import target  # noqa: E402


def _obj(colour, area, bbox):
    return {"colour": colour, "area": area, "bbox": bbox}


def test_targets_pick_the_unique_colour_or_the_biggest_object():
    rng = np.random.default_rng(0)
    objects = [_obj("red", 100, [0, 0, 10, 10]), _obj("red", 400, [20, 20, 20, 20]), _obj("blue", 50, [60, 0, 8, 4])]
    text, box = target(objects, "colour", rng, 80)
    assert text == "the blue one" and box == [64 / 80, 2 / 80, 8 / 80, 4 / 80]  # cx, cy, w, h of the blue one
    assert target(objects, "biggest", rng, 80) == ("the biggest figure", [0.375, 0.375, 0.25, 0.25])
    assert target(objects[:2], "colour", rng, 80) is None  # no unique colour: the scene is skipped


def test_probe_runs_end_to_end(tmp_path):
    generate_synthref(tmp_path / "d", "rec", num_images=12, image_size=64, seed=0)
    out = tmp_path / "probe.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "binding_probe.py"), "--root", str(tmp_path / "d"),
           "--task", "biggest", "--model", "simvg_tiny_test", "--steps", "2", "--every", "1", "--batch", "2",
           "--train-images", "8", "--test-images", "4", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["acc"][b] <= 100.0 for r in rows for b in ("token", "decoder"))
