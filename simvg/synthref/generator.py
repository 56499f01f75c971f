"""SynthRef: a procedurally generated referring-expression dataset (REC and GREC) with its own tokenizer.

``simvg data synth --out DIR --task rec|grec --num-images N --image-size S --seed K`` (or ``generate_synthref``)
writes, in SeqTR/SimVG's ``instances.json`` layout:

- ``DIR/images/<image_id>.png``: 2-8 shapes on a textured background (``scene``);
- ``DIR/instances.json``: {split: [entry]}; boxes are [x, y, w, h] pixels, tight around each shape's drawn mask;
- ``DIR/scenes.json``: every image's objects (shape, colour, size, centre, extent, box, visible pixels);
- ``DIR/meta.json``: task, seed, image size, split fractions and counts, word tables;
- ``DIR/tokenizer.spm`` (+ ``.vocab``): a sentencepiece model in BEiT-3's id layout, trained on the expressions.

Splits hold disjoint images (train first, then val, testA, testB, in that order of image ids). testA uses only
attribute expressions (shape, colour, size, size superlatives), testB only spatial ones (extreme positions, ordinals,
relations). REC: a train entry per object with up to 4 expressions, a val/test entry per object with one. GREC: a
train entry per image with all its expressions, a val/test entry per expression; about 60% single-target, 29%
multi-target and 11% no-target expressions (gRefCOCO: 28.8% and 11.6%, docs/design.md P4.2).

Every expression is resolved on its scene (``lang``) and kept only if it picks its targets with a clear margin.
Each image draws from its own generator seeded by (seed, image index), so the output does not depend on the number
of worker processes, and files are written byte-for-byte reproducibly (own PNG writer, sorted JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simvg.errors import UserError
from simvg.synthref.lang import (
    MARGIN,
    Candidates,
    Facts,
    Program,
    enumerate_programs,
    family_of,
    kind_of,
)
from simvg.synthref.scene import (
    BACKGROUNDS,
    COLOURS,
    MAX_HIDDEN,
    MAX_OBJECTS,
    MIN_OBJECTS,
    SHAPES,
    SIZES,
    SceneObject,
    draw_scene,
)
from simvg.synthref.text import render, vocabulary

DEFAULT_SPLITS = {"train": 0.80, "val": 0.0667, "testA": 0.0667, "testB": 0.0666}
SPLIT_FAMILIES = {"testA": ("attribute",), "testB": ("spatial",)}  # other splits take both families
KNOWN_SPLITS = ("train", "val", "test", "testA", "testB")
TRAIN_EXPRESSIONS = 4  # REC: expressions per object in a train entry
GREC_MIX = {"single": 0.60, "multi": 0.29, "none": 0.11}
# BPE with room for ~500 pieces turns every one of the ~120 words into a single piece; sentencepiece's unigram trainer
# stops at ~140 pieces on such a small closed vocabulary and leaves plurals split
TOKENIZER_VOCAB, TOKENIZER_TYPE = 512, "bpe"
VOCABULARY_REPEATS = 4  # each word this many times in the corpus, so rare words merge into pieces too
MIN_SIZE, MAX_SIZE = 64, 4096
GENERATOR_VERSION = 1


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an RGB image [H, W, 3] uint8 (8-bit, no filter, zlib ``level``).

    Written by hand because Pillow's encoder spends most of its time choosing per-row filters, which buys nothing
    on these images and halves generation speed; the output has no timestamp, so equal arrays give equal bytes.
    """
    h, w, _ = image.shape
    rows = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # a leading 0 per row = filter type "None"
    rows[:, 1:] = image.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows.tobytes(), level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def split_plan(num_images: int, splits: dict[str, float]) -> list[str]:
    """Split name of every image index: contiguous blocks in the order of ``splits``.

    Every split but the first gets round(fraction * N) images and at least one; the first takes the rest.
    """
    names = list(splits)
    total = sum(splits.values())
    counts = [max(1, round(splits[name] / total * num_images)) for name in names[1:]]
    first = num_images - sum(counts)
    if first < 1:
        raise UserError(f"--num-images {num_images} is too few for splits {', '.join(names)} (one image each)")
    return [name for name, n in zip(names, [first, *counts]) for _ in range(n)]


