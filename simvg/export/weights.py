"""``simvg export weights``: any model file as a model folder (``model.safetensors``, ``model.yaml``,
``tokenizer.spm``), the form ``Grounder.from_checkpoint``, ``simvg ground --checkpoint`` and the embedded defaults
in ``simvg/assets`` use. Official SimVG files need ``--tokenizer beit3.spm``; ``--half`` stores fp16 weights (half
the size; loading casts them back)."""

from __future__ import annotations

import argparse

from simvg.artifact import WEIGHT_CHOICES, export_folder


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a 'simvg train' .pth or run folder, an official SimVG .pth, a model folder")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for model.safetensors, model.yaml and tokenizer.spm")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece file for models that carry none (official files: beit3.spm)")  # fmt: skip
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help="auto: EMA when the file has them")
    parser.add_argument("--half", action="store_true", help="store fp16 weights")


def export_command(args: argparse.Namespace) -> int:
    path, read = export_folder(args.checkpoint, args.out, weights=args.weights, half=args.half,
                               tokenizer=args.tokenizer)  # fmt: skip
    for notice in read.notices:
        print(notice)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {read.spec.weights} weights{', fp16' if args.half else ''}) with "
          f"model.yaml and tokenizer.spm beside it")  # fmt: skip
    return 0
