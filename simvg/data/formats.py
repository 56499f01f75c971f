"""Dataset specs and the ``instances.json`` reader shared by the datasets, ``data check`` and ``data convert``.

The layout is SeqTR/SimVG's (docs/design.md O6): a JSON object ``{split: [entry, ...]}``.

- REC entry: ``{"image_id", "bbox": [x, y, w, h], "expressions": [str, ...], "height", "width", ...}``; train
  entries are per object with all its expressions, val/test entries hold one expression (we expand any entry
  with several expressions into one eval item per expression).
- GREC entry: ``{"image_id", "height", "width", "expressions": [...], "bbox": [[[x,y,w,h], ...] per expression],
  "annotations": [[{"bbox", "category_id", ...}, ...] per expression]}``; an annotation with ``category_id == -1``
  (bbox ``[0,0,0,0]``) is the "no target" placeholder and is dropped, leaving zero boxes.
- Optional per entry: ``file_name`` (image path relative to the image folder; it wins over the spec's pattern),
  ``data_source`` (mixed set), ``ref_id``, ``category_id``, ``kind`` (SynthRef).

Boxes become float xyxy in original pixels (continuous coordinates: ``x2 = x + w``; the official loader clips to
``w - 1``, a pixel-index habit that moves a border box by at most one pixel). A box is *bad* when it is not four
finite numbers, has ``w <= 0`` or ``h <= 0``, or lies more than ``BOX_TOLERANCE`` pixels outside the image; boxes
that overhang by less are clipped (COCO has many half-pixel overhangs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simvg.errors import UserError

BOX_TOLERANCE = 1.0  # pixels a box may overhang the image before it counts as out of the image

COCO_DIR = "images/mscoco/train2014"
COCO_NAME = "COCO_train2014_{image_id:012d}.jpg"

# data_source value -> (image folder under the data root, file-name pattern); "vg" and "visual-genome" are the
# same source: SeqTR's json uses "vg" while SimVG's pre-training filter lists "visual-genome" (docs/design.md B9).
SOURCE_IMAGES: dict[str, tuple[str, str]] = {
    "coco": (COCO_DIR, COCO_NAME),
    "flickr": ("images/flickr30k", "{image_id}.jpg"),
    "saiaprtc12": ("images/saiaprtc12", "{image_id}.jpg"),
    "vg": ("images/visual-genome", "{image_id}.jpg"),
}
SOURCE_ALIASES = {"visual-genome": "vg", "visual_genome": "vg", "visualgenome": "vg", "referit": "saiaprtc12"}


def canonical_source(name: str) -> str:
    """Map a ``data_source`` spelling to its canonical key (``visual-genome`` -> ``vg``)."""
    key = str(name).strip().lower()
    return SOURCE_ALIASES.get(key, key)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives under the data root and what it should contain.

    ``counts`` are the published numbers of *expressions* per split (summed over entries, so they hold for
    per-object train entries too); ``total`` is a published total over all splits when only that is known.
    """

    name: str
    ann_file: str
    image_dir: str
    image_pattern: str
    splits: tuple[str, ...]
    task: str = "rec"
    counts: dict[str, int] = field(default_factory=dict)
    total: int | None = None
    data_sources: tuple[str, ...] = ()


_MIXED_SPLITS = (
    "train",
    "val_refcoco_unc",
    "val_refcocoplus_unc",
    "val_refcocog_umd",
    "val_referitgame_berkeley",
    "val_flickr30k",
)

