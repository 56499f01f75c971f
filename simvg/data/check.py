"""``simvg data check DIR``: is a dataset folder complete and sane before a long training run?

Reports, per split, the entry and expression counts (against the published expression counts when the dataset
is known: SimVG#12 was a user unsure whether a converted file was complete), the ``data_source`` values of mixed
sets (docs/design.md B9), bad boxes (NaN, non-positive size, outside the image), empty expressions, and images that are
missing, unreadable (each one is opened and decoded; ``--quick`` only checks that the file exists and is not
empty) or whose size disagrees with the annotation. Exit status 0 when clean, 2 when a problem was found.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from simvg.data.formats import (
    SPECS,
    BadEntry,
    DatasetSpec,
    canonical_source,
    get_spec,
    image_relpath,
    parse_entry,
    read_instances,
)
from simvg.data.image_io import load_image
from simvg.errors import UserError

SHOW = 10  # examples printed per kind of problem


@dataclass
class Report:
    """What ``check_dataset`` found: counts per split and problems grouped by kind."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (entries, expressions)
    expected: dict[str, int] = field(default_factory=dict)
    sources: dict[str, Counter] = field(default_factory=dict)
    images: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def clean(self) -> bool:
        return not any(self.problems.values())


def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="dataset folder (SynthRef/converted) or data root of a named dataset")
    parser.add_argument("--dataset", default=None, help=f"dataset name ({', '.join(SPECS)})")
    parser.add_argument("--images", default=None, help="image folder (default: from the dataset spec)")
    parser.add_argument("--ann-file", default=None, help="annotation file (default: from the dataset spec)")
    parser.add_argument("--quick", action="store_true", help="only check that image files exist and are not empty")


def check_command(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    report = check_dataset(root, args.dataset, args.images, args.ann_file, args.quick)
    print(format_report(report))
    return 0 if report.clean else 2


def _locate(
    root: Path, dataset: str | None, images: str | None, ann_file: str | None
) -> tuple[DatasetSpec, Path, Path]:
    spec = get_spec(dataset) if dataset else SPECS["synthref" if (root / "meta.json").is_file() else "custom"]
    if ann_file:
        ann = Path(ann_file)
    else:
        ann = root / spec.ann_file if (root / spec.ann_file).is_file() else root / "instances.json"
    return spec, ann, Path(images) if images else root / spec.image_dir


def check_dataset(
    root: Path, dataset: str | None = None, images: str | None = None, ann_file: str | None = None, quick: bool = False
) -> Report:
    """Check annotations and images of a dataset folder; never raises for problems in the data itself."""
    spec, ann, image_root = _locate(root, dataset, images, ann_file)
    data = read_instances(ann)
    report = Report(expected=dict(spec.counts))
    dims: dict[Path, set[tuple[int | None, int | None]]] = defaultdict(set)
    for split, entries in data.items():
        n_expr = 0
        report.sources[split] = Counter(str(e["data_source"]) for e in entries if "data_source" in e)
        for i, entry in enumerate(entries):
            where = f"{split}[{i}] (image_id {entry.get('image_id')})"
            n_expr += len(entry.get("expressions") or [])
            try:
                folder, name = image_relpath(spec, entry, split)
                file = root / folder / name if folder and not images else image_root / name
                record = parse_entry(entry, i, file, drop_bad_expressions=True)
            except (BadEntry, TypeError, ValueError) as exc:
                report.problems[_kind(str(exc))].append(f"{where}: {exc}")
                continue
            for p in record.problems:
                report.problems[_kind(p)].append(f"{where}: {p}")
            dims[file].add((record.width, record.height))
        report.counts[split] = (len(entries), n_expr)
    _check_counts(report, spec)
    _check_sources(report, spec)
    _check_images(report, dims, quick)
    return report


def _kind(message: str) -> str:
    if "expression" in message and "empty" in message:
        return "empty expressions"
    return "bad boxes" if "bbox" in message else "bad entries"


def _check_counts(report: Report, spec: DatasetSpec) -> None:
    for split, expected in spec.counts.items():
        got = report.counts.get(split, (0, 0))[1]
        if split not in report.counts:
            report.problems["split counts"].append(f"{split}: missing (published: {expected} expressions)")
        elif got != expected:
            report.problems["split counts"].append(f"{split}: {got} expressions, published {expected}")
    total = sum(n for _, n in report.counts.values())
    if spec.total is not None and total != spec.total:
        report.problems["split counts"].append(f"all splits: {total} expressions, published {spec.total}")


def _check_sources(report: Report, spec: DatasetSpec) -> None:
    """Mixed sets: data_source values the readers do not know would lose those samples silently (B9)."""
    if not spec.data_sources:
        return
    known = {"coco", "flickr", "vg", "saiaprtc12"}
    for split, counter in report.sources.items():
        for source, n in counter.items():
            if canonical_source(source) not in known:
                report.problems["unknown data_source"].append(f"{split}: {n} entries with data_source {source!r}")


def _check_images(report: Report, dims: dict[Path, set[tuple[int | None, int | None]]], quick: bool) -> None:
    report.images = len(dims)
    for file, sizes in sorted(dims.items()):
        if not file.is_file():
            report.problems["missing images"].append(str(file))
            continue
        if quick:
            if file.stat().st_size == 0:
                report.problems["unreadable images"].append(f"{file}: empty file (0 bytes)")
            continue
        try:
            image = load_image(file)
        except UserError as exc:
            report.problems["unreadable images"].append(str(exc))
            continue
        for w, h in sizes:
            if w is not None and h is not None and image.size not in ((w, h), (h, w)):
                report.problems["image size mismatch"].append(
                    f"{file}: image is {image.width}x{image.height}, annotation says {w}x{h}"
                )


def format_report(report: Report) -> str:
    lines = ["split                      entries  expressions  published"]
    for split, (entries, exprs) in report.counts.items():
        pub = report.expected.get(split)
        lines.append(f"{split:<24} {entries:>9} {exprs:>12}  {pub if pub is not None else '-':>9}")
    for split, counter in report.sources.items():
        if counter:
            lines.append(f"data_source in {split}: " + ", ".join(f"{k}={v}" for k, v in sorted(counter.items())))
    lines.append(f"images referenced: {report.images}")
    for kind, items in report.problems.items():
        if not items:
            continue
        lines.append(f"PROBLEM {kind}: {len(items)}")
        lines += [f"  {item}" for item in items[:SHOW]]
        if len(items) > SHOW:
            lines.append(f"  ... and {len(items) - SHOW} more")
    lines.append("OK: no problems found" if report.clean else "problems found (exit status 2)")
    return "\n".join(lines)
