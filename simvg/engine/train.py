"""The training loop: ``fit(cfg)`` for one process or many (torchrun + DistributedDataParallel).

The recipe is the official one (docs/design.md O4): Adam(amsgrad) with the encoder at lr/10, warm-up + step
decay, gradient clipping 0.15, optional EMA, validation every epoch, ``best.pth`` by the validation score kept
apart from ``last.pth``. Additions: autocast (bf16/fp16 on CUDA), opt-in ``torch.compile``, checkpoints every K
steps, exact resume at a step boundary, and a clear stop on a non-finite loss.

Crash safety: every file is written atomically, and at an epoch end ``best.pth`` is written before ``last.pth``, so
a crash between the two leaves ``last.pth`` at the previous checkpoint and the resumed run re-does the epoch and
writes ``best.pth`` again (the other order could lose ``best.pth`` for good). On resume, ``metrics.jsonl`` loses
the records of the steps after the checkpoint, which the resumed run logs again. Paths of the config (data root,
tokenizer, starting weights) are stored absolute, so the run's checkpoints work from any folder.

Exact resume: the sample order of an epoch is a permutation drawn from (seed, epoch) and sharded over ranks the
way ``DistributedSampler`` does it, and the dataset draws expressions and augmentation from (seed, epoch, index);
a resumed run skips the batches already trained and restores every RNG, so it sees the same batches as an
uninterrupted one. The same global batch split over K processes gives the same update as one process, except
with DWBD's dynamic weight: like the official code, ``w`` is the mean over each process's own batch, so K processes
weight the distillation per shard (docs/design.md B6).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from simvg.artifact import read_weights
from simvg.config import Config, DataConfig, dump_config, model_settings, to_dict
from simvg.data.collate import collate
from simvg.data.datasets import (
    ShardSampler,
    build_dataset,
    build_tokenizer,
    dataset_task,
    resolve_paths,
    tokenizer_path,
)
from simvg.engine.ema import ModelEma
from simvg.engine.evaluate import evaluate
from simvg.engine.optim import MultiStepLRWarmUp, build_optimizer
from simvg.errors import UserError
from simvg.losses import SimVGLoss
from simvg.models import SimVG
from simvg.utils import dist
from simvg.utils.amp import autocast
from simvg.utils.checkpoint import (
    atomic_write,
    atomic_write_bytes,
    load_checkpoint,
    load_model_state,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from simvg.utils.logging import (
    Averages,
    MetricsWriter,
    format_duration,
    get_logger,
    plain_float,
    read_metrics,
    setup_logging,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message lists every loss term."""


class ResumableSampler(Sampler[int]):
    """Epoch permutation from (seed, epoch), padded by wrap-around to a multiple of the world size and sharded
    as ``rank::world`` (``DistributedSampler``'s layout, so K ranks x batch b cover the same samples as one process
    with batch K*b); ``set_epoch(epoch, start_batch)`` skips batches already trained (resume)."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        pad = (-self.length) % self.world_size
        order = np.concatenate([order, order[:pad]])
        return order[self.rank :: self.world_size].tolist()

    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.length / self.world_size) / self.batch_size)

    def __iter__(self):
        return iter(self.shard()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.length / self.world_size) - self.start_batch * self.batch_size)


@dataclass
class TrainState:
    """Where the run is: ``epoch`` (0-based, current), batches of it done, optimisation steps done, best score."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything one training process holds (plain container; the logic is in the free functions below)."""

    cfg: Config
    info: dist.DistInfo
    out_dir: Path
    model: SimVG  # the bare module (what is saved)
    net: nn.Module  # what is called in training: model, possibly compiled and/or DDP-wrapped
    loss_fn: SimVGLoss
    optimizer: torch.optim.Optimizer
    scheduler: MultiStepLRWarmUp
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    task: str
    train_loader: DataLoader
    val_loaders: dict[str, DataLoader]
    writer: MetricsWriter
    state: TrainState = field(default_factory=TrainState)
    t_start: float = field(default_factory=time.time)
    steps_this_session: int = 0


