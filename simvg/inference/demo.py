"""``simvg demo``: ground freshly generated SynthRef scenes with the embedded default model and show how it did.

A new seed each run (printed, so a run can be repeated with ``--seed``) means the scenes were never seen in
training. For every expression of the generated val split (every kind: attribute, position, ordinal, relation, and
for GREC multi-target and no-target ones) the demo writes a picture with the prediction and the truth (yellow),
prints a table of expression, predicted and true boxes and IoU, and the overall score: REC Acc@0.5 and, when a GREC
default model exists (``simvg/assets/default_grec``), GREC Pr@(F1=1) and N-acc, all from ``simvg.engine.metrics``.
``DIR/index.html`` gathers the pictures into one page.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from simvg.artifact import DEFAULT_MODELS, WEIGHTS_FILE
from simvg.engine.metrics import grec_outcome, grec_summary, rec_accuracy, rec_hits, rec_ious
from simvg.errors import UserError
from simvg.inference.draw import draw_result
from simvg.inference.grounder import Grounder
from simvg.synthref.generator import generate_synthref
from simvg.synthref.scene import EASY_BACKGROUND, EASY_MAX_OBJECTS
from simvg.utils.box_ops import box_xywh_to_xyxy

DISPLAY_SIDE = 384  # small SynthRef images are enlarged (nearest neighbour) so that labels stay readable


@dataclasses.dataclass
class Row:
    """One grounded expression of the demo."""

    task: str
    image_id: int
    text: str
    kind: str
    pred: list[list[float]]
    scores: list[float]
    truth: list[list[float]]
    iou: float | None  # REC only
    correct: bool
    picture: str
    outcome: Any = None  # GREC: the evaluator's GrecOutcome


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for the pictures and index.html")
    parser.add_argument("--seed", type=int, default=None, help="SynthRef seed (default: a fresh random one)")
    parser.add_argument("--num-images", type=int, default=4, help="scenes per task")
    parser.add_argument("--image-size", type=int, default=128, help="scene side (models trained on 128)")
    parser.add_argument("--checkpoint", default=None, help="REC model (default: simvg/assets/default)")
    parser.add_argument("--grec-checkpoint", default=None, help="GREC model (default: simvg/assets/default_grec)")
    # Default: the branch the model's spec names (the embedded defaults name the decoder: within their CPU budget
    # the token branch has not yet caught up through DWBD, docs/results.md); --branch token shows SimVG-TB.
    parser.add_argument(
        "--branch", choices=("token", "decoder"), default=None, help="which head answers (default: the model's own)"
    )
    parser.add_argument(
        "--max-objects", type=int, default=EASY_MAX_OBJECTS, help="objects per scene, at most (default: as trained)"
    )
    parser.add_argument("--background", choices=("plain", "textured"), default=EASY_BACKGROUND, help="scene background")
    parser.add_argument("--device", default="cpu")


def _truth_boxes(entry: dict[str, Any], task: str) -> list[list[float]]:
    """Ground truth of a val entry as xyxy pixels; [] for a GREC no-target expression."""
    if task == "rec":
        return box_xywh_to_xyxy(torch.tensor([entry["bbox"]], dtype=torch.float32)).tolist()
    boxes = [a["bbox"] for a in entry["annotations"][0] if a.get("category_id", 0) != -1]
    return box_xywh_to_xyxy(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)).tolist()


def _judge(task: str, result, truth: list[list[float]], threshold: float) -> tuple[float | None, bool, Any]:
    """(IoU or None, correct, GREC outcome or None) with the evaluator's definitions."""
    if task == "rec":
        iou = rec_ious(torch.tensor(result.boxes[:1]), torch.tensor(truth))
        return float(iou[0]), bool(rec_hits(iou)[0]), None
    pred = torch.tensor(result.boxes, dtype=torch.float32).reshape(-1, 4)
    scores, gt = torch.tensor(result.scores).reshape(-1), torch.tensor(truth).reshape(-1, 4)
    outcome = grec_outcome(pred, scores, gt, threshold)
    return None, outcome.correct, outcome


