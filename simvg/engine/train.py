"""The training loop: ``fit(cfg)`` for one process or many (torchrun + DistributedDataParallel).

The recipe is the official one (docs/design.md O4): Adam(amsgrad) with the encoder at lr/10, warm-up + step
decay, gradient clipping 0.15, optional EMA, validation every epoch, ``best.pth`` by the validation score kept
apart from ``last.pth``. Additions: autocast (bf16/fp16 on CUDA), opt-in ``torch.compile``, checkpoints every K
steps, exact resume at a step boundary, and a clear stop on a non-finite loss.

Read it as DETR's ``main`` and ``train_one_epoch``: ``fit`` sets up (``setup``), resumes (``resume_run``), then runs
the epochs (``train_one_epoch``: forward, loss with DWBD, backward, clipping, optimiser and schedule steps, EMA,
logging, periodic checkpoints, ``max_steps``), each ended by the schedule step, validation and the checkpoints.
Where the pieces live: the loaders in ``simvg.data.loaders``, the model and its starting weights in
``simvg.artifact``, the checkpoint's content in ``simvg.utils.checkpoint`` and the run folder (crash-safe order of
``best.pth`` and ``last.pth``, what a resume repairs) in ``simvg.utils.run_folder``. Paths of the config (data
root, tokenizer, starting weights) are stored absolute, so the run's checkpoints work from any folder.

Exact resume: the sampler and the dataset draw from (seed, epoch[, index]) (``simvg.data.loaders``), a resumed run
skips the batches already trained and restores every RNG, so it sees the same batches and draws the same dropout
masks as an uninterrupted one. The same global batch split over K processes gives the same update as one process,
except with DWBD's dynamic weight: like the official code, ``w`` is the mean over each process's own batch, so K
processes weight the distillation per shard (docs/design.md B6).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from simvg.artifact import build_model
from simvg.artifact import init_weights as init_weights  # re-exported: its home before simvg.artifact
from simvg.config import Config, TrainConfig, config_changes, dump_config, model_settings, to_dict
from simvg.data.datasets import build_tokenizer
from simvg.data.loaders import build_loaders
from simvg.data.loaders import make_loader as make_loader  # re-exported: its home before simvg.data.loaders
from simvg.data.tokenizer import check_vocab
from simvg.engine.ema import ModelEma
from simvg.engine.evaluate import evaluate
from simvg.engine.optim import MultiStepLRWarmUp, build_optimizer
from simvg.losses import SimVGLoss
from simvg.models import SimVG
from simvg.utils import dist
from simvg.utils.amp import autocast
from simvg.utils.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    restore_rng,
    restore_run,
    rng_state,
    run_checkpoint,
    save_checkpoint,
    seed_everything,
)
from simvg.utils.logging import Averages, Eta, MetricsWriter, format_duration, get_logger, setup_logging
from simvg.utils.run_folder import check_output_dir, restore_best, resume_point, rewind_metrics


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message lists every loss term."""


@dataclass
class TrainState:
    """Where the run is: ``epoch`` (0-based, current), batches of it done, optimisation steps done, best score and
    the latest validation metrics (what a checkpoint records beside the weights and the optimisation state)."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """One process's run as ``setup`` builds it: what a step updates and a checkpoint saves, what validation reads,
    and where the run stands (a plain container; the loop is ``train_one_epoch`` and ``fit``)."""

    cfg: Config
    info: dist.DistInfo
    model: SimVG  # the bare module (what is saved, what the EMA follows)
    net: nn.Module  # what a step calls: ``model``, possibly compiled and/or DDP-wrapped
    loss_fn: SimVGLoss
    optimizer: torch.optim.Optimizer
    scheduler: MultiStepLRWarmUp
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    task: str  # "rec" or "grec"
    val_loaders: dict[str, DataLoader]
    state: TrainState = field(default_factory=TrainState)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def fit(cfg: Config, resume: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (in this process's share under torchrun); returns the final state and metrics.

    ``allow_pickle`` lets a BEiT-3 ``model.pretrained`` file that needs full unpickling load (trusted files only).
    """
    run, train_loader = setup(cfg, resume, allow_pickle)
    t, info, out_dir, log = cfg.train, run.info, run.out_dir, get_logger()
    writer = MetricsWriter(out_dir / "metrics.jsonl" if info.is_main else None)
    if resume:
        resume_run(run, writer)
    else:
        seed_everything(t.seed + info.rank)  # ranks draw different dropout masks
    if info.is_main:
        atomic_write_bytes(dump_config(cfg).encode("utf-8"), out_dir / "config.yaml")
        log.info("run %s (config: %s)", out_dir, out_dir / "config.yaml")
    per_epoch = train_loader.sampler.batches_per_epoch()
    eta = Eta(min(t.epochs * per_epoch, t.max_steps) if t.max_steps else t.epochs * per_epoch)
    log.info("task %s, %d processes on %s, %d train samples, %d steps per epoch, %d steps in all", run.task,
             info.world_size, info.device, len(train_loader.dataset), per_epoch, eta.total)  # fmt: skip
    state = run.state
    writer.write("start", step=state.step, epoch=state.epoch, resume=resume, world_size=info.world_size)

    while state.epoch < t.epochs and not reached_max_steps(t, state.step):
        means = train_one_epoch(run, train_loader, writer, eta)
        if reached_max_steps(t, state.step) and state.epoch_step < per_epoch:
            save(run)  # stopped mid-epoch: a step-boundary checkpoint to resume from
            break
        # the epoch's end: schedule step, validation, last.pth and (when the score improved) best.pth
        epoch = state.epoch
        if t.schedule_unit == "epoch":
            run.scheduler.step()
        writer.write("epoch", epoch=epoch, step=state.step, **means)
        names = ("last.pth",)
        last_epoch = epoch + 1 == t.epochs
        if run.val_loaders and epoch >= t.eval_start_epoch and ((epoch + 1) % t.eval_every_epochs == 0 or last_epoch):
            state.metrics = validate(run)
            writer.write("val", epoch=epoch, step=state.step, **state.metrics)
            if state.best_metric is None or state.metrics["score"] > state.best_metric:
                state.best_metric = state.metrics["score"]
                names = ("best.pth", "last.pth")  # best first: a crash between the two must not lose best.pth
        state.epoch, state.epoch_step = epoch + 1, 0
        save(run, names)

    writer.write("end", step=state.step, epoch=state.epoch, best_metric=state.best_metric)
    log.info("done: step %d, best score %s, time %s", state.step, state.best_metric,
             format_duration(time.time() - eta.start))  # fmt: skip
    return {"step": state.step, "epoch": state.epoch, "best_metric": state.best_metric, "metrics": state.metrics,
            "model": run.model}  # fmt: skip