# ----------------------------------------------------------------------------------------------------------------
# set-up


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, with_weights: bool = True, allow_pickle: bool = False) -> SimVG:
    """The model of ``cfg.model`` (on CPU); with ``with_weights`` also BEiT-3 weights and ``init_from``.

    ``allow_pickle`` lets a BEiT-3 file that needs full unpickling load (``simvg train --allow-pickle``; trusted
    files only)."""
    model = SimVG(model_settings(cfg.model))
    if not with_weights:
        return model
    log = get_logger()
    if cfg.model.pretrained:
        from simvg.models.beit3 import load_beit3_pretrained

        log.info(
            "BEiT-3 weights from %s: %s",
            cfg.model.pretrained,
            load_beit3_pretrained(model.encoder, cfg.model.pretrained, allow_pickle=allow_pickle),
        )
    if cfg.model.init_from:
        init_weights(model, cfg.model.init_from, cfg.model.init_use_ema, cfg.data, cfg.model.init_reset)
    return model


def tokenizer_mismatch(source: Path | None, data: DataConfig) -> str | None:
    """``source`` (the tokenizer a checkpoint's run read) when it is a file that differs from ``data``'s, else None.

    Every SynthRef folder trains its own tokenizer, so a stage that moves to another folder must keep the first
    stage's (``data.tokenizer``); otherwise word ids change and the learned text embeddings mean nothing.
    """
    ours = tokenizer_path(data)
    if source is None or not (source.is_file() and ours.is_file()) or source.resolve() == ours.resolve():
        return None
    return None if source.read_bytes() == ours.read_bytes() else str(source)


def init_weights(
    model: nn.Module, path: str, use_ema: bool, data: DataConfig | None = None, reset: Sequence[str] = ()
) -> None:
    """Stage 2 / fine-tuning start: a checked partial load of any model file ``simvg.artifact`` reads (a run's
    checkpoint, a model folder, an official SimVG file: the authors' pre-train -> fine-tune flow); missing keys are
    reported.

    With ``data``, a warning names the checkpoint's tokenizer when this run reads a different one. Keys starting
    with a prefix in ``reset`` are not loaded (they keep this model's initialisation); a prefix that matches no
    key of the model is an error, so that a typo cannot silently load everything.
    """
    read = read_weights(path, weights="ema" if use_ema else "raw")
    log = get_logger()
    for notice in read.notices:
        log.info("init_from %s", notice)
    other = tokenizer_mismatch(read.tokenizer, data) if data is not None else None
    if other:
        log.warning(
            "init_from %s was trained with tokenizer %s, this run reads %s (other word ids): set data.tokenizer=%s",
            path, other, tokenizer_path(data), other,
        )  # fmt: skip
    state, dropped = without_prefixes(read.state, model, reset)
    hint = " (to start it fresh instead: --set model.init_reset=[{key}])"
    missing, unexpected = load_model_state(model, state, strict=False, source=path, mismatch_hint=hint)
    if len(missing) == len(model.state_dict()):
        raise UserError(f"{path}: no key of this checkpoint matches the model (is it a simvg checkpoint?)")
    log.info("initialised from %s (%s weights): %d keys loaded", path, read.spec.weights, len(state) - len(unexpected))
    if dropped:
        log.info("init_from %s: %d keys keep their fresh initialisation (model.init_reset): %s", path, len(dropped),
                 ", ".join(dropped[:10]))  # fmt: skip
    missing = sorted(set(missing) - set(dropped))
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            log.warning("init_from %s: %d %s keys: %s", path, len(keys), label, ", ".join(keys[:10]))


