"""Tiny on-disk grounding datasets and configs for the engine tests (train, resume, DDP, eval).

A folder in the SynthRef layout (``instances.json``, ``images/<id>.png``, ``tokenizer.spm``, ``meta.json``) with
64x64 scenes of two coloured squares; expressions name the target's colour. Small enough that a few training
steps of ``simvg_tiny_test`` take well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from simvg.config import Config, DataConfig, EvalConfig, LossConfig, ModelSection, TrainConfig, dump_config
from simvg.data.tokenizer import BEiT3Tokenizer, train_tokenizer

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SIZE = 64


def _scene(rng: np.random.Generator, path: Path) -> list[tuple[str, list[float]]]:
    """Draw two squares of different colours; returns (colour, xywh box) for each."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    names = rng.choice(list(COLOURS), size=2, replace=False)
    objects = []
    for k, name in enumerate(names):
        side = int(rng.integers(12, 24))
        x = int(rng.integers(0, SIZE // 2 - side // 2)) + k * SIZE // 2
        y = int(rng.integers(0, SIZE - side))
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[name])
        # the right-hand square may run past the right edge: its box is the part inside the image (the first
        # square, the REC target, always lies inside)
        objects.append((str(name), [float(x), float(y), float(min(side, SIZE - x)), float(side)]))
    image.save(path)
    return objects


def _rec_entry(image_id: int, obj: tuple[str, list[float]], train: bool) -> dict:
    name, box = obj
    texts = [f"the {name} square", f"{name} box"] if train else [f"the {name} square"]
    return {"image_id": image_id, "bbox": box, "expressions": texts, "height": SIZE, "width": SIZE}


def _grec_entry(image_id: int, objects: list[tuple[str, list[float]]], k: int) -> dict:
    """Expression kind by ``k % 3``: one target, both targets, or no target (a colour absent from the scene)."""
    present = [name for name, _ in objects]
    if k % 3 == 0:
        text, boxes = f"the {objects[0][0]} square", [objects[0][1]]
    elif k % 3 == 1:
        text, boxes = "all squares", [box for _, box in objects]
    else:
        absent = next(c for c in COLOURS if c not in present)
        text, boxes = f"the {absent} square", []
    anns = [{"bbox": b, "category_id": 1} for b in boxes] or [{"bbox": [0, 0, 0, 0], "category_id": -1}]
    return {"image_id": image_id, "height": SIZE, "width": SIZE, "expressions": [text],
            "bbox": [boxes or [[0, 0, 0, 0]]], "annotations": [anns]}  # fmt: skip


def make_dataset(root: Path, task: str = "rec", num_train: int = 16, num_val: int = 8, seed: int = 0) -> Path:
    """Write a tiny dataset folder at ``root`` and return it."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for image_id in range(num_train + num_val):
        objects = _scene(rng, root / "images" / f"{image_id}.png")
        split = "train" if image_id < num_train else "val"
        if task == "rec":
            splits[split].append(_rec_entry(image_id, objects[0], split == "train"))
        else:
            splits[split].append(_grec_entry(image_id, objects, image_id))
    (root / "instances.json").write_text(json.dumps(splits))
    (root / "meta.json").write_text(json.dumps({"task": task, "seed": seed, "image_size": SIZE}))
    corpus = [t for entries in splits.values() for e in entries for t in e["expressions"]]
    corpus += [f"the {c} square" for c in COLOURS] + ["all squares"]
    train_tokenizer(corpus * 3, root / "tokenizer.spm", vocab_size=40)
    return root


def make_config(
    root: Path,
    out_dir: Path,
    task: str = "rec",
    *,
    dropout: float = 0.0,
    drop_path: float = 0.0,
    distill_mode: str = "none",
    **train: object,
) -> Config:
    """A CPU config for ``simvg_tiny_test`` on the dataset at ``root``; ``train`` sets ``TrainConfig`` fields.

    By default no dropout, no drop-path and no distillation. The real recipes use ``dropout=0.1``, a drop-path rate
    (``drop_path``, BEiT-3's ``drop_path_rate``) and ``distill_mode="dynamic"`` (DWBD): with them on, a run draws
    random masks every step, so exact comparisons (resume, DDP) also check that every RNG stream is replayed.
    """
    vocab = BEiT3Tokenizer(root / "tokenizer.spm").vocab_size
    encoder: dict[str, object] = {"vocab_size": vocab}
    if drop_path:  # the preset's rate is 0; the default config stays exactly what it was
        encoder["drop_path_rate"] = drop_path
    overrides = {"dropout": dropout, "num_queries": 1 if task == "rec" else 4, "encoder": encoder}
    settings = dict(output_dir=str(out_dir), device="cpu", threads=1, seed=1, epochs=2, batch_size=4, lr=1e-3,
                    schedule_unit="step", warmup=2, milestones=[6], amp="none", log_every_steps=1)  # fmt: skip
    settings.update(train)
    return Config(
        model=ModelSection(preset="simvg_tiny_test", overrides=overrides),
        data=DataConfig(dataset="synthref", root=str(root), image_size=SIZE, num_workers=0, jitter_min=0.8),
        loss=LossConfig(distill_mode=distill_mode),
        train=TrainConfig(**settings),
        eval=EvalConfig(batch_size=8),
    )


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(dump_config(cfg))
    assert yaml.safe_load(path.read_text())  # the file is what the CLI reads
    return path
