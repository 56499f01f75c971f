"""Box- and caption-aware image transforms, the train/test pipelines, ``preprocess`` for inference and its inverse
``boxes_to_original`` (predictions back to original-image pixels).

A transform maps a ``Sample`` (PIL image, boxes xyxy [n, 4] float in pixels of the current image, text, and the
affine ``(sx, sy, dx, dy)`` that takes original pixels to current ones: ``x_cur = sx * x_orig + dx``) to a new
``Sample``, drawing any randomness from the ``numpy.random.Generator`` it is given (so a sample's augmentation
depends only on (seed, epoch, index), whatever the worker). ``ToTensorNormalize`` ends a pipeline and returns the
image tensor [3, H, W] plus the target fields ``boxes`` (cxcywh normalised), ``size``, ``orig_size`` and
``input_to_orig`` of the collate.py contract; ``input_to_orig`` is that affine, exact for every resize, crop and
pad (a horizontal flip makes ``sx`` negative, so train-time flipped boxes map back mirrored).

Pipelines (docs/design.md O4.1): test = Resize to S x S (stretched by default, like the official ``keep_ratio=False``;
or letterboxed) + Normalize; train = [LargeScaleJitter] + [RandomHorizontalFlip] + the same Resize + Normalize.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from simvg.data.image_io import to_rgb
from simvg.utils.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, clip_boxes_xyxy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("stretch", "letterbox", "letterbox_center")


@dataclass
class Sample:
    """An image with its boxes (xyxy pixels [n, 4]) and text, plus the orig -> current affine."""

    image: Image.Image
    boxes: Tensor
    text: str
    affine: tuple[float, float, float, float] = (1.0, 1.0, 0.0, 0.0)  # (sx, sy, dx, dy)
    orig_size: tuple[int, int] | None = None  # (h, w) of the original image

    def __post_init__(self) -> None:
        if self.orig_size is None:
            self.orig_size = (self.image.height, self.image.width)


Transform = Callable[[Sample, np.random.Generator], Sample]


def _scale(sample: Sample, image: Image.Image) -> Sample:
    """Resize to ``image`` (already resized) and scale boxes/affine by the exact per-axis factors."""
    fx, fy = image.width / sample.image.width, image.height / sample.image.height
    sx, sy, dx, dy = sample.affine
    boxes = sample.boxes * sample.boxes.new_tensor([fx, fy, fx, fy])
    return replace(sample, image=image, boxes=boxes, affine=(sx * fx, sy * fy, dx * fx, dy * fy))


def _shift(sample: Sample, image: Image.Image, ox: int, oy: int) -> Sample:
    """Move the content by (ox, oy) pixels (negative = crop offset) onto ``image``; boxes are clipped to it."""
    sx, sy, dx, dy = sample.affine
    boxes = clip_boxes_xyxy(sample.boxes + sample.boxes.new_tensor([ox, oy, ox, oy]), image.width, image.height)
    return replace(sample, image=image, boxes=boxes, affine=(sx, sy, dx + ox, dy + oy))


def resize_to(sample: Sample, width: int, height: int) -> Sample:
    """Bilinear resize to exactly ``width`` x ``height`` (aspect ratio not kept)."""
    if (width, height) == sample.image.size:
        return sample
    return _scale(sample, sample.image.resize((width, height), Image.Resampling.BILINEAR))


class Resize:
    """Resize to ``size`` x ``size``: ``stretch`` (official test resize) or keep-ratio letterbox.

    ``letterbox`` scales the long side to ``size`` and pads bottom/right; ``letterbox_center`` pads evenly (the
    extra pixel of an odd pad goes bottom/right). Padding uses ``fill`` (the mean colour, so it normalises to ~0).
    """

    def __init__(self, size: int, mode: str = "stretch", fill: tuple[int, int, int] = (124, 116, 104)) -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {mode!r} not in {RESIZE_MODES}")
        self.size, self.mode, self.fill = size, mode, fill

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        s = self.size
        if self.mode == "stretch":
            return resize_to(sample, s, s)
        w, h = sample.image.size
        scale = s / max(w, h)
        sample = resize_to(sample, max(1, min(s, round(w * scale))), max(1, min(s, round(h * scale))))
        ox, oy = 0, 0
        if self.mode == "letterbox_center":
            ox, oy = (s - sample.image.width) // 2, (s - sample.image.height) // 2
        canvas = Image.new("RGB", (s, s), self.fill)
        canvas.paste(sample.image, (ox, oy))
        return _shift(sample, canvas, ox, oy)


def crop_coverage(boxes: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Fraction of each box's area inside each crop, min over boxes: boxes [n, 4], crops [k, 4] xyxy -> [k].

    The overlap is clamped at 0 per axis, so a crop lying diagonally away from a box covers 0 of it (the
    official ``_bbox_overlaps`` multiplied two negative extents into a positive area, docs/design.md B4a). With no
    boxes (a no-target GREC sample) every crop has coverage 1. NumPy, not torch: this runs up to 500 times per
    sample on tiny arrays, where torch's per-call overhead dominates.
    """
    if boxes.shape[0] == 0:
        return np.ones(crops.shape[0])
    lt = np.maximum(boxes[:, None, :2], crops[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], crops[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)  # [n, k]
    area = np.maximum((boxes[:, 2:] - boxes[:, :2]).prod(-1), 1e-12)
    return (inter / area[:, None]).min(axis=0)


class LargeScaleJitter:
    """SimVG's LargeScaleJitter (docs/design.md O4.1) with the B4 bugs fixed.

    Draw ``s ~ U(jitter_min, jitter_max)`` and rescale so the long side is ``out_max_size * s``. If ``s > 1``, crop
    a window of the size the image has at long side ``out_max_size``: for each coverage threshold (0.9 ... 0.5)
    try ``tries`` integer offsets and take the first whose worst box coverage reaches it; otherwise the best
    crop if its coverage is >= ``min_coverage``; otherwise the sample is returned un-jittered. One integer crop
    record moves the image and the boxes alike (B4b, B4c); boxes are clipped to the crop and keep positive area.
    """

    def __init__(
        self,
        out_max_size: int = 640,
        jitter_min: float = 0.3,
        jitter_max: float = 1.4,
        thresholds: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5),
        tries: int = 100,
        min_coverage: float = 0.3,
    ) -> None:
        self.out_max_size, self.jitter_min, self.jitter_max = out_max_size, jitter_min, jitter_max
        self.thresholds, self.tries, self.min_coverage = tuple(thresholds), tries, min_coverage

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = float(rng.uniform(self.jitter_min, self.jitter_max))
        w, h = sample.image.size
        base = self.out_max_size / max(w, h)
        scaled = resize_to(sample, max(1, round(w * base * s)), max(1, round(h * base * s)))
        if s <= 1.0:
            return scaled
        cw, ch = min(scaled.image.width, max(1, round(w * base))), min(scaled.image.height, max(1, round(h * base)))
        crop = self._choose_crop(scaled.boxes, scaled.image.size, (cw, ch), rng)
        if crop is None:
            return sample
        x0, y0 = crop
        return _shift(scaled, scaled.image.crop((x0, y0, x0 + cw, y0 + ch)), -x0, -y0)

    def _choose_crop(
        self, boxes: Tensor, image_size: tuple[int, int], crop_size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[int, int] | None:
        """Integer top-left corner of the accepted crop, or None when no crop keeps enough of the boxes."""
        (iw, ih), (cw, ch) = image_size, crop_size
        boxes_np = boxes.double().numpy()
        best, best_cov = None, -1.0
        for thr in self.thresholds:
            xs = rng.integers(0, iw - cw + 1, size=self.tries)
            ys = rng.integers(0, ih - ch + 1, size=self.tries)
            cov = crop_coverage(boxes_np, np.stack([xs, ys, xs + cw, ys + ch], axis=1).astype(np.float64))
            ok = np.flatnonzero(cov >= thr)
            if len(ok):
                return int(xs[ok[0]]), int(ys[ok[0]])
            i = int(cov.argmax())
            if float(cov[i]) > best_cov:
                best, best_cov = (int(xs[i]), int(ys[i])), float(cov[i])
        return best if best_cov >= self.min_coverage else None


_SIDE_WORD = re.compile(r"\b(left|right|west|east)(most|hand|side|ward|wards|ern)?\b", re.IGNORECASE)
_SIDE_SWAP = {"left": "right", "right": "left", "west": "east", "east": "west"}


def swap_left_right(text: str) -> str:
    """Swap left <-> right and west <-> east (also leftmost, left-hand, westward...), keeping letter case.

    Like MDETR's flip it is blind to sense: "all right" becomes "all left". That is why flipping is off by default.
    """

    def repl(m: re.Match[str]) -> str:
        word = m.group(1)
        new = _SIDE_SWAP[word.lower()]
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _SIDE_WORD.sub(repl, text)


class RandomHorizontalFlip:
    """With probability ``prob``: mirror the image and boxes and swap left/right words in the text."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return sample
        return hflip(sample)


def hflip(sample: Sample) -> Sample:
    """Mirror about the vertical centre line: ``x -> W - x`` for pixels, boxes and the affine."""
    w = sample.image.width
    x1, y1, x2, y2 = sample.boxes.unbind(-1)
    boxes = torch.stack((w - x2, y1, w - x1, y2), dim=-1)
    sx, sy, dx, dy = sample.affine
    image = sample.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return replace(sample, image=image, boxes=boxes, text=swap_left_right(sample.text), affine=(-sx, sy, w - dx, dy))


class ToTensorNormalize:
    """PIL RGB -> float tensor [3, H, W] normalised by ``mean``/``std`` (in [0, 1] units) and the target fields.

    Normalisation is a per-channel lookup table of the 256 possible values: the same numbers as
    ``(x / 255 - mean) / std``, about 10x faster than float tensor arithmetic on a 640x640 image.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        levels = np.arange(256, dtype=np.float64)[None, :] / 255.0
        mean_, std_ = np.asarray(mean, dtype=np.float64)[:, None], np.asarray(std, dtype=np.float64)[:, None]
        self.table = ((levels - mean_) / std_).astype(np.float32)  # [3, 256]

    def __call__(self, sample: Sample) -> tuple[Tensor, dict[str, Any]]:
        planes = np.ascontiguousarray(np.asarray(sample.image, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W]
        image = np.empty(planes.shape, dtype=np.float32)
        for c in range(3):
            np.take(self.table[c], planes[c], out=image[c])
        h, w = planes.shape[1:]
        boxes = clip_boxes_xyxy(sample.boxes.float(), w, h)
        meta = {
            "boxes": box_xyxy_to_cxcywh(boxes) / boxes.new_tensor([w, h, w, h]),
            "size": torch.tensor([h, w], dtype=torch.long),
            "orig_size": torch.tensor(sample.orig_size, dtype=torch.long),
            "input_to_orig": torch.tensor(sample.affine, dtype=torch.float32),
        }
        return torch.from_numpy(image), meta


class Pipeline:
    """Geometric transforms in order, then ``ToTensorNormalize``: ``(sample, rng) -> (image [3,S,S], meta)``."""

    def __init__(self, transforms: Sequence[Transform], finish: ToTensorNormalize) -> None:
        self.transforms, self.finish = list(transforms), finish

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> tuple[Tensor, dict[str, Any], str]:
        rng = rng if rng is not None else np.random.default_rng(0)
        for t in self.transforms:
            sample = t(sample, rng)
        image, meta = self.finish(sample)
        return image, meta, sample.text


def _fill(cfg: Any) -> tuple[int, int, int]:
    return tuple(int(round(255 * m)) for m in cfg.mean)  # type: ignore[return-value]


def build_test_transform(cfg: Any) -> Pipeline:
    """Resize (``cfg.resize_mode``) to ``cfg.image_size`` + Normalize(``cfg.mean``, ``cfg.std``)."""
    return Pipeline([Resize(cfg.image_size, cfg.resize_mode, _fill(cfg))], ToTensorNormalize(cfg.mean, cfg.std))


def build_train_transform(cfg: Any) -> Pipeline:
    """[LargeScaleJitter if ``cfg.lsj``] + [flip if ``cfg.flip_prob`` > 0] + the test pipeline."""
    steps: list[Transform] = []
    if cfg.lsj:
        steps.append(LargeScaleJitter(cfg.image_size, cfg.jitter_min, cfg.jitter_max))
    if cfg.flip_prob > 0:
        steps.append(RandomHorizontalFlip(cfg.flip_prob))
    steps.append(Resize(cfg.image_size, cfg.resize_mode, _fill(cfg)))
    return Pipeline(steps, ToTensorNormalize(cfg.mean, cfg.std))


def preprocess(image: Image.Image, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Inference preprocessing of one image, identical to the test pipeline.

    Args:
        image: any PIL image (converted to RGB like ``load_image`` does; apply EXIF orientation before).
        cfg: a ``DataConfig`` (or anything with ``image_size``, ``resize_mode``, ``mean``, ``std``).

    Returns:
        (image tensor [3, S, S], meta with ``size`` [2], ``orig_size`` [2], ``input_to_orig`` [4]) where
        ``boxes_to_original(pred_boxes, meta)`` maps predictions back to ``image`` pixels.
    """
    sample = Sample(to_rgb(image), torch.zeros((0, 4)), "")
    tensor, meta, _ = build_test_transform(cfg)(sample)
    return tensor, {k: meta[k] for k in ("size", "orig_size", "input_to_orig")}


def boxes_to_original(boxes_cxcywh: Tensor, target: dict[str, Any]) -> Tensor:
    """Normalised cxcywh predictions [..., 4] in the network input -> xyxy pixels of the original image.

    The result is clipped to the original image, so a box can never leave it.
    """
    h, w = (float(v) for v in target["size"])
    sx, sy, dx, dy = (float(v) for v in target["input_to_orig"])
    xyxy = box_cxcywh_to_xyxy(boxes_cxcywh) * boxes_cxcywh.new_tensor([w, h, w, h])
    xyxy = (xyxy - xyxy.new_tensor([dx, dy, dx, dy])) / xyxy.new_tensor([sx, sy, sx, sy])
    # A flip (sx < 0) swaps the corners; sort them so that x1 <= x2 and y1 <= y2 whatever the affine.
    x, y = xyxy[..., 0::2].sort(-1).values, xyxy[..., 1::2].sort(-1).values
    xyxy = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), -1)
    oh, ow = (float(v) for v in target["orig_size"])
    limit = xyxy.new_tensor([ow, oh, ow, oh])
    return torch.minimum(xyxy.clamp(min=0), limit)
