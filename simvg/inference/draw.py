"""Pictures of grounding results: boxes with the expression and score on the image, a TB-versus-DB view, and
attention heat maps.

Pillow, plus a matplotlib colour map for the heat maps. Labels sit on filled backgrounds in the box colour with black
or white text (whichever contrasts more), so they stay readable on any photo. Font and line width scale with the
image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from simvg.errors import UserError

if TYPE_CHECKING:
    from simvg.inference.grounder import GroundingResult

# Distinct, saturated colours; the first is used for REC's single box.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)
GROUND_TRUTH_COLOUR = (255, 225, 25)
MAX_LABEL_CHARS = 48
HEAT_COLOURMAP = "turbo"  # matplotlib's improved "jet": blue (little attention) to red (most)
HEAT_ALPHA = 0.55  # weight of the heat colours over the photo
BRANCH_TITLES = {"token": "token branch (TB)", "decoder": "decoder branch (DB)"}
MIN_PICTURE_SIDE = 384  # attention pictures of smaller images are enlarged (nearest neighbour) to stay legible


def _font(image: Image.Image) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at a size that grows with the image (readable on 64 px and on 4000 px)."""
    return ImageFont.load_default(size=max(11, min(image.size) // 32))


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def shorten(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    """One-line label text: newlines folded, long expressions cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, int, int], font) -> None:
    """Draw ``text`` on a filled rectangle whose top-left corner is ``xy``, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    img_w, img_h = draw.im.size
    x = min(max(0.0, xy[0]), max(0.0, img_w - w))
    y = min(max(0.0, xy[1]), max(0.0, img_h - h))
    draw.rectangle((x, y, x + w, y + h), fill=fill)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(fill), font=font)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    colours: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with xyxy pixel ``boxes`` [N, 4] outlined and labelled.

    A label goes above its box when there is room, otherwise just inside the box's top edge.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = _font(out)
    width = max(2, min(out.size) // 160)
    colours = colours or [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    for box, label, colour in zip(boxes, labels, colours, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=width)
        _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
        label_h = bottom - top + 2 * max(2, (bottom - top) // 5)
        y = y1 - label_h if y1 - label_h >= 0 else y1 + width
        _label(draw, (x1, y), label, colour, font)
    return out


def draw_result(
    image: Image.Image, result: GroundingResult, ground_truth: Sequence[Sequence[float]] = ()
) -> Image.Image:
    """The image with the predicted boxes, each labelled "expression  score".

    ``ground_truth`` (xyxy pixels [M, 4]) is drawn first, in yellow and labelled "truth", so a demo shows both.
    A no-target answer gets a banner in the top-left corner instead of boxes.
    """
    out = image.convert("RGB")
    if len(ground_truth):
        out = draw_boxes(out, ground_truth, ["truth"] * len(ground_truth), [GROUND_TRUTH_COLOUR] * len(ground_truth))
    text = shorten(result.text)
    labels = [f"{text}  {score:.2f}" for score in result.scores]
    out = draw_boxes(out, result.boxes, labels)
    if result.no_target:
        draw = ImageDraw.Draw(out)
        _label(draw, (0, 0), f"no target: {text}", (40, 40, 40), _font(out))
    return out


def draw_comparison(image: Image.Image, token: GroundingResult, decoder: GroundingResult) -> Image.Image:
    """Token branch (left) and decoder branch (right) of the same query, side by side under titles."""
    return side_by_side([draw_result(image, token), draw_result(image, decoder)],
                        ["token branch (TB)", "decoder branch (DB)"])  # fmt: skip


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """Equal-sized ``panels`` left to right on a white canvas, each under its title."""
    first = panels[0]
    font = _font(first)
    _, top, _, bottom = ImageDraw.Draw(first).textbbox((0, 0), "Tg", font=font)
    title_h = (bottom - top) * 2
    gap = max(4, first.width // 50)
    canvas = Image.new("RGB", (len(panels) * first.width + (len(panels) - 1) * gap, first.height + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = k * (first.width + gap)
        canvas.paste(panel, (x, title_h))
        draw.text((x + gap, title_h // 4 - top), title, fill=(0, 0, 0), font=font)
    return canvas


def heat_overlay(image: Image.Image, values: np.ndarray) -> Image.Image:
    """``image`` (RGB) under a heat map of ``values`` [H, W] (same size; e.g. ``AttentionMaps.maps[branch]``),
    coloured by ``HEAT_COLOURMAP`` scaled to the map's own maximum and blended at ``HEAT_ALPHA``."""
    if values.shape != (image.height, image.width):
        raise ValueError(f"map {values.shape} does not match the image ({image.height}, {image.width})")
    peak = float(np.nanmax(values)) if values.size else 0.0
    scaled = np.nan_to_num(values / peak, nan=0.0) if peak > 0 else np.zeros(values.shape, np.float32)
    lut = (colormaps[HEAT_COLOURMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)  # [256, 3]
    heat = Image.fromarray(lut[np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)], "RGB")
    return Image.blend(image.convert("RGB"), heat, HEAT_ALPHA)


def draw_attention(image: Image.Image, result: GroundingResult, branch: str | None = None) -> Image.Image:
    """Where the model looked: per branch the heat map of ``result.attention`` over the image with that branch's
    boxes; the token branch (left) and the decoder branch (right) side by side under titles, or only ``branch``.
    Images under ``MIN_PICTURE_SIDE`` pixels are enlarged by a whole factor (maps and boxes with them)."""
    maps = result.attention
    if maps is None:
        raise UserError("the result has no attention maps: ground with attention=True")
    names = [branch] if branch else [b for b in ("token", "decoder") if b in maps.maps]
    missing = [b for b in names if b not in maps.maps]
    if missing:
        raise UserError(f"no attention map for the {missing[0]} branch (it has: {', '.join(maps.maps) or 'none'})")
    k = max(1, MIN_PICTURE_SIDE // max(image.size))
    big = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST) if k > 1 else image
    label = shorten(result.text)
    panels = []
    for name in names:
        heat = np.repeat(np.repeat(maps.maps[name], k, axis=0), k, axis=1)
        boxes = [[v * k for v in box] for box in maps.boxes.get(name, [])]
        panels.append(draw_boxes(heat_overlay(big, heat), boxes, [label] * len(boxes)))
    return side_by_side(panels, [BRANCH_TITLES[b] for b in names])
