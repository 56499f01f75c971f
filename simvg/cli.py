"""The ``simvg`` command line: ``simvg <command> [options]`` (also ``python -m simvg`` and under ``torchrun``).

Each command lives next to the code it drives, as a pair of functions ``<name>_arguments(parser)`` and
``<name>_command(args) -> int`` in the module named below. Only the chosen command's module is imported, so
``simvg --help`` and a command whose optional extras (FastAPI, onnxruntime) are missing never break another one.

Exit codes: 0 success; 2 a usage or input error (one line on stderr, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from simvg.errors import UserError

_PLACE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR}

# command words -> (module, function prefix, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("data", "synth"): ("simvg.synthref.generator", "synth", "generate a SynthRef dataset and its tokenizer"),
    ("data", "convert"): ("simvg.data.convert", "convert", "convert refer/gRefCOCO/TransVG/MDETR annotations"),
    ("data", "check"): ("simvg.data.check", "check", "check a dataset folder: counts, images, boxes, texts"),
    ("tokenizer", "train"): ("simvg.data.tokenizer", "train", "train a sentencepiece model with BEiT-3's id layout"),
    ("pretrain",): ("simvg.pretrain.commands", "pretrain", "pre-train the encoder on SynthRef captions"),
    ("train",): ("simvg.engine.commands", "train", "train from a YAML config (single process or torchrun)"),
    ("eval",): ("simvg.engine.commands", "eval", "evaluate a checkpoint on a split"),
    ("plot",): ("simvg.engine.plot", "plot", "draw loss and accuracy curves of a run"),
    ("ground",): ("simvg.inference.commands", "ground", "ground one expression in one image"),
    ("predict",): ("simvg.inference.commands", "predict", "ground a JSONL file of queries over a folder of images"),
    ("demo",): ("simvg.inference.demo", "demo", "ground fresh SynthRef scenes with the embedded default model"),
    ("serve",): ("simvg.serve.app", "serve", "serve a web page and a JSON API on 127.0.0.1"),
    ("export", "onnx"): ("simvg.export.onnx", "export", "export a branch of a checkpoint to ONNX"),
    ("export", "weights"): ("simvg.export.weights", "export", "write a training checkpoint as a model folder"),
}


def _find_command(argv: list[str]) -> tuple[tuple[str, ...] | None, int]:
    """Longest command path matching the leading words of ``argv``."""
    for key in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(key)]) == key:
            return key, len(key)
    return None, 0


def _usage() -> str:
    lines = ["usage: simvg <command> [options]", "", "commands:"]
    lines += [f"  {' '.join(k):<18} {v[2]}" for k, v in COMMANDS.items()]
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
    subs = [(k, v[2]) for k, v in COMMANDS.items() if len(k) > 1 and k[0] == word]
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
            from simvg import __version__

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
    module_name, prefix, help_text = COMMANDS[key]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog="simvg " + " ".join(key), description=help_text, formatter_class=HelpFormatter
    )
    getattr(module, f"{prefix}_arguments")(parser)
    try:
        args = parser.parse_args(argv[n:])
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    try:
        return int(getattr(module, f"{prefix}_command")(args) or 0)
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
