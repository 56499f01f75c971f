"""The ``simvg`` command line: ``simvg <command> [options]`` (also ``python -m simvg`` and under ``torchrun``).

Each command lives next to the code it drives, as a pair of functions ``<name>_arguments(parser)`` and
``<name>_command(args) -> int``; ``COMMANDS`` maps the command words to them. The optional extras (FastAPI and
uvicorn for ``serve``, onnx and onnxruntime for ``export onnx``) are imported inside those commands, so a missing
extra breaks only the command that needs it.

Exit codes: 0 success; 2 a usage or input error (one line on stderr, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from typing import NamedTuple

from simvg import __version__
from simvg.data import check as data_check
from simvg.data import convert as data_convert
from simvg.data import tokenizer as tokenizer_train
from simvg.engine import commands as engine
from simvg.engine import plot
from simvg.errors import UserError
from simvg.export import onnx as export_onnx
from simvg.export import weights as export_weights
from simvg.inference import commands as inference
from simvg.inference import demo
from simvg.pretrain import commands as pretrain
from simvg.serve import app as serve
from simvg.synthref import generator as synth

_PLACE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR}


class Command(NamedTuple):
    """One command: its options, what it runs (returns the exit status) and its line in ``simvg --help``."""

    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: dict[tuple[str, ...], Command] = {
    ("data", "synth"): Command(synth.synth_arguments, synth.synth_command,
                               "generate a SynthRef dataset and its tokenizer"),
    ("data", "convert"): Command(data_convert.convert_arguments, data_convert.convert_command,
                                 "convert refer/gRefCOCO/TransVG/MDETR annotations"),
    ("data", "check"): Command(data_check.check_arguments, data_check.check_command,
                               "check a dataset folder: counts, images, boxes, texts"),
    ("tokenizer", "train"): Command(tokenizer_train.train_arguments, tokenizer_train.train_command,
                                    "train a sentencepiece model with BEiT-3's id layout"),
    ("pretrain",): Command(pretrain.pretrain_arguments, pretrain.pretrain_command,
                           "pre-train the encoder on SynthRef captions"),
    ("train",): Command(engine.train_arguments, engine.train_command,
                        "train from a YAML config (single process or torchrun)"),
    ("eval",): Command(engine.eval_arguments, engine.eval_command, "evaluate a checkpoint on a split"),
    ("plot",): Command(plot.plot_arguments, plot.plot_command, "draw loss and accuracy curves of a run"),
    ("ground",): Command(inference.ground_arguments, inference.ground_command,
                         "ground one expression in one image"),
    ("predict",): Command(inference.predict_arguments, inference.predict_command,
                          "ground a JSONL file of queries over a folder of images"),
    ("demo",): Command(demo.demo_arguments, demo.demo_command,
                       "ground fresh SynthRef scenes with the embedded default model"),
    ("serve",): Command(serve.serve_arguments, serve.serve_command, "serve a web page and a JSON API on 127.0.0.1"),
    ("export", "onnx"): Command(export_onnx.export_arguments, export_onnx.export_command,
                                "export a branch of a checkpoint to ONNX"),
    ("export", "weights"): Command(export_weights.export_arguments, export_weights.export_command,
                                   "write a training checkpoint as a model folder"),
}  # fmt: skip


def _find_command(argv: list[str]) -> tuple[tuple[str, ...] | None, int]:
    """Longest command path matching the leading words of ``argv``."""
    for key in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(key)]) == key:
            return key, len(key)
    return None, 0


def _usage() -> str:
    lines = ["usage: simvg <command> [options]", "", "commands:"]
    lines += [f"  {' '.join(k):<18} {v.help}" for k, v in COMMANDS.items()]
    lines += ["", "Run 'simvg <command> --help' for the options of a command."]
    return "\n".join(lines)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already speaks of it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _group_usage(word: str) -> str | None:
    """The sub-commands of a command group (``simvg export``, ``simvg data``), None for an unknown word."""
    subs = [(k, v.help) for k, v in COMMANDS.items() if len(k) > 1 and k[0] == word]
    if not subs:
        return None
    lines = [f"usage: simvg {word} <command> [options]", "", "commands:"]
    lines += [f"  {' '.join(k):<18} {text}" for k, text in subs]
    lines += ["", f"Run 'simvg {word} <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (also used directly by tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    key, n = _find_command(argv)
    if key is None:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        if argv[0] in ("-V", "--version"):
            print(f"simvg {__version__}")
            return 0
        group = _group_usage(argv[0])
        if group is not None:
            if len(argv) == 1 or argv[1] in ("-h", "--help"):
                print(group)
                return 0
            print(f"simvg: error: unknown command {' '.join(argv[:2])!r}\n\n{group}", file=sys.stderr)
            return 2
        print(f"simvg: error: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command = COMMANDS[key]
    parser = argparse.ArgumentParser(
        prog="simvg " + " ".join(key), description=command.help, formatter_class=HelpFormatter
    )
    command.arguments(parser)
    try:
        args = parser.parse_args(argv[n:])
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    try:
        return int(command.run(args) or 0)
    except UserError as exc:
        print(f"simvg {' '.join(key)}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _PLACE_ERRORS:
            raise
        # a write (or read) refused by the place itself: a full disk, a read-only or forbidden folder
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"simvg {' '.join(key)}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
