"""benchmarks/grec_failures.py: each wrong GREC expression gets the cause a reader would give it by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grec_failures  # noqa: E402

A, B = [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]
A_SHIFTED = [0.0, 0.0, 10.0, 9.0]  # IoU 0.9 with A: a duplicate of it
CASES = [  # (gt boxes, predicted boxes, scores, cause, correct after NMS)
    ([A], [A, B], [0.9, 0.1], "correct", True),
    ([A], [A], [0.7], "correct", True),  # a score of exactly 0.7 is kept (official >=)
    ([], [A], [0.9], "no-target expression, boxes kept", False),
    ([A], [A], [0.69], "nothing kept", False),
    ([A, B], [A, A_SHIFTED], [0.9, 0.8], "a target missed", False),
    ([A], [A_SHIFTED, A], [0.8, 0.9], "every target found, plus a duplicate", True),
    ([A], [A, B], [0.9, 0.8], "every target found, plus a box elsewhere", False),
]


@pytest.mark.parametrize(("gt", "boxes", "scores", "cause", "fixed"), CASES)
def test_causes_by_hand(gt, boxes, scores, cause, fixed) -> None:
    assert grec_failures.classify({"boxes": boxes, "scores": scores}, gt) == (cause, fixed)


def test_nms_keeps_the_higher_score_of_two_overlapping_boxes() -> None:
    boxes = torch.tensor([A_SHIFTED, B, A])
    keep = grec_failures.without_duplicates(boxes, torch.tensor([0.8, 0.75, 0.9]))
    assert keep.tolist() == [False, True, True]


def test_main_tables_a_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [{"gt_boxes": gt, "decoder": {"boxes": b, "scores": s}, "token": {"boxes": [A], "scores": [0.1]}}
               for gt, b, s, _, _ in CASES]  # fmt: skip
    dump = tmp_path / "val.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert grec_failures.main([str(dump)]) == 0
    out = capsys.readouterr().out
    assert "| correct | 2 (28.6 %) | 1 (14.3 %) |" in out  # token: only the no-target expression is right
    assert "| nothing kept | 1 (14.3 %) | 6 (85.7 %) |" in out
    assert "| correct after NMS | 3 (42.9 %) | 1 (14.3 %) |" in out
    with pytest.raises(SystemExit, match="not a GREC"):
        (tmp_path / "rec.jsonl").write_text(json.dumps({"decoder": {"box": A}}) + "\n")
        grec_failures.main([str(tmp_path / "rec.jsonl")])
