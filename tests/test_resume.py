"""Exact resume: stopping at a step boundary (or being killed while writing a checkpoint) and resuming gives the
same losses and the same final weights as an uninterrupted run, also with the recipe's randomness on (dropout,
drop-path, DWBD); a resumed run keeps the best score so far, so ``best.pth`` is never replaced by a worse model."""

import os
import subprocess
import sys

import pytest
import torch
from engine_data import make_config, make_dataset, write_config

from simvg.cli import main
from simvg.data.loaders import ResumableSampler
from simvg.engine import train
from simvg.engine.train import fit
from simvg.utils.checkpoint import load_checkpoint
from simvg.utils.logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), "rec")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted: 2 epochs x 4 steps, EMA on, LSJ on (augmentation must replay too)."""
    cfg = make_config(data, tmp_path_factory.mktemp("ref") / "run", ema=True)
    fit(cfg)
    return cfg


# the recipes' randomness: dropout 0.1 in the heads, drop-path in the encoder, DWBD's dynamic weight
RECIPE = {"dropout": 0.1, "drop_path": 0.2, "distill_mode": "dynamic"}


@pytest.fixture(scope="module")
def recipe_reference(data, tmp_path_factory):
    """Uninterrupted, with ``RECIPE`` on: 2 epochs x 4 steps, EMA on, LSJ on."""
    cfg = make_config(data, tmp_path_factory.mktemp("ref_recipe") / "run", ema=True, **RECIPE)
    fit(cfg)
    return cfg


def losses_by_step(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(f"{out_dir}/metrics.jsonl") if r["event"] == "train"}


def assert_same_final_state(out_a, out_b):
    a, b = load_checkpoint(f"{out_a}/last.pth"), load_checkpoint(f"{out_b}/last.pth")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-6), key
    for key, value in a["ema"]["module"].items():
        assert torch.allclose(value, b["ema"]["module"][key], atol=1e-6), key
    assert a["metrics"] == pytest.approx(b["metrics"])


def test_stop_mid_epoch_and_resume_matches_uninterrupted(data, reference, tmp_path):
    out = tmp_path / "run"
    fit(make_config(data, out, ema=True, max_steps=3))  # stops inside epoch 0
    ckpt = load_checkpoint(out / "last.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (3, 0, 3)
    fit(make_config(data, out, ema=True), resume=True)
    ref = losses_by_step(reference.train.output_dir)
    assert losses_by_step(out) == pytest.approx(ref, rel=1e-6)
    assert_same_final_state(reference.train.output_dir, out)


@pytest.mark.slow  # subprocesses: each pays the torch import
def test_killed_during_checkpoint_write_resumes_from_previous(data, reference, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(make_config(data, out, ema=True, checkpoint_every_steps=2), tmp_path / "cfg.yaml")
    # killed during the second checkpoint save, the one at step 4 (tests/kill_during_save.py holds the hook)
    cmd = [sys.executable, os.path.join(REPO, "tests", "kill_during_save.py"), "2", "train", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(out / "last.pth")["step"] == 2  # the previous checkpoint, intact
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the torn write stayed in its temporary file
    assert main(["train", str(cfg), "--resume"]) == 0
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert_same_final_state(reference.train.output_dir, out)
    assert losses_by_step(out) == pytest.approx(losses_by_step(reference.train.output_dir), rel=1e-6)


def train_records(out_dir):
    """{step: every logged loss term} of a run."""
    keys = ("loss", "loss_dgt", "loss_tgt", "loss_kd", "distill_w")
    records = read_metrics(f"{out_dir}/metrics.jsonl")
    return {r["step"]: {k: r[k] for k in keys} for r in records if r["event"] == "train"}


def test_resume_with_dropout_drop_path_and_dwbd_matches_uninterrupted(data, recipe_reference, tmp_path):
    """Catches a resume that does not restore the RNG state (``set_rng_state`` in ``restore``): with dropout and
    drop-path on, the masks drawn after the resume would differ from the uninterrupted run's, and so would every
    loss term (DWBD's weight included) and the final weights."""
    out = tmp_path / "run"
    fit(make_config(data, out, ema=True, max_steps=3, **RECIPE))  # stops inside epoch 0
    ckpt = load_checkpoint(out / "last.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (3, 0, 3)
    fit(make_config(data, out, ema=True, **RECIPE), resume=True)
    ref = train_records(recipe_reference.train.output_dir)
    got = train_records(out)
    assert got.keys() == ref.keys() == set(range(1, 9))
    assert all(0 < r["distill_w"] < 1 and r["loss_kd"] > 0 for r in ref.values())  # DWBD is really on
    for step, terms in ref.items():
        assert got[step] == pytest.approx(terms, rel=1e-6), f"step {step}: resumed {got[step]}, uninterrupted {terms}"
    assert_same_final_state(recipe_reference.train.output_dir, out)


def test_resume_keeps_best_metric_and_best_pth(data, tmp_path, monkeypatch):
    """Catches a resume that does not restore ``best_metric`` (``TrainState(..., best_metric, ...)`` in
    ``restore``): the first validation after the resume would then count as an improvement and overwrite
    ``best.pth`` with a worse model."""
    real_validate = train.validate
    scores = {0: 80.0, 1: 50.0}  # the model after epoch 0 is the best; the one after epoch 1 is worse

    def scripted_validate(run):
        return {**real_validate(run), "score": scores[run.state.epoch]}

    monkeypatch.setattr(train, "validate", scripted_validate)
    out = tmp_path / "run"
    assert fit(make_config(data, out, max_steps=4))["best_metric"] == 80.0  # epoch 0 (4 steps), validated, stop
    first = load_checkpoint(out / "best.pth")
    assert (first["step"], first["best_metric"]) == (4, 80.0)
    assert load_checkpoint(out / "last.pth")["best_metric"] == 80.0
    result = fit(make_config(data, out), resume=True)  # epoch 1: validated at 50, worse
    assert (result["step"], result["best_metric"]) == (8, 80.0)
    best, last = load_checkpoint(out / "best.pth"), load_checkpoint(out / "last.pth")
    assert (best["step"], best["best_metric"]) == (4, 80.0), "best.pth was replaced by the worse model of step 8"
    assert all(torch.equal(v, first["model"][k]) for k, v in best["model"].items())
    assert (last["step"], last["best_metric"], last["metrics"]["score"]) == (8, 80.0, 50.0)


def test_resume_without_checkpoint_is_a_user_error(data, tmp_path, capsys):
    cfg = write_config(make_config(data, tmp_path / "empty"), tmp_path / "cfg.yaml")
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_sampler_shards_cover_the_single_process_batches_and_skip_on_resume():
    single = ResumableSampler(10, batch_size=4, seed=3)
    ranks = [ResumableSampler(10, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(1)
    order = list(single)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    shards = [list(r) for r in ranks]
    # global batch k of one process == union of batch k of each rank (wrap-around pads 10 to 10: no padding here)
    for k in range(3):
        assert sorted(order[4 * k : 4 * k + 4]) == sorted(shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2])
    assert single.batches_per_epoch() == 3 and ranks[0].batches_per_epoch() == 3
    single.set_epoch(1, start_batch=2)
    assert list(single) == order[8:] and len(single) == 2
    single.set_epoch(2)
    assert list(single) != order  # a new permutation each epoch
    odd = [list(ResumableSampler(5, 1, 0, rank=r, world_size=2)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 3 and set(odd[0] + odd[1]) == set(range(5))  # padded by wrap-around
