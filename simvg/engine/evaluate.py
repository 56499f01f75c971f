"""Split-level evaluation of one or both branches (docs/design.md O7, P3).

``evaluate`` runs the model over a loader, judges every expression in original-image pixels
(``boxes_to_original``), gathers the per-expression results of all ranks keyed by ``sample_id`` (so a sample
is counted once even if a sampler repeats it), and only then computes the metrics with ``simvg.engine.metrics``:
REC Acc@0.5 per branch, or GREC Pr@(F1=1, IoU>=0.5), N-acc and T-acc per branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from simvg.artifact import SCORE_THRESHOLD, postprocess
from simvg.data.collate import Batch
from simvg.data.transforms import boxes_to_original
from simvg.engine.metrics import GrecOutcome, grec_outcome, grec_summary, rec_accuracy, rec_hits, rec_ious
from simvg.utils import dist
from simvg.utils.amp import autocast

TASKS = ("rec", "grec")
PRIMARY_METRIC = {"rec": "acc", "grec": "pr_f1"}


def _r(values: Tensor) -> list:
    """Pixel coordinates and scores rounded for dumps (2 and 4 decimals are far below annotation noise)."""
    return [round(float(v), 4) for v in values.flatten().tolist()]


def judge_sample(
    branch_out: dict[str, Tensor], i: int, target: dict[str, Any], task: str, opts: dict[str, Any]
) -> dict[str, Any]:
    """One expression's result for one branch: prediction in original pixels plus its verdict.

    ``branch_out`` holds ``pred_logits`` [B, Q, 2] and ``pred_boxes`` [B, Q, 4]; ``i`` picks the sample.
    """
    logits, pred = branch_out["pred_logits"][i : i + 1].cpu(), branch_out["pred_boxes"][i : i + 1].cpu()
    det = postprocess(logits, pred, opts["score_threshold"])[0]
    scores, boxes = det.scores, boxes_to_original(det.boxes, target)  # [Q], [Q, 4] xyxy pixels
    gt = target["orig_boxes"].float().cpu().reshape(-1, 4)
    if task == "rec":
        q = int(det.keep[0])
        iou = float(rec_ious(boxes[q : q + 1], gt[:1])[0]) if len(gt) else 0.0
        return {"box": _r(boxes[q]), "score": round(float(scores[q]), 4), "iou": round(iou, 6)}
    order = scores.argsort(descending=True)
    kept = det.keep
    outcome = grec_outcome(boxes[kept], scores[kept], gt, opts["score_threshold"], opts["match_threshold"],
                           opts["match_metric"])  # fmt: skip
    return {
        "boxes": [_r(b) for b in boxes[order]],
        "scores": _r(scores[order]),
        "kept": outcome.num_kept,
        "tp": outcome.tp,
        "fp": outcome.fp,
        "fn": outcome.fn,
        "correct": outcome.correct,
    }


def judge_batch(outputs: dict[str, Any], batch: Batch, task: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-expression records of a batch: ids, expression, ground truth, and one entry per branch run."""
    records = []
    for i, target in enumerate(batch.targets):
        record = {
            "sample_id": str(target["sample_id"]),
            "image_id": target["image_id"],
            "expression": target["expression"],
            "gt_boxes": [_r(b) for b in target["orig_boxes"].float().cpu().reshape(-1, 4)],
        }
        for name, out in outputs.items():
            if out is not None:
                record[name] = judge_sample(out, i, target, task, opts)
        records.append(record)
    return records


def summarize(records: Iterable[dict[str, Any]], task: str, branches: Iterable[str], iou_threshold: float = 0.5):
    """Metrics (percent) per branch from per-expression records, plus ``score`` = mean primary metric."""
    records = list(records)
    metrics: dict[str, float] = {"num_samples": float(len(records))}
    primaries = []
    for name in branches:
        if task == "rec":
            ious = torch.tensor([r[name]["iou"] for r in records], dtype=torch.float64)
            values = {"acc": rec_accuracy(rec_hits(ious, iou_threshold))}
        else:
            outcomes = [GrecOutcome(not r["gt_boxes"], r[name]["kept"], r[name]["tp"], r[name]["fp"], r[name]["fn"])
                        for r in records]  # fmt: skip
            values = {k: v for k, v in grec_summary(outcomes).items() if not k.startswith("num_")}
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
        primaries.append(values[PRIMARY_METRIC[task]])
    metrics["score"] = sum(primaries) / len(primaries) if primaries else 0.0
    return metrics


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' records, each ``sample_id`` once, in a stable order."""
    unique: dict[str, dict[str, Any]] = {}
    for part in dist.all_gather_object(records):
        for record in part:
            unique.setdefault(record["sample_id"], record)
    return [unique[k] for k in sorted(unique)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    task: str = "rec",
    branch: str = "both",
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = SCORE_THRESHOLD,
    match_threshold: float = 0.5,
    match_metric: str = "giou",
    amp: str = "none",
    dump: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on every batch of ``loader`` (this rank's shard) and return split-level metrics.

    Returns (identical on every rank): ``num_samples``, ``score`` and per branch run ``"<branch>/acc"`` (REC) or
    ``"<branch>/pr_f1"``, ``"<branch>/n_acc"``, ``"<branch>/t_acc"`` (GREC), all in percent. If ``dump`` is a
    list, the gathered per-expression records are appended to it (ids, expression, ground truth and per branch
    the boxes in original pixels, scores and verdict).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    was_training = model.training
    model.eval()
    opts = {"score_threshold": score_threshold, "match_threshold": match_threshold, "match_metric": match_metric}
    local: list[dict[str, Any]] = []
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, amp):
            outputs = model(batch.images, batch.text_ids, batch.text_pad_mask, branch=branch)
        local += judge_batch(outputs, batch, task, opts)
    model.train(was_training)
    records = gather_records(local)
    branches = [b for b in ("decoder", "token") if records and b in records[0]]
    if dump is not None:
        dump.extend(records)
    return summarize(records, task, branches, iou_threshold)
