"""``simvg ground`` (one image, one expression) and ``simvg predict`` (a JSONL file of queries over a folder).

``predict`` reads one JSON object per line, ``{"image": path relative to --images, "text": ..., "id": ...}``
(``id`` optional: the line number is used), grounds them in batches and writes one JSON object per query to
``--out``. A bad line (not JSON, a missing field, an image that is missing or unreadable, an empty text) stops the
run with an error naming ``FILE:LINE``, or with ``--skip-bad`` is counted, reported on stderr and left out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from simvg.config import SCORE_THRESHOLD
from simvg.errors import UserError
from simvg.inference.draw import draw_comparison, draw_result
from simvg.inference.grounder import Grounder, check_text
from simvg.models.quantize import precision_arguments
from simvg.utils.checkpoint import atomic_text_writer, atomic_write

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
    parser.add_argument("--confidence", action="store_true", default=None,
                        help="report the branch-agreement confidence also when the token branch answers (runs the "
                             "decoder too); without it, only when the decoder answers")  # fmt: skip
    precision_arguments(parser)


def load_grounder(args: argparse.Namespace, **limits: int) -> Grounder:
    """The ``Grounder`` the model options describe; the load's notices go to stderr."""
    grounder = Grounder.from_checkpoint(
        args.checkpoint, device=args.device, branch=args.branch, tokenizer=args.tokenizer,
        score_threshold=args.score_threshold, weights=args.weights, precision=args.precision, threads=args.threads,
        compile=args.compile, confidence=getattr(args, "confidence", None),
        **limits,
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
    parser.add_argument("--attention", default=None, metavar="OUT.png",
                        help="write where the model looked: the object token's attention (token branch, left) "
                             "and the decoder query's cross-attention (right), with each branch's box")  # fmt: skip


def _describe(result) -> str:
    """Human-readable lines for one result."""
    threshold = f", score threshold {result.score_threshold:g}" if result.score_threshold is not None else ""
    lines = [f"{result.text!r} ({result.task.upper()}, {result.branch} branch{threshold})"]
    if result.no_target:
        lines.append("  no target: nothing scores above the threshold")
    confidences = result.confidences if result.confidences is not None else [None] * len(result.boxes)
    for box, score, conf in zip(result.boxes, result.scores, confidences):
        agree = f"  confidence {conf:.2f} (branch agreement)" if conf is not None else ""
        lines.append(f"  box x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f}  score {score:.3f}{agree}")
    lines += [f"  note: {w}" for w in result.warnings]
    if result.trained_on:
        lines.append(f"  model trained on: {result.trained_on}")
    return "\n".join(lines)


def _save_image(image, out: str) -> None:
    """Write ``image`` atomically in the format its name says; an unwritable place is a UserError naming it."""
    path = Path(out)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: unknown image format; use a .png or .jpg name")
    atomic_write(path, lambda f: image.save(f, format=fmt))


def ground_command(args: argparse.Namespace) -> int:
    if args.compare and not args.out:
        raise UserError("--compare draws a picture: give --out OUT.png too")
    grounder = load_grounder(args)
    image = grounder.open_image(args.image)
    result = grounder.ground(image, args.text, attention=bool(args.attention))
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else _describe(result))
    if args.attention:
        _save_image(result.draw_attention(image), args.attention)
        print(f"wrote {args.attention}", file=sys.stderr)
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
    parser.add_argument("--batch-size", type=int, default=8, help="queries per forward pass")
    parser.add_argument("--skip-bad", action="store_true", help="count and report bad lines instead of stopping")
    parser.add_argument("--format", choices=("jsonl", "coco"), default="jsonl",
                        help="jsonl: one result per query; coco: a JSON array of COCO-style detections")  # fmt: skip
    parser.add_argument("--vis-dir", default=None, help="also write each query's picture with its boxes here")


@dataclass
class Query:
    """One valid line of the queries file."""

    line: int
    id: Any
    image: str
    path: Path
    text: str
    image_id: Any = None  # the line's optional "image_id" (e.g. a COCO image id), passed through


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
    return Query(line, obj.get("id", line), obj["image"], images_dir / rel, obj["text"], obj.get("image_id"))


