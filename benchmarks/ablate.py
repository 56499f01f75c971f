"""Ablations of SimVG on SynthRef at CPU scale: the same data and step budget for every variant.

Every run goes through the real CLI (``python -m simvg train`` then ``python -m simvg eval`` on each test split), so
what is measured is what a user gets. Variants (``--set`` overrides of the base config):

- ``decoder_only``: the token branch gets no loss (its accuracy is reported anyway, as the untrained baseline);
- ``token_gt_only``: the token branch is trained on the ground truth only (no distillation);
- ``onestage_dwbd``: the recipe as is (dynamic weight-balance distillation, one stage);
- ``twostage``: decoder only for half the budget, then DWBD from that checkpoint for the other half;
- ``fixed_weight``: distillation with a fixed weight 0.5 instead of the dynamic one;
- ``no_tqg``: plain learned queries instead of the text-guided query generator.

``--fractions`` below 1 train on the first part of the train split (a subset folder beside the runs; val and test
splits unchanged) for the data-efficiency curve. Each run writes ``result.json`` in its folder; a run that has one is
skipped, a killed training is resumed from its ``last.pth``. Every stored result of the same ``--steps`` (also
those of earlier calls with other variants, seeds or fractions) goes to ``OUT/results.json``; the report
(``REPORT/ablation.md`` with mean and per-seed tables, ``ablation_curves.png``, ``ablation_fractions.png``) is
rebuilt from them on every call. ``twostage``'s stage 2 keeps the base config's lr (the official stage 2 lowers it).
Validation (the curves) runs about every ``--val-every`` steps (200), whatever the fraction.

The default base is ``configs/synthref_rec_starter.yaml`` (the starter level: two objects on a plain background),
where a 1000-step run leaves the "average box" plateau; on the easy and standard levels 1000-2000 steps end on or
near it and every variant reads the same (docs/results.md). The ablation of docs/results.md (about 13 min per run,
training and evaluation, with two runs sharing a 2-core CPU)::

    python benchmarks/ablate.py --steps 1000 --seeds 0 1 --parallel 2 --out runs/ablate_starter --report docs/results
    python benchmarks/ablate.py --steps 1000 --seeds 0 --variants onestage_dwbd --fractions 0.25 0.1 \\
        --out runs/ablate_starter --report docs/results

The same ablation from the encoder pre-trained on SynthRef captions (docs/results/ablation_pretrained)::

    python benchmarks/ablate.py --steps 1000 --seeds 0 1 --parallel 2 \\
        --set model.pretrained=artifacts/pretrain_synthref/beit3_fp16.pth \\
        --out runs/ablate_pretrained --report docs/results/ablation_pretrained
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.data.loaders import batches_per_epoch  # noqa: E402

BRANCHES = ("decoder", "token")
DECODER_ONLY = ["loss.token=0", "loss.distill=0"]
VARIANTS: dict[str, list[str]] = {
    "decoder_only": DECODER_ONLY,
    "token_gt_only": ["loss.distill_mode=none"],
    "onestage_dwbd": [],
    "twostage": [],  # two trainings, see run_twostage
    "fixed_weight": ["loss.distill_mode=fixed", "loss.fixed_weight=0.5"],
    # A dotted key inside model.overrides merges with the config's own overrides instead of replacing them.
    "no_tqg": ["model.overrides.use_tqg=false"],
}
CURVE_VARIANTS = ("decoder_only", "token_gt_only", "onestage_dwbd", "twostage")
DEFAULT_SYNTH = (  # used when the config has no "# Data:" header line
    "simvg data synth --out data/synthref_rec_easy --task rec --num-images 4000 --image-size 128 --seed 0"
    " --max-objects 4 --background plain"
)


@dataclass
class Job:
    """One (variant, seed, fraction) run: where it trains and what it starts from."""

    variant: str
    seed: int
    fraction: float
    data_root: Path
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # shared by every run (schedule, data root, threads)

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}/f{self.fraction:g}"


# ----------------------------------------------------------------------------------------------------------------
# settings


def schedule_overrides(steps: int) -> list[str]:
    """The step budget: ``max_steps``, the LR drop at 85 % and warmup min(200, steps / 10).

    ``epochs = steps`` is enough to reach ``max_steps`` (an epoch has at least one batch) and never cuts a run short.
    """
    milestone = max(1, round(0.85 * steps))
    warmup = min(200, steps // 10)
    return [f"train.max_steps={steps}", f"train.epochs={steps}", "train.schedule_unit=step",
            f"train.milestones=[{milestone}]", f"train.warmup={warmup}"]  # fmt: skip


def validation_overrides(train_entries: int, batch_size: int, every_steps: int) -> list[str]:
    """Validate about every ``every_steps`` optimisation steps whatever the train split's size: the engine counts
    validation in epochs, and an epoch of a 10 % subset is ten times shorter than the full set's."""
    steps_per_epoch = max(1, batches_per_epoch(train_entries, batch_size))  # one process, as the runs here
    return [f"train.eval_every_epochs={max(1, round(every_steps / steps_per_epoch))}"]


