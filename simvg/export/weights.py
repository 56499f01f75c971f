"""``simvg export weights``: a training checkpoint as a model folder (``model.safetensors``, ``config.yaml``,
``tokenizer.spm``), the form ``Grounder.from_checkpoint``, ``simvg ground --checkpoint`` and the embedded defaults
in ``simvg/assets`` use. ``--half`` stores fp16 weights (half the size; loading casts them back)."""

from __future__ import annotations

import argparse
from pathlib import Path

from simvg.errors import UserError
from simvg.utils.checkpoint import export_weights

WEIGHTS = {"auto": None, "ema": True, "raw": False}


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a .pth written by 'simvg train'")
    parser.add_argument("--out", required=True, help="folder for model.safetensors, config.yaml and tokenizer.spm")
    parser.add_argument("--weights", choices=tuple(WEIGHTS), default="auto", help="auto: EMA when the run kept one")
    parser.add_argument("--half", action="store_true", help="store fp16 weights")


def export_command(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    path = export_weights(args.checkpoint, args.out, use_ema=WEIGHTS[args.weights], half=args.half)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB{', fp16' if args.half else ''}) with config.yaml and tokenizer.spm beside it")
    return 0
