"""Binding probe: how many steps does a scratch SimVG need to ground one-word expressions on a SynthRef level?

The task is the simplest grounding there is: "the <colour> one" for an object whose colour is unique in its scene
(``--task colour``), or "the biggest figure" (``--task biggest``, no text needed: the visual path alone). Targets come
from the dataset's ``scenes.json``; the model, loss (one-stage DWBD) and optimiser (Adam amsgrad, clip 1.0, linear
warm-up) are the SynthRef recipe's. Held-out images (ids from ``--test-from``) give Acc@0.5 of both branches every
``--every`` steps. docs/results.md uses it to show where the embedded recipe's time goes: the standard level stays
at the "average box" for the whole probe, the easy level (2-4 objects, plain background) leaves it.

    python benchmarks/binding_probe.py --root data/synthref_rec --task colour --steps 600
    python benchmarks/binding_probe.py --root data/synthref_rec_easy --task colour --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.config import DataConfig, LossConfig  # noqa: E402
from simvg.data.image_io import load_image  # noqa: E402
from simvg.data.tokenizer import BEiT3Tokenizer  # noqa: E402
from simvg.data.transforms import Sample, build_test_transform  # noqa: E402
from simvg.losses import SimVGLoss  # noqa: E402
from simvg.models import create_model  # noqa: E402
from simvg.utils.box_ops import box_cxcywh_to_xyxy, box_iou  # noqa: E402


def target(objects: list[dict], task: str, rng: np.random.Generator, size: int) -> tuple[str, list[float]] | None:
    """(expression, cxcywh box in [0, 1]) of one scene, or None when the scene has no unique colour."""
    if task == "biggest":
        obj, text = max(objects, key=lambda o: o["area"]), "the biggest figure"
    else:
        colours = [o["colour"] for o in objects]
        unique = [o for o in objects if colours.count(o["colour"]) == 1]
        if not unique:
            return None
        obj = unique[int(rng.integers(len(unique)))]
        text = f"the {obj['colour']} one"
    x, y, w, h = obj["bbox"]
    return text, [(x + w / 2) / size, (y + h / 2) / size, w / size, h / size]


class Scenes:
    """Images of a SynthRef folder as normalised tensors (cached) and their probe targets."""

    def __init__(self, root: Path, task: str, img_size: int, seed: int) -> None:
        self.root, self.task = root, task
        self.scenes = json.loads((root / "scenes.json").read_text())
        self.size = json.loads((root / "meta.json").read_text())["image_size"]
        self.tokenizer = BEiT3Tokenizer(root / "tokenizer.spm", max_len=20)
        self.rng = np.random.default_rng(seed)
        self.transform = build_test_transform(DataConfig(image_size=img_size))  # what evaluation does
        self.cache: dict[int, torch.Tensor] = {}

    def image(self, i: int) -> torch.Tensor:
        """The normalised [3, S, S] image of scene ``i`` (the test transform: stretch resize + ImageNet stats)."""
        if i not in self.cache:
            sample = Sample(load_image(self.root / "images" / f"{i}.png"), torch.zeros(0, 4), "")
            self.cache[i] = self.transform(sample, self.rng)[0]
        return self.cache[i]

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
        """[B, 3, S, S] images, [B, L] ids, [B, L] pad mask and DETR targets for the scenes that have a target."""
        items = [(i, target(self.scenes[str(i)]["objects"], self.task, self.rng, self.size)) for i in ids]
        items = [(i, t) for i, t in items if t is not None]
        encoded = [self.tokenizer.encode_one(t[0]) for _, t in items]
        targets = [{"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.tensor([t[1]])} for _, t in items]
        return (
            torch.stack([self.image(i) for i, _ in items]),
            torch.stack([e[0] for e in encoded]),
            torch.stack([e[1] for e in encoded]),
            targets,
        )


def accuracy(model: torch.nn.Module, test: tuple) -> dict[str, float]:
    """Acc@0.5 (%) of both branches on the held-out batch."""
    model.eval()
    with torch.no_grad():
        out = model(*test[:3])
    truth = box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in test[3]]))
    result = {}
    for branch in ("token", "decoder"):
        pred = box_cxcywh_to_xyxy(out[branch]["pred_boxes"][:, 0])
        result[branch] = round(100.0 * (box_iou(pred, truth).diagonal() >= 0.5).float().mean().item(), 2)
    model.train()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="a SynthRef folder (simvg data synth)")
    p.add_argument("--task", choices=("colour", "biggest"), default="colour")
    p.add_argument("--model", default="simvg_synth_s")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--train-images", type=int, default=3200, help="scene ids 0..N-1 are drawn for training")
    p.add_argument("--test-images", type=int, default=256, help="held-out scenes right after the train ones")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="append one JSON line per evaluation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model)
    data = Scenes(args.root, args.task, model.cfg.encoder.img_size, args.seed)
    loss_fn = SimVGLoss(LossConfig(decoder=1.0, token=2.0, distill=1.0))
    opt = torch.optim.Adam(model.parameters(), args.lr, betas=(0.9, 0.98), eps=1e-9, amsgrad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    test = data.batch(range(args.train_images, args.train_images + args.test_images))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, ids, pad, targets = data.batch(data.rng.integers(0, args.train_images, args.batch))
        loss = loss_fn(model(images, ids, pad), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.every == 0:
            row = {"root": str(args.root), "task": args.task, "step": step, "loss": round(loss.item(), 3),
                   "acc": accuracy(model, test), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
