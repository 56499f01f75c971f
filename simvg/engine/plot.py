"""``simvg plot RUN_DIR``: loss and validation curves of a run, drawn from its ``metrics.jsonl`` (matplotlib).

The figure is a bare ``matplotlib.figure.Figure`` (PNG through the Agg canvas): no pyplot, so no GUI backend is
chosen and no global figure state is touched.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from simvg.errors import UserError
from simvg.utils.logging import read_metrics


def plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training output folder (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")


def series(records: list[dict[str, Any]], event: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x values, y values) of ``key`` over the records of ``event``; a resumed run's repeated steps keep the last."""
    points: dict[float, float] = {}
    for r in records:
        if r.get("event") == event and isinstance(r.get(key), (int, float)):
            points[float(r[x])] = float(r[key])
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw training loss terms (left) and validation metrics (right) against the step; returns the PNG path."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a training output folder?)")
    records = read_metrics(path)
    # Terms that are switched off stay 0 and cannot be drawn on the log axis.
    loss_keys = sorted({k for r in records if r.get("event") == "train" for k, v in r.items()
                        if k.startswith("loss") and isinstance(v, (int, float)) and v > 0})  # fmt: skip
    val_keys = sorted({k for r in records if r.get("event") == "val" for k in r
                       if "/" in k and "/num_" not in k and not k.endswith("/score")})  # fmt: skip
    if not loss_keys:
        raise UserError(f"{path}: no training records yet")
    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_val = fig.subplots(1, 2)
    for key in loss_keys:
        ax_loss.plot(*series(records, "train", key), label=key, linewidth=1.2 if key == "loss" else 0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    for key in val_keys:
        ax_val.plot(*series(records, "val", key), marker="o", label=key)
    ax_val.set(xlabel="step", ylabel="percent", title="validation")
    if val_keys:
        ax_val.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_command(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