def without_prefixes(
    state: dict[str, torch.Tensor], model: nn.Module, prefixes: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(``state`` without the keys under ``prefixes``, the model's keys under them); ``UserError`` for a prefix
    that names no key of the model."""
    own = list(model.state_dict())
    for prefix in prefixes:
        if not any(_under(key, prefix) for key in own):
            raise UserError(f"model.init_reset: {prefix!r} names no weight of this model (e.g. tqg.query_embed)")
    dropped = [key for key in own if any(_under(key, p) for p in prefixes)]
    kept = {key: value for key, value in state.items() if not any(_under(key, p) for p in prefixes)}
    return kept, dropped


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix.rstrip(".") + ".")


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], num_workers: int) -> DataLoader:
    # A fixed generator keeps the loader from drawing its worker base seed from the global RNG, which would shift
    # the dropout stream of a resumed run; the dataset seeds its own draws from (seed, epoch, index).
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        drop_last=False, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def build_loaders(cfg: Config, info: dist.DistInfo) -> tuple[str, DataLoader, dict[str, DataLoader]]:
    """(task, train loader, {val split: loader}); eval shards are unpadded so every sample counts once."""
    tokenizer = build_tokenizer(cfg.data)
    check_vocab(model_settings(cfg.model).encoder.vocab_size, tokenizer)
    spec, _, _ = resolve_paths(cfg.data)
    task = dataset_task(spec, Path(cfg.data.root))
    seed = cfg.train.seed
    train_set = build_dataset(cfg.data, cfg.data.train_split, True, tokenizer, seed=seed)
    sampler = ResumableSampler(len(train_set), cfg.train.batch_size, seed, info.rank, info.world_size)
    train_loader = make_loader(train_set, cfg.train.batch_size, sampler, cfg.data.num_workers)
    val_loaders = {}
    for split in cfg.data.val_splits:
        val_loaders[split] = eval_loader(cfg, build_dataset(cfg.data, split, False, tokenizer, seed=seed), info)
    return task, train_loader, val_loaders


def check_vocab(rows: int, tokenizer: Any) -> None:
    """The text embedding (``rows`` ids) must have a row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{tokenizer.path}: {tokenizer.vocab_size} token ids but the model's text embedding has {rows} rows; "
            f"set model.overrides.encoder.vocab_size to at least {tokenizer.vocab_size}"
        )


def eval_loader(cfg: Config, dataset: Dataset, info: dist.DistInfo) -> DataLoader:
    """An unpadded, sharded loader over ``dataset`` (its first ``eval.max_samples`` items when set)."""
    if cfg.eval.max_samples and cfg.eval.max_samples < len(dataset):
        dataset = Subset(dataset, range(cfg.eval.max_samples))
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return make_loader(dataset, cfg.eval.batch_size, sampler, cfg.data.num_workers)


def wrap_for_training(model: SimVG, cfg: Config, info: dist.DistInfo) -> nn.Module:
    net: nn.Module = model
    if info.world_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # Some parameters never receive gradients: BEiT-3's mask token (kept for checkpoint compatibility) and, in
        # decoder-only stages, the token branch; DDP must be told, or it waits for them forever.
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=True)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def absolute_paths(cfg: Config) -> None:
    """Make the config's input paths absolute (data root and tokenizer, starting weights) so that the stored config
    works from any folder (``simvg eval`` of the run elsewhere)."""
    cfg.data.root = str(Path(cfg.data.root).absolute())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).absolute())
    for name in ("pretrained", "init_from"):
        value = getattr(cfg.model, name)
        if value:
            setattr(cfg.model, name, str(Path(value).absolute()))


def setup_run(cfg: Config, resume: bool, allow_pickle: bool = False) -> Run:
    """Build everything for ``fit``: process group, output folder, data, model, optimiser, and resume state."""
    info = dist.init_distributed(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    absolute_paths(cfg)
    out_dir = Path(cfg.train.output_dir)
    check_output_dir(out_dir, resume)
    setup_logging(info.rank, out_dir / "train.log")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.train.seed)  # same initial weights on every rank
    task, train_loader, val_loaders = build_loaders(cfg, info)
    model = build_model(cfg, with_weights=not resume, allow_pickle=allow_pickle).to(info.device)
    loss_fn = SimVGLoss(cfg.loss).to(info.device)
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.encoder_lr_scale, t.betas, t.eps, t.weight_decay, t.amsgrad)
    scheduler = MultiStepLRWarmUp(optimizer, t.warmup, t.milestones, t.gamma)
    scaler = torch.amp.GradScaler(info.device.type, enabled=info.device.type == "cuda" and t.amp == "fp16")
    ema = ModelEma(model, t.ema_decay) if t.ema else None
    net = wrap_for_training(model, cfg, info)
    writer = MetricsWriter(out_dir / "metrics.jsonl" if info.is_main else None)
    run = Run(cfg, info, out_dir, model, net, loss_fn, optimizer, scheduler, scaler, ema, task, train_loader,
              val_loaders, writer)  # fmt: skip
    if resume:
        restore(run, resume_point(out_dir))
        if info.is_main:
            rewind_metrics(run)
            restore_best(run)
        dist.barrier()
    if not resume:
        seed_everything(cfg.train.seed + info.rank)  # ranks draw different dropout masks
    return run


