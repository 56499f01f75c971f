"""Transforms: boxes follow resize / crop / pad exactly (hand-computed), LSJ keeps the target, flips swap words."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image

from simvg.config import DataConfig
from simvg.data.transforms import (
    LargeScaleJitter,
    RandomHorizontalFlip,
    Resize,
    Sample,
    ToTensorNormalize,
    boxes_to_original,
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


def _target(size: int, orig_hw: tuple[int, int], affine: list[float]) -> dict[str, torch.Tensor]:
    """A sample's metadata as the pipeline returns it: input size, original (h, w), input_to_orig (sx, sy, dx, dy)."""
    return {"size": torch.tensor([size, size]), "orig_size": torch.tensor(orig_hw),
            "input_to_orig": torch.tensor(affine)}  # fmt: skip


def test_boxes_to_original_hand_computed_stretch_letterbox_and_flip():
    """Predictions of any leading shape back to original pixels, worked out by hand for a 100x50 image at 64.

    Catches the affine applied the wrong way round (``* s`` or ``+ d``), x and y scales or columns swapped, the
    corners sorted along the wrong axis or stacked on the wrong one (only visible with more than one leading
    dimension, or with one box alone), and a missing clip at 0 or at the image's size."""
    # stretch: x_in = 0.64 x, y_in = 1.28 y
    stretch = _target(64, (50, 100), [0.64, 1.28, 0.0, 0.0])
    inside = [0.25, 0.5, 0.25, 0.5]  # input [8, 16, 24, 48] -> [12.5, 12.5, 37.5, 37.5]
    leaving = [0.0, 1.0, 0.5, 0.5]  # input [-16, 48, 16, 80] -> [-25, 37.5, 25, 62.5], clipped to [0, 37.5, 25, 50]
    back = boxes_to_original(torch.tensor([[inside, leaving], [leaving, inside]]), stretch)
    a, b = [12.5, 12.5, 37.5, 37.5], [0.0, 37.5, 25.0, 50.0]
    torch.testing.assert_close(back, torch.tensor([[a, b], [b, a]]))
    # centred letterbox: 64x32 content 16 rows down, x_in = 0.64 x, y_in = 0.64 y + 16
    boxed = _target(64, (50, 100), [0.64, 0.64, 0.0, 16.0])
    # input [24, 24, 40, 40] -> y (24 - 16) / 0.64 = 12.5; the whole input -> y -25..75, clipped to 0..50
    back = boxes_to_original(torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]]), boxed)
    torch.testing.assert_close(back, torch.tensor([[37.5, 12.5, 62.5, 37.5], [0.0, 0.0, 100.0, 50.0]]))
    # the same letterbox, flipped: x_in = 64 - 0.64 x; input [8, 24, 24, 40] -> x 87.5 and 62.5, sorted
    flipped = _target(64, (50, 100), [-0.64, 0.64, 64.0, 16.0])
    back = boxes_to_original(torch.tensor([0.25, 0.5, 0.25, 0.25]), flipped)
    torch.testing.assert_close(back, torch.tensor([62.5, 12.5, 87.5, 37.5]))


# ----------------------------------------------------------------------------------------------------------------
# Pixel-exact image/box alignment through crop, flip, letterbox and the map back to original pixels.
#
# The test image encodes where each pixel came from: pixel (x, y) of the original holds (R, G, B) = (x, y, 255)
# inside the integer box [x1, x2) x [y1, y2) and (x, y, 0) outside it. After an integer crop, a flip and a
# letterbox that only pads, every pixel of the network input still names its original pixel, so the affine
# ``input_to_orig`` and the boxes can be checked against the pixels themselves, edges included.

PAD = (124, 116, 104)  # round(255 * ImageNet mean): the letterbox fill of DataConfig's pipelines


def _coordinate_image(w: int, h: int, box: list[int]) -> Image.Image:
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    x1, y1, x2, y2 = box
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    return Image.fromarray(np.stack([xs, ys, np.where(inside, 255, 0)], -1).astype(np.uint8))


