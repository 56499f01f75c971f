"""Checkpoints: atomic writes, weights_only loads, prefix cleaning, checked partial loads, RNG round trip, export."""

import errno
import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import kill_during_save
import numpy as np
import pytest
import torch
from torch import nn

from simvg.engine.ema import ModelEma
from simvg.engine.optim import MultiStepLRWarmUp, build_optimizer, lr_factor
from simvg.errors import UserError
from simvg.utils import checkpoint as C
from simvg.utils.checkpoint import (
    CHECKPOINT_KEYS,
    atomic_torch_save,
    clean_state_dict,
    load_checkpoint,
    load_model_state,
    remove_stale_temporaries,
    restore_rng,
    restore_run,
    rng_state,
    run_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    unwrap_model,
)

TESTS = Path(__file__).resolve().parent
REAL_REPLACE = os.replace


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.head(self.encoder(x))


def trained_state(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, lr=1e-2)
    sched = MultiStepLRWarmUp(opt, warmup=1, milestones=[3])
    ema = ModelEma(model)
    for _ in range(2):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)
    state = {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": None, "epoch": 1, "epoch_step": 2, "step": 7, "rng": [rng_state()],
        "config": {"train": {"lr": 0.01, "milestones": [3]}}, "metrics": {"val/decoder/acc": 12.5}, "best_metric": 12.5,
    }  # fmt: skip
    return model, opt, sched, ema, state


def test_round_trip_loads_with_weights_only(tmp_path):
    model, opt, sched, ema, state = trained_state(tmp_path)
    path = tmp_path / "last.pth"
    save_checkpoint(path, state)
    loaded = torch.load(path, map_location="cpu", weights_only=True)  # must not need any pickled class
    assert loaded["version"] == 1 and loaded["step"] == 7 and loaded["config"] == state["config"]
    fresh = Tiny()
    load_model_state(fresh, loaded["model"])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = build_optimizer(fresh, lr=1e-2)
    opt2.load_state_dict(loaded["optimizer"])
    sched2 = MultiStepLRWarmUp(opt2, warmup=1, milestones=[3])
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    ema2 = ModelEma(fresh)
    ema2.load_state_dict(loaded["ema"])
    assert ema2.updates == 2
    assert torch.equal(ema2.module.head.weight, ema.module.head.weight)


def test_unknown_checkpoint_key_is_refused(tmp_path):
    with pytest.raises(KeyError, match="bogus"):
        save_checkpoint(tmp_path / "x.pth", {"bogus": 1})


def test_atomic_write_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "last.pth"
    atomic_torch_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary left behind


def test_kill_during_write_leaves_previous_checkpoint(tmp_path):
    """A SIGKILL between writing the temporary file and the rename leaves the old file intact (the kill comes from
    ``tests/kill_during_save.py``; a save that is not atomic is either not killed or leaves value 2 behind)."""
    path = tmp_path / "last.pth"
    code = (
        "import sys, torch\n"
        "import kill_during_save\n"
        "from simvg.utils import checkpoint\n"
        "kill_during_save.install(2)\n"
        "checkpoint.atomic_torch_save({'v': torch.tensor(1)}, sys.argv[1])\n"
        "checkpoint.atomic_torch_save({'v': torch.tensor(2)}, sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in remove_stale_temporaries(tmp_path)] != []
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_load_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_clean_state_dict_strips_wrapper_prefixes():
    sd = {"module._orig_mod.encoder.weight": 1, "_orig_mod.head.bias": 2, "head.weight": 3}
    assert clean_state_dict(sd) == {"encoder.weight": 1, "head.bias": 2, "head.weight": 3}


def test_unwrap_model_removes_compile_wrapper():
    model = Tiny()

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Wrapped(model)) is model