# Published expression counts: RefCOCO/RefCOCO+ (Yu et al. 2016, UNC splits), RefCOCOg (Mao et al. 2016 google
# split; Nagaraja et al. 2016 umd split), ReferItGame and Flickr30k val/test as in the TransVG/SeqTR split files;
# gRefCOCO total from the GRES paper (278,232 expressions). Unknown counts are left out rather than guessed.
SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "refcoco",
            "annotations/refcoco-unc/instances.json",
            COCO_DIR,
            COCO_NAME,
            ("train", "val", "testA", "testB"),
            counts={"train": 120624, "val": 10834, "testA": 5657, "testB": 5095},
        ),
        DatasetSpec(
            "refcoco+",
            "annotations/refcocoplus-unc/instances.json",
            COCO_DIR,
            COCO_NAME,
            ("train", "val", "testA", "testB"),
            counts={"train": 120191, "val": 10758, "testA": 5726, "testB": 4889},
        ),
        DatasetSpec(
            "refcocog_umd",
            "annotations/refcocog-umd/instances.json",
            COCO_DIR,
            COCO_NAME,
            ("train", "val", "test"),
            counts={"train": 80512, "val": 4896, "test": 9602},
        ),
        DatasetSpec(
            "refcocog_google",
            "annotations/refcocog-google/instances.json",
            COCO_DIR,
            COCO_NAME,
            ("train", "val"),
            counts={"train": 85474, "val": 9536},
        ),
        DatasetSpec(
            "referit",
            "annotations/referitgame-berkeley/instances.json",
            "images/saiaprtc12",
            "{image_id}.jpg",
            ("train", "val", "test"),
            counts={"train": 54127, "val": 5842, "test": 60103},
        ),
        DatasetSpec(
            "flickr30k",
            "annotations/flickr30k/instances.json",
            "images/flickr30k",
            "{image_id}.jpg",
            ("train", "val", "test"),
            counts={"val": 14433, "test": 14481},
        ),
        DatasetSpec(
            "grefcoco",
            "annotations/grefs_grec/instances.json",
            COCO_DIR,
            COCO_NAME,
            ("train", "val", "testA", "testB"),
            task="grec",
            total=278232,
        ),
        DatasetSpec(
            "mixed",
            "annotations/mixed/instances.json",
            COCO_DIR,
            COCO_NAME,
            _MIXED_SPLITS,
            data_sources=("coco", "flickr", "vg", "saiaprtc12"),
        ),
        DatasetSpec(
            "cocoall", "annotations/mixed/instances.json", COCO_DIR, COCO_NAME, _MIXED_SPLITS, data_sources=("coco",)
        ),
        DatasetSpec("synthref", "instances.json", "images", "{image_id}.png", ("train", "val", "testA", "testB")),
        DatasetSpec("custom", "instances.json", "images", "{image_id}.jpg", ("train", "val", "test")),
    )
}
DATASET_ALIASES = {
    "refcocoplus": "refcoco+",
    "refcocog": "refcocog_umd",
    "referitgame": "referit",
    "flickr": "flickr30k",
    "gref": "refcocog_google",
    "gref_umd": "refcocog_umd",
    "unc": "refcoco",
    "unc+": "refcoco+",
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name (accepts a few common aliases such as ``refcocoplus``)."""
    key = DATASET_ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(SPECS)}")
    return SPECS[key]


def _source_for_split(split: str) -> str | None:
    """Mixed-set val splits are named after their source dataset; entries there may lack ``data_source``."""
    for hint, source in (("refcoco", "coco"), ("referit", "saiaprtc12"), ("flickr", "flickr")):
        if hint in split:
            return source
    return None


def image_relpath(spec: DatasetSpec, entry: dict[str, Any], split: str) -> tuple[str | None, str]:
    """(folder override or None, file name) of an entry's image: ``file_name`` > ``data_source`` > spec pattern."""
    image_id = entry.get("image_id")
    if "file_name" in entry:
        return None, str(entry["file_name"])
    source = entry.get("data_source") or (_source_for_split(split) if spec.data_sources else None)
    if source is not None and canonical_source(source) in SOURCE_IMAGES:
        folder, pattern = SOURCE_IMAGES[canonical_source(source)]
        return folder, pattern.format(image_id=int(image_id))
    return None, spec.image_pattern.format(image_id=int(image_id))


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes a ``UserError`` with the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_instances(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read an ``instances.json``: ``{split: [entry dict, ...]}``, checked for that outer shape."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"{path}: expected a JSON object mapping split names to lists of entries")
    for split, entries in data.items():
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise UserError(f"{path}: split {split!r} entry {i} is not an object")
    return data


class BadEntry(ValueError):
    """An annotation problem in one entry (turned into a ``UserError`` or a skip by the caller)."""


@dataclass
class Record:
    """One parsed entry: boxes per expression as float xyxy arrays [n, 4] in original pixels."""

    image_id: int
    file: Path
    width: int | None
    height: int | None
    expressions: list[str]
    boxes: list[np.ndarray]
    entry_index: int
    problems: list[str] = field(default_factory=list)  # per-expression problems that were dropped
    kinds: list[str] | None = None  # SynthRef's expression kind, aligned with ``expressions``


def is_grec_entry(entry: dict[str, Any]) -> bool:
    """GREC entries nest boxes per expression (``bbox[i]`` is a list of boxes) or carry ``annotations``."""
    bbox = entry.get("bbox")
    return "annotations" in entry or (isinstance(bbox, list) and bool(bbox) and isinstance(bbox[0], list))


def check_box(box: Any, width: int | None, height: int | None) -> np.ndarray:
    """COCO xywh -> float xyxy [4], clipped; raises ``BadEntry`` for NaN, non-positive size or out-of-image."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BadEntry(f"bbox {box!r} is not [x, y, w, h]")
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise BadEntry(f"bbox {box!r} has non-numeric values") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BadEntry(f"bbox {list(box)} is not finite")
    if w <= 0 or h <= 0:
        raise BadEntry(f"bbox {list(box)} has non-positive width or height")
    tol = BOX_TOLERANCE
    right, bottom = width if width is not None else math.inf, height if height is not None else math.inf
    if x < -tol or y < -tol or x + w > right + tol or y + h > bottom + tol:
        raise BadEntry(f"bbox {list(box)} lies outside the {width}x{height} image")
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2 = x + w if width is None else min(x + w, float(width))
    y2 = y + h if height is None else min(y + h, float(height))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        raise BadEntry(f"bbox {list(box)} has no area inside the {width}x{height} image")
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def _dims(entry: dict[str, Any]) -> tuple[int | None, int | None]:
    w, h = entry.get("width"), entry.get("height")
    try:
        w = int(w) if w is not None else None
        h = int(h) if h is not None else None
    except (TypeError, ValueError):
        raise BadEntry(f"width/height {w!r}x{h!r} are not integers") from None
    if (w is not None and w <= 0) or (h is not None and h <= 0):
        raise BadEntry(f"width/height {w}x{h} are not positive")
    return w, h


def _expressions(entry: dict[str, Any]) -> list[str]:
    exprs = entry.get("expressions")
    if isinstance(exprs, str):
        exprs = [exprs]
    if not isinstance(exprs, list) or not exprs:
        raise BadEntry("no 'expressions' list")
    return [e if isinstance(e, str) else "" for e in exprs]


def _grec_boxes(entry: dict[str, Any], i: int, width: int | None, height: int | None) -> np.ndarray:
    """Boxes of expression ``i`` of a GREC entry, without the category -1 placeholders; [n, 4]."""
    anns = entry.get("annotations")
    if isinstance(anns, list):
        if i >= len(anns) or not isinstance(anns[i], list):
            raise BadEntry(f"annotations[{i}] missing")
        raw = [a.get("bbox") for a in anns[i] if isinstance(a, dict) and int(a.get("category_id", 0)) != -1]
    else:
        bbox = entry.get("bbox")
        if not isinstance(bbox, list) or i >= len(bbox) or not isinstance(bbox[i], list):
            raise BadEntry(f"bbox[{i}] missing")
        # without annotations, the all-zero box is the only way the no-target placeholder shows
        raw = [b for b in bbox[i] if not (isinstance(b, list) and len(b) == 4 and not any(b))]
    boxes = [check_box(b, width, height) for b in raw]
    return np.stack(boxes) if boxes else np.zeros((0, 4), dtype=np.float32)


def parse_entry(entry: dict[str, Any], index: int, file: Path, drop_bad_expressions: bool) -> Record:
    """Entry dict -> ``Record``; raises ``BadEntry`` when the entry is unusable.

    Empty or whitespace expressions and (GREC) expressions with a bad box are problems of that expression: with
    ``drop_bad_expressions`` they are removed and listed in ``Record.problems``, otherwise they raise.
    """
    if "image_id" not in entry and "file_name" not in entry:
        raise BadEntry("no 'image_id'")
    try:
        image_id = int(entry.get("image_id", -1))
    except (TypeError, ValueError):
        raise BadEntry(f"image_id {entry.get('image_id')!r} is not an integer") from None
    width, height = _dims(entry)
    grec = is_grec_entry(entry)
    shared = None if grec else check_box(entry.get("bbox"), width, height)[None]
    texts = _expressions(entry)
    kind = entry.get("kind")
    kinds_in = kind if isinstance(kind, list) and len(kind) == len(texts) else [kind] * len(texts)
    exprs, boxes, kinds, problems = [], [], [], []
    for i, text in enumerate(texts):
        try:
            if not text.strip():
                raise BadEntry(f"expression {i} is empty")
            boxes.append(_grec_boxes(entry, i, width, height) if grec else shared)
            exprs.append(text.strip())
            kinds.append(str(kinds_in[i]) if kinds_in[i] is not None else "")
        except BadEntry as exc:
            if not drop_bad_expressions:
                raise
            problems.append(str(exc))
    if not exprs:
        raise BadEntry("; ".join(problems) or "no usable expression")
    return Record(image_id, file, width, height, exprs, boxes, index, problems, kinds if kind is not None else None)
