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

from simvg.config import Config, config_from_dict, load_config, read_yaml
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
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pth) or an exported model folder")
    parser.add_argument("--config", help="YAML config (default: the one stored with the checkpoint)")
    parser.add_argument("--split", required=True, help="split to evaluate, e.g. val, testA")
    parser.add_argument("--branch", choices=("token", "decoder", "both"), default="both")
    parser.add_argument("--dump", help="write one JSON line per expression to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data (repeatable)")  # fmt: skip
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA or raw weights of a checkpoint (auto: EMA when present)")  # fmt: skip
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N expressions (0: all)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def load_for_eval(path: Path, config: str | None, overrides: list[str], weights: str) -> tuple[Config, Any, str]:
    """(config, model state dict, "ema"|"raw") from a checkpoint file or an exported model folder."""
    from simvg.utils.checkpoint import load_checkpoint, model_state_from

    if path.is_dir():
        from safetensors.torch import load_file

        if not (path / "model.safetensors").is_file():
            raise UserError(f"{path}: a model folder needs model.safetensors and config.yaml")
        raw_cfg = read_yaml(config or path / "config.yaml")
        cfg = config_from_dict(raw_cfg, overrides, str(config or path / "config.yaml"))
        # The model's own word ids: a folder's tokenizer.spm wins over the dataset's unless --set names one.
        if (path / "tokenizer.spm").is_file() and not any(o.startswith("data.tokenizer=") for o in overrides):
            cfg.data.tokenizer = str(path / "tokenizer.spm")
        return cfg, load_file(str(path / "model.safetensors")), "exported"
    obj = load_checkpoint(path)
    if config:
        cfg = load_config(config, overrides)
    elif "config" in obj:
        cfg = config_from_dict(obj["config"], overrides, f"{path} (stored config)")
    else:
        raise UserError(f"{path}: holds no config; pass --config")
    use_ema = bool(obj.get("ema")) if weights == "auto" else weights == "ema"
    if use_ema and not obj.get("ema"):
        raise UserError(f"{path}: --weights ema but the checkpoint holds no EMA weights")
    return cfg, model_state_from(obj, use_ema=use_ema), "ema" if use_ema else "raw"


def eval_command(args: argparse.Namespace) -> int:
    from simvg.data.datasets import build_dataset, build_tokenizer, dataset_task, resolve_paths
    from simvg.engine.evaluate import evaluate
    from simvg.engine.train import build_model, check_vocab, eval_loader
    from simvg.utils.checkpoint import load_model_state

    cfg, state, kind = load_for_eval(Path(args.checkpoint), args.config, args.overrides, args.weights)
    cfg.eval.max_samples = args.max_samples  # a training config may limit validation; eval reports whole splits
    info = dist.init_distributed(cfg.train.device)
    try:
        model = build_model(cfg, with_weights=False)
        load_model_state(model, state, strict=True, source=args.checkpoint)
        model.to(info.device)
        spec, _, _ = resolve_paths(cfg.data)
        task = dataset_task(spec, Path(cfg.data.root))
        tokenizer = build_tokenizer(cfg.data)
        check_vocab(cfg, tokenizer)
        dataset = build_dataset(cfg.data, args.split, False, tokenizer, seed=cfg.train.seed)
        loader = eval_loader(cfg, dataset, info)
        e = cfg.eval
        records: list[dict[str, Any]] | None = [] if args.dump else None
        metrics = evaluate(model, loader, info.device, task, args.branch, iou_threshold=e.iou_threshold,
                           score_threshold=e.score_threshold, match_threshold=e.match_threshold,
                           match_metric=e.match_metric, amp=cfg.train.amp, dump=records)  # fmt: skip
        if info.is_main:
            if records is not None:
                write_dump(Path(args.dump), records)
            print(json.dumps(metrics) if args.json else format_metrics(args.split, task, kind, metrics))
    finally:
        dist.cleanup()
    return 0


def write_dump(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


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
