"""Checkpoints: atomic writes, ``weights_only`` loads, prefix cleaning and checked partial loads.

A training checkpoint is a plain dict of tensors and Python primitives (layout in ``CHECKPOINT_KEYS``), so it loads
with ``torch.load(weights_only=True)``: the config is stored as a plain dict and RNG states as tensors.

Writes are atomic: the data goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``-d over the destination and the folder is fsynced. A process killed at any moment therefore leaves
either the previous file or the new one, never a torn file. A write that fails (a full disk, a read-only
folder) raises ``WriteError``, a ``UserError`` (and an ``OSError``) naming the destination, and leaves the previous
file in place.

Integrity: ``save_checkpoint`` stores ``sha256``, a hash of everything else in the checkpoint (every tensor's bytes,
dtype and shape, every value and key), and ``load_checkpoint`` checks it, so a file whose bytes changed after it
was written (a flipped bit, a partial copy that still unpickles) is refused with a clear error instead of loading
silently. Files without the key (the authors' files, older ones of ours) load as before; ``load_checkpoint``
returns the dict without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
from torch import nn

from simvg.errors import UserError

FORMAT_VERSION = 1
CHECKPOINT_KEYS = (
    "version",  # int, FORMAT_VERSION
    "model",  # state dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    "ema",  # {"module": state dict, "updates": int, "decay": float} or None
    "optimizer",  # optimizer state dict or None
    "scheduler",  # scheduler state dict or None
    "scaler",  # GradScaler state dict or None
    "epoch",  # int, 0-based epoch the run is in
    "epoch_step",  # int, batches of `epoch` already trained (0 = the epoch starts afresh)
    "step",  # int, optimisation steps done in total
    "rng",  # list (one per rank) of rng_state() dicts
    "config",  # the resolved Config as a plain dict
    "metrics",  # dict of the latest validation metrics (floats)
    "best_metric",  # float or None, the best validation score so far
    "sha256",  # str, content_hash() of all the other entries (written by save_checkpoint, checked on load)
)
_PREFIXES = ("module.", "_orig_mod.")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(UserError, OSError):
    """A file could not be written (full disk, read-only or missing folder, permissions); the message is one line
    naming the destination. Both a ``UserError`` (the CLI prints it, exit 2) and an ``OSError`` (``errno``,
    ``strerror`` and ``filename`` are the cause's)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """The ``WriteError`` for ``exc`` raised while writing ``path``."""
    reason = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc) or "I/O error"
    error = WriteError(f"{path}: cannot write ({reason})")
    error.errno, error.strerror, error.filename = exc.errno, exc.strerror, str(path)
    return error


def _temporary_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in ``path``'s folder (created if needed); ``WriteError`` naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None


