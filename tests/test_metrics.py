"""REC and GREC metrics on hand-built cases (docs/design.md P3), including SimVG's per-batch bug B5."""

import pytest
import torch

from simvg.engine.metrics import (
    GrecOutcome,
    grec_outcome,
    grec_summary,
    greedy_match_count,
    rec_accuracy,
    rec_hits,
    rec_ious,
)
from simvg.utils.box_ops import generalized_box_iou


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_rec_iou_boundary_is_inclusive():
    gt = boxes([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    # [0,0,10,5]: inter 50, union 100 -> exactly 0.5 (hit); [0,0,10,4.9]: 0.49 (miss); disjoint: 0 (miss)
    pred = boxes([0, 0, 10, 5], [0, 0, 10, 4.9], [20, 20, 30, 30])
    ious = rec_ious(pred, gt)
    assert ious.tolist() == pytest.approx([0.5, 0.49, 0.0])
    assert rec_hits(ious).tolist() == [True, False, False]
    assert rec_accuracy(rec_hits(ious)) == pytest.approx(100 / 3)


def test_rec_uses_iou_not_giou():
    # inter 60*9 = 540, union 1000 + 600 - 540 = 1060 -> IoU 0.509; hull 100*11 = 1100 -> GIoU 0.473
    gt = boxes([0, 0, 100, 10])
    pred = boxes([0, 1, 60, 11])
    assert rec_ious(pred, gt).item() == pytest.approx(540 / 1060)
    assert rec_hits(rec_ious(pred, gt)).tolist() == [True]


def test_rec_accuracy_is_per_sample_over_split():
    # A split of 3 batches (2, 2, 1 samples) with hits [1,1], [0,1], [0]: per-sample 60 %,
    # per-batch mean (the official aggregation) would be (100 + 50 + 0) / 3 = 50 %.
    assert rec_accuracy([True, True, False, True, False]) == pytest.approx(60.0)
    assert rec_accuracy([]) == 0.0


def test_greedy_matching_takes_highest_pair_first():
    # Pred 0 matches both GTs; greedy picks (0, 0) = 0.9 first, then pred 1 can only take GT 1 at 0.6.
    sim = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
    assert greedy_match_count(sim, 0.5) == 2
    # After (0, 0) is taken, the remaining pair (1, 1) = 0.4 is below threshold.
    assert greedy_match_count(torch.tensor([[0.9, 0.8], [0.7, 0.4]]), 0.5) == 1
    assert greedy_match_count(torch.zeros(0, 3), 0.5) == 0


def test_grec_single_target():
    out = grec_outcome(boxes([0, 0, 10, 10], [50, 50, 60, 60]), torch.tensor([0.9, 0.2]), boxes([0, 0, 10, 10]))
    assert (out.tp, out.fp, out.fn, out.num_kept) == (1, 0, 0, 1)
    assert out.correct and out.f1 == 1.0


def test_grec_multi_target_with_extra_box():
    gt = boxes([0, 0, 10, 10], [20, 20, 30, 30])
    pred = boxes([0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60])
    out = grec_outcome(pred, torch.tensor([0.9, 0.8, 0.75]), gt)
    assert (out.tp, out.fp, out.fn) == (2, 1, 0)
    assert out.f1 == pytest.approx(4 / 5) and not out.correct


def test_grec_missing_box():
    gt = boxes([0, 0, 10, 10], [20, 20, 30, 30])
    out = grec_outcome(boxes([0, 0, 10, 10], [20, 20, 30, 30]), torch.tensor([0.9, 0.69]), gt)
    assert (out.tp, out.fp, out.fn, out.num_kept) == (1, 0, 1, 1)  # 0.69 < 0.7 is dropped
    assert out.f1 == pytest.approx(2 / 3) and not out.correct


def test_grec_score_threshold_is_inclusive():
    out = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.7]), boxes([0, 0, 10, 10]))
    assert out.num_kept == 1 and out.correct


