"""Does the REC confidence (branch agreement) mean something? Measured on freshly generated SynthRef scenes.

Generates ``--num-images`` new scenes (a seed no model was trained on; easy level by default, as the embedded model
was trained) in-process, grounds every val expression with both branches of a model (default: the embedded REC
model) through the ``Grounder`` API, and prints, per confidence bin, how many answers fall there and how many are
correct (IoU >= 0.5 with the truth), for the decoder's and the token branch's answer, plus the AUROC of confidence
against correctness (0.5: no signal; 1: every correct answer more confident than every wrong one) and of the score.

    python benchmarks/rec_confidence.py                       # embedded default, easy level, seed 4321, 120 images
    python benchmarks/rec_confidence.py --checkpoint runs/x --seed 7 --num-images 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.engine.metrics import rec_ious  # noqa: E402
from simvg.inference.grounder import Grounder  # noqa: E402
from simvg.synthref.generator import generate_synthref  # noqa: E402
from simvg.synthref.scene import EASY_BACKGROUND, EASY_MAX_OBJECTS  # noqa: E402
from simvg.utils.box_ops import box_xywh_to_xyxy  # noqa: E402

BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0 + 1e-9)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` labels (Mann-Whitney U, ties count half)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def measure(grounder: Grounder, data: Path) -> dict[str, np.ndarray]:
    """Per val expression: confidence, the decoder's score, and whether each branch's answer is correct."""
    entries = json.loads((data / "instances.json").read_text())["val"]
    by_image: dict[int, list[dict]] = defaultdict(list)
    for entry in entries:
        by_image[entry["image_id"]].append(entry)
    rows: dict[str, list] = defaultdict(list)
    for image_id, group in sorted(by_image.items()):
        image = grounder.open_image(data / "images" / f"{image_id}.png")
        texts = [e["expressions"][0] for e in group]
        truth = box_xywh_to_xyxy(torch.tensor([e["bbox"] for e in group], dtype=torch.float32))
        for branch in ("decoder", "token"):
            results = grounder.ground_batch([image] * len(group), texts, branch=branch)
            ious = rec_ious(torch.tensor([r.boxes[0] for r in results]), truth)
            rows[f"{branch}_correct"] += (ious >= 0.5).tolist()
            rows[f"{branch}_score"] += [r.scores[0] for r in results]
            rows[f"{branch}_confidence"] += [r.confidences[0] for r in results]
        rows["kind"] += [e["kind"] for e in group]
    return {k: np.asarray(v) for k, v in rows.items()}


def report(m: dict[str, np.ndarray]) -> tuple[list[str], dict]:
    """Markdown table per confidence bin and the AUROCs."""
    conf = m["decoder_confidence"]
    lines = ["| confidence | expressions | decoder Acc@0.5 | token Acc@0.5 |", "|---|---|---|---|"]
    record: dict = {"bins": []}
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inside = (conf >= lo) & (conf < hi)
        n = int(inside.sum())
        acc = {b: 100.0 * m[f"{b}_correct"][inside].mean() if n else float("nan") for b in ("decoder", "token")}
        label = f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}"
        lines.append(f"| {label} | {n} | {acc['decoder']:.1f} % | {acc['token']:.1f} % |")
        record["bins"].append({"low": lo, "high": min(hi, 1.0), "n": n, **{f"{b}_acc": acc[b] for b in acc}})
    n = len(conf)
    lines.append(f"| all | {n} | {100 * m['decoder_correct'].mean():.1f} % | {100 * m['token_correct'].mean():.1f} % |")
    for branch in ("decoder", "token"):
        correct = m[f"{branch}_correct"].astype(bool)
        record[f"{branch}_auroc_confidence"] = auroc(conf, correct)
        record[f"{branch}_auroc_score"] = auroc(m[f"{branch}_score"], correct)
        record[f"{branch}_score_range"] = [float(m[f"{branch}_score"].min()), float(m[f"{branch}_score"].max())]
        lines.append(f"\n{branch} answer: AUROC of confidence {record[f'{branch}_auroc_confidence']:.3f}, of the "
                     f"score {record[f'{branch}_auroc_score']:.3f} (scores {record[f'{branch}_score_range'][0]:.4f}"
                     f"..{record[f'{branch}_score_range'][1]:.4f})")  # fmt: skip
    order = np.argsort(-conf, kind="stable")
    half = order[: n // 2]
    record["decoder_acc_top_half"] = 100.0 * m["decoder_correct"][half].mean()
    lines.append(f"decoder Acc@0.5 of the more confident half: {record['decoder_acc_top_half']:.1f} %")
    return lines, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="REC model (default: the embedded one)")
    p.add_argument("--seed", type=int, default=4321, help="generator seed of the fresh scenes")
    p.add_argument("--num-images", type=int, default=120, help="scenes (each gives one expression per object)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-objects", type=int, default=EASY_MAX_OBJECTS)
    p.add_argument("--background", choices=("plain", "textured"), default=EASY_BACKGROUND)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    grounder = Grounder.from_checkpoint(args.checkpoint, confidence=True, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthref(Path(tmp), "rec", args.num_images, args.image_size, args.seed, splits={"val": 1.0},
                          max_objects=args.max_objects, background=args.background)  # fmt: skip
        measured = measure(grounder, Path(tmp))
    lines, record = report(measured)
    print(f"{grounder.source}: {len(measured['kind'])} expressions on {args.num_images} fresh scenes (seed "
          f"{args.seed}, <= {args.max_objects} objects, {args.background} background)\n")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **record}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
