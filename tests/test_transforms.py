"""Transforms: boxes follow resize / crop / pad exactly (hand-computed), LSJ keeps the target, flips swap words."""

import numpy as np
import pytest
import torch
from PIL import Image

from simvg.data.collate import boxes_to_original
from simvg.data.datasets import DataConfig
from simvg.data.transforms import (
    LargeScaleJitter,
    RandomHorizontalFlip,
    Resize,
    Sample,
    ToTensorNormalize,
    build_test_transform,
    build_train_transform,
    crop_coverage,
    preprocess,
    swap_left_right,
)
from simvg.utils.box_ops import box_cxcywh_to_xyxy

BOX = [[10.0, 5.0, 30.0, 25.0]]


def _sample(w=100, h=50, boxes=BOX, text="a dog") -> Sample:
    return Sample(Image.new("RGB", (w, h), (128, 128, 128)), torch.tensor(boxes), text)


@pytest.mark.parametrize(
    "mode, cxcywh, affine",
    [
        # 100x50 -> 64x64: fx = 0.64, fy = 1.28 -> box [6.4, 6.4, 19.2, 32.0]
        ("stretch", [0.2, 0.3, 0.2, 0.4], [0.64, 1.28, 0.0, 0.0]),
        # keep ratio: 64x32 at the top-left -> box [6.4, 3.2, 19.2, 16.0]
        ("letterbox", [0.2, 0.15, 0.2, 0.2], [0.64, 0.64, 0.0, 0.0]),
        # centred: 16 rows of padding above -> box [6.4, 19.2, 19.2, 32.0]
        ("letterbox_center", [0.2, 0.4, 0.2, 0.2], [0.64, 0.64, 0.0, 16.0]),
    ],
)
def test_resize_modes_hand_computed(mode, cxcywh, affine):
    image, meta, _ = build_test_transform(DataConfig(image_size=64, resize_mode=mode))(_sample())
    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(meta["boxes"], torch.tensor([cxcywh]))
    torch.testing.assert_close(meta["input_to_orig"], torch.tensor(affine))
    assert meta["size"].tolist() == [64, 64] and meta["orig_size"].tolist() == [50, 100]
    torch.testing.assert_close(boxes_to_original(meta["boxes"], meta), torch.tensor(BOX))


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "letterbox_center"])
def test_input_to_orig_exact_with_rounded_sizes(mode):
    # 97x33 at 64: 33 * 64/97 = 21.77 rows -> 22; the affine must use the real 22/33, not 64/97
    boxes = [[0.0, 0.0, 97.0, 33.0], [13.5, 7.25, 40.0, 30.0]]
    _, meta, _ = build_test_transform(DataConfig(image_size=64, resize_mode=mode))(_sample(97, 33, boxes))
    torch.testing.assert_close(boxes_to_original(meta["boxes"], meta), torch.tensor(boxes), atol=1e-4, rtol=0)
    if mode != "stretch":
        assert meta["input_to_orig"][1].item() == pytest.approx(22 / 33)


def test_letterbox_padding_normalises_to_about_zero():
    image, _, _ = build_test_transform(DataConfig(image_size=64, resize_mode="letterbox"))(_sample())
    assert image[:, 40:, :].abs().max() < 0.02  # rows 32..63 are padding
    assert image[:, :32, :].abs().max() > 0.05  # the grey content is not the mean colour


