"""SetCriterion: each weighted term against hand-computed values; aux keys; empty targets; num_boxes under DDP."""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simvg.losses.criterion import SetCriterion, num_target_boxes
from simvg.losses.matcher import HungarianMatcher


def _logits_for(p_object: list[float]) -> torch.Tensor:
    p = torch.tensor(p_object)
    return torch.stack((p.log(), (1 - p).log()), dim=-1)


def _target(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    b = torch.tensor(boxes).reshape(-1, 4)
    return {"labels": torch.zeros(len(b), dtype=torch.int64), "boxes": b}


def test_terms_hand_computed_one_box():
    # q0 matches the target (L1 0.1, GIoU 1/3, see test_matcher); q1 is unmatched -> "no object".
    out = {
        "pred_logits": _logits_for([0.8, 0.3])[None],
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]]),
    }
    losses = SetCriterion(HungarianMatcher())(out, [_target([[0.6, 0.5, 0.2, 0.2]])])
    ce = (-math.log(0.8) * 1.0 - math.log(0.7) * 0.1) / (1.0 + 0.1)  # weighted mean over both queries
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    assert math.isclose(losses["loss_class"].item(), 1 * ce, rel_tol=1e-5)
    assert math.isclose(losses["loss_bbox"].item(), 5 * 0.1, rel_tol=1e-5)
    assert math.isclose(losses["loss_giou"].item(), 2 * (1 - 1 / 3), rel_tol=1e-5)


def test_terms_are_normalised_by_num_boxes():
    # Two images, one box each: L1 sums are 0.1 and 0.2 (w differs by 0.2), num_boxes = 2.
    out = {
        "pred_logits": _logits_for([0.6, 0.9])[:, None],
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.5, 0.5, 0.4, 0.4]]]),
    }
    targets = [_target([[0.6, 0.5, 0.2, 0.2]]), _target([[0.5, 0.5, 0.2, 0.4]])]
    losses = SetCriterion(HungarianMatcher(), weight_bbox=1.0, weight_giou=1.0)(out, targets)
    assert math.isclose(losses["loss_bbox"].item(), (0.1 + 0.2) / 2, rel_tol=1e-5)
    # image 1: [0.3,0.3,0.7,0.7] vs [0.4,0.3,0.6,0.7]: IoU = 0.08/0.16 = 0.5 = GIoU (target inside prediction)
    assert math.isclose(losses["loss_giou"].item(), ((1 - 1 / 3) + (1 - 0.5)) / 2, rel_tol=1e-5)
    ce = (-math.log(0.6) - math.log(0.9)) / 2  # both queries matched, weight 1 each
    assert math.isclose(losses["loss_class"].item(), ce, rel_tol=1e-5)


def test_perfect_prediction_and_aux_keys():
    box = torch.tensor([[[0.4, 0.6, 0.3, 0.2]]])
    layer = {"pred_logits": torch.tensor([[[20.0, -20.0]]]), "pred_boxes": box}
    out = {**layer, "aux_outputs": [dict(layer), dict(layer)]}
    losses = SetCriterion(HungarianMatcher())(out, [_target([[0.4, 0.6, 0.3, 0.2]])])
    expected_keys = {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_0", "_1")}
    assert set(losses) == expected_keys
    assert all(v.item() < 1e-5 for v in losses.values())


def test_empty_targets_push_everything_to_no_object():
    out = {"pred_logits": _logits_for([0.2, 0.6])[None], "pred_boxes": torch.rand(1, 2, 4, requires_grad=True)}
    losses = SetCriterion(HungarianMatcher())(out, [_target([])])
    # every query is "no object" with weight 0.1: the weighted mean is the plain mean
    assert math.isclose(losses["loss_class"].item(), -(math.log(0.8) + math.log(0.4)) / 2, rel_tol=1e-5)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    sum(losses.values()).backward()  # still differentiable
    assert torch.isfinite(out["pred_boxes"].grad).all()


def _ddp_worker(rank: int, port: int, counts: list[int], result: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(counts))
    try:
        targets = [_target([[0.5, 0.5, 0.1, 0.1]] * n) for n in [counts[rank]]]
        result[rank] = num_target_boxes(targets, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_across_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = torch.zeros(2).share_memory_()
    mp.spawn(_ddp_worker, args=(port, [1, 4], result), nprocs=2)
    assert result.tolist() == [2.5, 2.5]
    assert num_target_boxes([_target([])], torch.device("cpu")) == 1.0  # clamped at 1 without a process group


def test_class_weight_is_a_non_persistent_buffer():
    """The no-object weight is configuration, not a learned state: it must not enter a state dict (the official
    checkpoints' ``empty_weight`` is dropped on load for the same reason)."""
    criterion = SetCriterion(HungarianMatcher(), eos_coef=0.25)
    assert criterion.class_weight.tolist() == [1.0, 0.25]
    assert "class_weight" not in criterion.state_dict()


def test_each_image_is_matched_to_its_own_targets_in_a_batch_of_three():
    """Batch targets are concatenated; image i's matches index them through its offset. With three images (one or
    two boxes each) and every prediction equal to its own image's ground truth, the box losses are exactly 0: an
    offset subtracted instead of added, or offsets for the first image only, would pair boxes across images.
    (With two images of one box each, -offset wraps onto the right index, so three are needed.)"""
    gts = [[[0.2, 0.2, 0.1, 0.1]], [[0.5, 0.5, 0.2, 0.3], [0.8, 0.3, 0.1, 0.2]], [[0.3, 0.7, 0.3, 0.1]]]
    preds = [gts[0] + [[0.9, 0.9, 0.05, 0.05]], gts[1], gts[2] + [[0.1, 0.9, 0.05, 0.05]]]
    out = {"pred_logits": _logits_for([0.9, 0.1] * 3).reshape(3, 2, 2), "pred_boxes": torch.tensor(preds)}
    losses = SetCriterion(HungarianMatcher())(out, [_target(g) for g in gts])
    assert losses["loss_bbox"].item() == 0.0
    assert abs(losses["loss_giou"].item()) < 1e-6
