"""``simvg pretrain CONFIG [--set key=value ...] [--output DIR] [--resume]``."""

from __future__ import annotations

import argparse

from simvg.pretrain.config import load_pretrain_config
from simvg.pretrain.engine import pretrain


def pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML pre-training file (configs/pretrain/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=8000 (repeatable)")  # fmt: skip
    parser.add_argument("--output", help="output folder (overrides train.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.pth")


def pretrain_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.output_dir={args.output}"] if args.output else [])
    pretrain(load_pretrain_config(args.config, overrides), resume=args.resume)
    return 0
