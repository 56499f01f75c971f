"""Box utilities against hand-computed values."""

import torch

from simvg.utils import box_ops as B


def test_round_trips():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(B.box_cxcywh_to_xyxy(B.box_xyxy_to_cxcywh(xyxy)), xyxy)
    assert torch.allclose(B.box_xywh_to_xyxy(B.box_xyxy_to_xywh(xyxy)), xyxy)
    assert torch.allclose(B.box_xyxy_to_cxcywh(xyxy)[0], torch.tensor([0.3, 0.55, 0.4, 0.7]))


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 6.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    # overlap 1, union 7; disjoint; identical
    assert torch.allclose(B.box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    # hull of a,b0 is 3x3=9 -> 1/7 - (9-7)/9; a,b1 hull 6x2=12, union 8 -> 0 - 4/12
    expected = torch.tensor([[1 / 7 - 2 / 9, -1 / 3, 1.0]])
    assert torch.allclose(B.generalized_box_iou(a, b), expected)
    assert torch.allclose(B.elementwise_box_iou(a.expand(3, 4), b), expected.new_tensor([1 / 7, 0.0, 1.0]))
    assert torch.allclose(B.elementwise_generalized_box_iou(a.expand(3, 4), b), expected[0])


def test_diagonal_disjoint_boxes_do_not_overlap():
    # The official LSJ multiplied two negative extents into a positive "overlap" (docs/design.md B4).
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    assert B.box_iou(a, b).item() == 0.0


def test_empty_boxes_have_zero_iou_not_nan():
    z = torch.zeros(1, 4)
    assert B.box_iou(z, z).item() == 0.0
    assert torch.isfinite(B.generalized_box_iou(z, z)).all()


def test_clip_and_scale():
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 50.0]])
    assert torch.equal(B.clip_boxes_xyxy(boxes, 100, 40), torch.tensor([[0.0, 3.0, 100.0, 40.0]]))
    assert torch.equal(B.scale_boxes(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), 10, 20), torch.tensor([[5.0, 10.0, 10, 20]]))
