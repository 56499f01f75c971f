"""SynthRef scenes: sampling 2-8 coloured shapes on a textured background and drawing them with exact masks.

Everything here is a pure function of a ``numpy.random.Generator`` and the image side ``S``, so a scene can be
re-drawn from its stored parameters (tests re-render masks to check that every box is tight).

Geometry: an object is a shape centred at ``(cx, cy)`` inside a square of side ``extent`` pixels. Extents come from
three size classes with wide gaps (relative to ``S``), so "small", "medium" and "large" stay separable at any image
size; the smallest object spans at least 12% of the image side. Masks are binary (no anti-aliasing) so that the
box of an object is exactly the bounding box of its pixels.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
# nominal hue (degrees), saturation and value ranges per colour name; ranges keep neighbours apart
COLOURS: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.0, (0.80, 0.95), (0.80, 0.95)),
    "orange": (28.0, (0.85, 1.00), (0.90, 1.00)),
    "yellow": (56.0, (0.80, 0.95), (0.90, 1.00)),
    "green": (125.0, (0.70, 0.90), (0.60, 0.80)),
    "cyan": (185.0, (0.70, 0.90), (0.85, 0.95)),
    "blue": (225.0, (0.80, 0.95), (0.75, 0.95)),
    "purple": (280.0, (0.65, 0.80), (0.55, 0.75)),
    "pink": (325.0, (0.40, 0.55), (0.95, 1.00)),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.17), "medium": (0.21, 0.24), "large": (0.29, 0.33)}
# extent multipliers that bring every shape's filled area to 0.52-0.69 x (nominal extent)^2, so a "small" star and a
# "small" circle look about as big and the size classes stay apart by area (tests check it)
SHAPE_SCALE = {
    "circle": 0.9,
    "square": 0.92,
    "triangle": 1.1,
    "star": 1.25,
    "diamond": 1.2,
    "cross": 1.0,
    "hexagon": 0.92,
}
MAX_HIDDEN = 0.15  # share of an object's pixels that later objects may cover
MIN_OBJECTS, MAX_OBJECTS = 2, 8
BACKGROUNDS = ("textured", "plain")
# The easy level: what the embedded default models are trained on and what ``simvg demo`` generates.
EASY_MAX_OBJECTS, EASY_BACKGROUND = 4, "plain"
# The starter level (two objects, plain background): where a scratch model leaves the "average box" plateau within
# a few hundred steps; the first stage of the REC recipe and the level of the ablation (docs/results.md).
STARTER_MAX_OBJECTS = 2
_PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; ``bbox`` is [x, y, w, h] of its full (amodal) mask in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    extent: float
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int]
    area: int
    visible: int

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2.0, y + h / 2.0

    @classmethod
    def from_json(cls, d: dict) -> SceneObject:
        """Inverse of ``to_json`` (an object of ``scenes.json``)."""
        return cls(**{**d, "rgb": tuple(d["rgb"]), "bbox": tuple(d["bbox"])})

    def to_json(self) -> dict:
        # by hand: dataclasses.asdict deep-copies recursively and cost a tenth of the generation time
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rgb"], d["bbox"] = list(self.rgb), list(self.bbox)
        return d


def shape_polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape in pixels (the circle is drawn as an ellipse instead)."""
    r = extent / 2.0
    if shape == "square":
        pts = [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (1.0, 0.82), (-1.0, 0.82)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "cross":
        a = 0.34
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    elif shape == "star":
        pts = [_polar(1.0 if k % 2 == 0 else 0.45, -90.0 + 36.0 * k) for k in range(10)]
    elif shape == "hexagon":
        pts = [_polar(1.0, 60.0 * k) for k in range(6)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _polar(radius: float, degrees: float) -> tuple[float, float]:
    t = math.radians(degrees)
    return radius * math.cos(t), radius * math.sin(t)


def render_mask(shape: str, cx: float, cy: float, extent: float, size: int) -> tuple[np.ndarray, int, int]:
    """Binary mask of one object, cropped: returns (mask [h, w] bool, x0, y0) with its offset in the image.

    The crop covers the object's square plus a pixel of slack, clipped to the ``size`` x ``size`` image.
    """
    half = extent / 2.0 + 2.0
    x0, y0 = max(0, int(math.floor(cx - half))), max(0, int(math.floor(cy - half)))
    x1, y1 = min(size, int(math.ceil(cx + half)) + 1), min(size, int(math.ceil(cy + half)) + 1)
    canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    lx, ly = cx - x0, cy - y0
    if shape == "circle":
        r = extent / 2.0
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=1)
    else:
        draw.polygon(shape_polygon(shape, lx, ly, extent), fill=1)
    return np.array(canvas, dtype=bool), x0, y0


def mask_bbox(mask: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int]:
    """Tight [x, y, w, h] around the True pixels of a cropped mask placed at (x0, y0)."""
    ys, xs = np.nonzero(mask)
    return x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1


def sample_objects(
    rng: np.random.Generator, size: int, max_objects: int = MAX_OBJECTS
) -> tuple[list[SceneObject], list[np.ndarray], list[tuple]]:
    """Sample and place objects; returns the objects (in drawing order), their masks and mask offsets.

    A scene uses only a few shapes and colours so that most objects share attributes with others: the
    expressions then need more than one word to single an object out.
    """
    n_want = int(rng.integers(MIN_OBJECTS, max_objects + 1))
    shapes = rng.choice(len(SHAPES), size=int(rng.integers(2, 5)), replace=False)
    colours = rng.choice(len(COLOURS), size=int(rng.integers(2, 5)), replace=False)
    owner = np.full((size, size), -1, dtype=np.int8)  # index of the topmost object at each pixel
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    offsets: list[tuple[int, int]] = []
    for _ in range(n_want):
        shape = SHAPES[int(rng.choice(shapes))]
        colour = list(COLOURS)[int(rng.choice(colours))]
        size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
        placed = _place(rng, shape, size_name, size, owner, objects)
        if placed is None:
            continue
        cx, cy, extent, mask, x0, y0, hidden = placed
        objects = [_cover(o, int(h)) for o, h in zip(objects, hidden)]
        owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = len(objects)
        area = int(mask.sum())
        rgb = _sample_rgb(rng, colour)
        objects.append(SceneObject(shape, colour, size_name, cx, cy, extent, rgb, mask_bbox(mask, x0, y0), area, area))
        masks.append(mask)
        offsets.append((x0, y0))
    return objects, masks, offsets


def _cover(obj: SceneObject, hidden: int) -> SceneObject:
    if hidden == 0:
        return obj
    return replace(obj, visible=obj.visible - hidden)


def _place(rng: np.random.Generator, shape: str, size_name: str, size: int, owner: np.ndarray, objects: list):
    """Try random positions until the new object (drawn on top) hides at most MAX_HIDDEN of any earlier one.

    Returns (cx, cy, extent, mask, x0, y0, pixels it hides of each earlier object), or None.
    """
    lo, hi = SIZES[size_name]
    for _ in range(_PLACEMENT_TRIES):
        extent = round(float(rng.uniform(lo, hi)) * size * SHAPE_SCALE[shape], 2)
        half = extent / 2.0 + 1.0
        cx = round(float(rng.uniform(half, size - half)), 2)
        cy = round(float(rng.uniform(half, size - half)), 2)
        mask, x0, y0 = render_mask(shape, cx, cy, extent, size)
        under = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask]
        hidden = np.bincount(under[under >= 0], minlength=len(objects)) if len(objects) else np.zeros(0)
        if all(o.visible - h >= (1.0 - MAX_HIDDEN) * o.area for o, h in zip(objects, hidden)):
            return cx, cy, extent, mask, x0, y0, hidden
    return None


