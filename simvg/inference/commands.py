"""``simvg ground`` (one image, one expression) and ``simvg predict`` (a JSONL file of queries over a folder).

``predict`` reads one JSON object per line, ``{"image": path relative to --images, "text": ..., "id": ...}``
(``id`` optional: the line number is used), grounds them in batches and writes one JSON object per query to
``--out``. A bad line (not JSON, a missing field, an image that is missing or unreadable, an empty text) stops the
run with an error naming ``FILE:LINE``, or with ``--skip-bad`` is counted, reported on stderr and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simvg.artifact import SCORE_THRESHOLD
from simvg.errors import UserError

MAX_REPORTED_BAD = 10


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and configure a model, shared by ``ground``, ``predict`` and ``serve``."""
    parser.add_argument("--checkpoint", default=None,
                        help="model or run folder, .pth (ours or the authors' official files), .safetensors or .onnx "
                             "(default: the embedded model)")  # fmt: skip
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece file for models without one (official files: beit3.spm)")  # fmt: skip
    parser.add_argument("--branch", choices=("token", "decoder"), default=None,
                        help="which head answers (default: the model's own)")  # fmt: skip
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA or raw weights of a checkpoint that holds both (auto: EMA)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD,
                        help="GREC: keep boxes scoring at least this")  # fmt: skip


def load_grounder(args: argparse.Namespace, **limits: int):
    """The ``Grounder`` the model options describe; the load's notices go to stderr."""
    from simvg.inference.grounder import Grounder

    grounder = Grounder.from_checkpoint(
        args.checkpoint, device=args.device, branch=args.branch, tokenizer=args.tokenizer,
        score_threshold=args.score_threshold, weights=args.weights, **limits,
    )  # fmt: skip
    for notice in grounder.notices:
        print(notice, file=sys.stderr)
    return grounder


def ground_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file")
    parser.add_argument("text", help="the referring expression, in quotes")
    model_arguments(parser)
    parser.add_argument("--out", default=None, help="write the image with the boxes drawn (PNG/JPEG)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--compare", action="store_true", help="with --out: draw token and decoder side by side")


def _describe(result) -> str:
    """Human-readable lines for one result."""
    lines = [f"{result.text!r} ({result.task.upper()}, {result.branch} branch)"]
    if result.no_target:
        lines.append("  no target: nothing scores above the threshold")
    for box, score in zip(result.boxes, result.scores):
        lines.append(f"  box x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f}  score {score:.3f}")
    lines += [f"  note: {w}" for w in result.warnings]
    if result.trained_on:
        lines.append(f"  model trained on: {result.trained_on}")
    return "\n".join(lines)


def _save_image(image, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(path)
    except (ValueError, KeyError):
        raise UserError(f"{path}: unknown image format; use a .png or .jpg name") from None


def ground_command(args: argparse.Namespace) -> int:
    from simvg.inference.draw import draw_comparison, draw_result

    if args.compare and not args.out:
        raise UserError("--compare draws a picture: give --out OUT.png too")
    grounder = load_grounder(args)
    image = grounder.open_image(args.image)
    result = grounder.ground(image, args.text)
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else _describe(result))
    if args.out:
        if args.compare:
            other = grounder.ground(image, args.text, branch="decoder" if result.branch == "token" else "token")
            token, decoder = (result, other) if result.branch == "token" else (other, result)
            _save_image(draw_comparison(image, token, decoder), args.out)
        else:
            _save_image(draw_result(image, result), args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder the queries' image paths are relative to")
    parser.add_argument("--queries", required=True, help='JSONL: {"image": ..., "text": ..., "id": ...} per line')
    parser.add_argument("--out", required=True, help="JSONL predictions, one line per query")
    model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-bad", action="store_true", help="count and report bad lines instead of stopping")


@dataclass
class Query:
    """One valid line of the queries file."""

    line: int
    id: Any
    image: str
    path: Path
    text: str


def parse_query(raw: str, line: int, images_dir: Path) -> Query:
    """One JSONL line -> Query; UserError (without the file name) saying what is wrong."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise UserError("expected a JSON object")
    for key in ("image", "text"):
        if not isinstance(obj.get(key), str):
            raise UserError(f"field {key!r} is missing or not a string")
    rel = Path(obj["image"])
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"image {obj['image']!r} must be a path inside --images")
    return Query(line, obj.get("id", line), obj["image"], images_dir / rel, obj["text"])


def _read_queries(path: Path, images_dir: Path, bad: list[str], skip_bad: bool) -> Iterator[Query]:
    """Valid queries of ``path``, in order; bad lines raise or (with ``skip_bad``) go to ``bad``."""
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield parse_query(raw, number, images_dir)
            except UserError as exc:
                _bad(bad, f"{path}:{number}: {exc}", skip_bad)


def _bad(bad: list[str], message: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise UserError(message + " (use --skip-bad to skip such lines)")
    bad.append(message)


def _batches(queries: Iterator[Query], size: int) -> Iterator[list[Query]]:
    batch: list[Query] = []
    for query in queries:
        batch.append(query)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ground_batch(grounder, batch: list[Query], path: Path, bad: list[str], skip_bad: bool) -> list[dict]:
    """Predictions for the good queries of one batch; image and text errors are reported per line."""
    from simvg.inference.grounder import check_text

    good, images, cache = [], [], {}
    for q in batch:
        try:
            check_text(q.text, grounder.max_text_chars)
            if q.path not in cache:
                cache[q.path] = grounder.open_image(q.path)
            good.append(q)
            images.append(cache[q.path])
        except UserError as exc:
            _bad(bad, f"{path}:{q.line}: {exc}", skip_bad)
    results = grounder.ground_batch(images, [q.text for q in good]) if good else []
    return [{"id": q.id, "image": q.image, **r.to_dict()} for q, r in zip(good, results)]


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def predict_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    images_dir, queries, out = Path(args.images), Path(args.queries), Path(args.out)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: not a folder (--images)")
    if not queries.is_file():
        raise UserError(f"{queries}: queries file not found")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    grounder = load_grounder(args)
    bad: list[str] = []
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        bar = tqdm(total=_count_lines(queries), unit="query", disable=None)  # disable=None: no bar unless a TTY
        with tmp.open("w", encoding="utf-8") as f, bar:
            for batch in _batches(_read_queries(queries, images_dir, bad, args.skip_bad), args.batch_size):
                for record in _ground_batch(grounder, batch, queries, bad, args.skip_bad):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
                bar.n = written + len(bad)
                bar.refresh()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for message in bad[:MAX_REPORTED_BAD]:
        print(f"skipped {message}", file=sys.stderr)
    more = f" ({len(bad) - MAX_REPORTED_BAD} more not shown)" if len(bad) > MAX_REPORTED_BAD else ""
    print(f"wrote {written} predictions to {out}; {len(bad)} bad lines skipped{more}", file=sys.stderr)
    return 0