def resume_point(out_dir: Path) -> Path:
    """``last.pth``; ``best.pth`` when a crash came between writing ``best.pth`` and the first ``last.pth``."""
    last, best = out_dir / "last.pth", out_dir / "best.pth"
    if last.is_file() or not best.is_file():
        return last
    get_logger().warning("%s is missing: resuming from %s (written just before it)", last, best)
    return best


def check_output_dir(out_dir: Path, resume: bool) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict (see ``simvg.utils.checkpoint.CHECKPOINT_KEYS``); every rank must call it (RNG gather)."""
    rngs = dist.all_gather_object(rng_state())
    s = run.state
    return {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": s.epoch, "epoch_step": s.epoch_step, "step": s.step, "rng": rngs,
        "config": to_dict(run.cfg), "metrics": dict(s.metrics), "best_metric": s.best_metric,
    }  # fmt: skip


def save(run: Run, names: tuple[str, ...] = ("last.pth",)) -> None:
    """Write the checkpoint under each of ``names``, in order (``last.pth`` last: see the module docstring)."""
    state = checkpoint_state(run)
    if run.info.is_main:
        for name in names:
            save_checkpoint(run.out_dir / name, state)
    dist.barrier()


def restore(run: Run, path: Path) -> None:
    """Resume from ``path``: weights, optimiser, scheduler, scaler, EMA, counters and this rank's RNG."""
    obj = load_checkpoint(path)
    load_model_state(run.model, obj["model"], strict=True, source=str(path))
    run.optimizer.load_state_dict(obj["optimizer"])
    run.scheduler.load_state_dict(obj["scheduler"])
    if obj.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(obj["scaler"])
    if run.ema is not None:
        if obj.get("ema"):
            run.ema.load_state_dict(obj["ema"])
        else:
            run.ema = ModelEma(run.model, run.cfg.train.ema_decay)
    run.state = TrainState(
        obj["epoch"], obj["epoch_step"], obj["step"], obj.get("best_metric"), obj.get("metrics") or {}
    )
    rngs = obj.get("rng") or []
    if len(rngs) == run.info.world_size:
        set_rng_state(rngs[run.info.rank])
    else:
        get_logger().warning(
            "%s was written by %d processes, now %d: RNG streams restart", path, len(rngs), run.info.world_size
        )
        seed_everything(run.cfg.train.seed + 1000 * run.info.rank + run.state.step)
    changed = config_changes(obj.get("config", {}), to_dict(run.cfg))
    get_logger().info("resumed %s at epoch %d, batch %d, step %d%s", path, run.state.epoch, run.state.epoch_step,
                      run.state.step, f" (config changed: {', '.join(changed)})" if changed else "")  # fmt: skip


def recorded_before(record: dict[str, Any], state: TrainState) -> bool:
    """Whether a ``metrics.jsonl`` record was written before the checkpoint ``state`` came from: records of later
    steps, and the epoch-end records of an epoch the checkpoint has not ended yet, are re-done by a resumed run."""
    step = record.get("step")
    if not isinstance(step, int) or step < state.step:
        return True
    if step > state.step:
        return False
    if record.get("event") in ("epoch", "val"):
        return isinstance(record.get("epoch"), int) and record["epoch"] < state.epoch
    return True


def rewind_metrics(run: Run) -> None:
    """Drop the records a resumed run writes again (steps after its checkpoint) from ``metrics.jsonl``."""
    path = run.writer.path
    if path is None or not path.is_file():
        return
    records = read_metrics(path)
    kept = [r for r in records if recorded_before(r, run.state)]
    if len(kept) < len(records):
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")))
        get_logger().info("metrics.jsonl: %d records after step %d dropped (re-done by this run)",
                          len(records) - len(kept), run.state.step)  # fmt: skip