def _publish(tmp: str, path: Path) -> None:
    """Rename the finished temporary file over ``path``, with the mode an ordinary ``open()`` would give it
    (mkstemp creates 0600; honour the umask)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``: a crash at any
    instant leaves the previous file or the new one, never a torn file. The file gets the mode an ordinary
    ``open()`` would give it (0666 less the umask). An ``OSError`` becomes a ``WriteError`` naming ``path``."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a second error while cleaning up must not hide the first
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(path, exc) from None
        raise
    _fsync_dir(path.parent)


class _CheckedText:
    """A text file whose write errors name the destination (``WriteError``)."""

    def __init__(self, f: TextIO, path: Path) -> None:
        self._f, self._path = f, path

    def write(self, text: str) -> int:
        try:
            return self._f.write(text)
        except OSError as exc:
            raise write_error(self._path, exc) from None


@contextlib.contextmanager
def atomic_text_writer(path: str | Path) -> Iterator[_CheckedText]:
    """A UTF-8 text file to stream into, that appears at ``path`` only when the block ends without an error (as
    ``atomic_write``); any failure of the file itself is a ``WriteError`` naming ``path``, and an error in the block
    leaves the previous ``path`` untouched."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    f = os.fdopen(fd, "w", encoding="utf-8")
    try:
        yield _CheckedText(f, path)
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            _publish(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes the buffer, which fails again on a full disk
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by a process killed in the middle of ``atomic_torch_save``."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def content_hash(obj: Any) -> str:
    """SHA-256 of a checkpoint-like value: dicts (keys in a fixed order), lists, tuples, tensors (dtype, shape and
    bytes) and plain values. It is the same before ``torch.save`` and after ``torch.load``."""
    digest = hashlib.sha256()
    _hash_into(digest, obj)
    return digest.hexdigest()


def _hash_into(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            digest.update(f"K{type(key).__name__}:{key!r}".encode())
            _hash_into(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for item in obj:
            _hash_into(digest, item)
    else:
        digest.update(f"V{type(obj).__name__}:{obj!r}".encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically, with its ``sha256``; unknown keys are refused so the layout stays
    documented."""
    unknown = set(state) - set(CHECKPOINT_KEYS)
    if unknown:
        raise KeyError(f"unknown checkpoint keys {sorted(unknown)}; allowed: {CHECKPOINT_KEYS}")
    obj = {"version": FORMAT_VERSION, **{k: v for k, v in state.items() if k != "sha256"}}
    obj["sha256"] = content_hash(obj)
    atomic_torch_save(obj, path)


def verify_content(obj: dict[str, Any], path: str | Path) -> None:
    """Check a loaded checkpoint against its stored ``sha256`` and remove that key (a file without one passes): the
    hash belongs to the file, so a loaded dict that is edited and saved again never carries a stale one."""
    stored = obj.pop("sha256", None)
    if not isinstance(stored, str):
        return
    if content_hash(obj) != stored:
        raise UserError(
            f"{path}: corrupt checkpoint: its content does not match the sha256 stored in it (the file changed "
            "after it was written: a damaged disk or copy); use another checkpoint (e.g. best.pth or a backup)"
        )


# numpy scalars and dtypes are plain data; files written by other code (the official SimVG trainer logs metrics
# that may be numpy floats) carry them, and torch's weights_only unpickler refuses them unless they are allowed.
_SAFE_NUMPY = [np.dtype, *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")}]
_SAFE_NUMPY.append(np._core.multiarray.scalar)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; a missing or unreadable file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        # torch warns about pickle protocols it did not write (the official files): noise, not the user's problem.
        with torch.serialization.safe_globals(_SAFE_NUMPY), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch >= 2.6 wraps every weights-only failure in one long text; only "Unsupported global" means that
        # the file is a pickle of other Python objects, anything else is a damaged or foreign file.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise UserError(f"{path}: not a readable checkpoint (damaged, or not a torch file)") from None
        raise UserError(
            f"{path}: not a readable checkpoint (it holds Python objects ({found.group(1)}) beyond tensors and "
            "plain data, which are never unpickled here)"
        ) from None
    except Exception as exc:  # torch's unpickler raises many types (IndexError, RuntimeError...) on garbage
        raise UserError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    verify_content(obj, path)
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip the wrappers' key prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile)."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_model_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    strict: bool = True,
    source: str = "checkpoint",
    mismatch_hint: str = "",
) -> tuple[list[str], list[str]]:
    """Load weights into ``model``; returns (missing, unexpected) keys.

    A shape mismatch is always an error (``UserError`` naming the key, then ``mismatch_hint`` with ``{key}``
    filled in). With ``strict`` any missing or unexpected key is an error too; otherwise the caller reports them.
    """
    state_dict = clean_state_dict(state_dict)
    own = unwrap_model(model).state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise UserError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
                + mismatch_hint.format(key=key)
            )
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise UserError(f"{source}: {_describe_keys(missing, unexpected)}")
    unwrap_model(model).load_state_dict(state_dict, strict=False)
    return missing, unexpected


def _describe_keys(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts) or "all keys match"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain types (``weights_only``-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


# ----------------------------------------------------------------------------------------------------------------
# a training run's checkpoint: what ``simvg train`` saves and resumes (its folder: simvg.utils.run_folder)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (``seed`` modulo 2**32) and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_checkpoint(
    model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ema: Any | None, progress: dict[str, Any],
    config: dict[str, Any], rngs: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """A training run's checkpoint dict (``CHECKPOINT_KEYS``): the bare model's weights, the EMA's state (None
    without one), optimiser, scheduler, GradScaler (None when disabled), ``progress`` (epoch, epoch_step, step,
    best_metric, metrics), ``config`` (the run's config as a plain dict) and ``rngs`` (every rank's ``rng_state()``)."""
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": progress["epoch"], "epoch_step": progress["epoch_step"], "step": progress["step"], "rng": rngs,
        "config": config, "metrics": dict(progress["metrics"]), "best_metric": progress["best_metric"],
    }  # fmt: skip


def restore_run(
    obj: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ema: Any | None, source: str
) -> None:
    """Put a run checkpoint's states back (``obj`` as ``load_checkpoint`` read it from ``source``): the weights
    (strictly), optimiser, scheduler, the GradScaler's when both have one, the EMA's when both have one (a
    checkpoint without EMA leaves ``ema`` alone: the caller starts it afresh from the restored weights)."""
    load_model_state(model, obj["model"], strict=True, source=source)
    optimizer.load_state_dict(obj["optimizer"])
    scheduler.load_state_dict(obj["scheduler"])
    if obj.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(obj["scaler"])
    if ema is not None and obj.get("ema"):
        ema.load_state_dict(obj["ema"])


def restore_rng(rngs: list[dict[str, Any]], rank: int, world_size: int) -> bool:
    """Put back this rank's RNG states from a checkpoint's ``rng`` list (one ``rng_state()`` per rank); False,
    touching nothing, when the checkpoint was written by another number of processes (the caller re-seeds)."""
    if len(rngs) != world_size:
        return False
    set_rng_state(rngs[rank])
    return True
