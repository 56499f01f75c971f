"""Hardening (issue 18): faults, bad input, write errors and the command line's first minutes.

Each test names what it catches. Write errors are tested on real file systems where this machine allows it (a
read-only and a full tmpfs, mounted by root; skipped otherwise) and with a simulated full disk everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kill_during_save
import numpy as np
import pytest
import torch
from engine_data import make_config, make_dataset, write_config
from fastapi.testclient import TestClient
from grounding_helpers import running_server, scene
from PIL import Image

from simvg.cli import main
from simvg.engine import train
from simvg.engine.train import fit
from simvg.errors import UserError
from simvg.inference.grounder import Grounder
from simvg.serve.app import allowed_hosts_for, create_app
from simvg.utils import checkpoint
from simvg.utils.checkpoint import (
    WriteError,
    atomic_write_bytes,
    content_hash,
    load_checkpoint,
    save_checkpoint,
)
from simvg.utils.logging import get_logger, read_metrics, setup_logging

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------
# shared set-up


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), "rec")


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A finished one-step run (last.pth and best.pth with the run's config inside)."""
    out = tmp_path_factory.mktemp("run") / "run"
    fit(make_config(data, out, max_steps=1, epochs=1))
    return out


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (root only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as path:
        yield path


@pytest.fixture
def full(tmp_path):
    """A tmpfs with no byte left."""
    with tmpfs(tmp_path / "full", size="256k") as path:
        with contextlib.suppress(OSError), (path / "filler").open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        yield path


def one_line_error(capsys, command: str, *needles: str) -> str:
    """The captured stderr's last line is the command's one-line error with ``needles``; no traceback anywhere."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    last = err.splitlines()[-1]
    assert last.startswith(f"simvg {command}: error: "), err
    for needle in needles:
        assert needle in last, err
    return captured.out


class Crash(BaseException):
    """Stands for SIGKILL in-process: raised by the crash hook where the script form kills the process."""


def crash_at_save(monkeypatch, n: int) -> None:
    """Make the n-th checkpoint write from now on 'crash' after its temporary file is written, before the rename
    (exactly where ``python tests/kill_during_save.py n ...`` kills the process); later writes are not touched."""

    def kill() -> None:
        raise Crash

    kill_during_save.install(n, kill, monkeypatch.setattr)


def scripted_scores(monkeypatch, scores: dict[int, float]) -> None:
    """Validation scores by epoch (the model after epoch 0 is the best)."""
    real_validate = train.validate
    monkeypatch.setattr(train, "validate", lambda run: {**real_validate(run), "score": scores[run.state.epoch]})


# ----------------------------------------------------------------------------------------------------------------
# 1. a crash between last.pth and best.pth


# Saves of a 2-epoch run of 4 steps per epoch with a checkpoint every 2 steps: #1 step 2, #2 step 4, #3 and #4 the
# end of epoch 0 (best.pth and last.pth, in some order), #5 step 6, ...
@pytest.mark.parametrize("n", [3, 4])
def test_crash_between_the_epoch_end_writes_keeps_best_pth(data, tmp_path, monkeypatch, n):
    """Catches last.pth written before best.pth: a crash between the two leaves a last.pth that records the best
    score while best.pth never appears, not even after --resume (the resumed epochs score worse)."""
    scripted_scores(monkeypatch, {0: 80.0, 1: 50.0})
    out = tmp_path / "run"
    crash_at_save(monkeypatch, n)
    with pytest.raises(Crash):
        fit(make_config(data, out, checkpoint_every_steps=2))
    result = fit(make_config(data, out, checkpoint_every_steps=2), resume=True)
    assert (result["step"], result["best_metric"]) == (8, 80.0)
    assert (out / "best.pth").is_file(), "best.pth lost by a crash between the epoch-end writes"
    best = load_checkpoint(out / "best.pth")
    assert (best["step"], best["best_metric"], best["metrics"]["score"]) == (4, 80.0, 80.0)


@pytest.mark.slow  # two subprocesses, each paying the torch import
def test_killed_between_the_epoch_end_writes_keeps_best_pth(data, tmp_path):
    """The issue's reproduction with a real SIGKILL (``tests/kill_during_save.py``), then ``simvg train --resume``."""
    out = tmp_path / "run"
    cfg = write_config(make_config(data, out, checkpoint_every_steps=2), tmp_path / "cfg.yaml")
    # killed in the second of the two epoch-0 writes
    cmd = [sys.executable, "tests/kill_during_save.py", "4", "train", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cmd = [sys.executable, "-m", "simvg", "train", str(cfg), "--resume"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = load_checkpoint(out / "last.pth")
    assert last["best_metric"] is not None
    assert (out / "best.pth").is_file()
    assert load_checkpoint(out / "best.pth")["best_metric"] == last["best_metric"]


def test_resume_recreates_a_missing_best_pth_from_last_pth(data, tmp_path, monkeypatch):
    """A run of an older version killed between the writes: last.pth is the best model and best.pth is missing.
    Catches a resume that leaves it missing (the resumed epoch scores worse, so nothing writes it again)."""
    scripted_scores(monkeypatch, {0: 80.0, 1: 50.0})
    out = tmp_path / "run"
    fit(make_config(data, out, max_steps=4))  # epoch 0 validated (the best), stop
    (out / "best.pth").unlink()
    fit(make_config(data, out), resume=True)
    best = load_checkpoint(out / "best.pth")
    assert (best["step"], best["best_metric"]) == (4, 80.0)


# ----------------------------------------------------------------------------------------------------------------
# 2. write errors: one line naming the path, exit 2, nothing torn


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """Catches an OSError traceback (and a leftover temporary) when the disk fills; simulated with fsync failing,
    which is where a full disk (or quota) shows at the latest."""
    path = tmp_path / "out.bin"
    atomic_write_bytes(b"old", path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(UserError, match=re.escape(f"{path}: cannot write (No space left on device)")) as info:
        atomic_write_bytes(b"new", path)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_train_output_read_only(data, tmp_path, read_only, capsys):
    cfg = write_config(make_config(data, tmp_path / "unused"), tmp_path / "cfg.yaml")
    assert main(["train", str(cfg), "--output", str(read_only / "run")]) == 2
    one_line_error(capsys, "train", str(read_only / "run"), "Read-only file system")


def test_train_output_full_disk(data, tmp_path, full, capsys):
    cfg = write_config(make_config(data, tmp_path / "unused", epochs=1), tmp_path / "cfg.yaml")
    assert main(["train", str(cfg), "--output", str(full / "run")]) == 2
    one_line_error(capsys, "train", str(full / "run"), "No space left on device")
    assert not [p for p in (full / "run").iterdir() if p.name.endswith(".tmp")]


def write_queries(tmp_path: Path, lines: list[bytes]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    scene().save(images / "a.png")
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes(b"\n".join(lines) + b"\n")
    return images, queries


def predict_argv(folder: Path, images: Path, queries: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--images", str(images), "--queries", str(queries), "--out", str(out),
            "--checkpoint", str(folder), *extra]  # fmt: skip


@pytest.mark.parametrize("place", ["read_only", "full"])
def test_predict_out_unwritable(folder, tmp_path, capsys, request, place):
    """Catches the traceback on a full disk and, on a read-only one, the cleanup's second error hiding the first."""
    where = request.getfixturevalue(place)
    images, queries = write_queries(tmp_path, [b'{"image": "a.png", "text": "the red circle"}'] * 20)
    out = where / "preds.jsonl"
    assert main(predict_argv(folder, images, queries, out)) == 2
    reason = "Read-only file system" if place == "read_only" else "No space left on device"
    one_line_error(capsys, "predict", str(out), reason)
    assert not out.exists()


def test_predict_out_simulated_full_disk(folder, tmp_path, capsys, monkeypatch):
    images, queries = write_queries(tmp_path, [b'{"image": "a.png", "text": "the red circle"}'])
    out = tmp_path / "preds.jsonl"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    assert main(predict_argv(folder, images, queries, out)) == 2
    one_line_error(capsys, "predict", str(out), "No space left on device")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_eval_dump_read_only_prints_the_metrics_first(run_dir, read_only, capsys):
    dump = read_only / "dump.jsonl"
    assert main(["eval", "--checkpoint", str(run_dir / "last.pth"), "--split", "val", "--dump", str(dump)]) == 2
    out = one_line_error(capsys, "eval", str(dump), "Read-only file system")
    assert "val: 8 expressions" in out


def test_export_weights_out_read_only(run_dir, read_only, capsys):
    assert main(["export", "weights", "--checkpoint", str(run_dir), "--out", str(read_only / "model")]) == 2
    one_line_error(capsys, "export weights", str(read_only / "model"), "Read-only file system")


def test_ground_out_unwritable(folder, tmp_path, capsys):
    scene().save(tmp_path / "a.png")
    argv = ["ground", str(tmp_path / "a.png"), "the red circle", "--checkpoint", str(folder), "--out", "/proc/x.png"]
    assert main(argv) == 2
    one_line_error(capsys, "ground", "/proc/x.png", "cannot write")


# ----------------------------------------------------------------------------------------------------------------
# 3. queries files that are not UTF-8


def test_predict_non_utf8_line_is_a_bad_line_and_a_bom_is_ignored(folder, tmp_path, capsys):
    """Catches the UnicodeDecodeError traceback (even with --skip-bad) and the BOM making line 1 'bad'."""
    good = b'{"image": "a.png", "text": "the red circle", "id": "%d"}'
    images, queries = write_queries(tmp_path, [b"\xef\xbb\xbf" + good % 1, b'{"image": "a.png", "text": "r\xe9d"}',
                                               good % 3])  # fmt: skip
    out = tmp_path / "preds.jsonl"
    assert main(predict_argv(folder, images, queries, out)) == 2
    one_line_error(capsys, "predict", f"{queries}:2: not UTF-8 text (byte 0xe9 at column 30)")
    assert main(predict_argv(folder, images, queries, out, "--skip-bad")) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "3"]
    err = capsys.readouterr().err
    assert f"skipped {queries}:2: not UTF-8" in err and "1 bad lines skipped" in err


# ----------------------------------------------------------------------------------------------------------------
# 4. degenerate images and a model giving NaN


def test_zero_size_image_is_a_user_error(grounder):
    """Catches the ZeroDivisionError of a 0x0 image."""
    with pytest.raises(UserError, match="empty image"):
        grounder.ground(Image.new("RGB", (0, 0)), "red")
    with pytest.raises(UserError, match="empty image"):
        grounder.ground(Image.new("RGB", (5, 0)), "red")


def test_nan_outputs_give_no_box_and_valid_json(folder, monkeypatch):
    """Catches NaN written into the JSON (invalid JSON) when the model's output is not finite."""
    nan_grounder = Grounder.from_checkpoint(folder)
    real = nan_grounder.runner

    def runner(images, ids, mask, branch):
        logits, boxes = real(images, ids, mask, branch)
        return torch.full_like(logits, float("nan")), torch.full_like(boxes, float("nan"))

    nan_grounder.runner = runner
    result = nan_grounder.ground(scene(), "the red circle")
    assert result.boxes == [] and result.scores == []
    assert any("not finite" in w for w in result.warnings)
    json.dumps(result.to_dict(), allow_nan=False)


def test_float_tiff_of_nans_gives_no_warning(grounder, tmp_path):
    """Catches numpy's 'All-NaN slice' RuntimeWarning leaking out of the image reader."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((16, 24), np.nan, dtype=np.float32), mode="F").save(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = grounder.ground(path, "the red circle")
    assert result.image_size == (24, 16)


# ----------------------------------------------------------------------------------------------------------------
# 5. long expressions


def test_a_400_word_expression_is_cut_to_the_token_budget_not_refused(folder, grounder, tmp_path, capsys):
    """Catches the CLI and API refusing past 1000 characters; the server keeps its limit."""
    text = " ".join(["the red circle on the left"] * 67)[:2400]
    assert len(text.split()) >= 400
    result = grounder.ground(scene(), text)
    assert result.truncated and any("cut" in w for w in result.warnings)
    scene().save(tmp_path / "a.png")
    assert main(["ground", str(tmp_path / "a.png"), text, "--checkpoint", str(folder), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["truncated"] and any("cut" in w for w in body["warnings"])
    with TestClient(create_app(grounder)) as client:  # the server's own limit, whatever the grounder's
        response = client.post("/api/ground", files={"image": ("a.png", (tmp_path / "a.png").read_bytes())},
                               data={"text": text})  # fmt: skip
        assert response.status_code == 400 and "limit is 1000" in response.json()["error"]


# ----------------------------------------------------------------------------------------------------------------
# 6. serve


def test_serve_port_in_use_and_out_of_range_are_one_line_errors(folder, capsys):
    """Catches 'open http://...' printed before the bind fails (exit 3) and the OverflowError of --port 99999."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        assert main(["serve", "--checkpoint", str(folder), "--port", str(port)]) == 2
        out = one_line_error(capsys, "serve", f"127.0.0.1:{port}", "another --port")
        assert "open http" not in out
    finally:
        busy.close()
    assert main(["serve", "--checkpoint", str(folder), "--port", "99999"]) == 2
    one_line_error(capsys, "serve", "--port 99999")


def test_client_disconnecting_mid_upload_logs_no_traceback(grounder):
    """Catches 'Exception in ASGI application' with a full traceback for every client that goes away."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    with running_server(create_app(grounder)) as url:
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(handler)
        try:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as sock:
                head = (b"POST /api/ground HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                        b"Content-Type: multipart/form-data; boundary=XX\r\n\r\n")  # fmt: skip
                part = b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + b"x" * 999
                sock.sendall(head + part)
                time.sleep(0.5)
            time.sleep(1.0)
            import httpx

            assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        finally:
            uvicorn_log.removeHandler(handler)
    assert not [r for r in records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_security_headers_and_host_check(grounder):
    """Catches answers without nosniff / frame / content-security headers and a server that answers any Host
    (DNS rebinding lets a web page reach 127.0.0.1 under its own name)."""
    app = create_app(grounder, allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for path in ("/", "/healthz", "/static/app.js"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "[::1]:8000"}).status_code == 200
        rebound = client.get("/healthz", headers={"Host": "attacker.example:8000"})
        assert rebound.status_code == 400 and "attacker.example" in rebound.json()["error"]
        assert rebound.headers["x-frame-options"] == "DENY"


def test_serve_command_checks_the_host_and_healthz_hides_the_path(folder, monkeypatch, capsys):
    """Catches ``simvg serve`` answering any Host and /healthz showing the model's absolute path."""
    from simvg.serve import app as serve_app

    started = {}
    monkeypatch.setattr(serve_app, "run_server", lambda app, sock: started.update(app=app, port=sock.getsockname()))
    argv = ["serve", "--checkpoint", str(folder), "--port", "0", "--allowed-host", "grounder.lan"]
    assert main(argv) == 0
    port = started["port"][1]
    assert f"open http://127.0.0.1:{port}/" in capsys.readouterr().out
    with TestClient(started["app"], base_url=f"http://127.0.0.1:{port}") as client:
        body = client.get("/healthz").json()
        assert body["model"] == folder.name and str(folder.parent) not in json.dumps(body)
        assert body["trained_on"].startswith("SynthRef")
        assert client.get("/healthz", headers={"Host": "grounder.lan"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_serve_without_its_extra_gives_a_pip_hint(monkeypatch, capsys):
    """Catches the ModuleNotFoundError traceback of ``simvg serve`` without FastAPI/uvicorn."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["serve"]) == 2
    one_line_error(capsys, "serve", "pip install 'simvg[serve]'")


# ----------------------------------------------------------------------------------------------------------------
# 7. pickle opt-in, content hashes, metrics.jsonl after a resume


def test_train_has_the_allow_pickle_the_refusal_suggests(data, tmp_path, capsys):
    """Catches the BEiT-3 refusal suggesting --allow-pickle, which ``simvg train`` did not have."""
    from simvg.models import create_model

    cfg = make_config(data, tmp_path / "run", max_steps=1, epochs=1)
    encoder = create_model("simvg_tiny_test", **cfg.model.overrides).encoder
    pretrained = tmp_path / "beit3_pickled.pth"
    state = {"beit3." + k: v for k, v in encoder.state_dict().items()}
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, pretrained)
    cfg.model.pretrained = str(pretrained)
    path = write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(path)]) == 2
    one_line_error(capsys, "train", str(pretrained), "--allow-pickle")
    assert main(["train", str(path), "--allow-pickle"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pth")["step"] == 1


def flip_byte_in(path: Path, pattern: bytes) -> None:
    """Flip one bit inside the first occurrence of ``pattern`` (a tensor's bytes) in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(pattern)
    assert at >= 0
    data[at + len(pattern) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_checkpoint_with_a_flipped_bit_is_refused(tmp_path):
    """Catches a damaged checkpoint loading silently; files without a hash (older, official) still load."""
    marker = torch.arange(256, dtype=torch.float32) * 1.2345
    state = {"model": {"w": marker.clone()}, "config": {"a": [1, 2]}, "step": 3, "metrics": {"score": 1.5}}
    save_checkpoint(tmp_path / "ckpt.pth", state)
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    loaded = load_checkpoint(tmp_path / "ckpt.pth")
    assert "sha256" not in loaded and raw.pop("sha256") == content_hash(loaded)
    torch.save(loaded, tmp_path / "edited.pth")  # a loaded checkpoint, edited and saved again, carries no stale hash
    assert load_checkpoint(tmp_path / "edited.pth")["step"] == 3
    flip_byte_in(tmp_path / "ckpt.pth", marker.numpy().tobytes())
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "ckpt.pth")
    torch.save({"model": {"w": marker}}, tmp_path / "plain.pth")
    assert torch.equal(load_checkpoint(tmp_path / "plain.pth")["model"]["w"], marker)


def test_model_folder_with_a_flipped_bit_is_refused(folder, tmp_path, capsys):
    import shutil

    from safetensors import safe_open

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    with safe_open(str(copy / "model.safetensors"), framework="pt") as f:
        tensor = max((f.get_tensor(k) for k in f.keys()), key=lambda t: t.numel())
    flip_byte_in(copy / "model.safetensors", tensor.numpy().tobytes())
    with pytest.raises(UserError, match="corrupt weights"):
        Grounder.from_checkpoint(copy)
    scene().save(tmp_path / "a.png")
    assert main(["ground", str(tmp_path / "a.png"), "red", "--checkpoint", str(copy)]) == 2
    one_line_error(capsys, "ground", str(copy / "model.safetensors"), "sha256")


# n=2: the checkpoint of step 4 (every 2 steps) crashes: steps 3 and 4 are re-done; n=3: the first epoch-end write
# crashes after the validation was logged: the validation is re-done
@pytest.mark.parametrize("n", [2, 3])
def test_metrics_jsonl_has_each_step_once_after_a_resume(data, tmp_path, monkeypatch, n):
    """Catches the re-done steps appearing twice in metrics.jsonl (and a re-done validation's records)."""
    out = tmp_path / "run"
    crash_at_save(monkeypatch, n)
    with pytest.raises(Crash):
        fit(make_config(data, out, checkpoint_every_steps=2))
    before = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert before == [1, 2, 3, 4]
    fit(make_config(data, out, checkpoint_every_steps=2), resume=True)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 9))
    assert [(r["epoch"], r["step"]) for r in records if r["event"] == "val"] == [(0, 4), (1, 8)]
    assert [r["step"] for r in records if r["event"] == "start"] == [0, 2 if n == 2 else 4]


# ----------------------------------------------------------------------------------------------------------------
# 8. file modes


def test_every_writer_honours_the_umask(folder, run_dir, tmp_path, capsys):
    """Files must get 0666 less the umask (0644 here), as any ordinary program's, not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        scene().save(tmp_path / "a.png")
        images, queries = write_queries(tmp_path, [b'{"image": "a.png", "text": "red"}'])
        assert main(["export", "weights", "--checkpoint", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
        assert main(predict_argv(folder, images, queries, tmp_path / "p.jsonl")) == 0
        assert main(["ground", str(tmp_path / "a.png"), "red", "--checkpoint", str(folder),
                     "--out", str(tmp_path / "g.png")]) == 0  # fmt: skip
        assert main(["eval", "--checkpoint", str(run_dir / "last.pth"), "--split", "val",
                     "--dump", str(tmp_path / "d.jsonl")]) == 0  # fmt: skip
        save_checkpoint(tmp_path / "c.pth", {"step": 1})
    finally:
        os.umask(old)
    written = [*(tmp_path / "exported").iterdir(), *(tmp_path / n for n in ("p.jsonl", "g.png", "d.jsonl", "c.pth"))]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert len(modes) == 7 and set(modes.values()) == {"0o644"}, modes


# ----------------------------------------------------------------------------------------------------------------
# 11. the command line's first minutes


def test_group_help_version_and_defaults_in_help(capsys):
    """Catches 'unknown command' for ``simvg export --help`` / ``simvg data --help``, a missing --version and
    --help without defaults."""
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "export onnx" in out and "export weights" in out
    assert main(["data", "--help"]) == 0
    assert "data synth" in capsys.readouterr().out
    assert main(["data"]) == 0
    assert main(["data", "nonsense"]) == 2
    assert "data check" in capsys.readouterr().err
    assert main(["--version"]) == 0
    from simvg import __version__

    assert capsys.readouterr().out.strip() == f"simvg {__version__}"
    assert main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE queries per forward pass (default: 8)" in text and "(default: 0.7)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_one_default_branch_from_the_model_folder(folder, tmp_path, capsys, monkeypatch):
    """ground, predict, serve and demo answer with the model folder's branch unless --branch says otherwise."""
    import shutil

    import yaml

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    spec = yaml.safe_load((copy / "model.yaml").read_text())
    for branch in ("decoder", "token"):
        spec["branch"] = branch
        (copy / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        scene().save(tmp_path / "a.png")
        assert main(["ground", str(tmp_path / "a.png"), "red", "--checkpoint", str(copy), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["branch"] == branch
        images, queries = write_queries(tmp_path, [b'{"image": "a.png", "text": "red"}'])
        assert main(predict_argv(copy, images, queries, tmp_path / "p.jsonl")) == 0
        assert json.loads((tmp_path / "p.jsonl").read_text())["branch"] == branch
    from simvg.inference import demo
    from simvg.serve import app as serve_app

    for module, prefix in ((serve_app, "serve"), (demo, "demo")):
        parser = argparse.ArgumentParser()
        getattr(module, f"{prefix}_arguments")(parser)
        assert parser.parse_args([]).branch is None, prefix


# ----------------------------------------------------------------------------------------------------------------
# 12. log lines and progress bars; absolute data root


def test_log_lines_do_not_land_inside_the_progress_bar(capsys):
    """Catches log lines written after the bar's text on the bar's own line."""
    from tqdm import tqdm

    setup_logging(0)
    try:
        bar = tqdm(total=10, file=sys.stderr, disable=False, ncols=60, desc="epoch 0")
        bar.update(1)
        get_logger().info("hello from the log")
        bar.update(1)
        bar.close()
    finally:
        setup_logging(0)
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])\d\d:\d\d:\d\d hello from the log\n", err), repr(err)


def test_run_config_stores_an_absolute_data_root(data, tmp_path, monkeypatch, capsys):
    """Catches a relative data.root in the run's config, which breaks ``simvg eval`` from another folder."""
    monkeypatch.chdir(data.parent)
    out = tmp_path / "run"
    fit(make_config(Path(data.name), out, max_steps=1, epochs=1))
    stored = load_checkpoint(out / "last.pth")["config"]["data"]["root"]
    assert Path(stored).is_absolute() and Path(stored) == data.resolve()
    import yaml

    assert Path(yaml.safe_load((out / "config.yaml").read_text())["data"]["root"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(out / "last.pth"), "--split", "val"]) == 0
    assert "val: 8 expressions" in capsys.readouterr().out


def test_write_error_is_both_a_user_error_and_an_os_error():
    error = checkpoint.write_error("x/y.pth", OSError(errno.EROFS, "Read-only file system"))
    assert isinstance(error, WriteError) and isinstance(error, UserError) and isinstance(error, OSError)
    assert str(error) == "x/y.pth: cannot write (Read-only file system)" and error.errno == errno.EROFS


# ----------------------------------------------------------------------------------------------------------------
# 9. a SynthRef-only model says what it cannot know


def photo_like(size: int = 96) -> Image.Image:
    """An image with a photograph's colour statistics: smooth regions of mid saturation at every hue, plus noise."""
    rng = np.random.default_rng(0)
    coarse = rng.random((6, 6, 3)).astype(np.float32)
    hsv = np.stack([np.asarray(Image.fromarray(coarse[..., k], mode="F").resize((size, size))) for k in range(3)], -1)
    hsv = hsv * np.array([1.0, 0.5, 0.6], dtype=np.float32) + np.array([0.0, 0.3, 0.2], dtype=np.float32)
    hsv = np.clip(hsv + rng.normal(0, 0.02, hsv.shape), 0, 1)
    return Image.fromarray((hsv * 255).astype(np.uint8), mode="HSV").convert("RGB")


def test_synthref_only_model_warns_about_photographs_and_unknown_words(folder, grounder, tmp_path):
    """Catches confident answers with ``"warnings": []`` for a photograph and for words the vocabulary lacks."""
    from simvg.synthref.scene import draw_scene

    assert grounder.spec.synthetic_only
    photo = grounder.ground(photo_like(), "the red circle")
    assert any("does not look like a SynthRef scene" in w for w in photo.warnings), photo.warnings
    from simvg.inference.provenance import unlike_synthref

    scenes = [Image.fromarray(draw_scene(np.random.default_rng(s), 128, background=bg)[0])
              for s in range(6) for bg in ("plain", "textured")]  # fmt: skip
    assert max(unlike_synthref(s) for s in scenes) < 0.25 < unlike_synthref(photo_like())
    assert grounder.ground(scenes[0], "the red circle").warnings == []
    words = grounder.ground(scenes[0], "the xyzzy left of the qwerty circle").warnings
    assert words[-1].startswith("words the model's vocabulary does not know") and words[-1].endswith(": xyzzy, qwerty")
    import shutil

    import yaml

    real = tmp_path / "model"  # the same weights, said to be trained on photographs: no photo warning
    shutil.copytree(folder, real)
    spec = yaml.safe_load((real / "model.yaml").read_text())
    spec["trained_on"] = "RefCOCO (photographs)"
    (real / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert Grounder.from_checkpoint(real).ground(photo_like(), "the red circle").warnings == []


# ----------------------------------------------------------------------------------------------------------------
# 14. what users of other grounding tools expect


def test_numpy_arrays_and_result_draw(grounder):
    """Catches numpy arrays refused as input and results that cannot draw themselves."""
    pil = scene()
    want = grounder.ground(pil, "the red circle")
    for array in (np.asarray(pil), np.asarray(pil).astype(np.float32) / 255.0, np.asarray(pil.convert("RGBA"))):
        assert grounder.ground(array, "the red circle").boxes == want.boxes
    assert grounder.ground(np.asarray(pil.convert("L")), "the red circle").image_size == pil.size
    with pytest.raises(UserError, match="shape"):
        grounder.ground(np.zeros((4, 4, 2), dtype=np.uint8), "red")
    drawn = want.draw(np.asarray(pil))
    assert drawn.size == pil.size and drawn.tobytes() != pil.tobytes()
    assert want.draw(pil).tobytes() == drawn.tobytes()


def test_predict_vis_dir_and_coco_format(folder, tmp_path):
    """Catches ``predict`` without pictures beside the JSON and without COCO-style output."""
    lines = [b'{"image": "a.png", "text": "the red circle", "id": "q1", "image_id": 7}',
             b'{"image": "a.png", "text": "the blue square", "id": "two/2"}']  # fmt: skip
    images, queries = write_queries(tmp_path, lines)
    out, vis = tmp_path / "coco.json", tmp_path / "vis"
    assert main(predict_argv(folder, images, queries, out, "--format", "coco", "--vis-dir", str(vis))) == 0
    detections = json.loads(out.read_text())
    assert [(d["image_id"], d["query_id"], d["category_id"]) for d in detections] == [
        (7, "q1", 1),
        ("a.png", "two/2", 1),
    ]
    x, y, w, h = detections[0]["bbox"]
    assert w >= 0 and h >= 0 and 0 <= detections[0]["score"] <= 1
    assert sorted(p.name for p in vis.iterdir()) == ["q1.png", "two_2-line2.png"]
    assert Image.open(vis / "q1.png").size == scene().size
    assert main(predict_argv(folder, images, queries, tmp_path / "p.jsonl")) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["image_id"] == 7


def test_any_command_reports_an_unwritable_place_in_one_line(read_only, capsys):
    """The CLI's last line of defence: an OSError of the place itself (read-only, full, forbidden) in any command is
    one line naming the file, exit 2."""
    argv = ["data", "synth", "--out", str(read_only / "sr"), "--task", "rec", "--num-images", "4", "--image-size", "64"]
    assert main(argv) == 2
    one_line_error(capsys, "data synth", str(read_only / "sr"), "Read-only file system")
