"""``simvg data convert``: other annotation formats -> the ``instances.json`` layout (formats.py, docs/design.md P4).

Sources and their box conventions (every output box is COCO xywh in original pixels):

- ``refer``: Licheng Yu's refer API, ``refs(<splitby>).p`` (a Python-2 pickle, read with the restricted
  unpickler) + COCO ``instances.json`` (boxes xywh). Train: one entry per referred object with all its sentences;
  other splits: one entry per sentence. Text = the tokenised ``sent`` (``raw`` if missing).
- ``grefcoco``: raw gRefCOCO, ``grefs(unc).json`` + ``instances.json``; ``ann_id`` may be a list (multi-target)
  and ``[-1]`` means no target. Train: one entry per image with all its expressions (SimVG's layout); other
  splits: one entry per expression. No-target -> one annotation ``{"bbox": [0,0,0,0], "category_id": -1}``.
- ``transvg``: TransVG/ReSC split files ``<name>_<split>.pth`` (lists of tuples, loaded with
  ``torch.load(weights_only=True)``): ``unc``, ``unc+``, ``gref``, ``gref_umd`` hold
  ``(img_file, ann_id, bbox_xywh, phrase, attr)``; ``referit`` holds the same tuple with the bbox already
  **x1y1x2y2**; ``flickr`` holds ``(img_file, bbox_x1y1x2y2, phrase)``. Files list one expression per item; train
  items sharing (image, object) are grouped into one per-object entry like SeqTR's (``--per-expression`` keeps
  them apart). The files carry no image size: pass ``--images DIR`` to read it from the image headers.
- ``mdetr``: MDETR-style COCO json (``finetune_<name>_<split>.json``): ``images`` are expressions (``caption``,
  ``original_id`` = image id), ``annotations`` point at them with xywh boxes; gRefCOCO files (several or
  ``category_id == -1`` annotations) become GREC entries grouped per image for train.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from simvg.data.formats import SPECS, get_spec, is_grec_entry, read_json
from simvg.data.safe_pickle import fix_latin1, safe_load
from simvg.errors import UserError

FORMATS = ("refer", "grefcoco", "transvg", "mdetr")
NO_TARGET = {"bbox": [0, 0, 0, 0], "category_id": -1}
# TransVG file prefix -> (our dataset name, bbox is x1y1x2y2)
TRANSVG = {
    "unc": ("refcoco", False),
    "unc+": ("refcoco+", False),
    "gref": ("refcocog_google", False),
    "gref_umd": ("refcocog_umd", False),
    "referit": ("referit", True),
    "flickr": ("flickr30k", True),
}
DEFAULT_SPLITBY = {
    "refcoco": "unc",
    "refcoco+": "unc",
    "refcocog_umd": "umd",
    "refcocog_google": "google",
    "referit": "berkeley",
    "grefcoco": "unc",
}

Splits = dict[str, list[dict[str, Any]]]


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="input files, or one folder holding them")
    parser.add_argument("--from", dest="source", required=True, choices=FORMATS, help="input format")
    parser.add_argument("--out", required=True, help="output folder (instances.json is written there)")
    parser.add_argument("--dataset", default=None, help=f"dataset name ({', '.join(SPECS)}); picks the defaults")
    parser.add_argument("--splitby", default=None, help="refer/grefcoco split family: unc, umd, google, berkeley")
    parser.add_argument("--images", default=None, help="image folder to read sizes from (transvg)")
    parser.add_argument("--per-expression", action="store_true", help="keep transvg/mdetr train items apart")
    parser.add_argument("--force", action="store_true", help="overwrite an existing instances.json")


def convert_command(args: argparse.Namespace) -> int:
    out = Path(args.out) / "instances.json"
    if out.exists() and not args.force:
        raise UserError(f"{out}: already exists (use --force to overwrite)")
    dataset = get_spec(args.dataset).name if args.dataset else None
    inputs = [Path(p) for p in args.inputs]
    if args.source == "refer":
        splits = convert_refer(*_refer_files(inputs, "refs", args.splitby or DEFAULT_SPLITBY.get(dataset or "", "")))
    elif args.source == "grefcoco":
        splits = convert_grefcoco(*_refer_files(inputs, "grefs", args.splitby or "unc"))
    elif args.source == "transvg":
        splits = convert_transvg(_expand(inputs, "*.pth"), args.images, not args.per_expression)
    else:
        splits = convert_mdetr(_expand(inputs, "*.json"), dataset == "grefcoco", not args.per_expression)
    write_instances(out, splits)
    print(format_counts(splits, dataset))
    return 0


def write_instances(path: Path, splits: Splits) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(splits, separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)  # never leave a half-written instances.json behind


def count_expressions(entries: list[dict[str, Any]]) -> int:
    return sum(len(e.get("expressions", [])) for e in entries)


def format_counts(splits: Splits, dataset: str | None = None) -> str:
    """One line per split: entries, expressions and (when known) the published expression count."""
    published = SPECS[dataset].counts if dataset else {}
    lines = []
    for split, entries in splits.items():
        line = f"{split:<26} {len(entries):>8} entries {count_expressions(entries):>8} expressions"
        if split in published:
            line += f" (published: {published[split]})"
        lines.append(line)
    return "\n".join(lines)


def _expand(inputs: list[Path], pattern: str) -> list[Path]:
    """Files given directly, or every ``pattern`` match of a folder given."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(p.glob(pattern))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: not found")
    if not files:
        raise UserError(f"no {pattern} input files in {', '.join(map(str, inputs))}")
    return files