def test_grec_no_target_with_and_without_box():
    empty = torch.zeros(0, 4)
    none_kept = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.3]), empty)
    one_kept = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.8]), empty)
    assert none_kept.no_target and none_kept.correct
    assert one_kept.no_target and not one_kept.correct
    summary = grec_summary([none_kept, one_kept])
    assert summary["n_acc"] == pytest.approx(50.0)
    assert summary["pr_f1"] == pytest.approx(50.0)
    assert summary["t_acc"] == 0.0  # no target expressions at all


def test_grec_giou_vs_iou_option():
    # Same pair as the REC case: IoU 0.509 >= 0.5 > GIoU 0.473, so only the IoU option matches it.
    gt = boxes([0, 0, 100, 10])
    pred = boxes([0, 1, 60, 11])
    assert grec_outcome(pred, torch.tensor([0.9]), gt, match_metric="iou").correct
    assert not grec_outcome(pred, torch.tensor([0.9]), gt).correct
    with pytest.raises(ValueError, match="match_metric"):
        grec_outcome(pred, torch.tensor([0.9]), gt, match_metric="dice")


def test_grec_one_prediction_cannot_match_two_targets():
    gt_two = boxes([0, 0, 10, 10], [0, 0, 10, 10])
    out = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.9]), gt_two)
    assert (out.tp, out.fp, out.fn) == (1, 0, 1) and not out.correct


def test_grec_summary_counts_over_the_whole_split_not_per_batch():
    """B5: a first batch with no no-target sample must not pull N-acc down; counts are global."""
    hit = GrecOutcome(no_target=False, num_kept=1, tp=1, fp=0, fn=0)
    miss = GrecOutcome(no_target=False, num_kept=0, tp=0, fp=0, fn=1)
    rejected = GrecOutcome(no_target=True, num_kept=0, tp=0, fp=0, fn=0)
    false_alarm = GrecOutcome(no_target=True, num_kept=2, tp=0, fp=0, fn=0)
    # batches: [hit, miss] (no no-target), [hit, hit], [rejected, false_alarm], [rejected]
    split = [hit, miss, hit, hit, rejected, false_alarm, rejected]
    summary = grec_summary(split)
    assert summary["pr_f1"] == pytest.approx(100 * 5 / 7)
    assert summary["n_acc"] == pytest.approx(100 * 2 / 3)  # per-batch averaging with B5 would give (0+0+50+100)/4
    assert summary["t_acc"] == pytest.approx(100 * 3 / 4)
    assert summary["num_samples"] == 7 and summary["num_no_target"] == 3


def test_grec_summary_empty():
    assert grec_summary([]) == {"pr_f1": 0.0, "n_acc": 0.0, "t_acc": 0.0, "num_samples": 0.0, "num_no_target": 0.0}


def test_grec_match_at_giou_exactly_half():
    """Catches GREC matching at GIoU > 0.5 instead of >= 0.5 (the official evaluator's bound is inclusive).

    Pred [0, 0, 10, 5] against GT [0, 0, 10, 10]: intersection 50, union 100, and the enclosing box is the GT
    itself (100), so GIoU = 50/100 - (100 - 100)/100 = 0.5 exactly in floating point.
    """
    gt = boxes([0, 0, 10, 10])
    half = boxes([0, 0, 10, 5])
    assert generalized_box_iou(half, gt).item() == 0.5
    out = grec_outcome(half, torch.tensor([0.9]), gt)
    assert (out.tp, out.fp, out.fn) == (1, 0, 0) and out.correct
    assert greedy_match_count(torch.tensor([[0.5]]), 0.5) == 1
    # two targets: [20, 20, 30, 30] hit exactly (taken first), then [0, 0, 10, 10] by [0, 5, 10, 10] at exactly 0.5
    # (the lower half this time: intersection 50, union = enclosing box = 100)
    two_gt = boxes([0, 0, 10, 10], [20, 20, 30, 30])
    pred = boxes([0, 5, 10, 10], [20, 20, 30, 30])
    both = grec_outcome(pred, torch.tensor([0.8, 0.95]), two_gt)
    assert (both.tp, both.fp, both.fn) == (2, 0, 0) and both.correct
    # just below the bound: [0, 0, 10, 4.9] has IoU = GIoU = 0.49 -> no match, one FP and one FN
    below = grec_outcome(boxes([0, 0, 10, 4.9]), torch.tensor([0.9]), gt)
    assert (below.tp, below.fp, below.fn) == (0, 1, 1) and not below.correct
    assert grec_summary([out, both, below])["pr_f1"] == pytest.approx(100 * 2 / 3)


