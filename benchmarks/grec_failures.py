"""Why GREC expressions fail: each wrong expression of a ``simvg eval --dump`` file sorted into one cause.

The verdicts are the project's evaluator's (``simvg.engine.metrics.grec_outcome``: boxes scored >= 0.7 are kept, a
kept box matches a target at GIoU >= 0.5, correct when F1 = 1). Causes, per branch, as a share of all expressions:

- ``no-target expression, boxes kept``: the model answers a "no target" expression with boxes;
- ``nothing kept``: a target expression gets no box over the threshold;
- ``a target missed``: at least one target has no matching kept box;
- ``every target found, plus a duplicate``: all targets matched, and the extra kept boxes overlap kept boxes
  (IoU >= 0.5): removing them (greedy NMS in score order) makes the expression correct;
- ``every target found, plus a box elsewhere``: all targets matched, and an extra box is on something else.

``correct after NMS`` re-judges every expression with those duplicates removed: what non-maximum suppression, which
SimVG does not apply, would add.

    simvg eval --checkpoint runs/synthref_grec/last.pth --split val --branch both --dump val.jsonl
    python benchmarks/grec_failures.py val.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.config import SCORE_THRESHOLD  # noqa: E402
from simvg.engine.metrics import grec_outcome  # noqa: E402
from simvg.utils.box_ops import box_iou  # noqa: E402

CAUSES = (
    "correct",
    "no-target expression, boxes kept",
    "nothing kept",
    "a target missed",
    "every target found, plus a duplicate",
    "every target found, plus a box elsewhere",
)


def without_duplicates(boxes: torch.Tensor, scores: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[K] bool: the boxes greedy NMS keeps (score order; a box overlapping a kept one at IoU >= threshold goes)."""
    keep = torch.zeros(len(boxes), dtype=torch.bool)
    for i in scores.argsort(descending=True).tolist():
        kept = boxes[keep]
        if len(kept) == 0 or float(box_iou(boxes[i : i + 1], kept).max()) < threshold:
            keep[i] = True
    return keep


def classify(prediction: dict, gt_boxes: list[list[float]]) -> tuple[str, bool]:
    """(cause, correct after NMS) of one branch's prediction ``{"boxes": [[x0, y0, x1, y1], ...], "scores": [...]}``."""
    boxes = torch.tensor(prediction["boxes"], dtype=torch.float).reshape(-1, 4)
    scores = torch.tensor(prediction["scores"], dtype=torch.float)
    gt = torch.tensor(gt_boxes, dtype=torch.float).reshape(-1, 4)
    outcome = grec_outcome(boxes, scores, gt)
    above = scores >= SCORE_THRESHOLD  # the boxes the evaluator keeps; NMS runs on those only
    kept_boxes, kept_scores = boxes[above], scores[above]
    keep = without_duplicates(kept_boxes, kept_scores)
    after_nms = grec_outcome(kept_boxes[keep], kept_scores[keep], gt).correct
    if outcome.correct:
        return "correct", after_nms
    if outcome.no_target:
        return "no-target expression, boxes kept", after_nms
    if outcome.num_kept == 0:
        return "nothing kept", after_nms
    if outcome.fn > 0:
        return "a target missed", after_nms
    return (
        "every target found, plus a duplicate" if after_nms else "every target found, plus a box elsewhere"
    ), after_nms


def tally(records: list[dict], branch: str) -> tuple[Counter, int]:
    """(count per cause, correct after NMS) over the records' ``branch`` predictions."""
    causes: Counter = Counter()
    after_nms = 0
    for record in records:
        cause, fixed = classify(record[branch], record["gt_boxes"])
        causes[cause] += 1
        after_nms += fixed
    return causes, after_nms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path, help="a 'simvg eval --dump' file of a GREC model")
    args = parser.parse_args(argv)
    if not args.dump.is_file():
        raise SystemExit(f"{args.dump}: not found")
    records = [json.loads(line) for line in args.dump.read_text().splitlines() if line.strip()]
    branches = [b for b in ("decoder", "token") if records and b in records[0]]
    if not records or "gt_boxes" not in records[0] or not branches:
        raise SystemExit(f"{args.dump}: not a GREC 'simvg eval --dump' file (no gt_boxes or branch predictions)")
    n = len(records)
    print(f"{args.dump}: {n} expressions\n")
    print("| cause | " + " | ".join(branches) + " |")
    print("|---|" + "---|" * len(branches))
    results = {b: tally(records, b) for b in branches}
    for cause in CAUSES:
        cells = [f"{results[b][0][cause]} ({100 * results[b][0][cause] / n:.1f} %)" for b in branches]
        print(f"| {cause} | " + " | ".join(cells) + " |")
    cells = [f"{results[b][1]} ({100 * results[b][1] / n:.1f} %)" for b in branches]
    print("| correct after NMS | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
