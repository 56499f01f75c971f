"""What int8 costs in accuracy: ``simvg eval`` in fp32 and in int8 on held-out SynthRef splits, and the agreement of
the int8 boxes with the fp32 ones.

For every (model, split): ``simvg eval --precision fp32|int8 --branch both --dump`` on the whole split (1 thread),
then from the two dumps, per branch:

- REC: Acc@0.5 against the ground truth in fp32 and int8, and the box agreement = the share of expressions whose
  int8 box has IoU >= 0.5 with the fp32 box (Acc@0.5 of int8 taking fp32 as the ground truth);
- GREC: Pr@(F1=1) against the ground truth in fp32 and int8, and the agreement = Pr@(F1=1) of the int8 boxes
  taking the fp32 kept boxes as the ground truth (same number kept, each matched at IoU >= 0.5).

Models: the embedded REC and GREC defaults (``simvg/assets/default``, ``default_grec``) on the easy-level SynthRef
data they were trained on (held-out val/testA/testB splits), and the tiny official-format REC model of the test
fixtures (``tests/fixtures/official_tiny_rec.safetensors``, the authors' code with random weights, 64 px: only its
agreement means something) on the REC data.

    simvg data synth --out DATA/rec --task rec --num-images 4000 --image-size 128 --seed 0 --max-objects 4 \\
        --background plain
    simvg data synth --out DATA/grec --task grec --num-images 4000 --image-size 128 --seed 1 --max-objects 4 \\
        --background plain
    .venv/bin/python benchmarks/int8_accuracy.py --rec DATA/rec --grec DATA/grec [--splits val testA testB]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simvg.cli import main as simvg  # noqa: E402
from simvg.engine.metrics import grec_outcome  # noqa: E402


def run_eval(model: Path, config: Path, root: Path, split: str, precision: str, dump: Path, extra: list[str]) -> dict:
    """``simvg eval`` in this process; its JSON metrics."""
    out = io.StringIO()
    argv = ["eval", "--checkpoint", str(model), "--config", str(config), "--set", f"data.root={root}", "--split",
            split, "--branch", "both", "--json", "--dump", str(dump), "--precision", precision, "--threads", "1",
            *extra]  # fmt: skip
    with contextlib.redirect_stdout(out):
        code = simvg(argv)
    if code != 0:
        raise SystemExit(f"simvg {' '.join(argv)} exited {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def read_dump(path: Path) -> dict[str, dict]:
    return {r["sample_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(fp32: dict[str, dict], int8: dict[str, dict], branch: str, task: str) -> float:
    """Percent of expressions where int8 answers what fp32 answers (see the module docstring)."""
    same = 0
    for key, ref in fp32.items():
        a, b = ref[branch], int8[key][branch]
        if task == "rec":
            same += box_iou(a["box"], b["box"]) >= 0.5
        else:
            want = torch.tensor(a["boxes"][: a["kept"]]).reshape(-1, 4)
            got, scores = torch.tensor(b["boxes"][: b["kept"]]).reshape(-1, 4), torch.tensor(b["scores"][: b["kept"]])
            outcome = grec_outcome(got, scores, want, score_threshold=0.0, match_threshold=0.5, match_metric="iou")
            same += outcome.correct
    return 100.0 * same / len(fp32)


def measure(name: str, model: Path, config: Path, root: Path, task: str, splits: list[str], extra: list[str],
            tmp: Path) -> list[dict]:  # fmt: skip
    rows = []
    metric = "acc" if task == "rec" else "pr_f1"
    for split in splits:
        dumps, metrics, seconds = {}, {}, {}
        for precision in ("fp32", "int8"):
            dumps[precision] = tmp / f"{name}_{split}_{precision}.jsonl"
            start = time.process_time()
            metrics[precision] = run_eval(model, config, root, split, precision, dumps[precision], extra)
            seconds[precision] = time.process_time() - start
        fp32, int8 = read_dump(dumps["fp32"]), read_dump(dumps["int8"])
        for branch in ("decoder", "token"):
            row = {"model": name, "split": split, "n": len(fp32), "branch": branch,
                   "fp32": metrics["fp32"][f"{branch}/{metric}"], "int8": metrics["int8"][f"{branch}/{metric}"],
                   "agreement": agreement(fp32, int8, branch, task), "metric": metric,
                   "cpu_s_fp32": seconds["fp32"], "cpu_s_int8": seconds["int8"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def official_model(folder: Path, data: Path) -> tuple[Path, list[str]]:
    """The tiny official REC fixture as an official-names ``.safetensors`` and a tokenizer whose ids fit its 300-row
    text table (trained on the data's expressions)."""
    from safetensors.torch import load_file, save_file

    from simvg.data.tokenizer import train_tokenizer

    tensors = load_file(ROOT / "tests" / "fixtures" / "official_tiny_rec.safetensors")
    state = {k.removeprefix("state_dict/"): v for k, v in tensors.items() if k.startswith("state_dict/")}
    save_file(state, str(folder / "official_tiny_rec.safetensors"))
    entries = json.loads((data / "instances.json").read_text())["train"]
    texts = [text for entry in entries for text in entry["expressions"]][:4000]
    tokenizer = train_tokenizer(texts, folder / "tokenizer.spm", vocab_size=100)
    return folder / "official_tiny_rec.safetensors", ["--tokenizer", str(tokenizer)]


def table(rows: list[dict]) -> str:
    lines = ["| model | split | expressions | branch | metric | fp32 | int8 | int8 - fp32 | int8 agrees with fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        metric = "Acc@0.5" if r["metric"] == "acc" else "Pr@(F1=1)"
        lines.append(f"| {r['model']} | {r['split']} | {r['n']} | {r['branch']} | {metric} | {r['fp32']:.2f} | "
                     f"{r['int8']:.2f} | {r['int8'] - r['fp32']:+.2f} | {r['agreement']:.2f} % |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rec", type=Path, required=True, help="easy-level SynthRef REC data (seed 0)")
    parser.add_argument("--grec", type=Path, required=True, help="easy-level SynthRef GREC data (seed 1)")
    parser.add_argument("--splits", nargs="+", default=["val", "testA", "testB"])
    parser.add_argument("--max-samples", type=int, default=0, help="the first N expressions per split (0: all)")
    args = parser.parse_args()
    limit = ["--max-samples", str(args.max_samples)] if args.max_samples else []
    torch.set_num_threads(1)
    assets, configs = ROOT / "simvg" / "assets", ROOT / "configs"
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows += measure("REC default", assets / "default", configs / "synthref_rec.yaml", args.rec, "rec",
                        args.splits, limit, tmp)  # fmt: skip
        rows += measure("GREC default", assets / "default_grec", configs / "synthref_grec.yaml", args.grec, "grec",
                        args.splits, limit, tmp)  # fmt: skip
        official, extra = official_model(tmp, args.rec)
        rows += measure("official tiny REC (random)", official, configs / "synthref_rec.yaml", args.rec, "rec",
                        args.splits, extra + limit, tmp)  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