def train_one_epoch(run: Run, loader: DataLoader, writer: MetricsWriter, eta: Eta) -> dict[str, float]:
    """Train the rest of ``run.state.epoch`` (all of it unless resuming mid-epoch; up to ``train.max_steps``);
    returns the epoch's mean loss terms and learning rate (means over the ranks)."""
    t, state, device = run.cfg.train, run.state, run.info.device
    loader.sampler.set_epoch(state.epoch, start_batch=state.epoch_step)  # skips the batches already trained
    loader.dataset.set_epoch(state.epoch)  # the epoch's expression draws and augmentation
    epoch_avg, log_avg = Averages(), Averages()
    bar = tqdm(total=loader.sampler.batches_per_epoch(), initial=state.epoch_step, desc=f"epoch {state.epoch}",
               disable=None if run.info.is_main else True, dynamic_ncols=True, leave=False)  # fmt: skip
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, t.amp):
            outputs = run.net(batch.images, batch.text_ids, batch.text_pad_mask, branch=run.loss_fn.required_branch)
            losses = run.loss_fn(outputs, batch.targets)  # both branches' terms, weighted by DWBD's w
        check_finite(run, losses)
        lr = run.optimizer.param_groups[-1]["lr"]  # the head's rate used by this step
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(losses["loss"]).backward()
        if t.clip_grad_norm > 0:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if t.schedule_unit == "step":
            run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.model)
        state.step += 1
        state.epoch_step += 1
        eta.tick()

        values = {k: float(v.detach()) for k, v in losses.items()} | {"lr": lr}  # this rank's
        epoch_avg.update(values)
        log_avg.update(values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", eta=eta.left(state.step))
        if state.step % t.log_every_steps == 0:
            means = dist.reduce_dict(log_avg.means(), device)
            log_avg.reset()
            writer.write("train", epoch=state.epoch, step=state.step, **means)
            terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k not in ("lr", "loss"))
            loss, rate = means.get("loss", float("nan")), means.get("lr", 0.0)
            get_logger().info("epoch %d step %d loss %.4f lr %.2e %s eta %s", state.epoch, state.step, loss, rate,
                              terms, eta.left(state.step))  # fmt: skip
        if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
            save(run)
        if reached_max_steps(t, state.step):
            break
    bar.close()
    return dist.reduce_dict(epoch_avg.means(), device) if epoch_avg.count else {}


def validate(run: Run) -> dict[str, float]:
    """Evaluate the (EMA, when enabled) model on every validation split.

    ``score`` (what selects ``best.pth``) is the mean over splits of each split's mean over branches of the primary
    metric (Acc@0.5 or Pr@F1=1), as the official ``det_best`` criterion. A decoder-only stage evaluates the decoder
    only (its token branch is untrained).
    """
    model = run.ema.module if run.ema is not None else run.model
    trained = run.loss_fn.required_branch
    branch = run.cfg.eval.branch if trained == "both" else trained
    e = run.cfg.eval
    metrics: dict[str, float] = {}
    for split, loader in run.val_loaders.items():
        result = evaluate(model, loader, run.info.device, run.task, branch, iou_threshold=e.iou_threshold,
                          score_threshold=e.score_threshold, match_threshold=e.match_threshold,
                          match_metric=e.match_metric, amp=run.cfg.train.amp)  # fmt: skip
        metrics.update({f"{split}/{k}": v for k, v in result.items()})
    metrics["score"] = sum(metrics[f"{split}/score"] for split in run.val_loaders) / len(run.val_loaders)
    shown = " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "/num_" not in k)
    get_logger().info("validation after epoch %d: %s", run.state.epoch, shown)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# set-up, resume, checkpoints


