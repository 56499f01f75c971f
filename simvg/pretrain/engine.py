"""``simvg pretrain``: the encoder pre-training loop, in one function that reads top to bottom (``pretrain``).

Same conventions as ``simvg train``: a YAML config with ``--set``, one process or ``torchrun`` (DDP), atomic
checkpoints every ``checkpoint_every_steps`` (``last.pth``: model, optimiser, scheduler, step, RNG), exact
``--resume``, ``metrics.jsonl`` (``simvg plot`` draws it) and a log file. Each checkpoint also writes ``beit3.pth``:
the encoder alone in the official BEiT-3 layout (``{"model": {"beit3.<name>": tensor}}``), which ``model.pretrained``
of a ``simvg train`` config loads through the same loader as Microsoft's BEiT-3 files.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from simvg.config import config_changes, dump_config, to_dict
from simvg.data.tokenizer import BEiT3Tokenizer
from simvg.engine.optim import MultiStepLRWarmUp
from simvg.errors import UserError
from simvg.models.beit3 import load_beit3_pretrained
from simvg.pretrain.config import PretrainConfig
from simvg.pretrain.data import TRAIN_STREAM, VAL_STREAM, CaptionScenes, StepBatches, check_tokenizer, collate
from simvg.pretrain.objectives import PretrainModel, pretrain_losses
from simvg.synthref.captions import CAPTION_WORDS
from simvg.utils import dist
from simvg.utils.amp import autocast
from simvg.utils.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    load_checkpoint,
    load_model_state,
    restore_rng,
    rng_state,
    save_checkpoint,
    seed_everything,
    unwrap_model,
)
from simvg.utils.logging import Averages, MetricsWriter, format_duration, setup_logging
from simvg.utils.run_folder import check_output_dir


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def weighted_loss(losses: dict[str, torch.Tensor], cfg: PretrainConfig) -> torch.Tensor:
    w = cfg.loss
    return (
        w.align * (losses["align_t2p"] + losses["align_p2t"]) / 2
        + w.mlm * losses["mlm"]
        + w.object * losses["align_object"]
    )


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, cfg: PretrainConfig, device: torch.device) -> dict[str, float]:
    """Held-out losses and accuracies: ``t2p_acc`` (a linked token's most similar patch shows its object, %) and
    ``mlm_acc`` (masked object words predicted, %), counted over the whole validation stream (all ranks)."""
    model.eval()
    sums: dict[str, float] = {}
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, cfg.train.amp):
            out = model(batch["image"], batch["ids"], batch["pad"])
        losses = pretrain_losses(out, batch, cfg.loss.temperature)
        items = {"align_t2p": losses["t2p_items"], "align_p2t": losses["t2p_items"], "mlm": losses["mlm_items"],
                 "align_object": losses["object_items"]}  # fmt: skip
        for key, count in items.items():  # loss means weighted by their item counts
            sums[key] = sums.get(key, 0.0) + float(losses[key]) * float(count)
        for key in ("t2p_hits", "t2p_items", "mlm_hits", "mlm_items", "object_hits", "object_items"):
            sums[key] = sums.get(key, 0.0) + float(losses[key])
    totals = dist.reduce_dict(sums, device) if dist.is_distributed() else sums
    t2p, mlm = max(totals.get("t2p_items", 0.0), 1.0), max(totals.get("mlm_items", 0.0), 1.0)
    obj = max(totals.get("object_items", 0.0), 1.0)
    model.train()
    return {
        "align_t2p": totals.get("align_t2p", 0.0) / t2p,
        "align_p2t": totals.get("align_p2t", 0.0) / t2p,
        "mlm": totals.get("mlm", 0.0) / mlm,
        "t2p_acc": 100.0 * totals.get("t2p_hits", 0.0) / t2p,
        "mlm_acc": 100.0 * totals.get("mlm_hits", 0.0) / mlm,
        "align_object": totals.get("align_object", 0.0) / obj,
        "object_acc": 100.0 * totals.get("object_hits", 0.0) / obj,
    }


def save(path: Path, model: nn.Module, optimizer, scheduler, step: int, cfg: PretrainConfig, metrics: dict) -> None:
    """``last.pth`` (everything ``--resume`` needs) and ``beit3.pth`` (the encoder alone); every rank calls it."""
    rngs = dist.all_gather_object(rng_state())
    if dist.is_main_process():
        bare = unwrap_model(model)
        save_checkpoint(path / "last.pth", {
            "model": bare.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "rng": rngs, "config": to_dict(cfg), "metrics": metrics,
        })  # fmt: skip
        encoder = {f"beit3.{k}": v for k, v in bare.beit3.state_dict().items()}
        atomic_torch_save({"model": encoder, "config": to_dict(cfg.encoder), "step": step}, path / "beit3.pth")
    dist.barrier()


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a pre-training; returns the final step and the last validation metrics."""
    t, d = cfg.train, cfg.data
    info = dist.init_distributed(t.device)
    torch.set_num_threads(t.threads)
    out_dir = Path(t.output_dir)
    log = setup_logging(info.rank, out_dir / "pretrain.log")
    check_output_dir(out_dir, resume)
    seed_everything(t.seed)  # the same initial weights on every rank

    encoder_cfg = cfg.encoder.beit3()
    tokenizer = BEiT3Tokenizer(d.tokenizer, max_len=d.max_tokens)
    check_tokenizer(tokenizer, encoder_cfg.vocab_size, list(CAPTION_WORDS))
    if encoder_cfg.max_text_positions - 2 < d.max_tokens:
        raise UserError(f"data.max_tokens {d.max_tokens} exceeds the encoder's text positions")
    model = PretrainModel(encoder_cfg, cfg.loss.align_dim).to(info.device)
    if cfg.encoder.pretrained and not resume:
        log.info("%s", load_beit3_pretrained(model.beit3, cfg.encoder.pretrained))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = MultiStepLRWarmUp(optimizer, t.warmup, t.milestones)
    net: nn.Module = model
    if info.world_size > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        # BEiT-3's mask token never receives a gradient (kept only for checkpoint compatibility): tell DDP.
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    step, metrics = 0, {}
    if resume:
        obj = load_checkpoint(out_dir / "last.pth")
        load_model_state(model, obj["model"], strict=True, source=str(out_dir / "last.pth"))
        optimizer.load_state_dict(obj["optimizer"])
        scheduler.load_state_dict(obj["scheduler"])
        step, metrics = int(obj["step"]), dict(obj.get("metrics") or {})
        if not restore_rng(obj.get("rng") or [], info.rank, info.world_size):
            # another process count: the samples stay exact (they depend on the step only), dropout streams not
            seed_everything(t.seed + info.rank + step)
        changed = config_changes(obj.get("config", {}), to_dict(cfg))
        log.info("resumed at step %d%s", step, f" (config changed: {', '.join(changed)})" if changed else "")
    else:
        seed_everything(t.seed + info.rank)
    if info.is_main:
        atomic_write_bytes(dump_config(to_dict(cfg)).encode("utf-8"), out_dir / "config.yaml")

    grid = encoder_cfg.img_size, encoder_cfg.patch_size
    refer = cfg.loss.object > 0  # captions whose first phrase singles its object out
    train_set = CaptionScenes(d, tokenizer, *grid, stream=TRAIN_STREAM, refer_first=refer)
    val_set = CaptionScenes(d, tokenizer, *grid, stream=VAL_STREAM, refer_first=refer)
    train_loader = DataLoader(train_set, batch_sampler=StepBatches(step, t.max_steps, t.batch_size, info.rank,
                              info.world_size), collate_fn=collate, num_workers=d.num_workers)  # fmt: skip
    val_ids = list(range(info.rank, d.val_samples, info.world_size))
    val_loader = DataLoader(torch.utils.data.Subset(val_set, val_ids), batch_size=t.batch_size, collate_fn=collate,
                            num_workers=d.num_workers)  # fmt: skip
    writer = MetricsWriter(out_dir / "metrics.jsonl" if info.is_main else None)
    log.info("pre-training %s (%d-d, %d layers, %d px) for %d steps of %d x %d captions, from step %d",
             cfg.encoder.preset, encoder_cfg.embed_dim, encoder_cfg.depth, encoder_cfg.img_size, t.max_steps,
             t.batch_size, info.world_size, step)  # fmt: skip

    averages, started, first_step = Averages(), time.monotonic(), step
    net.train()
    for batch in train_loader:
        batch = to_device(batch, info.device)
        with autocast(info.device, t.amp):
            out = net(batch["image"], batch["ids"], batch["pad"])
        losses = pretrain_losses(out, batch, cfg.loss.temperature)
        loss = weighted_loss(losses, cfg)
        scalars = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(float(loss.detach())):
            raise UserError(f"non-finite loss at step {step} ({scalars})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        averages.update({
            "loss": float(loss.detach()), "align_t2p": scalars["align_t2p"], "align_p2t": scalars["align_p2t"],
            "mlm": scalars["mlm"], "align_object": scalars["align_object"], "grad_norm": float(grad_norm),
            "object_acc": 100.0 * scalars["object_hits"] / max(scalars["object_items"], 1.0),
            "t2p_acc": 100.0 * scalars["t2p_hits"] / max(scalars["t2p_items"], 1.0),
        })  # fmt: skip
        if step % t.log_every_steps == 0 or step == t.max_steps:
            means = averages.means()
            averages.reset()
            writer.write("train", step=step, lr=scheduler.get_last_lr()[0], **means)
            rate = (time.monotonic() - started) / max(step - first_step, 1)
            log.info("step %d/%d loss %.4f t2p %.3f p2t %.3f obj %.3f mlm %.3f t2p_acc %.1f%% obj_acc %.1f%% "
                     "(%.2f s/step, %s left)", step, t.max_steps, means["loss"], means["align_t2p"],
                     means["align_p2t"], means["align_object"], means["mlm"], means["t2p_acc"], means["object_acc"],
                     rate, format_duration(rate * (t.max_steps - step)))  # fmt: skip
        if d.val_samples and (step % t.eval_every_steps == 0 or step == t.max_steps):
            metrics = validate(net, val_loader, cfg, info.device)
            writer.write("val", step=step, **metrics)
            log.info("validation at step %d: %s", step, " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if step % t.checkpoint_every_steps == 0 or step == t.max_steps:
            save(out_dir, net, optimizer, scheduler, step, cfg, metrics)
    dist.cleanup()
    return {"step": step, "metrics": metrics}