def _allowed(split: str, program: Program) -> bool:
    return family_of(program) in SPLIT_FAMILIES.get(split, ("attribute", "spatial"))


def _allowed_singles(split: str, kinds: dict[str, list[Program]]) -> dict[str, list[Program]]:
    """Copies of the program lists whose kind the split takes (a single-target kind fixes the family)."""
    families = SPLIT_FAMILIES.get(split, ("attribute", "spatial"))
    return {
        k: list(ps) for k, ps in kinds.items() if ps and ("attribute" if k == "attribute" else "spatial") in families
    }


def _sample_singles(pool: dict[str, list[Program]], k: int, rng: np.random.Generator) -> list[Program]:
    """Up to k distinct programs taken out of ``pool``, cycling through the kinds in random order so that every
    kind gets its turn."""
    picks: list[Program] = []
    while pool and len(picks) < k:
        for kind in [list(pool)[i] for i in rng.permutation(len(pool))]:
            programs = pool[kind]
            picks.append(programs.pop(int(rng.integers(len(programs)))))
            if not programs:
                del pool[kind]
            if len(picks) == k:
                break
    return picks


def _rec_entries(split: str, image_id: int, objects: list[SceneObject], cands: Candidates, rng, size: int) -> list:
    per_object = TRAIN_EXPRESSIONS if split == "train" else 1
    entries = []
    for i, obj in enumerate(objects):
        pool = _allowed_singles(split, cands.singles[i])
        texts, kinds, families = [], [], []
        for program in _sample_singles(pool, per_object, rng):
            text = render(program, rng)
            if text not in texts:
                texts.append(text)
                kinds.append(kind_of(program, 1))
                families.append(family_of(program))
        groups = [slice(None)] if split == "train" else [slice(j, j + 1) for j in range(len(texts))]
        entries += [
            {
                "image_id": image_id,
                "height": size,
                "width": size,
                "bbox": list(obj.bbox),
                "expressions": texts[g],
                "kind": kinds[g],
                "family": families[g],
                "category_id": SHAPES.index(obj.shape) + 1,
                "object_id": i,
                "ref_id": image_id * 10 + i,
            }
            for g in groups
            if texts
        ]
    return entries


def _grec_pools(split: str, cands: Candidates) -> dict[str, dict]:
    """Allowed programs as two-level trees: single -> object -> kind -> programs; multi, none -> family -> "" ->
    (program, target mask) pairs."""
    singles = {i: _allowed_singles(split, kinds) for i, kinds in cands.singles.items()}
    pools: dict[str, dict] = {"single": {i: d for i, d in singles.items() if d}, "multi": {}, "none": {}}
    for name, items in (("multi", cands.multis), ("none", [(p, 0) for p in cands.nones])):
        for p, mask in items:
            if _allowed(split, p):
                pools[name].setdefault(family_of(p), {}).setdefault("", []).append((p, mask))
    return pools