def restore_best(run: Run) -> None:
    """Re-create ``best.pth`` when ``last.pth`` is the best model itself but ``best.pth`` is missing (a run of an
    older version killed between the two writes): that is the case when the last validation record is of the
    checkpoint's own step and scored ``best_metric``."""
    best, last = run.out_dir / "best.pth", run.out_dir / "last.pth"
    s = run.state
    if best.is_file() or s.best_metric is None or s.epoch_step != 0 or run.writer.path is None:
        return
    vals = [r for r in read_metrics(run.writer.path) if r.get("event") == "val"] if run.writer.path.is_file() else []
    if vals and vals[-1].get("step") == s.step and vals[-1].get("score") == plain_float(s.best_metric):
        with last.open("rb") as src:
            atomic_write(best, lambda f: shutil.copyfileobj(src, f))
        get_logger().warning("%s was missing; re-created from %s (the best model, step %d)", best, last, s.step)
    else:
        get_logger().warning("%s is missing although %s records a best score of %s: it is written again at the "
                             "next improvement", best, last, s.best_metric)  # fmt: skip


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ----------------------------------------------------------------------------------------------------------------
# steps and epochs


def train_step(run: Run, batch: Any) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss terms (this rank) and the learning rate."""
    cfg, device = run.cfg.train, run.info.device
    batch = batch.to(device)
    with autocast(device, cfg.amp):
        outputs = run.net(batch.images, batch.text_ids, batch.text_pad_mask, branch=run.loss_fn.required_branch)
        losses = run.loss_fn(outputs, batch.targets)
    check_finite(run, losses)
    lr = run.optimizer.param_groups[-1]["lr"]  # the head's rate used by this step
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses["loss"]).backward()
    if cfg.clip_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if cfg.schedule_unit == "step":
        run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    run.state.step += 1
    run.state.epoch_step += 1
    run.steps_this_session += 1
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["lr"] = lr
    return values


def check_finite(run: Run, losses: dict[str, torch.Tensor]) -> None:
    """Stop every rank together when any rank's loss is not finite (a lone rank stopping would hang DDP)."""
    bad = torch.tensor(0.0 if torch.isfinite(losses["loss"].detach()).item() else 1.0, device=run.info.device)
    if dist.all_reduce_sum(bad).item() > 0:
        terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {run.state.epoch} step {run.state.step + 1} ({terms}); "
            f"last good checkpoint: {run.out_dir / 'last.pth'}"
        )


def total_steps(run: Run) -> int:
    per_epoch = run.train_loader.sampler.batches_per_epoch()
    full = run.cfg.train.epochs * per_epoch
    return min(full, run.cfg.train.max_steps) if run.cfg.train.max_steps else full


def eta(run: Run) -> str:
    """Time left for the whole run, from this session's mean step time."""
    if not run.steps_this_session:
        return "?"
    per_step = (time.time() - run.t_start) / run.steps_this_session
    return format_duration(per_step * max(0, total_steps(run) - run.state.step))


def reached_max_steps(run: Run) -> bool:
    return bool(run.cfg.train.max_steps) and run.state.step >= run.cfg.train.max_steps


def train_one_epoch(run: Run) -> dict[str, float]:
    """Train the rest of ``run.state.epoch`` (all of it unless resuming mid-epoch); returns mean loss terms."""
    cfg, state = run.cfg.train, run.state
    sampler = run.train_loader.sampler
    sampler.set_epoch(state.epoch, start_batch=state.epoch_step)
    run.train_loader.dataset.set_epoch(state.epoch)
    epoch_avg, log_avg = Averages(), Averages()
    bar = tqdm(total=sampler.batches_per_epoch(), initial=state.epoch_step, desc=f"epoch {state.epoch}",
               disable=None if run.info.is_main else True, dynamic_ncols=True, leave=False)  # fmt: skip
    for batch in run.train_loader:
        values = train_step(run, batch)
        epoch_avg.update(values)
        log_avg.update(values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", eta=eta(run))
        if state.step % cfg.log_every_steps == 0:
            log_train(run, log_avg.means())
            log_avg.reset()
        if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
            save(run)
        if reached_max_steps(run):
            break
    bar.close()
    return dist.reduce_dict(epoch_avg.means(), run.info.device) if epoch_avg.count else {}


def log_train(run: Run, means: dict[str, float]) -> None:
    means = dist.reduce_dict(means, run.info.device)
    run.writer.write("train", epoch=run.state.epoch, step=run.state.step, **means)
    terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k not in ("lr", "loss"))
    get_logger().info("epoch %d step %d loss %.4f lr %.2e %s eta %s", run.state.epoch, run.state.step,
                      means.get("loss", float("nan")), means.get("lr", 0.0), terms, eta(run))  # fmt: skip


