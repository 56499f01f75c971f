"""``simvg pretrain CONFIG [--set key=value ...] [--output DIR] [--resume]``."""

from __future__ import annotations

import argparse

from simvg.engine.commands import run_arguments
from simvg.pretrain.config import load_pretrain_config
from simvg.pretrain.engine import pretrain


def pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    run_arguments(parser, "configs/pretrain/*.yaml")


def pretrain_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.output_dir={args.output}"] if args.output else [])
    pretrain(load_pretrain_config(args.config, overrides), resume=args.resume)
    return 0