def _refer_files(inputs: list[Path], stem: str, splitby: str) -> tuple[Path, Path]:
    """(refs file, COCO instances.json) from two files or a folder holding ``<stem>(<splitby>).p|json``."""
    if len(inputs) == 1 and inputs[0].is_dir():
        folder = inputs[0]
        found = sorted(folder.glob(f"{stem}({splitby or '*'}).*"))
        if len(found) != 1:
            raise UserError(f"{folder}: expected one {stem}({splitby or '<splitby>'}).p/.json, found {len(found)}")
        return found[0], folder / "instances.json"
    refs = [p for p in inputs if p.name.startswith(stem)]
    coco = [p for p in inputs if p.name.endswith(".json") and not p.name.startswith(stem)]
    if len(refs) != 1 or len(coco) != 1:
        raise UserError(f"--from {stem[:-1] if stem == 'refs' else 'grefcoco'} needs {stem}(...) and instances.json")
    return refs[0], coco[0]


def _load_refs(path: Path) -> list[dict[str, Any]]:
    refs = read_json(path) if path.suffix == ".json" else safe_load(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise UserError(f"{path}: expected a list of ref dicts")
    return refs


def _load_coco(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """COCO instances.json -> (images by id, annotations by id)."""
    coco = read_json(path)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise UserError(f"{path}: not a COCO instances file (needs 'images' and 'annotations')")
    return {int(i["id"]): i for i in coco["images"]}, {int(a["id"]): a for a in coco["annotations"]}


def _sentences(ref: dict[str, Any]) -> list[str]:
    return [fix_latin1(str(s.get("sent") or s.get("raw") or "")) for s in ref.get("sentences", [])]


def _image_fields(image: dict[str, Any]) -> dict[str, Any]:
    fields = {"image_id": int(image["id"]), "height": int(image["height"]), "width": int(image["width"])}
    if "file_name" in image:
        fields["file_name"] = str(image["file_name"])
    return fields


def _lookup(table: dict[int, Any], key: Any, what: str, where: str) -> Any:
    try:
        return table[int(key)]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: {what} {key!r} not in instances.json") from None


def convert_refer(refs_path: Path, coco_path: Path) -> Splits:
    """refer API refs + COCO instances -> splits (train per object, other splits per sentence)."""
    images, anns = _load_coco(coco_path)
    splits: Splits = defaultdict(list)
    for i, ref in enumerate(_load_refs(refs_path)):
        where = f"{refs_path}: ref {i} (ref_id {ref.get('ref_id')})"
        ann = _lookup(anns, ref.get("ann_id"), "ann_id", where)
        image = _lookup(images, ref.get("image_id"), "image_id", where)
        base = {
            **_image_fields(image),
            "bbox": [float(v) for v in ann["bbox"]],
            "ref_id": ref.get("ref_id"),
            "category_id": ann.get("category_id"),
        }
        sents = _sentences(ref)
        split = str(ref.get("split", "train"))
        if split == "train":
            splits[split].append({**base, "expressions": sents})
        else:
            splits[split] += [{**base, "expressions": [s]} for s in sents]
    return dict(splits)


def _grec_targets(ref: dict[str, Any], anns: dict[int, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The annotations of a gRefCOCO ref (``ann_id`` int or list; ``-1`` = no target)."""
    ids = ref.get("ann_id")
    ids = ids if isinstance(ids, list) else [ids]
    if not ids or all(int(a) == -1 for a in ids) or ref.get("no_target"):
        return [dict(NO_TARGET)]
    out = []
    for a in ids:
        ann = _lookup(anns, a, "ann_id", where)
        out.append({"bbox": [float(v) for v in ann["bbox"]], "category_id": ann.get("category_id"), "id": ann["id"]})
    return out


def convert_grefcoco(refs_path: Path, coco_path: Path) -> Splits:
    """Raw gRefCOCO -> SimVG's GREC layout (train grouped per image, other splits per expression)."""
    images, anns = _load_coco(coco_path)
    per_split: dict[str, list[tuple[dict[str, Any], str, list[dict[str, Any]]]]] = defaultdict(list)
    for i, ref in enumerate(_load_refs(refs_path)):
        where = f"{refs_path}: ref {i} (ref_id {ref.get('ref_id')})"
        image = _lookup(images, ref.get("image_id"), "image_id", where)
        targets = _grec_targets(ref, anns, where)
        for sent in _sentences(ref):
            per_split[str(ref.get("split", "train"))].append((_image_fields(image), sent, targets))
    return {split: _group_grec(items, split == "train") for split, items in per_split.items()}


def _group_grec(items: Iterable[tuple[dict[str, Any], str, list[dict[str, Any]]]], by_image: bool) -> list[dict]:
    """(image fields, expression, annotations) -> GREC entries, one per image (train) or per expression."""
    entries: dict[Any, dict[str, Any]] = {}
    for n, (image, sent, targets) in enumerate(items):
        key = image["image_id"] if by_image else n
        entry = entries.setdefault(key, {**image, "expressions": [], "bbox": [], "annotations": []})
        entry["expressions"].append(sent)
        entry["bbox"].append([t["bbox"] for t in targets])
        entry["annotations"].append(targets)
    return list(entries.values())


def _split_of(path: Path, prefix: str | None = None) -> str:
    """Split name from a file name: ``unc+_testA.pth`` -> ``testA``, ``finetune_refcoco_val.json`` -> ``val``."""
    stem = path.stem
    if prefix and stem.startswith(prefix + "_"):
        return stem[len(prefix) + 1 :]
    return stem.rsplit("_", 1)[-1]


def _new_split(splits: Splits, split: str, path: Path) -> str:
    if split in splits:
        raise UserError(f"{path}: split {split!r} twice in the inputs (convert one dataset at a time)")
    return split


def _transvg_prefix(path: Path) -> str:
    """The longest TransVG dataset prefix of a split file name (``gref_umd`` before ``gref``)."""
    for prefix in sorted(TRANSVG, key=len, reverse=True):
        if path.stem.startswith(prefix + "_"):
            return prefix
    raise UserError(f"{path}: name must start with one of {', '.join(TRANSVG)} followed by _<split>")


def _image_id(file_name: str) -> int:
    digits = re.findall(r"\d+", Path(file_name).stem)
    return int(digits[-1]) if digits else -1


def _transvg_item(item: Any, xyxy: bool, where: str) -> tuple[str, Any, list[float], str]:
    """(img_file, object key, bbox xywh, phrase) of one split-file tuple."""
    if not isinstance(item, (list, tuple)) or len(item) < 3:
        raise UserError(f"{where}: expected a tuple (img_file, ..., bbox, phrase, ...), got {type(item).__name__}")
    img, key, box, phrase = (item[0], None, item[1], item[2]) if len(item) == 3 else item[:4]
    try:
        box = [float(v) for v in box]
    except (TypeError, ValueError):
        raise UserError(f"{where}: bbox {box!r} is not numeric") from None
    if len(box) != 4:
        raise UserError(f"{where}: bbox {box!r} does not have 4 values")
    if xyxy:
        box = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    key = key if isinstance(key, (int, str)) else None
    return str(img), (key if key is not None else tuple(box)), box, str(phrase)


def _load_pth(path: Path) -> list[Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load with weights_only=True ({first})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of tuples, got {type(data).__name__}")
    return data


def _image_size(images: str | None, file_name: str, cache: dict[str, tuple[int, int]]) -> dict[str, int]:
    if images is None:
        return {}
    if file_name not in cache:
        try:
            with Image.open(Path(images) / file_name) as im:
                cache[file_name] = im.size
        except OSError as exc:
            raise UserError(f"{Path(images) / file_name}: cannot read the image size ({exc})") from None
    w, h = cache[file_name]
    return {"width": w, "height": h}


def convert_transvg(files: list[Path], images: str | None = None, group_train: bool = True) -> Splits:
    """TransVG/ReSC ``<name>_<split>.pth`` files -> splits; per-dataset box conventions in the module docstring."""
    splits: Splits = {}
    sizes: dict[str, tuple[int, int]] = {}
    for path in files:
        prefix = _transvg_prefix(path)
        split = _new_split(splits, _split_of(path, prefix), path)
        grouped: dict[Any, dict[str, Any]] = {}
        for n, item in enumerate(_load_pth(path)):
            img, key, box, phrase = _transvg_item(item, TRANSVG[prefix][1], f"{path}: item {n}")
            group = (img, key) if group_train and split == "train" else n
            if group not in grouped:
                grouped[group] = {
                    "image_id": _image_id(img),
                    "file_name": img,
                    "bbox": box,
                    "expressions": [],
                    **_image_size(images, img, sizes),
                }
            grouped[group]["expressions"].append(phrase)
        splits[split] = list(grouped.values())
    return splits


def _mdetr_entries(path: Path, force_grec: bool) -> tuple[list[tuple[dict[str, Any], str, list[dict]]], bool]:
    """(image fields, caption, annotations) per expression of an MDETR json, and whether it is GREC."""
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"{path}: not an MDETR-style file (needs 'images' and 'annotations')")
    anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in data["annotations"]:
        anns[int(a["image_id"])].append(a)
    items, grec = [], force_grec
    for image in data["images"]:
        targets = [
            {"bbox": [float(v) for v in a["bbox"]], "category_id": a.get("category_id"), "id": a.get("original_id")}
            for a in anns.get(int(image["id"]), [])
            if int(a.get("category_id", 0)) != -1 and not a.get("empty")
        ]
        grec = grec or len(targets) != 1
        fields = _image_fields({**image, "id": image.get("original_id", image["id"])})
        items.append((fields, str(image.get("caption", "")), targets or [dict(NO_TARGET)]))
    return items, grec


def convert_mdetr(files: list[Path], grec: bool = False, group_train: bool = True) -> Splits:
    """MDETR ``finetune_*`` json files -> splits (REC or GREC, detected per file unless ``grec``)."""
    splits: Splits = {}
    for path in files:
        items, is_grec = _mdetr_entries(path, grec)
        split = _new_split(splits, _split_of(path), path)
        if is_grec:
            splits[split] = _group_grec(items, group_train and split == "train")
            continue
        grouped: dict[Any, dict[str, Any]] = {}
        for n, (image, caption, targets) in enumerate(items):
            t = targets[0]
            key = (image["image_id"], t.get("id"), tuple(t["bbox"])) if group_train and split == "train" else n
            entry = grouped.setdefault(
                key, {**image, "bbox": t["bbox"], "category_id": t["category_id"], "expressions": []}
            )
            entry["expressions"].append(caption)
        splits[split] = list(grouped.values())
    return splits


def summarize(splits: Splits) -> dict[str, Counter]:
    """Per split: entries, expressions, GREC no-target and multi-target expression counts (for reports/tests)."""
    out = {}
    for split, entries in splits.items():
        c: Counter = Counter(entries=len(entries), expressions=count_expressions(entries))
        for e in entries:
            if is_grec_entry(e):
                for anns in e["annotations"]:
                    real = [a for a in anns if a.get("category_id") != -1]
                    c["no_target"] += not real
                    c["multi_target"] += len(real) > 1
        out[split] = c
    return out