def test_partial_load_reports_and_shape_mismatch_raises():
    model = Tiny()
    sd = {k: v for k, v in Tiny().state_dict().items() if not k.startswith("head.")}
    sd["extra.weight"] = torch.zeros(1)
    missing, unexpected = load_model_state(model, sd, strict=False)
    assert missing == ["head.bias", "head.weight"] and unexpected == ["extra.weight"]
    with pytest.raises(UserError, match="2 missing keys"):
        load_model_state(model, sd, strict=True)
    sd = Tiny().state_dict()
    sd["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match=r"shape mismatch for head.weight"):
        load_model_state(model, sd, strict=False)


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_lr_factor_matches_official_schedule():
    # warmup 3 -> 0.25, 0.5, 0.75; decay_steps [25] -> epochs 24..29 at 0.1 (last 6 of 30)
    factors = [lr_factor(e, 3, [25]) for e in range(30)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[23] == 1.0 and factors[24] == pytest.approx(0.1) and factors[29] == pytest.approx(0.1)
    assert lr_factor(27, 3, [21, 27]) == pytest.approx(0.01)
    assert lr_factor(0, 0, [7]) == 1.0


def test_optimizer_groups_and_scheduler_rates():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3)
    assert [g["name"] for g in opt.param_groups] == ["encoder", "head"]
    assert opt.param_groups[0]["amsgrad"] and opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert opt.param_groups[0]["eps"] == 1e-9 and opt.param_groups[0]["weight_decay"] == 0.0
    sched = MultiStepLRWarmUp(opt, warmup=1, milestones=[3])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 5e-4])  # factor 1/2 at i = 0
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-4])