def test_grec_target_expression_whose_only_kept_box_misses():
    """Catches T-acc counting expressions with a true positive instead of expressions with a kept box.

    T-acc asks "did the model say something is there?" (at least one kept box), Pr@F1 asks "was it right?". An
    expression with a target whose only kept box (score 0.9) lies elsewhere counts as detected for T-acc and as
    wrong for Pr@F1.
    """
    gt = boxes([0, 0, 10, 10])
    wrong = grec_outcome(boxes([50, 50, 60, 60], [0, 0, 10, 10]), torch.tensor([0.9, 0.3]), gt)
    assert (wrong.num_kept, wrong.tp, wrong.fp, wrong.fn) == (1, 0, 1, 1)
    assert wrong.f1 == 0.0 and not wrong.correct
    right = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.9]), gt)
    silent = grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.2]), gt)  # nothing kept
    summary = grec_summary([wrong, right, silent])
    assert summary["t_acc"] == pytest.approx(100 * 2 / 3)  # wrong and right kept a box; silent did not
    assert summary["pr_f1"] == pytest.approx(100 / 3)  # only right is correct
    assert grec_summary([wrong])["t_acc"] == 100.0 and grec_summary([wrong])["pr_f1"] == 0.0


def test_rec_accuracy_takes_any_iterable_of_hits():
    """A generator (not only a list or a tensor) is read once and counted."""
    assert rec_accuracy(h for h in (True, False, True, True)) == pytest.approx(75.0)
    assert rec_accuracy(torch.tensor([True, False])) == pytest.approx(50.0)
    assert rec_accuracy([]) == 0.0


def test_grec_outcome_fields_of_the_early_returns():
    """Every field of the two early answers (no target; nothing kept) and of the matched one, as the dump writes
    them: a no-target expression has no true/false positives or negatives whatever is kept, and a missed
    two-target expression has fn = 2 (the number of targets, not of box coordinates)."""
    empty = torch.zeros(0, 4)
    assert grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.8]), empty) == GrecOutcome(True, 1, 0, 0, 0)
    assert grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.1]), empty) == GrecOutcome(True, 0, 0, 0, 0)
    two = boxes([0, 0, 10, 10], [20, 20, 30, 30])
    assert grec_outcome(boxes([0, 0, 10, 10]), torch.tensor([0.1]), two) == GrecOutcome(False, 0, 0, 0, 2)
    found = grec_outcome(boxes([0, 0, 10, 10], [50, 50, 60, 60]), torch.tensor([0.9, 0.8]), two)
    assert found == GrecOutcome(False, 2, 1, 1, 1) and found.no_target is False


def test_f1_values():
    """F1 itself (the dump and the summary's ``correct`` read it): 1 for a rejected no-target expression, 0 for a
    false alarm, 2tp / (2tp + fp + fn) otherwise."""
    assert GrecOutcome(True, 0, 0, 0, 0).f1 == 1.0 and GrecOutcome(True, 2, 0, 0, 0).f1 == 0.0
    assert GrecOutcome(False, 3, 2, 1, 1).f1 == pytest.approx(4 / 6)
    assert GrecOutcome(False, 2, 2, 0, 0).f1 == 1.0 and GrecOutcome(False, 2, 2, 0, 0).correct
