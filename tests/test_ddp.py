"""Two CPU processes (torchrun, gloo) with batch 2 each end with the same weights as one process with batch 4; two
processes with DWBD, dropout and drop-path resume exactly."""

import os
import subprocess
import sys

import pytest
import torch
from engine_data import make_config, make_dataset, write_config

from simvg.engine.train import fit
from simvg.utils.checkpoint import load_checkpoint
from simvg.utils.logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # subprocesses: each pays the torch import
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = make_dataset(tmp_path / "data", "rec")
    # 3 steps of global batch 4; EMA on; distill_mode "none" because DWBD's w is a per-process batch mean.
    # Adam's m / sqrt(v) turns float-rounding differences of near-zero gradients into updates of up to lr, so the
    # rate is kept at 1e-4 for the comparison to hold at 1e-5.
    fit(make_config(data, tmp_path / "single", ema=True, max_steps=3, batch_size=4, lr=1e-4))
    double = write_config(make_config(data, tmp_path / "double", ema=True, max_steps=3, batch_size=2, lr=1e-4),
                          tmp_path / "double.yaml")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "simvg", "train", str(double)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "single" / "last.pth"), load_checkpoint(tmp_path / "double" / "last.pth")
    assert b["step"] == 3 and len(b["rng"]) == 2  # one RNG state per rank
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-5), key
    for key, value in a["ema"]["module"].items():
        assert torch.allclose(value, b["ema"]["module"][key], atol=1e-5), key
    # the logged loss is the mean over ranks, i.e. the single process's loss
    loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["event"] == "train"}
    loss2 = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "double" / "metrics.jsonl") if r["event"] == "train"}
    assert loss.keys() == loss2.keys() and all(abs(loss[k] - loss2[k]) < 1e-4 * abs(loss[k]) for k in loss)


def _torchrun(config, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "simvg", "train", str(config), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # three torchrun launches
def test_two_process_resume_with_dwbd_dropout_and_drop_path_matches_uninterrupted(tmp_path):
    """Two processes with the recipes' loss and randomness (DWBD dynamic, dropout 0.1, encoder drop-path): stopped
    after 2 of 4 steps and resumed, the run logs the same losses and ends with the same weights as an
    uninterrupted one. Catches a resume that does not put back each rank's own RNG state (``set_rng_state`` in
    ``restore``): the ranks' dropout masks after the resume would differ."""
    data = make_dataset(tmp_path / "data", "rec")
    recipe = {"dropout": 0.1, "drop_path": 0.2, "distill_mode": "dynamic", "ema": True, "epochs": 1, "batch_size": 2}
    _torchrun(write_config(make_config(data, tmp_path / "ref", **recipe), tmp_path / "ref.yaml"))
    stop = write_config(make_config(data, tmp_path / "run", max_steps=2, **recipe), tmp_path / "stop.yaml")
    _torchrun(stop)
    mid = load_checkpoint(tmp_path / "run" / "last.pth")
    assert (mid["step"], mid["epoch_step"], len(mid["rng"])) == (2, 2, 2)
    _torchrun(write_config(make_config(data, tmp_path / "run", **recipe), tmp_path / "resume.yaml"), "--resume")
    keys = ("loss", "loss_dgt", "loss_tgt", "loss_kd", "distill_w")
    ref, got = ({r["step"]: [r[k] for k in keys] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                 if r["event"] == "train"} for name in ("ref", "run"))  # fmt: skip
    assert ref.keys() == got.keys() == {1, 2, 3, 4}
    assert all(0 < terms[-1] < 1 for terms in ref.values())  # DWBD's w (mean over ranks) is on
    for step, terms in ref.items():
        assert got[step] == pytest.approx(terms, rel=1e-6), f"step {step}: resumed {got[step]}, uninterrupted {terms}"
    a, b = load_checkpoint(tmp_path / "ref" / "last.pth"), load_checkpoint(tmp_path / "run" / "last.pth")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (4, 1)
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-6), key
    for key, value in a["ema"]["module"].items():
        assert torch.allclose(value, b["ema"]["module"][key], atol=1e-6), key
