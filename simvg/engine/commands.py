"""``simvg train`` and ``simvg eval``: parse, build the config, and call the engine.

Both run as one process or under ``torchrun`` (``torchrun --nproc_per_node=K -m simvg train CONFIG``): the
process group is set up from the environment in ``simvg.utils.dist``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simvg.artifact import load_artifact, resolve
from simvg.config import Config, config_from_dict, load_config
from simvg.data.datasets import build_dataset, build_tokenizer, dataset_task, resolve_paths
from simvg.data.loaders import eval_loader
from simvg.data.tokenizer import check_vocab
from simvg.engine.evaluate import evaluate
from simvg.engine.train import NonFiniteLossError, fit
from simvg.errors import UserError
from simvg.models.quantize import precision_arguments, set_threads
from simvg.utils import dist
from simvg.utils.checkpoint import atomic_write_bytes, load_checkpoint


def run_arguments(parser: argparse.ArgumentParser, configs: str) -> None:
    """The options of a run from a YAML file (``simvg train``, ``simvg pretrain``)."""
    parser.add_argument("config", help=f"a YAML experiment file ({configs})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")  # fmt: skip
    parser.add_argument("--output", help="output folder (overrides train.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.pth")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    run_arguments(parser, "configs/*.yaml")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a model.pretrained file that needs full unpickling (trusted only)")  # fmt: skip


def train_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.output_dir={args.output}"] if args.output else [])
    if args.output and _given(args.overrides, "train.output_dir"):
        print(f"simvg train: --output {args.output} wins over --set train.output_dir", file=sys.stderr)
    cfg = load_config(args.config, overrides)
    try:
        fit(cfg, resume=args.resume, allow_pickle=args.allow_pickle)
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
    parser.add_argument("--split", required=True,
                        help="split to evaluate, e.g. val, testA; 'all': each split of data.val_splits, then of "
                             "data.test_splits")  # fmt: skip
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
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON object (with --split all: one object per split, keyed "
                             "by split)")  # fmt: skip
    precision_arguments(parser, compile=False)


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


@dataclass
class EvalSettings:
    """What ``simvg eval`` runs with, once the command line and ``--set`` are reconciled."""

    branch: str
    max_samples: int
    splits: list[str]


# ``--set`` keys that ``simvg eval`` does not read: the model comes from --checkpoint, and these only shape training.
TRAINING_ONLY = ("model", "loss", "train", "data.train_split", "data.lsj", "data.jitter_min", "data.jitter_max",
                 "data.flip_prob", "data.data_sources", "data.train_kinds")  # fmt: skip
EVAL_READS_TRAIN = ("train.device", "train.amp", "train.seed", "train.threads")  # the training keys it does read


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _given(overrides: list[str], key: str) -> bool:
    return any(_key(o) == key for o in overrides)


def unused_overrides(overrides: list[str], split: str) -> list[str]:
    """The ``--set`` keys that have no effect on this evaluation (each said once, in order)."""
    unused = []
    for key in dict.fromkeys(_key(o) for o in overrides):
        training = key not in EVAL_READS_TRAIN and any(key == p or key.startswith(p + ".") for p in TRAINING_ONLY)
        if training or (split != "all" and key in ("data.val_splits", "data.test_splits")):
            unused.append(key)
    return unused


def eval_splits(split: str, data: Any) -> list[str]:
    """``--split``: one split, or ``all``: data.val_splits then data.test_splits, each once."""
    if split != "all":
        return [split]
    splits = list(dict.fromkeys([*data.val_splits, *data.test_splits]))
    if not splits:
        raise UserError("--split all: data.val_splits and data.test_splits are both empty")
    return splits


def eval_threads(args: argparse.Namespace, cfg: Config) -> int | None:
    """``--threads``, else ``train.threads`` when given with ``--set`` (0: torch's default), else None."""
    threads = getattr(args, "threads", None)
    if threads is None and _given(args.overrides, "train.threads"):
        threads = cfg.train.threads or None
    return threads


def eval_settings(args: argparse.Namespace, cfg: Config) -> EvalSettings:
    """Reconcile the options with ``--set``: an option given on the command line wins (and says so); a ``--set``
    that evaluation does not read says so too. A training config's validation limit is not an evaluation's, so
    ``eval.max_samples`` counts only when given with ``--set`` (a stored one is reported, not applied); likewise
    ``train.threads``. Every other ``eval.*`` value (batch_size, branch, iou_threshold, score_threshold,
    match_threshold, match_metric) is used as the config and ``--set`` give it."""

    def note(text: str) -> None:
        print(f"simvg eval: {text}", file=sys.stderr)

    overrides = args.overrides
    options = (("--branch", "eval.branch", args.branch), ("--max-samples", "eval.max_samples", args.max_samples),
               ("--threads", "train.threads", getattr(args, "threads", None)),
               ("--tokenizer", "data.tokenizer", args.tokenizer))  # fmt: skip
    for option, key, value in options:
        if value is not None and _given(overrides, key):
            note(f"{option} {value} wins over --set {key}")
    for key in unused_overrides(overrides, args.split):
        why = "read by --split all only" if key.startswith("data.") and key.endswith("_splits") else "training only"
        note(f"--set {key} has no effect on evaluation ({why})")
    limit = cfg.eval.max_samples if _given(overrides, "eval.max_samples") else 0
    if args.max_samples is None and not limit and cfg.eval.max_samples:
        note(f"eval.max_samples {cfg.eval.max_samples} of the config is a validation limit of training; evaluating "
             "every expression (pass --max-samples N for the first N)")  # fmt: skip
    if args.tokenizer is not None:
        cfg.data.tokenizer = str(args.tokenizer)
    return EvalSettings(
        branch=args.branch if args.branch is not None else cfg.eval.branch,
        max_samples=args.max_samples if args.max_samples is not None else limit,
        splits=eval_splits(args.split, cfg.data),
    )


def match_model(cfg: Config, loaded: Any, overrides: list[str]) -> None:
    """Make the data pipeline the model's: its preprocessing and its tokenizer (a ``--set`` of these wins)."""
    pre = loaded.spec.preprocess
    for name in ("image_size", "resize_mode", "mean", "std", "max_tokens"):
        if not _given(overrides, f"data.{name}"):
            setattr(cfg.data, name, getattr(pre, name))
    if loaded.tokenizer is not None and not _given(overrides, "data.tokenizer"):
        cfg.data.tokenizer = str(loaded.tokenizer)


def eval_command(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    stored = None
    if path.suffix == ".pth" or (path.is_dir() and not (path / "model.safetensors").is_file()):
        stored = _stored_config(path)
    cfg = eval_config(path, args.config, args.overrides, stored)
    info = dist.init_distributed(cfg.train.device)
    try:
        set_threads(eval_threads(args, cfg))
        loaded = load_artifact(path, weights=args.weights, device=info.device, tokenizer=args.tokenizer,
                               precision=args.precision)  # fmt: skip
        for notice in loaded.notices:
            print(notice, file=sys.stderr)
        match_model(cfg, loaded, args.overrides)
        settings = eval_settings(args, cfg)
        cfg.eval.max_samples = settings.max_samples
        spec, _, _ = resolve_paths(cfg.data)
        task = dataset_task(spec, Path(cfg.data.root))
        if task != loaded.spec.task:
            queries = loaded.spec.architecture.num_queries
            raise UserError(f"{args.checkpoint}: a {loaded.spec.task.upper()} model ({queries} queries) cannot be "
                            f"evaluated on {cfg.data.dataset}, a {task.upper()} dataset")  # fmt: skip
        tokenizer = build_tokenizer(cfg.data)
        check_vocab(loaded.spec.architecture.encoder.vocab_size, tokenizer)
        e = cfg.eval
        results: dict[str, dict[str, float]] = {}
        records: list[dict[str, Any]] | None = [] if args.dump else None
        for split in settings.splits:
            dataset = build_dataset(cfg.data, split, False, tokenizer, seed=cfg.train.seed)
            loader = eval_loader(cfg, dataset, info)
            found: list[dict[str, Any]] | None = [] if args.dump else None
            results[split] = evaluate(loaded.model, loader, info.device, task, settings.branch,
                                      iou_threshold=e.iou_threshold, score_threshold=e.score_threshold,
                                      match_threshold=e.match_threshold, match_metric=e.match_metric,
                                      amp=cfg.train.amp, dump=found)  # fmt: skip
            if records is not None and found is not None:
                records += [{"split": split, **record} for record in found]
        if info.is_main:
            if args.json:
                print(json.dumps(results if args.split == "all" else results[args.split]))
            else:
                print("\n".join(format_metrics(s, task, loaded.spec.weights, m) for s, m in results.items()))
            if records is not None:
                write_dump(Path(args.dump), records)
    finally:
        dist.cleanup()
    return 0


def _stored_config(path: Path) -> dict[str, Any] | None:
    """The config inside a 'simvg train' checkpoint (or a run folder's), None for any other file."""
    obj = load_checkpoint(resolve(path))
    return obj["config"] if isinstance(obj.get("config"), dict) and isinstance(obj.get("model"), dict) else None


def write_dump(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON line per expression, written atomically; an unwritable place is a UserError naming it."""
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
