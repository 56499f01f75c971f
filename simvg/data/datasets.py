"""Grounding datasets over the ``instances.json`` layout (their loaders: ``simvg.data.loaders``).

Sampling follows SeqTR/SimVG (docs/design.md O4.1, P4.4): a *train* item is one entry (one referred object for
REC, one image for GREC train files) and one of its expressions is drawn on every visit; an *eval* item is one
expression (entries holding several expressions are expanded, never sampled). The draw and the augmentation use a
generator seeded by (seed, epoch, index), so results do not depend on the number of workers or their order.

Bad annotations (bad box, empty text, missing fields) are found when the index is built; bad images when loaded.
Without ``skip_bad`` both raise ``UserError`` naming the file and entry. With it, bad entries/expressions are
left out (``dataset.stats``) and a bad image is replaced by a deterministically drawn other item; each target
carries ``skipped`` (how many bad items were passed over to produce it), which survives worker processes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from simvg.config import DataConfig
from simvg.data.formats import (
    BadEntry,
    DatasetSpec,
    Record,
    canonical_source,
    get_spec,
    image_relpath,
    parse_entry,
    read_instances,
    read_json,
)
from simvg.data.image_io import load_image
from simvg.data.tokenizer import BEiT3Tokenizer
from simvg.data.transforms import (
    Pipeline,
    Sample,
    build_test_transform,
    build_train_transform,
)
from simvg.errors import UserError

MAX_REPLACEMENTS = 20  # bad images in a row before giving up (a broken image folder, not a few bad files)


class Tokenizer(Protocol):
    """What the dataset needs from ``simvg.data.tokenizer.BEiT3Tokenizer``."""

    def encode_one(self, text: str) -> tuple[Tensor, Tensor]: ...


def resolve_paths(cfg: DataConfig) -> tuple[DatasetSpec, Path, Path]:
    """(spec, annotation file, image folder) of ``cfg``."""
    spec = get_spec(cfg.dataset)
    root = Path(cfg.root)
    ann = root / (cfg.ann_file or spec.ann_file)
    images = root / (cfg.img_dir or spec.image_dir)
    return spec, ann, images


def tokenizer_path(cfg: DataConfig) -> Path:
    """The sentencepiece model of ``cfg``: ``cfg.tokenizer`` or ``root/tokenizer.spm``."""
    return Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.root) / "tokenizer.spm"


def dataset_task(spec: DatasetSpec, root: Path) -> str:
    """The task, "rec" or "grec": a SynthRef/custom folder says so in meta.json (``{"task": "grec"}``; a custom
    folder without it counts as REC), the published datasets in their spec."""
    meta = root / "meta.json"
    if spec.name in ("synthref", "custom") and meta.is_file():
        task = read_json(meta).get("task", spec.task)
        return str(task)
    return spec.task


def build_records(cfg: DataConfig, split: str, train: bool) -> tuple[list[Record], dict[str, Any]]:
    """Parse one split into ``Record``s; returns them with stats (bad entries, data_source counts, filtering)."""
    spec, ann_path, image_root = resolve_paths(cfg)
    data = read_instances(ann_path)
    if split not in data:
        raise UserError(f"{ann_path}: no split {split!r} (has: {', '.join(data) or 'none'})")
    wanted = {canonical_source(s) for s in (cfg.data_sources or spec.data_sources)}
    stats: dict[str, Any] = {"entries": len(data[split]), "bad": [], "dropped_expressions": [], "filtered": 0}
    stats["data_sources"] = Counter(canonical_source(e["data_source"]) for e in data[split] if "data_source" in e)
    records = []
    for i, entry in enumerate(data[split]):
        source = canonical_source(entry.get("data_source", ""))
        if train and wanted and split == cfg.train_split and source not in wanted:
            stats["filtered"] += 1
            continue
        where = f"{ann_path}: split {split!r} entry {i} (image_id {entry.get('image_id')})"
        try:
            folder, name = image_relpath(spec, entry, split)
            file = (Path(cfg.root) / folder / name) if folder and not cfg.img_dir else image_root / name
            record = parse_entry(entry, i, file, drop_bad_expressions=cfg.skip_bad)
        except (BadEntry, TypeError, ValueError) as exc:
            if not cfg.skip_bad:
                raise UserError(f"{where}: {exc}") from None
            stats["bad"].append(f"{where}: {exc}")
            continue
        stats["dropped_expressions"] += [f"{where}: {p}" for p in record.problems]
        if train and cfg.train_kinds and split == cfg.train_split:
            record = keep_kinds(record, cfg.train_kinds, where)
            if record is None:
                stats["filtered"] += 1
                continue
        records.append(record)
    return records, stats


def keep_kinds(record: Record, kinds: list[str], where: str) -> Record | None:
    """``record`` with only the expressions of the given kinds (None if none is left)."""
    if record.kinds is None:
        raise UserError(f"{where}: data.train_kinds needs SynthRef's expression kinds ('kind'); this entry has none")
    keep = [i for i, kind in enumerate(record.kinds) if kind in kinds]
    if not keep:
        return None
    pick = [record.expressions[i] for i in keep], [record.boxes[i] for i in keep], [record.kinds[i] for i in keep]
    return replace(record, expressions=pick[0], boxes=pick[1], kinds=pick[2])


class GroundingDataset(Dataset):
    """Items ``(image [3,S,S], text_ids [L], text_pad_mask [L], target)``; see collate.py for the target keys.

    Extra target keys: ``skipped`` (int, bad items passed over), ``kind`` (SynthRef expression kind or "").
    """

    def __init__(
        self,
        records: list[Record],
        transform: Pipeline,
        tokenizer: Tokenizer,
        train: bool,
        split: str = "",
        seed: int = 0,
        skip_bad: bool = False,
        stats: dict[str, Any] | None = None,
    ) -> None:
        self.records, self.transform, self.tokenizer = records, transform, tokenizer
        self.train, self.split, self.seed, self.skip_bad = train, split, seed, skip_bad
        self.stats = stats or {}
        self.epoch = 0
        # (record index, expression index or -1 = draw one per visit)
        if train:
            self.items = [(r, -1) for r in range(len(records))]
        else:
            self.items = [(r, e) for r, rec in enumerate(records) for e in range(len(rec.expressions))]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Change the expression draw and augmentation of every train item (call before each epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        for attempt in range(MAX_REPLACEMENTS + 1):
            rng = np.random.default_rng([self.seed, self.epoch, index, attempt])
            item = index if attempt == 0 else int(rng.integers(len(self.items)))
            try:
                image, ids, pad, target = self._load(item, rng)
            except UserError as exc:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad sample: {exc}", stacklevel=2)
                continue
            target["skipped"] = attempt
            return image, ids, pad, target
        raise UserError(f"{self.split}: {MAX_REPLACEMENTS + 1} bad images in a row; check the image folder")

    def _load(self, item: int, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        r, e = self.items[item]
        rec = self.records[r]
        e = int(rng.integers(len(rec.expressions))) if e < 0 else e
        image = _load_oriented(rec)
        orig = _orig_boxes(rec, e, image.width, image.height)
        tensor, meta, text = self.transform(Sample(image, orig.clone(), rec.expressions[e]), rng)
        ids, pad = self.tokenizer.encode_one(text)
        target = {
            **meta,
            "labels": torch.zeros(len(orig), dtype=torch.long),
            "orig_boxes": orig,
            "image_id": rec.image_id,
            "sample_id": f"{self.split}/{rec.entry_index}/{e}",
            "expression": text,
            "kind": rec.kinds[e] if rec.kinds else "",
        }
        return tensor, ids, pad, target


def _load_oriented(rec: Record) -> Any:
    """Load the image; if its size disagrees with the annotation only by a 90-degree turn, the annotation was
    made on the raw pixel grid, so undo the EXIF rotation. Any other disagreement is an error."""
    image = load_image(rec.file)
    if rec.width is None or rec.height is None or image.size == (rec.width, rec.height):
        return image
    if image.size == (rec.height, rec.width):
        raw = load_image(rec.file, exif=False)
        if raw.size == (rec.width, rec.height):
            return raw
    size = f"{image.width}x{image.height}"
    raise UserError(f"{rec.file}: image is {size} but the annotation says {rec.width}x{rec.height}")


def _orig_boxes(rec: Record, e: int, width: int, height: int) -> Tensor:
    """Expression ``e``'s boxes [n, 4] xyxy clipped to the image; a box with no area left is an image problem."""
    boxes = torch.from_numpy(rec.boxes[e]).float().clone()
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    if len(boxes) and bool(((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
        raise UserError(f"{rec.file}: box {rec.boxes[e].tolist()} lies outside the {width}x{height} image")
    return boxes


def build_dataset(cfg: DataConfig, split: str, train: bool, tokenizer: Tokenizer, seed: int = 0) -> GroundingDataset:
    """The dataset of ``split``: train items per entry with augmentation, eval items per expression without."""
    records, stats = build_records(cfg, split, train)
    if not records:
        _, ann_path, _ = resolve_paths(cfg)
        raise UserError(f"{ann_path}: split {split!r} has no usable entries ({len(stats['bad'])} bad)")
    transform = build_train_transform(cfg) if train else build_test_transform(cfg)
    return GroundingDataset(records, transform, tokenizer, train, split, seed, cfg.skip_bad, stats)


def build_tokenizer(cfg: DataConfig) -> BEiT3Tokenizer:
    """``BEiT3Tokenizer`` for ``cfg`` (``data.tokenizer``, else ``root/tokenizer.spm``)."""
    path = tokenizer_path(cfg)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer model not found (set data.tokenizer)")
    return BEiT3Tokenizer(str(path), max_len=cfg.max_tokens)
