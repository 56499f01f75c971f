"""``benchmarks/targets.py``: the verdict table, and a run end to end on a fresh tiny SynthRef set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grounding_helpers import make_model_folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import targets  # noqa: E402


def _rec(decoder: float, token: float) -> dict[str, float]:
    return {"num_samples": 10.0, "decoder/acc": decoder, "token/acc": token}


def test_table_states_each_target_and_its_verdict():
    rows = targets.table("rec", {"testA": _rec(99.0, 95.0), "testB": _rec(99.0, 89.9)})
    assert "| testA | 10 | 99.0 % | 95.0 % |" in rows
    assert "| token acc on testA >= 95 % | 95.0 % | yes |" in rows  # the threshold itself passes
    assert "| token acc on testB >= 90 % | 89.9 % | no |" in rows
    grec = {"num_samples": 4.0, "decoder/pr_f1": 1, "decoder/n_acc": 2, "decoder/t_acc": 3, "token/pr_f1": 80.0,
            "token/n_acc": 50.0, "token/t_acc": 6}  # fmt: skip
    rows = targets.table("grec", {"val": grec})
    assert "| token pr_f1 on val >= 80 % | 80.0 % | yes |" in rows
    assert "| token n_acc on val >= 90 % | 50.0 % | no |" in rows


def test_runs_end_to_end_on_a_fresh_set(tmp_path, capsys):
    folder = make_model_folder(tmp_path / "m")
    out, record = tmp_path / "fresh", tmp_path / "targets.json"
    code = targets.main(["--checkpoint", str(folder), "--num-images", "40", "--image-size", "64", "--seed", "5",
                         "--out", str(out), "--json", str(record)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| token acc on testA >= 95 % |" in printed and "| token acc on testB >= 90 % |" in printed
    results = json.loads(record.read_text())["results"]
    counts = json.loads((out / "meta.json").read_text())["counts"]
    assert {s: results[s]["num_samples"] for s in ("testA", "testB")} == {
        s: counts[s]["expressions"] for s in ("testA", "testB")
    }
