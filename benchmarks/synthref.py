"""SynthRef generation speed: images per second per core, and end to end with 1 and 2 worker processes.

Usage: python benchmarks/synthref.py [--images 400] [--size 256] [--e2e-images 600]

Per core: ``make_image`` in this process (draw, PNG write, expression enumeration and wording) for ``--images``
train images of each task, timed by CPU time (``time.process_time``) so that other jobs on a shared machine do not
lower the figure; wall time is printed beside it. End to end: ``generate_synthref`` (all splits, JSON files and
the tokenizer) with 1 and 2 workers, by wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simvg.synthref.generator import generate_synthref, make_image  # noqa: E402
from simvg.synthref.scene import MAX_OBJECTS  # noqa: E402


def per_core(task: str, n: int, size: int, out: Path) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of make_image on train images."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    make_image((task, "train", 0, 0, size, str(out), MAX_OBJECTS, "textured"))  # warm-up: imports, first allocations
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        make_image((task, "train", i, 0, size, str(out), MAX_OBJECTS, "textured"))
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--e2e-images", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| task | size | images/s per core (CPU time) | images/s (wall, 1 process) |")
        print("|---|---|---|---|")
        for task in ("rec", "grec"):
            for size in sorted({128, args.size}):
                cpu_rate, wall_rate = per_core(task, args.images, size, root / f"{task}{size}")
                print(f"| {task} | {size} | {cpu_rate:.0f} | {wall_rate:.0f} |")
        print()
        print("| end to end (generate_synthref) | workers | images | seconds | images/s (wall) |")
        print("|---|---|---|---|---|")
        for workers in (1, 2):
            s = generate_synthref(root / f"e2e{workers}", "rec", args.e2e_images, args.size, seed=0, workers=workers)
            rate = s["images_per_second"]
            print(f"| rec {args.size} px | {workers} | {args.e2e_images} | {s['seconds']:.1f} | {rate} |")


if __name__ == "__main__":
    main()
