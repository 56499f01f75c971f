"""Box utilities against hand-computed values."""

import torch

from simvg.utils import box_ops as B


def test_round_trips():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(B.box_cxcywh_to_xyxy(B.box_xyxy_to_cxcywh(xyxy)), xyxy)
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


def test_clip():
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 50.0]])
    assert torch.equal(B.clip_boxes_xyxy(boxes, 100, 40), torch.tensor([[0.0, 3.0, 100.0, 40.0]]))


def test_giou_hull_uses_each_boxs_own_right_and_bottom_edges():
    """A wide, flat box on the right: the hull runs to its x2 = 9, not to its y2 = 1 (a hull built from the wrong
    coordinate of boxes1 survived the first mutation run, docs/mutation.md)."""
    a = torch.tensor([[5.0, 0.0, 9.0, 1.0]])  # area 4
    b = torch.tensor([[0.0, 0.0, 2.0, 1.0]])  # area 2, disjoint; hull [0, 0, 9, 1] = 9, union 6
    assert torch.allclose(B.generalized_box_iou(a, b), torch.tensor([[0.0 - (9 - 6) / 9]]))
    assert torch.allclose(B.generalized_box_iou(b, a), torch.tensor([[0.0 - (9 - 6) / 9]]))


def test_conversions_work_on_any_leading_shape():
    """[..., 4] as documented: a single box [4] and a batch [2, 3, 4] convert along the last axis (a conversion
    that unbinds or stacks along axis 1 passes every [N, 4] test)."""
    one = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert B.box_xywh_to_xyxy(one).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert B.box_cxcywh_to_xyxy(one).tolist() == [-0.5, 0.0, 2.5, 4.0]
    assert B.box_xyxy_to_cxcywh(torch.tensor([-0.5, 0.0, 2.5, 4.0])).tolist() == [1.0, 2.0, 3.0, 4.0]
    batch = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    xyxy = B.box_xywh_to_xyxy(batch)
    assert xyxy.shape == (2, 3, 4) and xyxy[1, 2].tolist() == [20.0, 21.0, 42.0, 44.0]
    corners = B.box_cxcywh_to_xyxy(batch)
    assert corners.shape == (2, 3, 4) and corners[1, 2].tolist() == [9.0, 9.5, 31.0, 32.5]
    assert torch.allclose(B.box_xyxy_to_cxcywh(corners), batch)


def test_clip_bounds_every_coordinate_on_both_sides():
    """Each coordinate is clamped to [0, W] or [0, H], below and above, whatever the box's shape (also [4] and
    [2, 1, 4]); a box under 1 px keeps its fractional coordinates."""
    boxes = torch.tensor([[-5.0, -6.0, -1.0, -2.0], [150.0, 80.0, 200.0, 90.0], [0.25, 0.25, 0.5, 0.5]])
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 50.0, 100.0, 50.0], [0.25, 0.25, 0.5, 0.5]])
    assert torch.equal(B.clip_boxes_xyxy(boxes, 100, 50), expected)
    assert torch.equal(B.clip_boxes_xyxy(boxes[1], 100, 50), expected[1])
    assert torch.equal(B.clip_boxes_xyxy(boxes[:2, None], 100, 50), expected[:2, None])