def _read_queries(path: Path, images_dir: Path, bad: list[str], skip_bad: bool) -> Iterator[Query]:
    """Valid queries of ``path``, in order; bad lines raise or (with ``skip_bad``) go to ``bad``. A line that is not
    UTF-8 is a bad line; a UTF-8 byte-order mark at the start of the file is ignored."""
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"byte 0x{data[exc.start]:02x} at column {exc.start + 1}"
                _bad(bad, f"{path}:{number}: not UTF-8 text ({where}); save the file as UTF-8", skip_bad)
                continue
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


def _ground_batch(
    grounder, batch: list[Query], path: Path, bad: list[str], skip_bad: bool, vis_dir: Path | None = None
) -> list[dict]:
    """Predictions for the good queries of one batch; image and text errors are reported per line. With
    ``vis_dir``, each query's picture (boxes drawn) is written there as ``<id>.png``. Each text and image is checked
    once, here, so that a bad one is reported on its own line; the grounder takes them as checked."""
    good, images, texts, cache = [], [], [], {}
    for q in batch:
        try:
            text = check_text(q.text, grounder.max_text_chars)
            if q.path not in cache:
                cache[q.path] = grounder.open_image(q.path)
            good.append(q)
            images.append(cache[q.path])
            texts.append(text)
        except UserError as exc:
            _bad(bad, f"{path}:{q.line}: {exc}", skip_bad)
    results = grounder.ground_checked(images, texts) if good else []
    if vis_dir is not None:
        for q, r, image in zip(good, results, images):
            _save_image(r.draw(image), str(vis_dir / picture_name(q)))
    return [
        {"id": q.id, "image": q.image, **({"image_id": q.image_id} if q.image_id is not None else {}), **r.to_dict()}
        for q, r in zip(good, results)
    ]


def picture_name(query: Query) -> str:
    """``<id>.png`` for ``--vis-dir``, the id made file-name safe (and unique by its line when it had to change)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(query.id)).lstrip(".")[:100]
    return f"{safe}.png" if safe == str(query.id) else f"{safe or 'query'}-line{query.line}.png"


def coco_detections(record: dict) -> list[dict]:
    """A predict record as COCO results: one ``{"image_id", "category_id": 1, "bbox": [x, y, w, h], "score"}`` per
    box (none for a no-target answer), with ``query_id`` and ``text`` to tell the queries of one image apart.
    ``image_id`` is the query's ``image_id`` when it has one, else its image path."""
    image_id = record.get("image_id", record["image"])
    out = []
    for entry in record["boxes"]:
        x1, y1, x2, y2 = entry["box"]
        bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        extra = {"confidence": entry["confidence"]} if "confidence" in entry else {}
        out.append({"image_id": image_id, "category_id": 1, "bbox": bbox, "score": entry["score"], **extra,
                    "query_id": record["id"], "text": record["text"]})  # fmt: skip
    return out


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def predict_command(args: argparse.Namespace) -> int:
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
    vis_dir = Path(args.vis_dir) if args.vis_dir else None
    coco, detections = args.format == "coco", 0
    bar = tqdm(total=_count_lines(queries), unit="query", disable=None)  # disable=None: no bar unless a TTY
    # --out appears only complete; a write error (full disk, read-only folder) is one line naming it
    with atomic_text_writer(out) as f, bar:
        f.write("[" if coco else "")
        for batch in _batches(_read_queries(queries, images_dir, bad, args.skip_bad), args.batch_size):
            for record in _ground_batch(grounder, batch, queries, bad, args.skip_bad, vis_dir):
                if not coco:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                for item in coco_detections(record) if coco else []:
                    f.write(("," if detections else "") + "\n" + json.dumps(item, ensure_ascii=False))
                    detections += 1
                written += 1
            bar.n = written + len(bad)
            bar.refresh()
        f.write("\n]\n" if coco else "")
    for message in bad[:MAX_REPORTED_BAD]:
        print(f"skipped {message}", file=sys.stderr)
    more = f" ({len(bad) - MAX_REPORTED_BAD} more not shown)" if len(bad) > MAX_REPORTED_BAD else ""
    print(f"wrote {written} predictions to {out}; {len(bad)} bad lines skipped{more}", file=sys.stderr)
    return 0