def _picture(image: Image.Image, result, truth: list[list[float]], path: Path) -> None:
    """Save the annotated picture, enlarged so that small scenes stay legible."""
    factor = max(1, DISPLAY_SIDE // max(image.size))
    big = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    scaled = dataclasses.replace(result, boxes=[[v * factor for v in b] for b in result.boxes])
    draw_result(big, scaled, [[v * factor for v in b] for b in truth]).save(path)


def ground_split(grounder, data_dir: Path, task: str, out_dir: Path) -> list[Row]:
    """Ground every val expression of a generated SynthRef folder; one batch per image."""
    entries = json.loads((data_dir / "instances.json").read_text())["val"]
    by_image: dict[int, list[dict]] = defaultdict(list)
    for entry in entries:
        by_image[entry["image_id"]].append(entry)
    (out_dir / task).mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, group in sorted(by_image.items()):
        image = grounder.open_image(data_dir / "images" / f"{image_id}.png")
        results = grounder.ground_batch([image] * len(group), [e["expressions"][0] for e in group])
        for k, (entry, result) in enumerate(zip(group, results)):
            truth = _truth_boxes(entry, task)
            iou, correct, outcome = _judge(task, result, truth, grounder.score_threshold)
            picture = f"{task}/{image_id}-{k}.png"
            _picture(image, result, truth, out_dir / picture)
            kind = entry["kind"][0] if isinstance(entry["kind"], list) else entry["kind"]
            rows.append(Row(task, image_id, result.text, kind, result.boxes, result.scores, truth, iou, correct,
                            picture, outcome))  # fmt: skip
    return rows


def _fmt_boxes(boxes: list[list[float]]) -> str:
    return " ".join("[" + ",".join(f"{v:.0f}" for v in b) + "]" for b in boxes) or "none"


def summary_lines(rows: list[Row], task: str) -> list[str]:
    """The printed table of one task and its overall score."""
    picked = [r for r in rows if r.task == task]
    head = f"{'expression':<44} {'kind':<9} {'predicted':<22} {'true':<22} {'IoU':>5}  ok"
    lines = [f"== {task.upper()}: {len(picked)} expressions", head, "-" * len(head)]
    for r in picked:
        iou = f"{r.iou:.2f}" if r.iou is not None else "  -"
        lines.append(f"{r.text[:44]:<44} {r.kind:<9} {_fmt_boxes(r.pred)[:22]:<22} {_fmt_boxes(r.truth)[:22]:<22} "
                     f"{iou:>5}  {'yes' if r.correct else 'no'}")  # fmt: skip
    if task == "rec":
        lines.append(f"REC Acc@0.5: {rec_accuracy([r.correct for r in picked]):.1f}% of {len(picked)} expressions")
    else:
        s = grec_summary(r.outcome for r in picked)
        lines.append(f"GREC Pr@(F1=1, IoU>=0.5): {s['pr_f1']:.1f}%  N-acc: {s['n_acc']:.1f}%  T-acc: {s['t_acc']:.1f}% "
                     f"of {len(picked)} expressions ({s['num_no_target']:.0f} without target)")  # fmt: skip
    return lines


def write_index(rows: list[Row], out_dir: Path, seed: int, notes: list[str]) -> Path:
    """A self-contained HTML page: every picture with its expression, kind and verdict."""
    cards = []
    for r in rows:
        verdict = "correct" if r.correct else "wrong"
        iou = f" IoU {r.iou:.2f}" if r.iou is not None else ""
        cards.append(f'<figure class="{verdict}"><img src="{html.escape(r.picture)}" alt=""><figcaption>'
                     f"<b>{html.escape(r.text)}</b><br>{r.task.upper()} / {html.escape(r.kind)}: {verdict}{iou}"
                     "</figcaption></figure>")  # fmt: skip
    body = "\n".join(cards)
    extra = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>simvg demo (seed {seed})</title>
<style>body{{font-family:system-ui,sans-serif;margin:1rem}} figure{{display:inline-block;margin:.4rem;width:300px;
vertical-align:top}} img{{width:100%}} .wrong figcaption{{color:#b00020}} .correct figcaption{{color:#1b5e20}}</style>
</head><body><h1>simvg demo</h1><p>Fresh SynthRef scenes, seed {seed}. Yellow: truth; coloured: prediction.</p>
{extra}{body}</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def demo_command(args: argparse.Namespace) -> int:
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grec_model = args.grec_checkpoint
    if grec_model is None and (DEFAULT_MODELS["grec"] / WEIGHTS_FILE).is_file():
        grec_model = DEFAULT_MODELS["grec"]
    tasks, notes = [("rec", args.checkpoint)], []
    if grec_model is None:
        notes.append(f"GREC skipped: no GREC default model in {DEFAULT_MODELS['grec']} (or pass --grec-checkpoint)")
    else:
        tasks.append(("grec", grec_model))
    rows: list[Row] = []
    for offset, (task, model) in enumerate(tasks):
        grounder = Grounder.from_checkpoint(model, device=args.device, branch=args.branch)
        data = out / f"synthref_{task}"
        generate_synthref(data, task, args.num_images, args.image_size, seed + offset, splits={"val": 1.0},
                          overwrite=True, max_objects=args.max_objects, background=args.background)  # fmt: skip
        rows += ground_split(grounder, data, task, out)
        print("\n".join(summary_lines(rows, task)) + "\n")
    for note in notes:
        print(note)
    index = write_index(rows, out, seed, notes)
    print(f"seed {seed} (repeat with --seed {seed}); {len(rows)} pictures, open {index}")
    return 0
