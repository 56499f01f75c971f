"""Checkpoints: atomic writes, weights_only loads, prefix cleaning, checked partial loads, RNG round trip, export."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from simvg.engine.ema import ModelEma
from simvg.engine.optim import MultiStepLRWarmUp, build_optimizer, lr_factor
from simvg.errors import UserError
from simvg.utils.checkpoint import (
    atomic_torch_save,
    clean_state_dict,
    load_checkpoint,
    load_model_state,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)


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
    """A SIGKILL between writing the temporary file and the rename leaves the old file intact."""
    path = tmp_path / "last.pth"
    code = (
        "import sys, torch\n"
        "from simvg.utils.checkpoint import atomic_torch_save\n"
        "atomic_torch_save({'v': torch.tensor(1)}, sys.argv[1])\n"
        "atomic_torch_save({'v': torch.tensor(2)}, sys.argv[1])\n"
    )
    env = {**os.environ, "SIMVG_FAULT_KILL_DURING_SAVE": "2"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9
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