def test_normalisation_values():
    sample = Sample(Image.new("RGB", (2, 2), (255, 0, 128)), torch.zeros((0, 4)), "")
    image, meta = ToTensorNormalize()(sample)
    torch.testing.assert_close(
        image[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, (128 / 255 - 0.406) / 0.225])
    )
    half, _ = ToTensorNormalize((0.5,) * 3, (0.5,) * 3)(sample)
    torch.testing.assert_close(half[:, 1, 1], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    assert meta["boxes"].shape == (0, 4)


def test_crop_coverage_hand_computed():
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]])
    crops = np.array([[20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [12.0, -8.0, 20, -2]])
    # the last crop lies diagonally away: both overlaps negative; the official code made their product positive
    np.testing.assert_allclose(crop_coverage(boxes, crops), [0.0, 0.25, 1.0, 0.0])
    two = np.array([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    np.testing.assert_allclose(crop_coverage(two, np.array([[5.0, 0.0, 20.0, 10.0]])), [0.5])
    assert crop_coverage(np.zeros((0, 4)), crops).tolist() == [1.0] * 4


def test_lsj_shrink_scales_boxes_exactly():
    lsj = LargeScaleJitter(out_max_size=64, jitter_min=0.5, jitter_max=0.5)
    out = lsj(_sample(120, 80, [[30.0, 20.0, 90.0, 60.0]]), np.random.default_rng(0))
    # long side 64 * 0.5 = 32 -> 32 x round(80 * 32/120 = 21.33) = 21
    assert out.image.size == (32, 21)
    fx, fy = 32 / 120, 21 / 80
    torch.testing.assert_close(out.boxes, torch.tensor([[30 * fx, 20 * fy, 90 * fx, 60 * fy]]))
    assert out.affine == pytest.approx((fx, fy, 0.0, 0.0))


def _red_box_sample(box):
    image = Image.new("RGB", (120, 80), (0, 0, 255))
    image.paste((255, 0, 0), tuple(int(v) for v in box))
    return Sample(image, torch.tensor([box]), "x")


@pytest.mark.parametrize("box", [[40.0, 20.0, 80.0, 60.0], [0.0, 0.0, 30.0, 24.0], [96.0, 60.0, 120.0, 80.0]])
def test_lsj_crop_keeps_target_and_moves_image_and_box_together(box):
    lsj = LargeScaleJitter(out_max_size=64, jitter_min=1.01, jitter_max=1.4)  # always zoom in and crop
    for seed in range(100):
        sample = _red_box_sample(box)
        out = lsj(sample, np.random.default_rng(seed))
        w, h = out.image.size
        assert (w, h) == (64, 43)  # the size of the image at long side 64
        b = out.boxes[0]
        assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h, (seed, b)
        full = torch.tensor(box) * out.affine[0] + torch.tensor([out.affine[2], out.affine[3]] * 2)
        coverage = ((b[2] - b[0]) * (b[3] - b[1])) / ((full[2] - full[0]) * (full[3] - full[1]))
        assert coverage >= 0.3 - 1e-6, (seed, coverage)
        # one integer crop record for image and GT: the kept box's centre is red in the cropped image
        cx, cy = int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)
        r, _, blue = out.image.getpixel((cx, cy))
        assert r > 200 and blue < 60, (seed, (r, blue))


def test_lsj_returns_unjittered_when_no_crop_keeps_the_targets():
    boxes = [[0.0, 0.0, 6.0, 6.0], [114.0, 74.0, 120.0, 80.0]]  # opposite corners: no crop holds both
    lsj = LargeScaleJitter(out_max_size=64, jitter_min=1.4, jitter_max=1.4)
    sample = _sample(120, 80, boxes)
    out = lsj(sample, np.random.default_rng(3))
    assert out is sample


def test_swap_left_right_words():
    text = "the Left dog left of the LEFTMOST cat, right-hand side, rightmost; bright leftover"
    assert (
        swap_left_right(text) == "the Right dog right of the RIGHTMOST cat, left-hand side, leftmost; bright leftover"
    )
    assert swap_left_right(swap_left_right(text)) == text
    # SynthRef uses compass synonyms; "eastern"/"western" swap too, "beast" does not.
    assert swap_left_right("the star west of the East circle, eastern beast") == (
        "the star east of the West circle, western beast"
    )


def test_flip_mirrors_image_boxes_and_text():
    sample = _sample(text="man on the left")
    sample.image.putpixel((0, 0), (255, 0, 0))
    out = RandomHorizontalFlip(prob=1.0)(sample, np.random.default_rng(0))
    assert out.image.getpixel((99, 0)) == (255, 0, 0)
    torch.testing.assert_close(out.boxes, torch.tensor([[70.0, 5.0, 90.0, 25.0]]))
    assert out.text == "man on the right"
    # x_flipped = -1 * x_orig + 100
    assert out.affine == (-1.0, 1.0, 100.0, 0.0)
    assert RandomHorizontalFlip(prob=0.0)(sample, np.random.default_rng(0)) is sample


def test_train_pipeline_reproducible_and_boxes_valid():
    cfg = DataConfig(image_size=64, flip_prob=0.5)
    pipe = build_train_transform(cfg)
    rng = np.random.default_rng(0)
    a = pipe(_red_box_sample([40.0, 20.0, 80.0, 60.0]), np.random.default_rng(7))
    b = pipe(_red_box_sample([40.0, 20.0, 80.0, 60.0]), np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    for _ in range(30):
        image, meta, _ = pipe(_red_box_sample([40.0, 20.0, 80.0, 60.0]), rng)
        assert image.shape == (3, 64, 64)
        xyxy = box_cxcywh_to_xyxy(meta["boxes"])
        assert (xyxy >= 0).all() and (xyxy <= 1 + 1e-6).all() and (meta["boxes"][:, 2:] > 0).all()


def test_resize_rejects_unknown_mode():
    with pytest.raises(ValueError):
        Resize(64, "squash")


def test_preprocess_matches_test_pipeline_and_maps_back():
    image = Image.new("L", (90, 60), 10)  # grayscale input is converted like load_image does
    cfg = DataConfig(image_size=32, resize_mode="letterbox_center")
    tensor, meta = preprocess(image, cfg)
    assert tensor.shape == (3, 32, 32) and set(meta) == {"size", "orig_size", "input_to_orig"}
    assert meta["orig_size"].tolist() == [60, 90]
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # the whole 32x32 input, padding included
    torch.testing.assert_close(boxes_to_original(whole, meta), torch.tensor([[0.0, 0.0, 90.0, 60.0]]))
