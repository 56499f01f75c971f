"""Run feedback: the ``simvg`` logger, running averages, and the ``metrics.jsonl`` file of a run.

Only rank 0 logs at INFO and writes files; other ranks log warnings only, so a multi-GPU run prints one story.
Log lines go to the terminal through ``tqdm.write``, so they land above a progress bar instead of inside its line.
``metrics.jsonl`` gets one JSON object per line and is appended to, so a resumed run continues the same file (after
dropping the records of the steps it re-does, ``simvg.utils.run_folder.rewind_metrics``);
each line carries ``event`` ("start", "train", "epoch", "val", "end") and the global ``step``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from simvg.utils.checkpoint import write_error

LOGGER_NAME = "simvg"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int = 0, log_file: str | Path | None = None) -> logging.Logger:
    """Configure the ``simvg`` logger once: stderr (and ``log_file`` on rank 0), INFO on rank 0, WARNING elsewhere."""
    logger = get_logger()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stream = TqdmHandler()
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = QuietFileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: an active progress bar is cleared, the line written,
    and the bar drawn again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class QuietFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so in one line once instead of printing a
    traceback for every record; the terminal keeps the log."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            reason = sys.exc_info()[1]
            detail = getattr(reason, "strerror", None) or reason
            print(f"simvg: warning: cannot write {self.baseFilename} ({detail}); the log goes to the terminal only",
                  file=sys.stderr)  # fmt: skip


class Averages:
    """Running means of named scalars since the last ``reset`` (DETR's SmoothedValue, reduced to what we use)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


class MetricsWriter:
    """Appends JSON lines to ``path`` (a no-op writer when ``path`` is None, e.g. on ranks other than 0)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **values: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(self.path, exc) from None


class Eta:
    """Time left of a run of ``total`` optimisation steps, from this session's mean step time (a resumed run times
    its own steps only)."""

    def __init__(self, total: int) -> None:
        self.total, self.start, self.steps = total, time.time(), 0

    def tick(self) -> None:
        """One more step done in this session."""
        self.steps += 1

    def left(self, step: int) -> str:
        """``"h:mm:ss"`` for the steps after ``step``; ``"?"`` before the first step of the session."""
        if not self.steps:
            return "?"
        return format_duration((time.time() - self.start) / self.steps * max(0, self.total - step))


def plain_float(value: float) -> Any:
    """``value`` as ``metrics.jsonl`` stores it (6 significant digits; non-finite as a string)."""
    return _plain(float(value))


def _plain(value: Any) -> Any:
    """JSON-safe value: floats rounded to 6 significant digits, non-finite floats as strings."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a torn last line (a killed run) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