def _pixels(image: torch.Tensor, cfg: DataConfig) -> np.ndarray:
    """The normalised network input [3, H, W] back to its uint8 pixels [H, W, 3]."""
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    levels = (image * std + mean) * 255
    assert (levels - levels.round()).abs().max() < 1e-2
    return levels.round().to(torch.uint8).permute(1, 2, 0).numpy()


def _assert_aligned(pixels: np.ndarray, meta: dict, box: list[int]) -> tuple[int, int, int, int]:
    """Check input pixels, ``meta["boxes"]`` and ``input_to_orig`` against each other; returns the part of the
    original image (x1, y1, x2, y2) that the input shows."""
    h, w = pixels.shape[:2]
    content = ~(pixels == PAD).all(-1)
    v, u = np.nonzero(content)
    x, y = pixels[v, u, 0].astype(np.int64), pixels[v, u, 1].astype(np.int64)
    assert set(np.unique(pixels[v, u, 2]).tolist()) <= {0, 255}, "an input pixel was resampled"
    shown = (int(x.min()), int(y.min()), int(x.max()) + 1, int(y.max()) + 1)
    # the content is one whole window of the original, each pixel once
    assert len(u) == (shown[2] - shown[0]) * (shown[3] - shown[1]) == len(set(zip(x.tolist(), y.tolist())))
    # input_to_orig takes the centre of every input pixel to the centre of the original pixel it shows
    sx, sy, dx, dy = meta["input_to_orig"].double().tolist()
    off_x, off_y = np.abs((u + 0.5 - dx) / sx - (x + 0.5)).max(), np.abs((v + 0.5 - dy) / sy - (y + 0.5)).max()
    assert max(off_x, off_y) < 1e-4, (
        f"input_to_orig {meta['input_to_orig'].tolist()} misses the pixels by {off_x}, {off_y} px"
    )
    # the target box covers exactly the marked pixels: no pixel of the rectangle outside it, none missing
    xyxy = box_cxcywh_to_xyxy(meta["boxes"].double())[0] * torch.tensor([w, h, w, h], dtype=torch.float64)
    assert (xyxy - xyxy.round()).abs().max() < 1e-3, f"box {xyxy.tolist()} is not on the pixel grid"
    bx1, by1, bx2, by2 = xyxy.round().long().tolist()
    expected = np.zeros((h, w), dtype=bool)
    expected[by1:by2, bx1:bx2] = True
    marked = pixels[..., 2] == 255
    my, mx = np.nonzero(marked)
    drawn = [int(mx.min()), int(my.min()), int(mx.max()) + 1, int(my.max()) + 1] if len(mx) else []
    assert np.array_equal(marked, expected), f"box {[bx1, by1, bx2, by2]} but the rectangle's pixels span {drawn}"
    # and the map back returns the original box (clipped to what the input shows)
    back = boxes_to_original(meta["boxes"], meta)[0].tolist()  # x1 <= x2 even after a flip (sx < 0)
    clipped = [max(box[0], shown[0]), max(box[1], shown[1]), min(box[2], shown[2]), min(box[3], shown[3])]
    assert back == pytest.approx(clipped, abs=1e-3), f"mapped back to {back}, the original box is {clipped}"
    return shown


def _lsj_flip_letterbox(w: int, h: int, box: list[int], size: int, flip: bool, mode: str, seed: int):
    """The real train pipeline with a jitter of exactly max(w, h) / size: LSJ keeps the scale (no resampling) and
    crops a window whose long side is ``size``, so the letterbox only pads. None when LSJ found no crop."""
    cfg = DataConfig(image_size=size, lsj=True, jitter_min=max(w, h) / size, jitter_max=max(w, h) / size,
                     flip_prob=1.0 if flip else 0.0, resize_mode=mode)  # fmt: skip
    pipe = build_train_transform(cfg)
    assert isinstance(pipe.transforms[0], LargeScaleJitter) and len(pipe.transforms) == (3 if flip else 2)
    rng = np.random.default_rng(seed)
    sample = pipe.transforms[0](Sample(_coordinate_image(w, h, box), torch.tensor([box], dtype=torch.float32), ""), rng)
    if sample.image.size == (w, h):
        return None  # no crop kept enough of the box: the image comes back whole (and Resize resamples it)
    for t in pipe.transforms[1:]:
        sample = t(sample, rng)
    image, meta = pipe.finish(sample)
    assert image.shape == (3, size, size)
    return _assert_aligned(_pixels(image, cfg), meta, box)


