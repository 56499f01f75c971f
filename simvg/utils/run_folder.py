"""A run's folder (``simvg train`` and ``simvg pretrain``): the checks before a run writes there, where a resumed
run starts, and what a resumed run repairs.

A run folder holds ``last.pth`` (the latest checkpoint), ``best.pth`` (the best validated model), ``metrics.jsonl``,
``config.yaml`` and the log. At an epoch end ``best.pth`` is written before ``last.pth``, so a crash between the
two leaves ``last.pth`` at the previous checkpoint and the resumed run re-does the epoch and writes ``best.pth``
again (the other order could lose ``best.pth`` for good). A resumed run drops the ``metrics.jsonl`` records of the
steps after its checkpoint, which it logs again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from simvg.errors import UserError
from simvg.utils import dist
from simvg.utils.checkpoint import atomic_write, remove_stale_temporaries
from simvg.utils.logging import get_logger, plain_float, read_metrics


def resume_point(out_dir: Path) -> Path:
    """``last.pth``; ``best.pth`` when a crash came between writing ``best.pth`` and the first ``last.pth``."""
    last, best = out_dir / "last.pth", out_dir / "best.pth"
    if last.is_file() or not best.is_file():
        return last
    get_logger().warning("%s is missing: resuming from %s (written just before it)", last, best)
    return best


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """A new run needs a folder without a run in it, a resumed one a checkpoint there; either must be writable
    (``UserError`` otherwise). Temporary files of a process killed mid-write are removed (main process)."""
    if resume and not resume_point(out_dir).is_file():
        raise UserError(f"{out_dir / 'last.pth'}: nothing to resume (no checkpoint in the output folder)")
    if not resume and resume_point(out_dir).is_file():
        raise UserError(f"{out_dir}: holds a run already (last.pth); pass --resume to continue or another --output")
    if dist.is_main_process():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out_dir)
            probe = out_dir / ".simvg-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or exc
            raise UserError(f"{out_dir}: cannot write the run there ({reason}); pass another --output") from None
    dist.barrier()


def recorded_before(record: dict[str, Any], step: int, epoch: int) -> bool:
    """Whether a ``metrics.jsonl`` record was written before the checkpoint of (``step``, ``epoch``): records of
    later steps, and the epoch-end records of an epoch the checkpoint has not ended yet, are re-done by a resumed
    run."""
    at = record.get("step")
    if not isinstance(at, int) or at < step:
        return True
    if at > step:
        return False
    if record.get("event") in ("epoch", "val"):
        return isinstance(record.get("epoch"), int) and record["epoch"] < epoch
    return True


def rewind_metrics(path: Path | None, step: int, epoch: int) -> None:
    """Drop the records a run resumed at (``step``, ``epoch``) writes again from ``metrics.jsonl`` at ``path``."""
    if path is None or not path.is_file():
        return
    records = read_metrics(path)
    kept = [r for r in records if recorded_before(r, step, epoch)]
    if len(kept) < len(records):
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")))
        get_logger().info("metrics.jsonl: %d records after step %d dropped (re-done by this run)",
                          len(records) - len(kept), step)  # fmt: skip


def restore_best(out_dir: Path, metrics_path: Path | None, step: int, epoch_step: int, best: float | None) -> None:
    """Re-create ``best.pth`` when ``last.pth`` (at ``step``, ``epoch_step`` batches into its epoch, best score
    ``best``) is the best model itself but ``best.pth`` is missing (a run of an older version killed between the
    two writes): that is the case when the last validation record is of the checkpoint's own step and scored
    ``best``."""
    best_pth, last = out_dir / "best.pth", out_dir / "last.pth"
    if best_pth.is_file() or best is None or epoch_step != 0 or metrics_path is None:
        return
    vals = [r for r in read_metrics(metrics_path) if r.get("event") == "val"] if metrics_path.is_file() else []
    if vals and vals[-1].get("step") == step and vals[-1].get("score") == plain_float(best):
        with last.open("rb") as src:
            atomic_write(best_pth, lambda f: shutil.copyfileobj(src, f))
        get_logger().warning("%s was missing; re-created from %s (the best model, step %d)", best_pth, last, step)
    else:
        get_logger().warning("%s is missing although %s records a best score of %s: it is written again at the "
                             "next improvement", best_pth, last, best)  # fmt: skip