def _grec_pick(pools: dict[str, dict], rng) -> tuple[Program, int] | None:
    """Draw (program, target mask) without replacement: a category by GREC_MIX among those left, then a group at
    each level of its tree uniformly (so neither a kind nor a family crowds out the others), then an item."""
    names = [k for k in GREC_MIX if pools[k]]
    if not names:
        return None
    weights = np.array([GREC_MIX[k] for k in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    tree = pools[name]
    k1 = sorted(tree)[int(rng.integers(len(tree)))]
    k2 = sorted(tree[k1])[int(rng.integers(len(tree[k1])))]
    items = tree[k1][k2]
    item = items.pop(int(rng.integers(len(items))))
    if not items:
        del tree[k1][k2]
        if not tree[k1]:
            del tree[k1]
    return (item, 1 << k1) if name == "single" else item


def _grec_entries(split: str, image_id: int, objects: list[SceneObject], cands: Candidates, rng, size: int) -> list:
    n_expr = len(objects) + 2 if split == "train" else len(objects)
    pools = _grec_pools(split, cands)
    texts, kinds, families, boxes, anns = [], [], [], [], []
    while len(texts) < n_expr:
        pick = _grec_pick(pools, rng)
        if pick is None:
            break
        program, mask = pick
        text = render(program, rng)
        if text in texts:
            continue
        targets = [i for i in range(len(objects)) if mask >> i & 1]
        texts.append(text)
        kinds.append(kind_of(program, len(targets)))
        families.append(family_of(program))
        boxes.append([list(objects[i].bbox) for i in targets] or [[0, 0, 0, 0]])
        anns.append([_annotation(objects[i], i) for i in targets] or [_NO_TARGET])
    groups = [slice(None)] if split == "train" else [slice(j, j + 1) for j in range(len(texts))]
    return [
        {
            "image_id": image_id,
            "height": size,
            "width": size,
            "expressions": texts[g],
            "kind": kinds[g],
            "family": families[g],
            "bbox": boxes[g],
            "annotations": anns[g],
        }
        for g in groups
        if texts
    ]


_NO_TARGET = {"bbox": [0, 0, 0, 0], "category_id": -1, "object_id": -1, "area": 0}


def _annotation(obj: SceneObject, index: int) -> dict:
    return {"bbox": list(obj.bbox), "category_id": SHAPES.index(obj.shape) + 1, "object_id": index, "area": obj.area}


def make_image(job: tuple[str, str, int, int, int, str, int, str]) -> dict:
    """Draw, save and describe one image; ``job`` = (task, split, image_id, seed, image_size, out_dir,
    max_objects, background)."""
    task, split, image_id, seed, size, out_dir, max_objects, background = job
    rng = np.random.default_rng([seed, image_id])
    image, objects = draw_scene(rng, size, max_objects, background)
    (Path(out_dir) / "images" / f"{image_id}.png").write_bytes(encode_png(image))
    cands = enumerate_programs(Facts.from_objects(objects, size), rng, want_multi=task == "grec")
    build = _grec_entries if task == "grec" else _rec_entries
    return {
        "image_id": image_id,
        "split": split,
        "objects": [o.to_json() for o in objects],
        "entries": build(split, image_id, objects, cands, rng, size),
    }


def _check_arguments(task: str, num_images: int, image_size: int, seed: int, workers: int, splits: dict) -> None:
    if task not in ("rec", "grec"):
        raise UserError(f"--task must be 'rec' or 'grec', got {task!r}")
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise UserError(f"--image-size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {image_size}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    bad = [name for name, f in splits.items() if name not in KNOWN_SPLITS or not f > 0]
    if bad or not splits:
        raise UserError(f"splits must map names from {', '.join(KNOWN_SPLITS)} to positive fractions, got {splits}")


def _check_scene_options(max_objects: int, background: str) -> None:
    if not MIN_OBJECTS <= max_objects <= MAX_OBJECTS:
        raise UserError(f"--max-objects must be between {MIN_OBJECTS} and {MAX_OBJECTS}, got {max_objects}")
    if background not in BACKGROUNDS:
        raise UserError(f"--background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / "instances.json").exists() and not overwrite:
        raise UserError(f"{out_dir}: already holds a dataset (instances.json); pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if overwrite and (out_dir / "images").is_dir():
        shutil.rmtree(out_dir / "images")  # stale images of a larger earlier run would otherwise linger
    (out_dir / "images").mkdir(parents=True, exist_ok=True)


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> list[dict]:
    if workers == 1 or len(jobs) < 2:
        return [make_image(job) for job in tqdm(jobs, unit="img", disable=not progress)]
    # Not fork: the parent may hold torch/OpenMP threads (tests, notebooks), which fork can deadlock. forkserver, not
    # spawn: a spawned worker re-imports the main module (the `simvg` script imports every command, torch included,
    # seconds per worker); the fork server, a fresh single-threaded process, imports it once and forks the workers.
    ctx = multiprocessing.get_context("forkserver")
    chunk = max(1, min(32, len(jobs) // (4 * workers)))
    with ctx.Pool(min(workers, len(jobs))) as pool:
        return list(
            tqdm(pool.imap(make_image, jobs, chunksize=chunk), total=len(jobs), unit="img", disable=not progress)
        )


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def _counts(instances: dict[str, list[dict]], plan: list[str]) -> dict:
    out = {}
    for split, entries in instances.items():
        kinds = Counter(k for e in entries for k in e["kind"])
        out[split] = {
            "images": plan.count(split),
            "entries": len(entries),
            "expressions": sum(len(e["expressions"]) for e in entries),
            "kinds": dict(sorted(kinds.items())),
        }
    return out


def generate_synthref(
    out_dir: str | Path,
    task: str = "rec",
    num_images: int = 1000,
    image_size: int = 160,
    seed: int = 0,
    splits: dict[str, float] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    max_objects: int = MAX_OBJECTS,
    background: str = "textured",
) -> dict:
    """Write a SynthRef dataset to ``out_dir``; returns meta.json's content plus timing (seconds, images/s).

    ``max_objects`` and ``background`` make easier levels (fewer objects, a plain background); the defaults are
    the standard level.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    _check_arguments(task, num_images, image_size, seed, workers, splits)
    _check_scene_options(max_objects, background)
    out_dir = Path(out_dir)
    plan = split_plan(num_images, splits)
    _prepare(out_dir, overwrite)
    start = time.perf_counter()
    jobs = [(task, split, i, seed, image_size, str(out_dir), max_objects, background) for i, split in enumerate(plan)]
    results = _run_jobs(jobs, workers, progress)
    instances: dict[str, list[dict]] = {name: [] for name in splits}
    for r in results:
        instances[r["split"]].extend(r["entries"])
    _dump(out_dir / "instances.json", instances)
    _dump(
        out_dir / "scenes.json", {str(r["image_id"]): {"split": r["split"], "objects": r["objects"]} for r in results}
    )
    corpus = [t for e in instances[next(iter(splits))] for t in e["expressions"]] + vocabulary() * VOCABULARY_REPEATS
    # Imported here, not at the top: the spawned workers import this module, and the tokenizer module imports torch
    # (about 2.5 s and 300 MB per worker process for nothing: they only draw scenes).
    from simvg.data.tokenizer import train_tokenizer

    train_tokenizer(corpus, out_dir / "tokenizer.spm", TOKENIZER_VOCAB, model_type=TOKENIZER_TYPE)
    meta = _meta(task, seed, image_size, num_images, splits, _counts(instances, plan))
    meta["scene"] = {"max_objects": max_objects, "background": background}
    _dump(out_dir / "meta.json", meta)
    seconds = time.perf_counter() - start
    return {**meta, "seconds": round(seconds, 3), "images_per_second": round(num_images / seconds, 1)}


def _meta(task: str, seed: int, image_size: int, num_images: int, splits: dict, counts: dict) -> dict:
    return {
        "generator": f"simvg.synthref.generator v{GENERATOR_VERSION}",
        "task": task,
        "seed": seed,
        "image_size": image_size,
        "num_images": num_images,
        "splits": splits,
        "split_families": {name: list(SPLIT_FAMILIES.get(name, ("attribute", "spatial"))) for name in splits},
        "counts": counts,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": {name: list(r) for name, r in SIZES.items()},
        "margin": MARGIN,
        "max_hidden": MAX_HIDDEN,
        "tokenizer": "tokenizer.spm",
        "image_pattern": "images/{image_id}.png",
    }


def synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``simvg data synth``."""
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--task", choices=("rec", "grec"), default="rec", help="single-target REC or GREC")
    parser.add_argument("--num-images", type=int, default=1000, help="number of images over all splits")
    parser.add_argument("--image-size", type=int, default=160, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS, help="at most this many objects per scene")
    parser.add_argument(
        "--background", choices=BACKGROUNDS, default="textured", help="textured (standard) or plain (easier)"
    )


def synth_command(args: argparse.Namespace) -> int:
    """Generate the dataset and print a one-line summary per split."""
    summary = generate_synthref(
        args.out,
        args.task,
        args.num_images,
        args.image_size,
        args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        max_objects=args.max_objects,
        background=args.background,  # a bar only on a terminal: redirected logs stay one line per event
    )
    for split, c in summary["counts"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in c["kinds"].items())
        print(f"{split}: {c['images']} images, {c['entries']} entries, {c['expressions']} expressions ({kinds})")
    print(f"wrote {args.out} in {summary['seconds']:.1f} s ({summary['images_per_second']} images/s)")
    return 0