class FixedCrop(LargeScaleJitter):
    """LSJ with a given crop corner, so that a crop can be hand-computed (the seeded loop below covers the search)."""

    def __init__(self, corner, **kwargs):
        super().__init__(**kwargs)
        self.corner = corner

    def _choose_crop(self, boxes, image_size, crop_size, rng):
        return self.corner


def test_crop_flip_letterbox_hand_computed_pixel_exact():
    """Catches an LSJ crop that moves the boxes (or the image) a few pixels off the other, and a flip that writes
    ``w + dx`` into the affine: the flip comes after a crop here, so dx != 0."""
    box = [30, 20, 60, 50]
    sample = Sample(_coordinate_image(120, 80, box), torch.tensor([box], dtype=torch.float32), "")
    # out_max_size 100, jitter 1.2: the image keeps its 120x80 pixels; the crop is 100 x round(66.67) = 67
    lsj = FixedCrop((7, 3), out_max_size=100, jitter_min=1.2, jitter_max=1.2)
    cropped = lsj(sample, np.random.default_rng(0))
    assert cropped.image.size == (100, 67)
    assert cropped.boxes.tolist() == [[23.0, 17.0, 53.0, 47.0]]
    assert cropped.affine == (1.0, 1.0, -7.0, -3.0)
    flipped = RandomHorizontalFlip(prob=1.0)(cropped, np.random.default_rng(0))
    # x -> 100 - x: box [47, 17, 77, 47]; x_flip = 100 - (x - 7) = -x + 107
    assert flipped.boxes.tolist() == [[47.0, 17.0, 77.0, 47.0]]
    assert flipped.affine == (-1.0, 1.0, 107.0, -3.0)
    # centred letterbox to 100: no scaling, (100 - 67) // 2 = 16 rows above -> box [47, 33, 77, 63], dy = 13
    image, meta = ToTensorNormalize()(Resize(100, "letterbox_center", PAD)(flipped))
    torch.testing.assert_close(meta["input_to_orig"], torch.tensor([-1.0, 1.0, 107.0, 13.0]))
    torch.testing.assert_close(meta["boxes"], torch.tensor([[0.62, 0.48, 0.30, 0.30]]))
    pixels = _pixels(image, DataConfig())
    assert tuple(pixels[33, 76]) == (30, 20, 255) and tuple(pixels[62, 47]) == (59, 49, 255)  # box corners
    assert tuple(pixels[33, 77]) == (29, 20, 0) and tuple(pixels[32, 50]) == (56, 19, 0)  # just outside
    assert _assert_aligned(pixels, meta, box) == (7, 3, 107, 70)


def test_flip_after_letterbox_maps_back():
    """Catches ``w + dx`` in the flip's affine with a letterbox offset (dx = 10) before the flip."""
    box = [5, 10, 15, 30]
    sample = Sample(_coordinate_image(40, 60, box), torch.tensor([box], dtype=torch.float32), "")
    boxed = Resize(60, "letterbox_center", PAD)(sample)  # (60 - 40) // 2 = 10 columns left of the image
    assert boxed.affine == (1.0, 1.0, 10.0, 0.0)
    flipped = RandomHorizontalFlip(prob=1.0)(boxed, np.random.default_rng(0))
    # box [15, 10, 25, 30] -> [35, 10, 45, 30]; x_flip = 60 - (x + 10) = -x + 50
    assert flipped.affine == (-1.0, 1.0, 50.0, 0.0)
    image, meta = ToTensorNormalize()(flipped)
    back = boxes_to_original(meta["boxes"], meta)[0]
    assert back.tolist() == pytest.approx([5.0, 10.0, 15.0, 30.0], abs=1e-4)  # the corners sorted, not swapped
    assert _assert_aligned(_pixels(image, DataConfig()), meta, box) == (0, 0, 40, 60)


