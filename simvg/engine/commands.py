"""``simvg train`` and ``simvg eval``: parse, build the config, and call the engine.

Both run as one process or under ``torchrun`` (``torchrun --nproc_per_node=K -m simvg train CONFIG``): the
process group is set up from the environment in ``simvg.utils.dist``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from simvg.config import Config, config_from_dict, load_config
from simvg.errors import UserError
from simvg.utils import dist


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML experiment file (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")  # fmt: skip
    parser.add_argument("--output", help="output folder (overrides train.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.pth")


def train_command(args: argparse.Namespace) -> int:
    from simvg.engine.train import NonFiniteLossError, fit

    overrides = list(args.overrides) + ([f"train.output_dir={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    try:
        fit(cfg, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"simvg train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    return 0


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run or model folder, a 'simvg train' .pth, an official .pth")  # fmt: skip
    parser.add_argument(
        "--config", help="YAML config for the data (default: the one stored with a training checkpoint)"
    )
    parser.add_argument("--split", required=True, help="split to evaluate, e.g. val, testA")
    parser.add_argument("--branch", choices=("token", "decoder", "both"), default=None,
                        help="branches to evaluate (default: eval.branch of the config, 'both')")  # fmt: skip
    parser.add_argument("--tokenizer", help="sentencepiece file for models that carry none (official: beit3.spm)")
    parser.add_argument("--dump", help="write one JSON line per expression to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data (repeatable)")  # fmt: skip
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA or raw weights of a checkpoint (auto: EMA when present)")  # fmt: skip
    parser.add_argument("--max-samples", type=int, default=None,
                        help="the first N expressions only (default: eval.max_samples of --set, else all)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def eval_config(path: Path, config: str | None, overrides: list[str], stored: dict[str, Any] | None) -> Config:
    """The data and evaluation settings: ``--config``, else the training checkpoint's stored config; ``--set`` on top.

    A model folder or an official file holds no dataset, so it needs ``--config`` (or ``--set data.*``).
    """
    if config:
        return load_config(config, overrides)
    if stored is not None:
        return config_from_dict(stored, overrides, f"{path} (stored config)")
    if not any(o.startswith("data.") for o in overrides):
        raise UserError(f"{path}: holds no dataset config; pass --config (e.g. configs/refcoco_b32_onestage.yaml)")
    return config_from_dict({}, overrides, "--set")


def _given(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def eval_settings(args: argparse.Namespace, cfg: Config) -> tuple[str, int]:
    """(branch, max_samples): a command-line option wins over ``--set`` (and says so); a training config's
    validation limit is not an evaluation's, so ``eval.max_samples`` counts only when given with ``--set``."""
    branch, limit = cfg.eval.branch, cfg.eval.max_samples if _given(args.overrides, "eval.max_samples") else 0
    for option, key, value in (("--branch", "eval.branch", args.branch), ("--max-samples", "eval.max_samples",
                                                                           args.max_samples)):  # fmt: skip
        if value is not None and _given(args.overrides, key):
            print(f"simvg eval: {option} {value} wins over --set {key}", file=sys.stderr)
    if args.branch is not None:
        branch = args.branch
    if args.max_samples is not None:
        limit = args.max_samples
    return branch, limit


def match_model(cfg: Config, loaded: Any, overrides: list[str]) -> None:
    """Make the data pipeline the model's: its preprocessing and its tokenizer (a ``--set`` of these wins)."""
    pre = loaded.spec.preprocess
    for name in ("image_size", "resize_mode", "mean", "std", "max_tokens"):
        if not _given(overrides, f"data.{name}"):
            setattr(cfg.data, name, getattr(pre, name))
    if loaded.tokenizer is not None and not _given(overrides, "data.tokenizer"):
        cfg.data.tokenizer = str(loaded.tokenizer)


def eval_command(args: argparse.Namespace) -> int:
    from simvg.artifact import load_artifact
    from simvg.data.datasets import build_dataset, build_tokenizer, dataset_task, resolve_paths
    from simvg.engine.evaluate import evaluate
    from simvg.engine.train import check_vocab, eval_loader

    path = Path(args.checkpoint)
    stored = None
    if path.suffix == ".pth" or (path.is_dir() and not (path / "model.safetensors").is_file()):
        stored = _stored_config(path)
    cfg = eval_config(path, args.config, args.overrides, stored)
    info = dist.init_distributed(cfg.train.device)
    try:
        loaded = load_artifact(path, weights=args.weights, device=info.device, tokenizer=args.tokenizer)
        for notice in loaded.notices:
            print(notice, file=sys.stderr)
        match_model(cfg, loaded, args.overrides)
        branch, cfg.eval.max_samples = eval_settings(args, cfg)
        spec, _, _ = resolve_paths(cfg.data)
        task = dataset_task(spec, Path(cfg.data.root))
        if task != loaded.spec.task:
            queries = loaded.spec.architecture.num_queries
            raise UserError(f"{args.checkpoint}: a {loaded.spec.task.upper()} model ({queries} queries) cannot be "
                            f"evaluated on {cfg.data.dataset}, a {task.upper()} dataset")  # fmt: skip
        tokenizer = build_tokenizer(cfg.data)
        check_vocab(loaded.spec.architecture.encoder.vocab_size, tokenizer)
        dataset = build_dataset(cfg.data, args.split, False, tokenizer, seed=cfg.train.seed)
        loader = eval_loader(cfg, dataset, info)
        e = cfg.eval
        records: list[dict[str, Any]] | None = [] if args.dump else None
        metrics = evaluate(loaded.model, loader, info.device, task, branch, iou_threshold=e.iou_threshold,
                           score_threshold=e.score_threshold, match_threshold=e.match_threshold,
                           match_metric=e.match_metric, amp=cfg.train.amp, dump=records)  # fmt: skip
        if info.is_main:
            print(json.dumps(metrics) if args.json else format_metrics(args.split, task, loaded.spec.weights, metrics))
            if records is not None:
                write_dump(Path(args.dump), records)
    finally:
        dist.cleanup()
    return 0


def _stored_config(path: Path) -> dict[str, Any] | None:
    """The config inside a 'simvg train' checkpoint (or a run folder's), None for any other file."""
    from simvg.artifact import resolve
    from simvg.utils.checkpoint import load_checkpoint

    obj = load_checkpoint(resolve(path))
    return obj["config"] if isinstance(obj.get("config"), dict) and isinstance(obj.get("model"), dict) else None


def write_dump(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON line per expression, written atomically; an unwritable place is a UserError naming it."""
    from simvg.utils.checkpoint import atomic_write_bytes

    text = "".join(json.dumps(record) + "\n" for record in records)
    try:
        atomic_write_bytes(text.encode("utf-8"), path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the dump ({exc.strerror or exc})") from None


def format_metrics(split: str, task: str, kind: str, metrics: dict[str, float]) -> str:
    """Human-readable lines, e.g. ``val: 1500 expressions (EMA weights)`` then one line per branch."""
    lines = [f"{split}: {int(metrics['num_samples'])} expressions ({task.upper()}, {kind} weights)"]
    for branch in ("decoder", "token"):
        values = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(branch + "/")}
        if not values:
            continue
        if task == "rec":
            lines.append(f"  {branch:<8} Acc@0.5 {values['acc']:.2f}")
        else:
            lines.append(f"  {branch:<8} Pr@(F1=1, IoU>=0.5) {values['pr_f1']:.2f}  N-acc {values['n_acc']:.2f}  "
                         f"T-acc {values['t_acc']:.2f}")  # fmt: skip
    return "\n".join(lines)