def batch_size(config: dict[str, Any], overrides: list[str]) -> int:
    """The per-process batch of the runs: the config's, or the last ``train.batch_size=`` override."""
    sets = [o.split("=", 1)[1] for o in overrides if o.startswith("train.batch_size=")]
    return int(sets[-1]) if sets else int(config.get("train", {}).get("batch_size", 32))


def train_entries(root: Path) -> int:
    return len(json.loads((root / "instances.json").read_text())["train"])


def read_config(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "data" not in data:
        sys.exit(f"ablate: {path}: not a simvg experiment config (no data section)")
    return data


def synth_command(config_path: Path, root: Path) -> list[str]:
    """The ``simvg data synth`` call that makes ``root``: the config's ``# Data:`` line with ``--out root``."""
    line = next((ln for ln in config_path.read_text().splitlines() if ln.startswith("# Data: simvg data synth")), None)
    words = shlex.split(line.removeprefix("# Data: ") if line else DEFAULT_SYNTH)
    out = words.index("--out")
    words[out + 1] = str(root)
    return [sys.executable, "-m", "simvg", *words[1:]]


def ensure_data(config_path: Path, root: Path) -> None:
    if (root / "instances.json").is_file():
        return
    cmd = synth_command(config_path, root)
    print("ablate: generating", shlex.join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def subset_dataset(source: Path, fraction: float, dest: Path) -> Path:
    """``dest``: the first ``fraction`` of ``source``'s train entries, other splits as they are.

    Images are one symlink to the source folder and the tokenizer is copied, so the vocabulary is the full one.
    """
    if (dest / "instances.json").is_file():
        return dest
    data = json.loads((source / "instances.json").read_text())
    train = data["train"]
    count = max(1, math.ceil(fraction * len(train)))
    data["train"] = train[:count]
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.spm", "tokenizer.vocab"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    meta = json.loads((source / "meta.json").read_text()) if (source / "meta.json").is_file() else {}
    meta["subset"] = {"source": str(source), "fraction": fraction, "train_entries": count, "of": len(train)}
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    if not (dest / "images").exists():
        (dest / "images").symlink_to((source / "images").resolve(), target_is_directory=True)
    # Written last: its presence marks a complete subset folder.
    (dest / "instances.json").write_text(json.dumps(data))
    return dest


# ----------------------------------------------------------------------------------------------------------------
# running


def run_cli(args: list[str], log: Path, threads: int) -> str:
    """Run ``python -m simvg ARGS`` (stderr to ``log``); returns stdout. A failure stops the job with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as err:
        err.write(f"$ simvg {shlex.join(args)}\n")
        err.flush()
        proc = subprocess.run([sys.executable, "-m", "simvg", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"simvg {args[0]} failed (exit {proc.returncode}); {log}:\n{tail}")
    return proc.stdout


def train(config: Path, run_dir: Path, overrides: list[str], threads: int) -> None:
    """Train into ``run_dir`` unless it finished already; resume a killed run from its ``last.pth``."""
    events = read_events(run_dir)
    if any(e.get("event") == "end" for e in events) and (run_dir / "last.pth").is_file():
        return
    resume = (run_dir / "last.pth").is_file()
    sets = [a for o in overrides for a in ("--set", o)]
    args = ["train", str(config), *sets, "--output", str(run_dir), *(["--resume"] if resume else [])]
    run_cli(args, run_dir.parent / f"{run_dir.name}.log", threads)


def evaluate(run_dir: Path, splits: list[str], max_samples: int, threads: int) -> dict[str, dict[str, float]]:
    """{split: {branch: Acc@0.5 in percent}} of ``run_dir/last.pth`` (both branches, trained or not)."""
    results = {}
    for split in splits:
        args = ["eval", "--checkpoint", str(run_dir / "last.pth"), "--split", split, "--branch", "both", "--json",
                "--max-samples", str(max_samples)]  # fmt: skip
        out = run_cli(args, run_dir.parent / f"{run_dir.name}.log", threads)
        metrics = json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("{")))
        results[split] = {b: float(metrics[f"{b}/acc"]) for b in BRANCHES if f"{b}/acc" in metrics}
    return results


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
    return events


def train_summary(run_dir: Path, step_offset: int = 0) -> dict[str, Any]:
    """Final step, training wall time (summed over resumed sessions) and the validation curve of one training.

    The curve is one point per ``"val"`` event: ``{"step", "decoder", "token"}`` (Acc@0.5 on the first validation
    split, percent; a branch the run did not validate is absent). A resumed run's repeated steps keep the last value.
    """
    events = read_events(run_dir)
    wall, session_start, last_time = 0.0, None, None
    for e in events:
        if e.get("event") == "start":
            if session_start is not None:
                wall += last_time - session_start
            session_start = e["time"]
        last_time = e.get("time", last_time)
    if session_start is not None:
        wall += last_time - session_start
    curve: dict[int, dict[str, float]] = {}
    for e in (e for e in events if e.get("event") == "val"):
        split = next((k.split("/")[0] for k in e if k.endswith("/num_samples")), "val")
        point = {b: e[f"{split}/{b}/acc"] for b in BRANCHES if f"{split}/{b}/acc" in e}
        curve[e["step"] + step_offset] = point
    final = max((e.get("step", 0) for e in events), default=0)
    return {"final_step": final + step_offset, "train_wall_s": round(wall, 1),
            "curve": [{"step": s, **p} for s, p in sorted(curve.items())]}  # fmt: skip


def run_job(job: Job, config: Path, args: argparse.Namespace, splits: list[str]) -> dict[str, Any]:
    """Train and evaluate one job; the result is also written to ``run_dir/result.json``."""
    t0 = time.time()
    data = [*args.overrides, f"data.root={job.data_root}", f"train.seed={job.seed}", f"train.threads={args.threads}"]
    batch = batch_size(read_config(config), args.overrides)
    data += validation_overrides(train_entries(job.data_root), batch, args.val_every)
    if job.variant == "twostage":
        half = max(1, args.steps // 2)
        stage1, stage2 = job.run_dir / "stage1", job.run_dir / "stage2"
        train(config, stage1, [*data, *schedule_overrides(half), *DECODER_ONLY], args.threads)
        init = [f"model.init_from={stage1 / 'last.pth'}"]
        train(config, stage2, [*data, *schedule_overrides(args.steps - half), *init], args.threads)
        first = train_summary(stage1)
        summary = train_summary(stage2, step_offset=first["final_step"])
        summary["train_wall_s"] = round(first["train_wall_s"] + summary["train_wall_s"], 1)
        summary["curve"] = first["curve"] + summary["curve"]
        final_dir = stage2
    else:
        train(config, job.run_dir, [*data, *schedule_overrides(args.steps), *VARIANTS[job.variant]], args.threads)
        summary, final_dir = train_summary(job.run_dir), job.run_dir
    test = evaluate(final_dir, splits, args.eval_samples, args.threads)
    result = {"variant": job.variant, "seed": job.seed, "fraction": job.fraction, "steps": args.steps,
              **summary, "wall_s": round(time.time() - t0, 1), "test": test,
              "gap": {s: round(v["token"] - v["decoder"], 4) for s, v in test.items() if len(v) == 2},
              "run_dir": str(job.run_dir)}  # fmt: skip
    (job.run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def make_jobs(args: argparse.Namespace, base_root: Path, out: Path) -> list[Job]:
    jobs = []
    for fraction in args.fractions:
        if fraction >= 1.0:
            root = base_root
        else:
            root = subset_dataset(base_root, fraction, out / "data" / f"{base_root.name}_f{fraction:g}")
        for variant in args.variants:
            for seed in args.seeds:
                run_dir = out / f"f{fraction:g}" / variant / f"seed{seed}"
                jobs.append(Job(variant, seed, fraction, root, run_dir))
    return jobs


def run_all(jobs: list[Job], config: Path, args: argparse.Namespace, splits: list[str]) -> list[dict[str, Any]]:
    """Results of every job: stored ones read back, the others run ``--parallel`` at a time."""
    done = {j.key: json.loads((j.run_dir / "result.json").read_text())
            for j in jobs if (j.run_dir / "result.json").is_file()}  # fmt: skip
    todo = [j for j in jobs if j.key not in done]
    print(f"ablate: {len(done)} runs stored, {len(todo)} to run", flush=True)

    def one(job: Job) -> dict[str, Any] | None:
        print(f"ablate: start {job.key}", flush=True)
        try:
            result = run_job(job, config, args, splits)
        except (RuntimeError, subprocess.CalledProcessError) as exc:  # one broken run must not stop the others
            print(f"ablate: FAILED {job.key}: {exc}", file=sys.stderr, flush=True)
            return None
        print(f"ablate: done {job.key} in {result['wall_s']:.0f} s: {result['test']}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for job, result in zip(todo, pool.map(one, todo)):
            if result is not None:
                done[job.key] = result
    return [done[j.key] for j in jobs if j.key in done]


# ----------------------------------------------------------------------------------------------------------------
# report


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def result_cells(rows: list[dict[str, Any]], splits: list[str]) -> list[str]:
    """Cells: DB and TB accuracy per split, then the TB-DB gap per split (mean ± std over ``rows``)."""
    cells = []
    for split in splits:
        for branch in BRANCHES:
            cells.append(mean_std([r["test"][split][branch] for r in rows if branch in r["test"].get(split, {})]))
    cells += [mean_std([r["gap"][s] for r in rows if s in r["gap"]]) for s in splits]
    return cells


def table_header(first: list[str], splits: list[str]) -> list[str]:
    names = [*first, *(f"{s} {b}" for s in splits for b in ("DB", "TB")), *(f"{s} TB−DB" for s in splits)]
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def markdown(results: list[dict[str, Any]], splits: list[str], command: str) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fractions = sorted({r["fraction"] for r in results}, reverse=True)
    lines = ["# SimVG ablations on SynthRef", "", f"Command: `{command}`", "",
             "Acc@0.5 (%) of the decoder branch (DB) and the token branch (TB) after the same number of steps; "
             "mean ± std over seeds. TB−DB is the gap the distillation is meant to close.", ""]  # fmt: skip
    for fraction in fractions:
        lines += [f"## Training fraction {fraction:g} (mean over seeds)", ""]
        lines += table_header(["variant", "seeds", "steps", "train min"], splits)
        for v in variants:
            rows = [r for r in results if r["variant"] == v and r["fraction"] == fraction]
            if rows:
                wall = statistics.mean(r["train_wall_s"] for r in rows) / 60
                head = [v, str(len(rows)), str(rows[0]["final_step"]), f"{wall:.1f}"]
                lines.append("| " + " | ".join(head + result_cells(rows, splits)) + " |")
        lines.append("")
    lines += ["## Per seed", ""]
    lines += table_header(["variant", "fraction", "seed", "final step", "train s"], splits)
    for r in sorted(results, key=lambda r: (variants.index(r["variant"]), -r["fraction"], r["seed"])):
        head = [r["variant"], f"{r['fraction']:g}", str(r["seed"]), str(r["final_step"]), f"{r['train_wall_s']:.0f}"]
        lines.append("| " + " | ".join(head + result_cells([r], splits)) + " |")
    lines += ["", "![validation accuracy versus step](ablation_curves.png)", "",
              "![test accuracy versus training fraction](ablation_fractions.png)", ""]  # fmt: skip
    return "\n".join(lines)


def mean_curve(rows: list[dict[str, Any]], branch: str) -> tuple[list[int], list[float]]:
    """Mean over seeds at every step where all of them validated ``branch``."""
    per_run = [{p["step"]: p[branch] for p in r["curve"] if branch in p} for r in rows]
    steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
    return steps, [statistics.mean(c[s] for c in per_run) for s in steps]


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    top = max(r["fraction"] for r in results)
    for i, variant in enumerate(v for v in CURVE_VARIANTS if any(r["variant"] == v for r in results)):
        rows = [r for r in results if r["variant"] == variant and r["fraction"] == top]
        for branch, style in (("token", "-"), ("decoder", "--")):
            steps, accs = mean_curve(rows, branch)
            if steps:
                ax.plot(steps, accs, style, color=f"C{i}", marker=".", label=f"{variant} {branch}")
    ax.set(xlabel="training step", ylabel="val Acc@0.5 (%)", title=f"Validation accuracy (fraction {top:g})")
    _save_figure(fig, ax, path)


def _save_figure(fig: Figure, ax: Any, path: Path) -> None:
    """Grid, legend (when anything was drawn), tight layout, PNG (a bare Figure: no pyplot, no GUI backend)."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_fractions(results: list[dict[str, Any]], splits: list[str], path: Path) -> None:
    """Test accuracy (mean over the test splits and seeds) versus training fraction, TB solid, DB dashed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in results)):
        for branch, style in (("token", "-"), ("decoder", "--")):
            points = []
            for fraction in sorted({r["fraction"] for r in results if r["variant"] == variant}):
                values = [r["test"][s][branch] for r in results if r["variant"] == variant
                          and r["fraction"] == fraction for s in splits if branch in r["test"].get(s, {})]  # fmt: skip
                if values:
                    points.append((fraction, statistics.mean(values)))
            if points:
                ax.plot(*zip(*points), style, color=f"C{i}", marker="o", label=f"{variant} {branch}")
    ax.set(xlabel="fraction of the train split", ylabel="test Acc@0.5 (%)", title="Data efficiency")
    _save_figure(fig, ax, path)


def write_report(results: list[dict[str, Any]], splits: list[str], report: Path, command: str) -> None:
    report.mkdir(parents=True, exist_ok=True)
    (report / "ablation.md").write_text(markdown(results, splits, command))
    plot_curves(results, report / "ablation_curves.png")
    plot_fractions(results, splits, report / "ablation_fractions.png")


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/synthref_rec_starter.yaml", help="base experiment config")
    p.add_argument("--data-root", help="dataset folder (default: the config's data.root; generated when missing)")
    p.add_argument("--steps", type=int, default=4000, help="optimisation steps per run (twostage: split in halves)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0], help="fractions of the train split")
    p.add_argument("--splits", nargs="+", default=["testA", "testB"], help="test splits (those present are used)")
    p.add_argument("--out", default="runs/ablate", help="runs and results.json")
    p.add_argument("--report", default="docs/results", help="folder of ablation.md and the plots")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training/eval process")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--eval-samples", type=int, default=0, help="first N expressions per test split (0: all)")
    p.add_argument("--val-every", type=int, default=200, help="validate about every N steps (the curves)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, before the variant's own (repeatable)",
    )
    args = p.parse_args(argv)
    if args.steps < 2 or any(not 0 < f <= 1 for f in args.fractions):
        p.error("--steps must be >= 2 and every fraction in (0, 1]")
    return args


def stored_elsewhere(out: Path, results: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Stored results of the same step budget from earlier calls with other variants, seeds or fractions."""
    seen = {r["run_dir"] for r in results}
    found = [json.loads(p.read_text()) for p in sorted(out.glob("f*/*/seed*/result.json"))]
    return [r for r in found if r["run_dir"] not in seen and r["steps"] == steps]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = (ROOT / args.config).resolve()
    base_root = Path(args.data_root or read_config(config)["data"]["root"])
    base_root = (base_root if base_root.is_absolute() else ROOT / base_root).resolve()
    out = (ROOT / args.out).resolve()
    ensure_data(config, base_root)
    present = json.loads((base_root / "instances.json").read_text()).keys()
    splits = [s for s in args.splits if s in present]
    if not splits:
        sys.exit(f"ablate: {base_root / 'instances.json'}: none of the splits {args.splits} (has {list(present)})")
    results = run_all(make_jobs(args, base_root, out), config, args, splits)
    results += stored_elsewhere(out, results, args.steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"splits": splits, "runs": results}, indent=1))
    if results:
        command = "python benchmarks/ablate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        write_report(results, splits, (ROOT / args.report).resolve(), command)
    print(f"ablate: {len(results)} runs in {out / 'results.json'}, report in {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