def _random_case(rng: np.random.Generator) -> tuple:
    w, h = (int(v) for v in rng.integers(24, 201, size=2))  # <= 256: a colour channel holds the coordinate
    size = int(rng.integers(max(12, math.ceil(max(w, h) / 1.4)), max(w, h)))  # jitter in (1, 1.4]
    bw, bh = int(rng.integers(1, w // 2 + 1)), int(rng.integers(1, h // 2 + 1))
    x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    mode = str(rng.choice(["letterbox", "letterbox_center"]))
    return w, h, [x1, y1, x1 + bw, y1 + bh], size, bool(rng.integers(2)), mode, int(rng.integers(2**31))


def test_train_pipeline_alignment_on_random_crops_and_sizes():
    """Property test over 150 seeded random cases (image size, box, crop, flip, letterbox mode): the input's
    pixels, its target box and ``input_to_orig`` agree exactly, and the map back returns the original box.
    Catches a crop that shifts boxes or image by any number of pixels and a flip affine of ``w + dx``."""
    rng = np.random.default_rng(2024)
    cropped = flipped_after_shift = clipped = 0
    for _ in range(150):
        case = _random_case(rng)
        try:
            shown = _lsj_flip_letterbox(*case)
        except AssertionError as exc:  # name the case (w, h, box, size, flip, mode, seed) in the one-line message
            raise AssertionError(f"case {case}: {str(exc).strip().splitlines()[0]}") from exc
        if shown is None:
            continue
        w, h, box, _, flip, _, _ = case
        cropped += 1
        flipped_after_shift += flip and shown[0] > 0
        clipped += not (shown[0] <= box[0] and shown[1] <= box[1] and box[2] <= shown[2] and box[3] <= shown[3])
    # the cases exercise what they are meant to: crops, flips of a shifted window, boxes cut by the crop
    assert cropped >= 140 and flipped_after_shift >= 40 and clipped >= 10, (cropped, flipped_after_shift, clipped)


if importlib.util.find_spec("hypothesis") is not None:  # in the "test" extra; the seeded loop above runs without it
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @st.composite
    def _cases(draw):
        w, h = draw(st.integers(24, 200)), draw(st.integers(24, 200))
        size = draw(st.integers(max(12, math.ceil(max(w, h) / 1.4)), max(w, h) - 1))
        bw, bh = draw(st.integers(1, w // 2)), draw(st.integers(1, h // 2))
        x1, y1 = draw(st.integers(0, w - bw)), draw(st.integers(0, h - bh))
        flip, mode = draw(st.booleans()), draw(st.sampled_from(["letterbox", "letterbox_center"]))
        return w, h, [x1, y1, x1 + bw, y1 + bh], size, flip, mode, draw(st.integers(0, 2**31 - 1))

    @settings(max_examples=200, deadline=None)
    @given(_cases())
    def test_train_pipeline_alignment_property(case):
        """Hypothesis version of the seeded loop above (same checks, shrinks a failure to a minimal case)."""
        _lsj_flip_letterbox(*case)


def test_resize_scales_a_crop_offset_with_the_image():
    """After a crop the affine carries an offset; a resize scales it by the same per-axis factor as the image:
    orig -> cropped (x + 10, y + 6) -> stretched 2x wide and 5x tall = (2x + 20, 5y + 30)."""
    sample = Sample(Image.new("RGB", (50, 20)), torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "", affine=(1.0, 1.0, 10, 6))
    out = Resize(100, "stretch")(sample)
    assert out.image.size == (100, 100)
    assert out.affine == pytest.approx((2.0, 5.0, 20.0, 30.0))  # 100/50 = 2, 100/20 = 5


class _FixedDraw:
    """An rng whose ``random()`` returns a chosen value (to pin the flip's boundary)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_flip_probability_is_exactly_prob():
    """``RandomHorizontalFlip(p)`` flips iff the uniform draw u in [0, 1) is below p, so P(flip) = p exactly;
    the default p is 0.5."""
    assert RandomHorizontalFlip().prob == 0.5
    flip = RandomHorizontalFlip(0.5)
    assert flip(_sample(), _FixedDraw(0.4999)).boxes.tolist() == [[70.0, 5.0, 90.0, 25.0]]
    assert flip(_sample(), _FixedDraw(0.5)).boxes.tolist() == BOX  # u == p: no flip


def test_pipeline_uses_the_given_rng_and_a_fixed_one_otherwise():
    cfg = DataConfig(image_size=64, lsj=True, flip_prob=0.5)
    pipeline = build_train_transform(cfg)
    runs = [pipeline(_sample(), np.random.default_rng(seed))[1]["input_to_orig"] for seed in range(6)]
    assert len({tuple(r.tolist()) for r in runs}) > 1  # the draws follow the rng given
    default = pipeline(_sample())[1]["input_to_orig"]
    assert torch.equal(default, pipeline(_sample(), np.random.default_rng(0))[1]["input_to_orig"])


@pytest.mark.parametrize("build", [build_test_transform, build_train_transform])
def test_pipelines_normalise_and_pad_with_the_configs_mean_and_std(build):
    """Both pipelines take mean and std from the config (not ImageNet's): a pixel v becomes (v/255 - m)/s, and the
    letterbox padding is the mean colour round(255 m), which normalises to ~0."""
    mean, std = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]
    cfg = DataConfig(image_size=64, resize_mode="letterbox", lsj=False, mean=mean, std=std)
    image, _, _ = build(cfg)(Sample(Image.new("RGB", (64, 32), (51, 102, 204)), torch.zeros(0, 4), ""))
    for c, v in enumerate((51, 102, 204)):
        assert image[c, 0, 0].item() == pytest.approx((v / 255 - mean[c]) / std[c], abs=1e-6)
        pad = round(255 * mean[c])
        assert image[c, 63, 0].item() == pytest.approx((pad / 255 - mean[c]) / std[c], abs=1e-6)


def test_resize_is_bilinear():
    """The documented interpolation (PIL's default for ``resize`` would be bicubic)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    out = Resize(64, "stretch")(Sample(image, torch.zeros(0, 4), "")).image
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR)))
    assert not np.array_equal(np.asarray(out), np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC)))


def test_resize_defaults_and_bad_mode():
    assert Resize(64).mode == "stretch" and Resize(64).fill == (124, 116, 104)  # round(255 * ImageNet mean)
    with pytest.raises(ValueError, match=r"resize mode 'crop' not in \('stretch', 'letterbox', 'letterbox_center'\)"):
        Resize(64, "crop")


@pytest.mark.parametrize(
    "size, content, affine",
    [
        ((50, 100), (32, 64), (0.64, 0.64)),  # portrait: the long side is the height
        ((2, 200), (1, 64), (0.5, 0.32)),  # 2 px wide -> round(0.64) = 1 px, never 0
        ((200, 2), (64, 1), (0.32, 0.5)),
    ],
)
def test_letterbox_keeps_the_ratio_of_portrait_and_extreme_images(size, content, affine):
    out = Resize(64, "letterbox")(Sample(Image.new("RGB", size, (255, 0, 0)), torch.zeros(0, 4), ""))
    assert out.image.size == (64, 64)
    red = np.asarray(out.image)[..., 1] == 0  # the pasted content; the padding is the mean colour
    assert (red.any(0).sum(), red.any(1).sum()) == content
    assert out.affine == pytest.approx((*affine, 0.0, 0.0))


def test_crop_coverage_edge_cases():
    crops = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    assert crop_coverage(np.zeros((0, 4)), crops).tolist() == [1.0, 1.0, 1.0]  # one value per crop
    tiny = np.array([[1.0, 1.0, 1.5, 1.5]])  # 0.25 px^2, inside the first crop only
    assert crop_coverage(tiny, crops).tolist() == [1.0, 0.0, 0.0]


def test_lsj_defaults_are_the_official_ones():
    lsj = LargeScaleJitter()
    assert (lsj.out_max_size, lsj.jitter_min, lsj.jitter_max, lsj.tries, lsj.min_coverage) == (640, 0.3, 1.4, 100, 0.3)
    assert lsj.thresholds == (0.9, 0.8, 0.7, 0.6, 0.5)


@pytest.mark.parametrize("jitter, size, out_size, affine", [
    (0.5, (1, 640), (1, 320), (1.0, 0.5)),  # s = 0.5: 1 px wide stays 1 px (round(0.5) = 0 -> 1)
    (0.5, (640, 1), (320, 1), (0.5, 1.0)),
    (1.8, (1, 640), (1, 640), (2.0, 1.8)),  # s = 1.8: scaled to 2 x 1152, then a 1 x 640 crop
    (1.8, (640, 1), (640, 1), (1.8, 2.0)),
])  # fmt: skip
def test_lsj_on_one_pixel_wide_images(jitter, size, out_size, affine):
    lsj = LargeScaleJitter(640, jitter_min=jitter, jitter_max=jitter)
    out = lsj(Sample(Image.new("RGB", size), torch.zeros(0, 4), ""), np.random.default_rng(0))
    assert out.image.size == out_size
    assert out.affine[:2] == pytest.approx(affine)


def test_lsj_at_scale_one_draws_nothing_after_the_scale():
    """s = 1 draws the scale and nothing else, so the sample's later draws (the flip) are the same whatever the
    image size; an extra draw here would shift every later draw of the sample."""
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    LargeScaleJitter(64, jitter_min=1.0, jitter_max=1.0)(_sample(), rng)
    ref.uniform(1.0, 1.0)
    assert rng.random() == ref.random()


def _rounds(seed: int, high_x: int, high_y: int, tries: int = 100, rounds: int = 5) -> list[tuple[int, int]]:
    """The first candidate offset of each threshold round, as ``_choose_crop`` draws them."""
    rng = np.random.default_rng(seed)
    firsts = []
    for _ in range(rounds):
        xs, ys = rng.integers(0, high_x, size=tries), rng.integers(0, high_y, size=tries)
        firsts.append((int(xs[0]), int(ys[0])))
    return firsts


def test_lsj_crop_search_rounds_and_fallback():
    """Every crop of the window covers the same share of the box here, so the rules decide alone: a coverage equal
    to a threshold passes it (0.5: the first crop of the 0.5 round); with no threshold met, the best crop is the
    earliest one found (1/3: the first of the first round) and is used if it reaches ``min_coverage`` (>=)."""
    half = LargeScaleJitter()._choose_crop(torch.tensor([[0.0, 0.0, 200.0, 100.0]]), (200, 100), (100, 100),
                                           np.random.default_rng(0))  # fmt: skip
    assert half == _rounds(0, 101, 1)[4]
    box, image, window = torch.tensor([[0.0, 0.0, 300.0, 100.0]]), (300, 100), (100, 100)
    first = _rounds(0, 201, 1)[0]
    assert LargeScaleJitter()._choose_crop(box, image, window, np.random.default_rng(0)) == first
    exact = LargeScaleJitter(min_coverage=1 / 3)._choose_crop(box, image, window, np.random.default_rng(0))
    assert exact == first
    assert LargeScaleJitter(min_coverage=0.34)._choose_crop(box, image, window, np.random.default_rng(0)) is None


def test_finish_clips_boxes_that_leave_the_image():
    sample = Sample(Image.new("RGB", (64, 64)), torch.tensor([[-8.0, 16.0, 80.0, 96.0]]), "")
    _, meta, _ = build_test_transform(DataConfig(image_size=64, lsj=False))(sample)
    assert meta["boxes"].tolist() == [[0.5, 0.625, 1.0, 0.75]]  # [0, 16, 64, 64] in cxcywh / 64
