"""Equal-compute comparison of training recipes: validation accuracy against the CPU time each recipe has spent.

A recipe ("arm") is a sequence of run folders (stages: ``simvg pretrain`` and/or ``simvg train`` outputs), given in
order. Its clock is the wall time of its stages added up from their ``metrics.jsonl`` records; a resumed stage's
pause (between its last record and the next ``start`` event) is not counted, so a run spread over several sessions
keeps an honest clock. Run the arms at the same time, one thread each, so that they share the machine's load and
equal wall time means equal compute.

    python benchmarks/equal_compute.py --arm "scratch=runs/a_starter,runs/a_easy" \
        --arm "pretrain=runs/b_pretrain,runs/b_easy" --out docs/results/equal_compute_easy.png

prints, per arm, a markdown table of every validation point (stage, step, minutes, decoder / token Acc@0.5 or the
pre-training metrics) and, per stage (each validates on its own level), the minutes to reach each accuracy level,
and draws the curves.

``--clock steps`` counts optimisation steps instead of minutes, for runs that did not share the machine's load (a
run's minutes then depend on what else ran): a pre-training step counts ``--pretrain-step-cost`` fine-tuning steps,
the ratio measured when both ran side by side (a stage is pre-training when its records carry ``t2p_acc``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from simvg.utils.logging import read_metrics  # noqa: E402

LEVELS = (20.0, 30.0, 50.0)  # Acc@0.5 levels whose first crossing is reported ("leaving the plateau" = 20 %)
UNITS = {"time": "min", "steps": "steps"}


@dataclass
class Point:
    """One validation record of an arm, on the arm's clock."""

    stage: str
    step: int
    clock: float  # minutes, or step-equivalents with --clock steps
    values: dict[str, float]


def stage_points(
    run_dir: Path, clock_start: float, clock: str = "time", pretrain_cost: float = 1.0
) -> tuple[list[Point], float]:
    """Validation points of one stage and the arm's clock at the stage's end (seconds, or step-equivalents).

    Time: the clock advances by the time between consecutive records of a segment; a ``start`` event after the first
    one begins a new segment (a resume), so the pause before it is skipped. Steps: the clock is the stage's step,
    times ``pretrain_cost`` for a pre-training stage."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {run_dir} a run folder?)")
    records = list(read_metrics(path))
    cost = pretrain_cost if any("t2p_acc" in r for r in records) else 1.0
    points: list[Point] = []
    now, last_time = clock_start, None
    for record in records:
        if clock == "steps":
            now = max(now, clock_start + cost * int(record.get("step", 0)))
        else:
            t = float(record["time"])
            if record.get("event") != "start" and last_time is not None:
                now += max(0.0, t - last_time)
            last_time = t
        if record.get("event") == "val":
            values = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and "/" in k}
            values.update({k: float(record[k]) for k in ("t2p_acc", "mlm_acc", "object_acc") if k in record})
            points.append(Point(run_dir.name, int(record["step"]), now if clock == "steps" else now / 60.0, values))
    return points, now


def arm_points(stages: list[Path], clock: str = "time", pretrain_cost: float = 1.0) -> list[Point]:
    """Every validation point of an arm's stages, on one clock."""
    points: list[Point] = []
    now = 0.0
    for stage in stages:
        new, now = stage_points(stage, now, clock, pretrain_cost)
        points.extend(new)
    return points


def first_crossing(points: list[Point], key: str, level: float) -> float | None:
    """The clock at the first validation point where ``key`` reaches ``level`` (None: never)."""
    return next((p.clock for p in points if p.values.get(key, -1.0) >= level), None)


def table(name: str, points: list[Point], clock: str = "time") -> str:
    header = "minutes" if clock == "time" else "step-equivalents"
    rows = [f"### {name}", "", f"| stage | step | {header} | decoder | token | pre-training (t2p / mlm / object) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for p in points:
        db, tb = p.values.get("val/decoder/acc"), p.values.get("val/token/acc")
        pre = " / ".join(f"{p.values[k]:.1f}" for k in ("t2p_acc", "mlm_acc", "object_acc") if k in p.values)
        cells = [f"{db:.1f}" if db is not None else "", f"{tb:.1f}" if tb is not None else ""]
        rows.append(
            f"| {p.stage} | {p.step} | {p.clock:.{1 if clock == 'time' else 0}f} | {cells[0]} | {cells[1]} | {pre} |"
        )
    # Crossings per stage: stages validate on their own data (a starter-level 50 % is not an easy-level 50 %).
    for stage in dict.fromkeys(p.stage for p in points if "val/decoder/acc" in p.values):
        for key, label in (("val/decoder/acc", "decoder"), ("val/token/acc", "token")):
            hits = [first_crossing([p for p in points if p.stage == stage], key, level) for level in LEVELS]
            text = ", ".join(f">= {lv:.0f} % at {m:.1f} {UNITS[clock]}" if m is not None else f">= {lv:.0f} % never"
                             for lv, m in zip(LEVELS, hits))  # fmt: skip
            rows.append(f"\n{stage}, {label}: {text}")
    return "\n".join(rows)


def plot(arms: dict[str, list[Point]], out: Path, title: str, xlabel: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, points), colour in zip(arms.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for key, style in (("val/decoder/acc", "-o"), ("val/token/acc", "--s")):
            xs = [p.clock for p in points if key in p.values]
            ys = [p.values[key] for p in points if key in p.values]
            if xs:
                ax.plot(xs, ys, style, color=colour, markersize=3, label=f"{name}: {key.split('/')[1]}")
        # Where fine-tuning starts: the end of the arm's pre-training stages (points without accuracies).
        pre = [p.clock for p in points if "val/decoder/acc" not in p.values]
        if pre:
            ax.axvline(max(pre), color=colour, linewidth=0.6, linestyle=":")
    ax.set(xlabel=xlabel, ylabel="val Acc@0.5 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="NAME=RUN_DIR[,RUN_DIR...] (stages in order)")
    parser.add_argument("--out", type=Path, help="PNG of the curves")
    parser.add_argument("--title", default="equal-compute comparison")
    parser.add_argument("--clock", choices=list(UNITS), default="time", help="x axis: minutes or optimisation steps")
    parser.add_argument(
        "--pretrain-step-cost", type=float, default=1.0, help="a pre-training step in fine-tuning steps"
    )
    args = parser.parse_args(argv)
    arms: dict[str, list[Point]] = {}
    for spec in args.arm:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--arm {spec!r}: expected NAME=RUN_DIR[,RUN_DIR...]")
        arms[name] = arm_points([Path(d) for d in dirs.split(",")], args.clock, args.pretrain_step_cost)
    for name, points in arms.items():
        print(table(name, points, args.clock), end="\n\n")
    if args.out:
        xlabel = "minutes of one CPU core (arm's own clock)"
        if args.clock == "steps":
            xlabel = f"optimisation steps (a pre-training step counts {args.pretrain_step_cost:g})"
        plot(arms, args.out, args.title, xlabel)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