def _sample_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    hue, (s_lo, s_hi), (v_lo, v_hi) = COLOURS[colour]
    h = ((hue + rng.uniform(-7.0, 7.0)) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s_lo, s_hi), rng.uniform(v_lo, v_hi))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted textured background [S, S, 3] uint8: gradient, blotches, stripes, checks or rings, maybe grain."""
    c1, c2 = _muted(rng), _muted(rng)
    field = _texture_field(rng, size)
    grain = int(rng.integers(0, 6))
    if grain >= 3:  # film grain on half of the images only: it is what makes PNG files big and slow to write
        field = field + rng.integers(-grain, grain + 1, size=(size, size), dtype=np.int8) / np.float32(255.0)
    # per channel on contiguous [S, S] planes: several times faster than broadcasting over a trailing axis of 3
    planes = [np.clip(c1[k] + field * (c2[k] - c1[k]), 0, 255).astype(np.uint8) for k in range(3)]
    return np.stack(planes, axis=-1)


def _texture_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A [S, S] float32 field in [0, 1] that mixes the two background colours."""
    kind = int(rng.integers(5))
    coords = np.arange(size, dtype=np.float32) / size
    if kind == 0:  # linear gradient at a random angle
        t = math.radians(float(rng.uniform(0, 360)))
        field = math.cos(t) * coords[None, :] + math.sin(t) * coords[:, None]
    elif kind == 1:  # smooth blotches: a coarse random grid upsampled
        cells = int(rng.integers(3, 7))
        grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
        field = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))
    elif kind == 2:  # stripes
        t = math.radians(float(rng.uniform(0, 180)))
        freq = float(rng.uniform(3, 9)) * 2 * math.pi
        field = 0.5 + 0.5 * np.sin(freq * (math.cos(t) * coords[None, :] + math.sin(t) * coords[:, None]))
    elif kind == 3:  # checks
        n = int(rng.integers(3, 9))
        idx = (np.arange(size) * n // size).astype(np.int32)
        field = ((idx[None, :] + idx[:, None]) % 2).astype(np.float32)
    else:  # radial gradient from a random centre
        px, py = rng.uniform(0, 1, size=2)
        field = np.sqrt((coords[None, :] - px) ** 2 + (coords[:, None] - py) ** 2)
    lo, hi = float(field.min()), float(field.max())
    return ((field - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, so the eight object colours stay the salient ones."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.75))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def paint_objects(image: np.ndarray, objects: list[SceneObject], masks: list[np.ndarray], offsets: list) -> None:
    """Draw objects in order onto ``image`` [S, S, 3] uint8, in place: shaded fill with a darker rim."""
    for obj, mask, (x0, y0) in zip(objects, masks, offsets):
        h, w = mask.shape
        # a diagonal light gradient (+-12%) so a shape is not one flat colour
        ramp = (np.arange(h)[:, None] + np.arange(w)[None, :]) / max(h + w - 2, 1)
        shade = (1.12 - 0.24 * ramp).astype(np.float32)
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        shade[mask & ~inner] = 0.6
        patch = image[y0 : y0 + h, x0 : x0 + w]
        colour = np.asarray(obj.rgb, dtype=np.float32)
        patch[mask] = np.clip(shade[mask][:, None] * colour[None, :], 0, 255).astype(np.uint8)


def plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """One muted colour [S, S, 3] uint8 (the ``plain`` background of the easier SynthRef level)."""
    return np.broadcast_to(_muted(rng).astype(np.uint8), (size, size, 3)).copy()


def draw_scene(
    rng: np.random.Generator, size: int, max_objects: int = MAX_OBJECTS, background: str = "textured"
) -> tuple[np.ndarray, list[SceneObject]]:
    """Sample and draw one scene: returns (image [S, S, 3] uint8, objects in drawing order).

    ``max_objects`` (2-8) and ``background`` ("textured" or "plain") set the difficulty; the defaults are the
    standard level, whose bytes do not change with these options.
    """
    image = render_background(rng, size) if background == "textured" else plain_background(rng, size)
    objects: list[SceneObject] = []
    while len(objects) < MIN_OBJECTS:  # placement can drop objects; two always fit after a retry or two
        objects, masks, offsets = sample_objects(rng, size, max_objects)
    paint_objects(image, objects, masks, offsets)
    return image, objects
