"""Data-loader throughput at 640 px (train pipeline: JPEG decode, LSJ, resize, normalise, tokenise, collate) with
0, 1 and 2 worker processes, beside the model's training-step throughput, to see whether loading can keep up.

Usage: python benchmarks/data.py [--images 48] [--batch 8] [--epochs 2] [--model simvg_b32] [--model-batch 2]

Images are generated on the fly: 640x480 JPEG (quality 90) with random noise and rectangles, so decode cost is
realistic. Each loader configuration runs one warm-up epoch (forks the workers, fills the page cache) and then
``--epochs`` timed epochs. The loaders are the training run's (``simvg.data.loaders``: the resumable epoch order,
``make_loader``). The model number is one training step (forward of both branches, SimVGLoss and backward) at batch
``--model-batch`` with random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simvg.config import DataConfig  # noqa: E402
from simvg.data.datasets import GroundingDataset, build_dataset  # noqa: E402
from simvg.data.loaders import ResumableSampler, make_loader  # noqa: E402
from simvg.data.tokenizer import BEiT3Tokenizer, train_tokenizer  # noqa: E402
from simvg.losses import SimVGLoss  # noqa: E402
from simvg.models import create_model  # noqa: E402

WORDS = "the left right red blue small big man woman dog cat car near behind front second person chair".split()


def make_dataset(root: Path, n: int, seed: int = 0) -> None:
    """``n`` 640x480 JPEGs and an instances.json with one train entry (3 expressions) per image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        x, y = int(rng.integers(0, 500)), int(rng.integers(0, 350))
        w, h = int(rng.integers(40, 140)), int(rng.integers(40, 130))
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(root / "images" / f"{i}.jpg", "JPEG", quality=90)
        exprs = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(3)]
        entries.append({"image_id": i, "bbox": [x, y, w, h], "expressions": exprs, "width": 640, "height": 480})
    (root / "instances.json").write_text(json.dumps({"train": entries}))


def make_tokenizer(root: Path) -> BEiT3Tokenizer:
    """A BEiT3Tokenizer trained on a tiny corpus."""
    train_tokenizer([" ".join(WORDS)] * 20 + WORDS, root / "tok.spm", vocab_size=64)
    return BEiT3Tokenizer(root / "tok.spm", max_len=20)


def loader_rate(dataset: GroundingDataset, batch: int, workers: int, epochs: int) -> float:
    """Samples per second over ``epochs`` timed epochs after one warm-up epoch."""
    sampler = ResumableSampler(len(dataset), batch, seed=0)
    loader = make_loader(dataset, batch, sampler, workers)
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def model_rate(name: str, batch: int, repeats: int = 2) -> float:
    """Training-step samples/s of model ``name`` at batch ``batch`` (random weights, fp32, CPU)."""
    model = create_model(name).train()
    size = model.cfg.encoder.img_size
    images = torch.randn(batch, 3, size, size)
    ids = torch.randint(3, 60, (batch, 20))
    pad = torch.zeros(batch, 20, dtype=torch.bool)
    pad[:, 12:] = True
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.zeros(1, dtype=torch.long)}] * batch
    loss_fn = SimVGLoss()

    def step() -> None:
        loss_fn(model(images, ids, pad), targets)["loss"].backward()
        model.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--model", default="simvg_b32")
    parser.add_argument("--model-batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.images)
        cfg = DataConfig(dataset="custom", root=str(root), image_size=640, lsj=True)
        dataset = build_dataset(cfg, "train", True, make_tokenizer(root))
        print(f"{args.images} images 640x480 JPEG, train pipeline (LSJ + stretch 640 + normalise), BEiT3Tokenizer")
        threads = torch.get_num_threads()
        print(f"batch {args.batch}, {args.epochs} timed epochs after 1 warm-up; torch threads {threads}")
        rates = {}
        for w in (int(v) for v in args.workers.split(",")):
            rates[w] = loader_rate(dataset, args.batch, w, args.epochs)
            print(f"loader num_workers={w}: {rates[w]:.1f} samples/s ({rates[w] / rates[min(rates)]:.2f}x workers=0)")
    rate = model_rate(args.model, args.model_batch)
    how = "forward + SimVGLoss + backward"
    print(f"model {args.model} training step at batch {args.model_batch} ({how}): {rate:.2f} samples/s")
    for w, r in rates.items():
        print(f"loader workers={w} / model: {r / rate:.1f}x")


if __name__ == "__main__":
    main()
