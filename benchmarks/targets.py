"""Issue 7's accuracy targets, checked on a freshly generated SynthRef set (a seed no model was trained on).

Generates ``--num-images`` new scenes at the chosen level with ``simvg data synth``, evaluates a model (default: the
embedded REC model) on each test split with ``simvg eval`` (both branches, whole splits, the model's own tokenizer)
and prints a table against the targets: REC Acc@0.5 of the token branch >= 95 % on testA and >= 90 % on testB; GREC
Pr@(F1=1, IoU>=0.5) >= 80 % with N-acc >= 90 %. ``--json`` writes every number to a file as well.

    python benchmarks/targets.py                                   # embedded REC default, easy level, seed 1234
    python benchmarks/targets.py --max-objects 2                   # the same model on the starter level
    python benchmarks/targets.py --checkpoint simvg/assets/default_grec --task grec --splits val testA testB
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.cli import main as simvg  # noqa: E402
from simvg.synthref.scene import EASY_BACKGROUND, EASY_MAX_OBJECTS  # noqa: E402

# (metric, branch, split or None for every split, threshold) per task; the token branch is SimVG-TB.
TARGETS: dict[str, list[tuple[str, str, str | None, float]]] = {
    "rec": [("acc", "token", "testA", 95.0), ("acc", "token", "testB", 90.0)],
    "grec": [("pr_f1", "token", None, 80.0), ("n_acc", "token", None, 90.0)],
}


def run_cli(args: list[str]) -> str:
    """stdout of one ``simvg`` command run in this process; a non-zero exit stops the script."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = simvg(args)
    if code:
        sys.exit(f"targets: simvg {' '.join(args)} exited with {code}")
    return out.getvalue()


def generate(args: argparse.Namespace) -> Path:
    root = Path(args.out)
    if not (root / "instances.json").is_file():
        run_cli(["data", "synth", "--out", str(root), "--task", args.task, "--num-images", str(args.num_images),
                 "--image-size", str(args.image_size), "--seed", str(args.seed), "--max-objects",
                 str(args.max_objects), "--background", args.background])  # fmt: skip
    return root


def evaluate(checkpoint: str, root: Path, split: str, threads: int) -> dict[str, float]:
    printed = run_cli(["eval", "--checkpoint", checkpoint, "--split", split, "--branch", "both", "--json",
                       "--set", f"data.root={root}", "--set", f"train.threads={threads}"])  # fmt: skip
    return json.loads(printed.strip().splitlines()[-1])


def table(task: str, results: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: every split and branch, then each target with its measured value and verdict."""
    metrics = ["acc"] if task == "rec" else ["pr_f1", "n_acc", "t_acc"]
    head = ["split", "expressions"] + [f"{b} {m}" for b in ("decoder", "token") for m in metrics]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split, m in results.items():
        cells = [f"{m[f'{b}/{k}']:.1f} %" for b in ("decoder", "token") for k in metrics]
        rows.append("| " + " | ".join([split, f"{m['num_samples']:.0f}", *cells]) + " |")
    rows += ["", "| target | measured | met |", "|---|---|---|"]
    for metric, branch, split, threshold in TARGETS[task]:
        for name in [split] if split else list(results):
            if name in results:
                value = results[name][f"{branch}/{metric}"]
                verdict = "yes" if value >= threshold else "no"
                rows.append(f"| {branch} {metric} on {name} >= {threshold:g} % | {value:.1f} % | {verdict} |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "simvg/assets/default"), help="model folder or .pth")
    p.add_argument("--task", choices=("rec", "grec"), default="rec")
    p.add_argument("--seed", type=int, default=1234, help="generator seed of the fresh set")
    p.add_argument("--num-images", type=int, default=3000, help="scenes in all (test splits get ~6.7 %% each)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-objects", type=int, default=EASY_MAX_OBJECTS)
    p.add_argument("--background", choices=("plain", "textured"), default=EASY_BACKGROUND)
    p.add_argument("--splits", nargs="+", default=["testA", "testB"])
    p.add_argument("--out", help="dataset folder (default: data/fresh_<task>_o<max-objects>_<background>_s<seed>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.out = args.out or f"data/fresh_{args.task}_o{args.max_objects}_{args.background}_s{args.seed}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = generate(args)
    results = {split: evaluate(args.checkpoint, root, split, args.threads) for split in args.splits}
    print(f"{args.checkpoint} on {root} ({args.task}, seed {args.seed}, <= {args.max_objects} objects, "
          f"{args.background} background)\n")  # fmt: skip
    print("\n".join(table(args.task, results)))
    if args.json:
        record: dict[str, Any] = {"checkpoint": args.checkpoint, "data": str(root), "results": results}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