def test_ema_decay_warmup_and_update():
    model = Tiny()
    ema = ModelEma(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(1 / 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.count.fill_(5)
    before = ema.module.head.bias.clone()
    ema.update(model)
    # new = 0.1 * old + 0.9 * (old + 1) = old + 0.9
    assert torch.allclose(ema.module.head.bias, before + 0.9)
    assert ema.module.count.item() == 5  # integer buffers are copied
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999


# ----------------------------------------------------------------------------------------------------------------
# Details the first mutation run found untested (docs/mutation.md): the temporary file's name, place and mode,
# missing folders, clean-up, the crash hook, the messages of unreadable files, prefix stripping, strict loading and
# its key report, the RNG state layout.


def test_atomic_write_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c" / "file.bin"
    C.atomic_write_bytes(b"xyz", target)
    assert target.read_bytes() == b"xyz"


def test_temporary_file_is_hidden_beside_the_destination(tmp_path: Path) -> None:
    """While writing, the data sits in ``.<name>.<random>.tmp`` in the destination's folder (same filesystem, so
    the rename is atomic; the pattern is what ``remove_stale_temporaries`` deletes after a crash)."""
    seen: list[list[str]] = []

    def write(f) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        f.write(b"data")

    C.atomic_write(tmp_path / "last.pth", write)
    (names,) = seen
    assert len(names) == 1 and names[0].startswith(".last.pth.") and names[0].endswith(".tmp"), names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_written_file_has_the_mode_of_an_ordinary_open(tmp_path: Path) -> None:
    old = os.umask(0o022)  # 0o666 & ~0o022 = 0o644 (a umask with 7 in the last digit would hide an x bit there)
    try:
        C.atomic_write_bytes(b"x", tmp_path / "f")
        with open(tmp_path / "g", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644 == (tmp_path / "g").stat().st_mode & 0o777


def test_failed_write_raises_its_own_error_even_if_the_temporary_is_gone(tmp_path: Path) -> None:
    """The clean-up after a failed write must not replace the error (here the temporary file has already vanished
    when the clean-up tries to delete it)."""

    def write(f) -> None:
        for tmp in tmp_path.glob(".*.tmp"):
            tmp.unlink()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        C.atomic_write(tmp_path / "x.bin", write)
    assert not list(tmp_path.iterdir())


def test_directory_fsync_failure_is_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some platforms cannot open a directory; the folder fsync is then skipped, not an error."""

    def refuse(*args, **kwargs):
        raise PermissionError("cannot open a directory here")

    monkeypatch.setattr(C.os, "open", refuse)
    C._fsync_dir(tmp_path)  # no exception


def test_removing_a_temporary_that_vanished_meanwhile_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".a.pth.1.tmp").write_bytes(b"")
    gone = tmp_path / ".b.pth.2.tmp"  # listed, then deleted by another process before we get to it
    listed = [tmp_path / ".a.pth.1.tmp", gone]
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(listed))
    assert C.remove_stale_temporaries(tmp_path) == listed
    assert not (tmp_path / ".a.pth.1.tmp").exists()


def test_kill_during_save_hook_stops_the_nth_checkpoint_write_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    """The crash hook of the tests (``tests/kill_during_save.py``) kills the process during the n-th
    ``atomic_torch_save`` (``save_checkpoint``'s included; other writes do not count) at the rename: the temporary
    file beside the destination is then complete (it loads) and the destination not written yet. In-process, with
    the kill raising (``test_kill_during_write_leaves_previous_checkpoint`` runs the real SIGKILL in a child process,
    which mutation testing cannot see); afterwards the hook's ``os.replace`` is gone again."""

    class Killed(BaseException):
        pass

    seen = []

    def kill() -> None:
        (tmp,) = tmp_path.glob(".1.pth.*.tmp")
        seen.append((load_checkpoint(tmp)["step"], sorted(p.name for p in tmp_path.iterdir() if p != tmp)))
        raise Killed

    kill_during_save.install(2, kill, monkeypatch.setattr)
    C.atomic_write_bytes(b"not counted", tmp_path / "other.bin")
    C.atomic_torch_save({"i": 0}, tmp_path / "0.pth")
    with pytest.raises(Killed):
        C.save_checkpoint(tmp_path / "1.pth", {"step": 1})
    assert seen == [(1, ["0.pth", "other.bin"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.pth", "other.bin"]  # the temporary removed
    assert os.replace is REAL_REPLACE
    C.atomic_torch_save({"i": 2}, tmp_path / "2.pth")  # the third write is not killed
    assert torch.load(tmp_path / "2.pth", weights_only=True) == {"i": 2}


def test_a_pickled_object_is_refused_with_its_reason(tmp_path: Path) -> None:
    """Arbitrary objects are never unpickled (``weights_only``); the message says why."""
    path = tmp_path / "obj.pth"
    torch.save({"model": {}, "extra": Fraction(1, 2)}, path)
    message = (
        f"{path}: not a readable checkpoint (it holds Python objects (fractions.Fraction) beyond tensors and plain "
        "data, which are never unpickled here)"
    )
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == message


def test_garbage_bytes_are_not_called_python_objects(tmp_path: Path) -> None:
    """torch >= 2.6 words every weights-only failure alike; garbage must not be reported as a pickle of objects."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == f"{path}: not a readable checkpoint (damaged, or not a torch file)"


def _first_line_of_torch_error(path: Path) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever torch raises on this file
        torch.load(path, map_location="cpu", weights_only=True)
    text = str(err.value).strip()
    return text.splitlines()[0][:300] if text else ""


@pytest.mark.parametrize("content", ["truncated", b"PK\x03\x04junk", b""])
def test_an_unreadable_file_is_named_with_the_first_line_of_the_cause(tmp_path: Path, content) -> None:
    """Torch's own error, first line only (an empty file's EOFError has no text: its type names it). (Plain garbage
    bytes reach torch's weights-only unpickler: the test below.)"""
    path = tmp_path / "bad.pth"
    if content == "truncated":  # a zip that torch opens and then fails on
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    reason = _first_line_of_torch_error(path)
    assert reason != "None" and (reason or content == b"")
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == f"{path}: not a readable checkpoint ({reason or 'EOFError'})"


def test_a_file_that_is_not_a_dict_is_named_with_its_type(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == f"{path}: not a checkpoint (a list, expected a dict)"


def test_first_line_of_an_error() -> None:
    assert C._first_line(ValueError("one\ntwo")) == "one"
    assert C._first_line(ValueError("  \n ")) == "ValueError"  # no text: the type's name
    assert C._first_line(KeyError()) == "KeyError"
    assert C._first_line(ValueError("x" * 400)) == "x" * 300


def test_nested_wrapper_prefixes_are_stripped_in_any_order() -> None:
    state = {"_orig_mod.module.a": 1, "module._orig_mod.b": 2, "module.module.c": 3, "d": 4}
    assert C.clean_state_dict(state) == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_unwrap_model_through_ddp_and_compile(tmp_path: Path) -> None:
    import torch.distributed as dist

    inner = nn.Linear(2, 2)

    class Compiled(nn.Module):  # what torch.compile's wrapper exposes
        def __init__(self, mod: nn.Module) -> None:
            super().__init__()
            self._orig_mod = mod

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert C.unwrap_model(ddp) is inner
        assert C.unwrap_model(Compiled(ddp)) is inner
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))  # keys 0.weight, 0.bias, 1.weight, 1.bias


def test_load_model_state_is_strict_by_default_and_reports_the_keys() -> None:
    state = _model().state_dict()
    del state["1.bias"]
    state["extra.w"] = torch.zeros(1)
    with pytest.raises(UserError) as err:
        C.load_model_state(_model(), state)
    assert str(err.value) == "checkpoint: 1 missing keys: 1.bias; 1 unexpected keys: extra.w"
    only_missing = _model().state_dict()
    del only_missing["0.bias"]
    with pytest.raises(UserError, match=r"^run\.pth: 1 missing keys: 0\.bias$"):
        C.load_model_state(_model(), only_missing, source="run.pth")
    assert C.load_model_state(_model(), state, strict=False) == (["1.bias"], ["extra.w"])


def test_shape_mismatch_message_and_hint() -> None:
    state = _model().state_dict()
    state["1.weight"] = torch.zeros(1, 4)
    with pytest.raises(UserError) as err:
        C.load_model_state(_model(), state)
    assert str(err.value) == "checkpoint: shape mismatch for 1.weight: checkpoint (1, 4), model (1, 3)"
    with pytest.raises(UserError, match=r"model \(1, 3\); reset 1\.weight to start fresh$"):
        C.load_model_state(_model(), state, mismatch_hint="; reset {key} to start fresh")


def test_describe_keys_lists_five_then_counts_the_rest() -> None:
    keys = [f"k{i}" for i in range(7)]
    assert C._describe_keys(keys, []) == "7 missing keys: k0, k1, k2, k3, k4 (+2 more)"
    assert C._describe_keys(keys[:5], ["u"]) == "5 missing keys: k0, k1, k2, k3, k4; 1 unexpected keys: u"
    assert C._describe_keys([], keys[:6]) == "6 unexpected keys: k0, k1, k2, k3, k4 (+1 more)"
    assert C._describe_keys([], []) == "all keys match"


def test_rng_state_layout_is_plain_integer_tensors() -> None:
    """The layout is part of the checkpoint format: integer tensors (``weights_only``-safe), a ``cuda`` list."""
    state = C.rng_state()
    assert set(state) == {"torch", "cuda", "numpy", "python"}
    assert state["numpy"]["keys"].dtype == torch.int64 and state["python"]["state"].dtype == torch.int64
    if not torch.cuda.is_available():
        assert state["cuda"] == []
    C.set_rng_state(pickle.loads(pickle.dumps(state)))  # and it round-trips


def test_files_of_other_pickle_protocols_load_without_warnings(tmp_path: Path) -> None:
    """Torch warns (UserWarning) about pickle protocols it did not write, e.g. a legacy-format file at protocol 3;
    that is noise for the user: the file loads and nothing is printed."""
    import warnings

    path = tmp_path / "p3.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path, _use_new_zipfile_serialization=False,
               pickle_protocol=3)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = C.load_checkpoint(path)
    assert obj["epoch"] == 3 and torch.equal(obj["model"]["w"], torch.ones(2))
    assert not caught, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------------------------
# Write errors: the message's reason when the OSError lacks parts, and text files that fail mid-write (the second
# mutation run, once tests/test_hardening.py joined the selection).


def _os_error(errno_: int | None = None, strerror: str | None = None, *args: str) -> OSError:
    """An ``OSError`` with only the given parts (``OSError(errno, strerror)`` would always set both)."""
    exc = OSError(*args)
    if errno_ is not None:
        exc.errno = errno_
    if strerror is not None:
        exc.strerror = strerror
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_os_error(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (_os_error(errno.ENOSPC), "ENOSPC"),  # no text: errno's symbolic name
        (_os_error(None, None, "quota exceeded"), "quota exceeded"),  # neither: the exception's own text
        (_os_error(99999, None, "odd"), "odd"),  # an errno without a name
        (_os_error(), "I/O error"),  # nothing at all
    ],
)
def test_write_error_reason_falls_back_from_strerror_to_errno_name_to_text(exc: OSError, reason: str) -> None:
    error = C.write_error(Path("runs/a.pth"), exc)
    assert str(error) == f"runs/a.pth: cannot write ({reason})"
    assert (error.errno, error.strerror, error.filename) == (exc.errno, exc.strerror, "runs/a.pth")


def test_write_error_text_is_its_message_alone() -> None:
    """``OSError`` would print "[Errno 28] ..." once ``errno`` is set; a ``WriteError`` prints its one line."""
    error = C.write_error("x.bin", _os_error(errno.ENOSPC, "No space left on device"))
    assert str(error) == "x.bin: cannot write (No space left on device)"
    assert str(C.WriteError()) == ""
    assert str(C.WriteError("first", "second")) == "first"


class _FullDisk:
    """A text file whose every write fails as on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


class _Recording:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)


def test_a_failing_text_write_names_the_destination(tmp_path: Path) -> None:
    """``atomic_text_writer``'s file turns a write's ``OSError`` into a ``WriteError`` naming the destination (not
    the temporary file), and passes a successful write's count through."""
    path = tmp_path / "preds.jsonl"
    with pytest.raises(C.WriteError) as err:
        C._CheckedText(_FullDisk(), path).write("x")  # type: ignore[arg-type]
    assert str(err.value) == f"{path}: cannot write (No space left on device)" and err.value.errno == errno.ENOSPC
    recording = _Recording()
    assert C._CheckedText(recording, path).write("abc") == 3  # type: ignore[arg-type]
    assert recording.parts == ["abc"]


def test_a_stale_sha256_in_the_state_is_replaced_not_hashed(tmp_path: Path) -> None:
    """A state that still carries a ``sha256`` (a dict loaded without ``load_checkpoint``, edited, saved again) gets
    a fresh hash of everything else: hashing the stale one too would make the file fail its own check on load."""
    path = tmp_path / "c.pth"
    C.save_checkpoint(path, {"step": 5, "sha256": "0" * 64})
    raw = torch.load(path, weights_only=True)
    assert raw["sha256"] == C.content_hash({"version": 1, "step": 5})
    assert C.load_checkpoint(path) == {"version": 1, "step": 5}


# ----------------------------------------------------------------------------------------------------------------
# The content hash's format, the corrupt-file message, and what load_checkpoint passes to torch.load.


def test_content_hash_format_is_fixed() -> None:
    """The hash is stored in every checkpoint, so its byte stream is part of the file format: any change to it
    makes every existing file fail its check ("corrupt checkpoint"). Expected digest spelled out by hand from the
    documented scheme: ``D<n>`` then each key as ``K<type>:<repr>`` in (type name, repr) order (int keys before
    str keys; ``'a'`` would sort before ``1`` by repr alone) followed by its value; lists ``l<n>``, tuples ``t<n>``
    then the items; tensors ``T<dtype><shape>`` then their bytes (little-endian); other values ``V<type>:<repr>``."""
    obj = {"b": torch.tensor([1, 2], dtype=torch.int16), 1: None, "a": [3, (2.5, "x")]}
    stream = (
        b"D3"
        b"Kint:1" b"VNoneType:None"
        b"Kstr:'a'" b"l2" b"Vint:3" b"t2" b"Vfloat:2.5" b"Vstr:'x'"
        b"Kstr:'b'" b"Ttorch.int16(2,)" b"\x01\x00\x02\x00"
    )  # fmt: skip
    assert C.content_hash(obj) == hashlib.sha256(stream).hexdigest()


def test_content_hash_tells_lists_from_tuples_and_reads_gradients_and_empty_tensors() -> None:
    assert C.content_hash([1, 2]) != C.content_hash((1, 2))
    weight = nn.Parameter(torch.ones(2))  # requires grad: hashed through detach()
    assert C.content_hash(weight) == C.content_hash(torch.ones(2))
    assert C.content_hash(torch.zeros(0, 3)) == hashlib.sha256(b"Ttorch.float32(0, 3)").hexdigest()


def test_a_corrupt_checkpoint_is_named_with_the_whole_advice(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    C.save_checkpoint(path, {"step": 1})
    obj = torch.load(path, weights_only=True)
    obj["step"] = 2  # changed after it was written: the stored hash no longer matches
    torch.save(obj, path)
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == (
        f"{path}: corrupt checkpoint: its content does not match the sha256 stored in it (the file changed after it "
        "was written: a damaged disk or copy); use another checkpoint (e.g. best.pth or a backup)"
    )


def test_only_torchs_user_warnings_are_silenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pickle-protocol notices (``UserWarning``) are noise for the user; anything else torch says while
    loading (a ``FutureWarning`` of an API about to change) must still reach the maintainers."""
    import warnings

    path = tmp_path / "c.pth"
    torch.save({"step": 1}, path)
    real_load = torch.load

    def load(*args, **kwargs):
        warnings.warn("protocol notice", UserWarning, stacklevel=2)
        warnings.warn("this will change", FutureWarning, stacklevel=2)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.load_checkpoint(path) == {"step": 1}
    assert [(w.category, str(w.message)) for w in caught] == [(FutureWarning, "this will change")]


def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path: Path, monkeypatch) -> None:
    """Tensors saved from CUDA memory are tagged ``cuda:0`` in the file; without ``map_location="cpu"`` torch would
    put them back on the GPU (an error on a machine without one). The tag is forged here by saving with torch's
    ``location_tag`` answering ``cuda:0``, as it does for a CUDA tensor."""
    path = tmp_path / "gpu.pth"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        C.save_checkpoint(path, {"model": {"w": torch.arange(3.0)}})
    assert b"cuda:0" in path.read_bytes()
    loaded = C.load_checkpoint(path)
    assert loaded["model"]["w"].device == torch.device("cpu")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))


def test_pickled_objects_stay_refused_when_the_environment_turns_weights_only_off(tmp_path: Path, monkeypatch) -> None:
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (set by some tools to read old files) turns torch's *default* to a full
    unpickle; an explicit ``weights_only=True`` is immune to it, so a checkpoint still cannot run code on load."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "obj.pth"
    torch.save({"model": {}, "extra": Fraction(1, 2)}, path)
    with pytest.raises(UserError, match=r"Python objects \(fractions\.Fraction\)"):
        C.load_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------------
# CUDA RNG states: saved when CUDA is there, restored only onto the same number of devices. No GPU here, so
# torch.cuda's four functions are stand-ins that record what the code asks of them.


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, count: int) -> list:
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((4,), i, dtype=torch.uint8)
                                                                  for i in range(count)])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


def test_rng_state_saves_every_cuda_devices_state(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, count=2)
    cuda = C.rng_state()["cuda"]
    assert [t.tolist() for t in cuda] == [[0, 0, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize(
    ("available", "count", "saved", "restored"),
    [
        (True, 2, 2, True),  # the same machine: restored
        (True, 1, 2, False),  # resumed on fewer GPUs: fresh states (they would be assigned to the wrong devices)
        (True, 2, 0, False),  # a run from a CPU machine: nothing to restore
        (False, 0, 1, False),  # a GPU run resumed on a CPU machine
    ],
)
def test_set_rng_state_restores_cuda_only_onto_the_same_device_count(
    monkeypatch: pytest.MonkeyPatch, available: bool, count: int, saved: int, restored: bool
) -> None:
    state = C.rng_state()
    state["cuda"] = [torch.full((4,), 7 + i, dtype=torch.uint8) for i in range(saved)]
    calls = _fake_cuda(monkeypatch, available, count)
    C.set_rng_state(state)
    assert calls == ([state["cuda"]] if restored else [])


# ----------------------------------------------------------------------------------------------------------------
# A training run's checkpoint: seed_everything, run_checkpoint, restore_run, restore_rng (in-process, a 3-4-2 model)


def _draws() -> tuple[float, float, float]:
    """One draw from each global RNG a training step uses: Python's, NumPy's and torch's."""
    return random.random(), float(np.random.random()), torch.rand(()).item()


def _run_objects(seed: int, ema: bool = True, init_scale: float = 65536.0):
    """A fresh Tiny model (weights from ``seed``) with its optimiser, scheduler, enabled CPU GradScaler and EMA."""
    torch.manual_seed(seed)
    model = Tiny()
    opt = build_optimizer(model, lr=1e-2)
    return model, opt, MultiStepLRWarmUp(opt, warmup=1, milestones=[3]), torch.amp.GradScaler("cpu",
            init_scale=init_scale), ModelEma(model) if ema else None  # fmt: skip


PROGRESS = {"epoch": 3, "epoch_step": 5, "step": 41, "best_metric": 47.5, "metrics": {"val/decoder/acc": 45.0}}
CONFIG = {"train": {"lr": 0.01, "milestones": [3]}}


@pytest.mark.parametrize("seed, numpy_seed", [(7, 7), (2**32 + 7, 7)])
def test_seed_everything_seeds_python_numpy_and_torch(seed: int, numpy_seed: int) -> None:
    """Catches a generator left unseeded (seeded from the clock instead) and NumPy's seed not taken modulo 2**32
    (NumPy refuses seeds >= 2**32; ``seed % 2 * 32`` would give 32): each draw is compared with a generator of
    its own library seeded by hand."""
    seed_everything(seed)
    expected = (random.Random(seed).random(), float(np.random.RandomState(numpy_seed).random_sample()),
                torch.rand((), generator=torch.Generator().manual_seed(seed)).item())  # fmt: skip
    assert _draws() == expected


def test_run_checkpoint_holds_each_state_under_its_own_key(tmp_path: Path) -> None:
    """Catches a field dropped, renamed or taken from the wrong object: every value is checked against what was
    put in (two Adam steps, a scheduler at epoch 2, EMA after 2 updates, a GradScaler at scale 8)."""
    model, opt, sched, ema, _ = trained_state(tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    rngs = [rng_state(), rng_state()]
    ckpt = run_checkpoint(model, opt, sched, scaler, ema, PROGRESS, CONFIG, rngs)
    assert set(ckpt) == set(CHECKPOINT_KEYS) - {"version", "sha256"}  # save_checkpoint adds those two
    assert ckpt["model"].keys() == {"encoder.weight", "encoder.bias", "head.weight", "head.bias", "count"}
    assert torch.equal(ckpt["model"]["head.weight"], model.head.weight)
    # the EMA's own weights, not the model's (after two updates at decay 1/10 and 2/11 they differ)
    assert ckpt["ema"]["updates"] == 2 and ckpt["ema"]["decay"] == 0.999
    assert torch.equal(ckpt["ema"]["module"]["head.weight"], ema.module.head.weight)
    assert not torch.equal(ckpt["ema"]["module"]["head.weight"], model.head.weight)
    assert [s["step"].item() for s in ckpt["optimizer"]["state"].values()] == [2.0] * 4
    assert ckpt["scheduler"]["last_epoch"] == 2
    assert ckpt["scaler"]["scale"] == 8.0
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"], ckpt["best_metric"]) == (3, 5, 41, 47.5)
    assert ckpt["metrics"] == {"val/decoder/acc": 45.0} and ckpt["config"] is CONFIG and ckpt["rng"] is rngs
    # the metrics are a copy: a later validation updating the run's dict does not rewrite this checkpoint
    progress = {**PROGRESS, "metrics": dict(PROGRESS["metrics"])}
    ckpt = run_checkpoint(model, opt, sched, scaler, ema, progress, CONFIG, rngs)
    progress["metrics"]["val/decoder/acc"] = 50.0
    assert ckpt["metrics"] == {"val/decoder/acc": 45.0}


def test_run_checkpoint_without_ema_or_scaler_stores_none(tmp_path: Path) -> None:
    """Catches ``ema.state_dict()`` called on a run without EMA and a disabled GradScaler's state being saved."""
    model, opt, sched, _, _ = trained_state(tmp_path)
    ckpt = run_checkpoint(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), None, PROGRESS, CONFIG, [])
    assert ckpt["ema"] is None and ckpt["scaler"] is None


def test_restore_run_puts_every_state_back(tmp_path: Path) -> None:
    """Catches a state not restored (or restored from another key): a fresh model, optimiser, scheduler, scaler
    and EMA, through a real save and load, end up as the trained ones."""
    model, opt, sched, ema, _ = trained_state(tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    path = tmp_path / "last.pth"
    save_checkpoint(path, run_checkpoint(model, opt, sched, scaler, ema, PROGRESS, CONFIG, [rng_state()]))
    model2, opt2, sched2, scaler2, ema2 = _run_objects(seed=1)
    assert not torch.equal(model2.head.weight, model.head.weight)
    restore_run(load_checkpoint(path), model2, opt2, sched2, scaler2, ema2, str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert [s["step"].item() for s in opt2.state_dict()["state"].values()] == [2.0] * 4
    assert torch.equal(opt2.state[model2.head.weight]["exp_avg"], opt.state[model.head.weight]["exp_avg"])
    # epoch 2 of warm-up 1, milestone 3: gamma 0.1 once -> 1e-3 (head), 1e-4 (encoder, lr scale 0.1);
    # a fresh scheduler would be at epoch 0, half the rate in warm-up
    assert sched2.last_epoch == 2 and sorted(sched2.get_last_lr()) == pytest.approx([1e-4, 1e-3])
    assert scaler2.get_scale() == 8.0
    assert ema2.updates == 2 and torch.equal(ema2.module.head.weight, ema.module.head.weight)


def test_restore_run_leaves_ema_and_scaler_alone_when_the_checkpoint_has_none(tmp_path: Path) -> None:
    """Catches the EMA or GradScaler being loaded from a ``None`` entry (``or`` for ``and``), and an EMA loaded
    into a run that has none."""
    model, opt, sched, _, _ = trained_state(tmp_path)
    obj = run_checkpoint(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), None, PROGRESS, CONFIG, [])
    model2, opt2, sched2, scaler2, ema2 = _run_objects(seed=1, init_scale=4.0)
    before = ema2.module.head.weight.clone()
    restore_run(obj, model2, opt2, sched2, scaler2, ema2, "last.pth")
    assert scaler2.get_scale() == 4.0 and ema2.updates == 0 and torch.equal(ema2.module.head.weight, before)
    # a checkpoint with EMA resumed by a run without one: nothing to load it into, and no error
    obj["ema"] = ModelEma(model).state_dict()
    restore_run(obj, *_run_objects(seed=1, ema=False), "last.pth")


def test_restore_run_loads_the_weights_strictly_and_names_the_file(tmp_path: Path) -> None:
    """Catches a non-strict load (a checkpoint missing a weight would resume from random weights) and the error
    naming something other than the checkpoint's path."""
    model, opt, sched, ema, _ = trained_state(tmp_path)
    obj = run_checkpoint(model, opt, sched, torch.amp.GradScaler("cpu"), ema, PROGRESS, CONFIG, [])
    del obj["model"]["head.bias"]
    with pytest.raises(UserError) as info:
        restore_run(obj, *_run_objects(seed=1), "runs/a/last.pth")
    assert str(info.value) == "runs/a/last.pth: 1 missing keys: head.bias"


def test_restore_rng_puts_back_this_ranks_states() -> None:
    """Catches the comparison inverted, the wrong return value, and another rank's state (or none) restored:
    rank 1 of 2 must continue exactly where rank 1's generators were when the checkpoint was written."""
    seed_everything(1)
    rank0 = rng_state()
    seed_everything(2)
    rank1 = rng_state()
    expected = _draws()
    seed_everything(3)
    assert restore_rng([rank0, rank1], rank=1, world_size=2) is True
    assert _draws() == expected


def test_restore_rng_from_another_world_size_touches_nothing() -> None:
    """Catches states restored from a checkpoint of another process count (or True returned): the generators
    keep the stream of the seed set before, compared with generators seeded by hand."""
    seed_everything(1)
    states = [rng_state()]
    seed_everything(3)
    assert restore_rng(states, rank=0, world_size=2) is False
    assert _draws() == (random.Random(3).random(), float(np.random.RandomState(3).random_sample()),
                        torch.rand((), generator=torch.Generator().manual_seed(3)).item())  # fmt: skip
