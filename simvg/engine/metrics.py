"""Evaluation metrics as pure functions: REC Acc@0.5 and gRefCOCO's GREC metrics.

REC (docs/design.md O7, P3a): one box per expression, correct when IoU(pred, gt) >= 0.5; the accuracy is
correct expressions / all expressions over the whole split (the official code averages per-batch accuracies).

GREC (docs/design.md P3b): a port of the *official* gRefCOCO ``RefExpEvaluator`` semantics, counted over the whole
split. Per expression: keep predictions with score >= ``SCORE_THRESHOLD`` (0.7, defined in ``simvg.config`` with the
eval section); a no-target expression is correct iff nothing is kept; otherwise predictions and ground truths are
matched greedily by GIoU >= 0.5 (highest pair first, one-to-one), and the expression is correct iff
F1 = 2TP / (2TP + FP + FN) reaches 1. Pr@(F1=1, IoU>=0.5) = correct / all; N-acc = no-target expressions with no
kept box / no-target expressions; T-acc = target expressions with at least one kept box / target expressions.
SimVG's per-batch averaging (bug B5) is deliberately not reproduced.

All boxes are xyxy in one common frame (we use original-image pixels). Every IoU comes from ``simvg.utils.box_ops``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from simvg.config import SCORE_THRESHOLD
from simvg.utils.box_ops import box_iou, elementwise_box_iou, generalized_box_iou


def rec_ious(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of aligned pairs: pred [N, 4] xyxy, gt [N, 4] xyxy -> [N]."""
    return elementwise_box_iou(pred_boxes.float(), gt_boxes.float())


def rec_hits(ious: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """[N] IoUs -> [N] bool, True where the expression is grounded correctly (IoU >= threshold)."""
    return ious >= iou_threshold


def rec_accuracy(hits: Iterable[bool] | Tensor) -> float:
    """Acc@threshold in percent over all expressions given; 0.0 for an empty split."""
    values = torch.as_tensor(list(hits) if not isinstance(hits, Tensor) else hits, dtype=torch.float64)
    return 100.0 * values.mean().item() if values.numel() else 0.0


@dataclass(frozen=True)
class GrecOutcome:
    """The evaluator's verdict on one expression."""

    no_target: bool  # the ground truth holds no box
    num_kept: int  # predictions with score >= threshold
    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        """F1 of the matching; a no-target expression scores 1 when nothing was kept, else 0."""
        return outcome_f1(self)

    @property
    def correct(self) -> bool:
        return outcome_f1(self) >= 1.0


# The formula lives in a plain function: make mutate (docs/mutation.md) does not mutate the bodies of properties.
def outcome_f1(o: GrecOutcome) -> float:
    """F1 of ``o``'s matching; a no-target expression scores 1 when nothing was kept, else 0."""
    if o.no_target:
        return 1.0 if o.num_kept == 0 else 0.0
    return 2 * o.tp / (2 * o.tp + o.fp + o.fn)


def greedy_match_count(scores: Tensor, threshold: float) -> int:
    """Greedy one-to-one matching on a [P, G] similarity matrix; returns the number of pairs >= threshold.

    Repeatedly takes the global maximum, counts it if it reaches the threshold, and removes its row and column
    (the official evaluator zeroes them; we use -inf so that negative GIoUs can never be picked twice).
    """
    scores = scores.clone().float()
    matched = 0
    for _ in range(min(scores.shape)):
        best = scores.max()
        if best < threshold:
            break
        flat = int(scores.argmax())
        row, col = divmod(flat, scores.shape[1])
        scores[row, :] = float("-inf")
        scores[:, col] = float("-inf")
        matched += 1
    return matched


def grec_outcome(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    gt_boxes: Tensor,
    score_threshold: float = SCORE_THRESHOLD,
    match_threshold: float = 0.5,
    match_metric: str = "giou",
) -> GrecOutcome:
    """Judge one GREC expression.

    Args:
        pred_boxes: [Q, 4] xyxy predictions.
        pred_scores: [Q] object probabilities.
        gt_boxes: [G, 4] xyxy ground truth; G == 0 means "no target".
        score_threshold: predictions with score >= this are kept (official 0.7).
        match_threshold: a pair matches when its similarity is >= this (official 0.5).
        match_metric: "giou" (official evaluator) or "iou".
    """
    kept = pred_boxes[pred_scores >= score_threshold].float()
    if gt_boxes.shape[0] == 0:
        return GrecOutcome(no_target=True, num_kept=len(kept), tp=0, fp=0, fn=0)
    if len(kept) == 0:
        return GrecOutcome(no_target=False, num_kept=0, tp=0, fp=0, fn=gt_boxes.shape[0])
    if match_metric not in ("giou", "iou"):
        raise ValueError(f"match_metric must be 'giou' or 'iou', not {match_metric!r}")
    similarity = (generalized_box_iou if match_metric == "giou" else box_iou)(kept, gt_boxes.float())
    tp = greedy_match_count(similarity, match_threshold)
    return GrecOutcome(no_target=False, num_kept=len(kept), tp=tp, fp=len(kept) - tp, fn=gt_boxes.shape[0] - tp)


def grec_summary(outcomes: Iterable[GrecOutcome]) -> dict[str, float]:
    """Split-level GREC metrics in percent: ``pr_f1`` (Pr@(F1=1, IoU>=0.5)), ``n_acc``, ``t_acc``.

    Counts are taken over every expression given (never per batch); a ratio with an empty denominator is 0.0.
    """
    outcomes = list(outcomes)
    correct = sum(o.correct for o in outcomes)
    no_target = [o for o in outcomes if o.no_target]
    target = [o for o in outcomes if not o.no_target]
    rejected = sum(o.num_kept == 0 for o in no_target)
    detected = sum(o.num_kept > 0 for o in target)

    def pct(num: int, den: int) -> float:
        return 100.0 * num / den if den else 0.0

    return {
        "pr_f1": pct(correct, len(outcomes)),
        "n_acc": pct(rejected, len(no_target)),
        "t_acc": pct(detected, len(target)),
        "num_samples": float(len(outcomes)),
        "num_no_target": float(len(no_target)),
    }