def eval_branch(run: Run) -> str:
    """Evaluate what the loss trains: a decoder-only stage must not report the untrained token branch."""
    trained = run.loss_fn.required_branch
    return run.cfg.eval.branch if trained == "both" else trained


def validate(run: Run) -> dict[str, float]:
    """Evaluate the (EMA, when enabled) model on every validation split.

    ``score`` (what selects ``best.pth``) is the mean over splits of each split's mean over branches of the primary
    metric (Acc@0.5 or Pr@F1=1), as the official ``det_best`` criterion.
    """
    model = run.ema.module if run.ema is not None else run.model
    e = run.cfg.eval
    metrics: dict[str, float] = {}
    for split, loader in run.val_loaders.items():
        result = evaluate(model, loader, run.info.device, run.task, eval_branch(run), iou_threshold=e.iou_threshold,
                          score_threshold=e.score_threshold, match_threshold=e.match_threshold,
                          match_metric=e.match_metric, amp=run.cfg.train.amp)  # fmt: skip
        metrics.update({f"{split}/{k}": v for k, v in result.items()})
    metrics["score"] = sum(metrics[f"{split}/score"] for split in run.val_loaders) / len(run.val_loaders)
    shown = " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "/num_" not in k)
    get_logger().info("validation after epoch %d: %s", run.state.epoch, shown)
    return metrics


def should_validate(run: Run, epoch: int) -> bool:
    t = run.cfg.train
    last = epoch + 1 == t.epochs
    return bool(run.val_loaders) and epoch >= t.eval_start_epoch and ((epoch + 1) % t.eval_every_epochs == 0 or last)


def end_epoch(run: Run, train_means: dict[str, float]) -> None:
    """Schedule step, validation, ``last.pth`` and (when the score improved) ``best.pth``."""
    epoch = run.state.epoch
    if run.cfg.train.schedule_unit == "epoch":
        run.scheduler.step()
    run.writer.write("epoch", epoch=epoch, step=run.state.step, **train_means)
    names = ("last.pth",)
    if should_validate(run, epoch):
        metrics = validate(run)
        run.state.metrics = metrics
        run.writer.write("val", epoch=epoch, step=run.state.step, **metrics)
        if run.state.best_metric is None or metrics["score"] > run.state.best_metric:
            run.state.best_metric = metrics["score"]
            names = ("best.pth", "last.pth")  # best first: a crash between the two must not lose best.pth
    run.state.epoch, run.state.epoch_step = epoch + 1, 0
    save(run, names)


def fit(cfg: Config, resume: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (in this process's share under torchrun); returns the final state and metrics.

    ``allow_pickle`` lets a BEiT-3 ``model.pretrained`` file that needs full unpickling load (trusted files only).
    """
    run = setup_run(cfg, resume, allow_pickle)
    log = get_logger()
    if run.info.is_main:
        atomic_write_bytes(dump_config(cfg).encode("utf-8"), run.out_dir / "config.yaml")
        log.info("run %s (config: %s)", run.out_dir, run.out_dir / "config.yaml")
    log.info("task %s, %d processes on %s, %d train samples, %d steps per epoch, %d steps in all",
             run.task, run.info.world_size, run.info.device, len(run.train_loader.dataset),
             run.train_loader.sampler.batches_per_epoch(), total_steps(run))  # fmt: skip
    run.writer.write("start", step=run.state.step, epoch=run.state.epoch, resume=resume, world_size=run.info.world_size)
    while run.state.epoch < cfg.train.epochs and not reached_max_steps(run):
        means = train_one_epoch(run)
        if reached_max_steps(run) and run.state.epoch_step < run.train_loader.sampler.batches_per_epoch():
            save(run)  # stopped mid-epoch: a step-boundary checkpoint to resume from
            break
        end_epoch(run, means)
    run.writer.write("end", step=run.state.step, epoch=run.state.epoch, best_metric=run.state.best_metric)
    log.info("done: step %d, best score %s, time %s", run.state.step, run.state.best_metric,
             format_duration(time.time() - run.t_start))  # fmt: skip
    return {"step": run.state.step, "epoch": run.state.epoch, "best_metric": run.state.best_metric,
            "metrics": run.state.metrics, "model": run.model}  # fmt: skip
