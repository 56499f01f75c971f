"""Hungarian matcher: hand-computed costs and assignments, DETR's invariants (batched == one by one, empty targets)."""

import math

import torch

from simvg.losses.matcher import HungarianMatcher


def _logits_for(p_object: list[float]) -> torch.Tensor:
    """Logits [Q, 2] whose softmax object probabilities are ``p_object``."""
    p = torch.tensor(p_object)
    return torch.stack((p.log(), (1 - p).log()), dim=-1)


def test_cost_matrix_hand_values():
    # One query at (0.5, 0.5, 0.2, 0.2), p(object) = 0.8; target (0.6, 0.5, 0.2, 0.2).
    outputs = {"pred_logits": _logits_for([0.8])[None], "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    # L1 = 0.1. xyxy: [0.4,0.4,0.6,0.6] vs [0.5,0.4,0.7,0.6]: inter 0.1*0.2 = 0.02, union 0.06, IoU 1/3,
    # hull 0.3*0.2 = 0.06 = union, so GIoU = 1/3.
    expected = 5 * 0.1 - 1 * 0.8 - 2 * (1 / 3)
    cost = HungarianMatcher().cost_matrix(outputs, targets)
    assert math.isclose(cost.item(), expected, rel_tol=1e-5)


def test_assignment_prefers_overlapping_query():
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    outputs = {"pred_logits": _logits_for([0.5, 0.5, 0.5])[None], "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]])}]
    ((q, t),) = HungarianMatcher()(outputs, targets)
    assert q.dtype == torch.int64 and t.dtype == torch.int64
    assert q.tolist() == [0, 1] and t.tolist() == [1, 0]


def test_class_cost_breaks_ties():
    # Two identical boxes: the one with the higher object probability wins.
    boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3]]])
    outputs = {"pred_logits": _logits_for([0.2, 0.9])[None], "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    ((q, t),) = HungarianMatcher()(outputs, targets)
    assert q.tolist() == [1] and t.tolist() == [0]


def test_batched_equals_one_by_one_and_empty_targets():
    g = torch.Generator().manual_seed(0)
    b, nq = 4, 5
    outputs = {"pred_logits": torch.randn(b, nq, 2, generator=g), "pred_boxes": torch.rand(b, nq, 4, generator=g)}
    sizes = [2, 0, 5, 1]
    targets = [
        {"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25}
        for n in sizes
    ]
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, (q, t) in enumerate(batched):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]])[0]
        assert torch.equal(q, single[0]) and torch.equal(t, single[1])
        assert len(q) == len(t) == min(nq, sizes[i])
        assert len(set(q.tolist())) == len(q)
    assert len(batched[1][0]) == 0


def test_all_targets_empty_and_single_query():
    outputs = {"pred_logits": torch.randn(3, 1, 2), "pred_boxes": torch.rand(3, 1, 4)}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(3)]
    for q, t in HungarianMatcher()(outputs, empty):
        assert q.numel() == 0 and t.numel() == 0 and q.dtype == torch.int64
    one = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])} for _ in range(3)]
    for q, t in HungarianMatcher()(outputs, one):  # Q = 1, one target: the match is trivial
        assert q.tolist() == [0] and t.tolist() == [0]


def test_box_cost_is_l1_over_all_four_coordinates():
    """Two coordinates differ by 0.1: the L1 distance is 0.2 (an L2 distance would be 0.141; with one differing
    coordinate, as in the test above, the two agree)."""
    outputs = {"pred_logits": _logits_for([0.5])[None], "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.6, 0.2, 0.2]])}]
    only_box = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0).cost_matrix(outputs, targets)
    assert math.isclose(only_box.item(), 0.2, rel_tol=1e-5)


def test_targets_in_double_precision_give_the_same_costs():
    """Ground truth may come as float64 (e.g. built from NumPy); it is compared in the predictions' dtype."""
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    outputs = {"pred_logits": _logits_for([0.8, 0.3])[None], "pred_boxes": pred}
    boxes = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    single = HungarianMatcher().cost_matrix(outputs, [{"labels": torch.tensor([0]), "boxes": boxes}])
    double = HungarianMatcher().cost_matrix(outputs, [{"labels": torch.tensor([0]), "boxes": boxes.double()}])
    assert double.dtype == torch.float32 and torch.equal(single, double)