def setup(cfg: Config, resume: bool, allow_pickle: bool) -> tuple[Run, DataLoader]:
    """This process's run and train loader: process group, output folder and log, data, model (with its starting
    weights unless resuming), loss and optimisation."""
    t = cfg.train
    info = dist.init_distributed(t.device)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    absolute_paths(cfg)
    check_output_dir(Path(t.output_dir), resume)
    setup_logging(info.rank, Path(t.output_dir) / "train.log")
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(t.seed)  # same initial weights on every rank
    tokenizer = build_tokenizer(cfg.data)
    check_vocab(model_settings(cfg.model).encoder.vocab_size, tokenizer)
    task, train_loader, val_loaders = build_loaders(cfg, tokenizer, info)
    model = build_model(cfg.model, cfg.data, with_weights=not resume, allow_pickle=allow_pickle).to(info.device)
    loss_fn = SimVGLoss(cfg.loss).to(info.device)
    optimizer = build_optimizer(model, t.lr, t.encoder_lr_scale, t.betas, t.eps, t.weight_decay, t.amsgrad)
    scheduler = MultiStepLRWarmUp(optimizer, t.warmup, t.milestones, t.gamma)
    scaler = torch.amp.GradScaler(info.device.type, enabled=info.device.type == "cuda" and t.amp == "fp16")
    ema = ModelEma(model, t.ema_decay) if t.ema else None
    net = wrap_for_training(model, cfg, info)
    run = Run(cfg, info, model, net, loss_fn, optimizer, scheduler, scaler, ema, task, val_loaders)
    return run, train_loader


def wrap_for_training(model: SimVG, cfg: Config, info: dist.DistInfo) -> nn.Module:
    """``model`` as a step calls it: DDP-wrapped under torchrun, compiled with ``train.compile``."""
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


def resume_run(run: Run, writer: MetricsWriter) -> None:
    """Continue from the run folder's checkpoint: weights, optimiser, scheduler, scaler, EMA, counters and this
    rank's RNG; on the main process ``metrics.jsonl`` is rewound to it and a lost ``best.pth`` re-created."""
    path, info, log = resume_point(run.out_dir), run.info, get_logger()
    obj = load_checkpoint(path)
    restore_run(obj, run.model, run.optimizer, run.scheduler, run.scaler, run.ema, str(path))
    if run.ema is not None and not obj.get("ema"):
        run.ema = ModelEma(run.model, run.cfg.train.ema_decay)  # the checkpoint has none: start from its weights
    s = run.state = TrainState(
        obj["epoch"], obj["epoch_step"], obj["step"], obj.get("best_metric"), obj.get("metrics") or {}
    )
    rngs = obj.get("rng") or []
    if not restore_rng(rngs, info.rank, info.world_size):
        log.warning("%s was written by %d processes, now %d: RNG streams restart", path, len(rngs), info.world_size)
        seed_everything(run.cfg.train.seed + 1000 * info.rank + s.step)
    changed = config_changes(obj.get("config", {}), to_dict(run.cfg))
    log.info("resumed %s at epoch %d, batch %d, step %d%s", path, s.epoch, s.epoch_step, s.step,
             f" (config changed: {', '.join(changed)})" if changed else "")  # fmt: skip
    if info.is_main:
        rewind_metrics(writer.path, s.step, s.epoch)
        restore_best(run.out_dir, writer.path, s.step, s.epoch_step, s.best_metric)
    dist.barrier()


def save(run: Run, names: tuple[str, ...] = ("last.pth",)) -> None:
    """Write the checkpoint under each of ``names``, in order (``best.pth`` before ``last.pth``: see
    ``simvg.utils.run_folder``); every rank must call it (the RNG states of all ranks are gathered)."""
    rngs = dist.all_gather_object(rng_state())
    state = run_checkpoint(run.model, run.optimizer, run.scheduler, run.scaler, run.ema, asdict(run.state),
                           to_dict(run.cfg), rngs)  # fmt: skip
    if run.info.is_main:
        for name in names:
            save_checkpoint(run.out_dir / name, state)
    dist.barrier()


def check_finite(run: Run, losses: dict[str, torch.Tensor]) -> None:
    """Stop every rank together when any rank's loss is not finite (a lone rank stopping would hang DDP)."""
    bad = torch.tensor(0.0 if torch.isfinite(losses["loss"].detach()).item() else 1.0, device=run.info.device)
    if dist.all_reduce_sum(bad).item() > 0:
        terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {run.state.epoch} step {run.state.step + 1} ({terms}); "
            f"last good checkpoint: {run.out_dir / 'last.pth'}"
        )


def reached_max_steps(t: TrainConfig, step: int) -> bool:
    return bool(t.max_steps) and step >= t.max_steps
