"""Readers and loaders: item expansion, seeded expression draws, GREC targets, mixed-source filtering, bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from simvg.config import DataConfig
from simvg.data.collate import Batch
from simvg.data.datasets import build_dataset, dataset_task
from simvg.data.formats import get_spec
from simvg.data.loaders import ResumableSampler, ShardSampler, batches_per_epoch, make_loader
from simvg.data.transforms import boxes_to_original
from simvg.errors import UserError


class StandInTokenizer:
    """Same call signature as BEiT3Tokenizer.encode_one: (ids [L] long, pad [L] bool, True = pad)."""

    def __init__(self, max_len: int = 8) -> None:
        self.max_len = max_len

    def encode_one(self, text: str):
        words = [sum(map(ord, w)) % 1000 + 3 for w in text.split()][: self.max_len - 2]
        ids = [0, *words, 2]
        pad = [False] * len(ids) + [True] * (self.max_len - len(ids))
        return torch.tensor(ids + [1] * (self.max_len - len(ids))), torch.tensor(pad)


TOK = StandInTokenizer()


def _write(root, splits, images=None, size=(40, 30), ext="png"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "instances.json").write_text(json.dumps(splits))
    (root / "images").mkdir(exist_ok=True)
    for image_id in images or {e["image_id"] for entries in splits.values() for e in entries}:
        Image.new("RGB", size, (image_id * 20 % 256, 0, 0)).save(root / "images" / f"{image_id}.{ext}")
    return root


def _rec(image_id, exprs, bbox=(4, 6, 10, 8), **kw):
    return {"image_id": image_id, "bbox": list(bbox), "expressions": exprs, "height": 30, "width": 40, **kw}


def _cfg(root, **kw):
    return DataConfig(dataset="synthref", root=str(root), image_size=32, lsj=False, **kw)


@pytest.fixture
def rec_dir(tmp_path):
    splits = {
        "train": [_rec(1, ["a", "b", "c"]), _rec(2, ["d"])],
        "val": [_rec(1, ["x"]), _rec(2, ["y", "z", "w"])],
    }
    return _write(tmp_path / "rec", splits)


def test_train_per_entry_eval_per_expression(rec_dir):
    train = build_dataset(_cfg(rec_dir), "train", True, TOK)
    val = build_dataset(_cfg(rec_dir), "val", False, TOK)
    assert len(train) == 2 and len(val) == 4
    texts = [val[i][3]["expression"] for i in range(4)]
    assert texts == ["x", "y", "z", "w"]
    assert len({val[i][3]["sample_id"] for i in range(4)}) == 4


def test_target_contract(rec_dir):
    image, ids, pad, t = build_dataset(_cfg(rec_dir), "val", False, TOK)[0]
    assert image.shape == (3, 32, 32) and ids.shape == pad.shape == (8,) and pad.dtype == torch.bool
    assert t["labels"].tolist() == [0] and t["image_id"] == 1
    assert t["size"].tolist() == [32, 32] and t["orig_size"].tolist() == [30, 40]
    # bbox xywh [4, 6, 10, 8] -> xyxy [4, 6, 14, 14]
    torch.testing.assert_close(t["orig_boxes"], torch.tensor([[4.0, 6.0, 14.0, 14.0]]))
    torch.testing.assert_close(t["boxes"], torch.tensor([[9 / 40, 10 / 30, 10 / 40, 8 / 30]]))
    torch.testing.assert_close(boxes_to_original(t["boxes"], t), t["orig_boxes"])
    assert t["skipped"] == 0


def test_expression_draw_is_seeded_per_epoch_and_index(rec_dir):
    ds = build_dataset(_cfg(rec_dir), "train", True, TOK, seed=5)
    draws = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        first = ds[0][3]["expression"]
        assert ds[0][3]["expression"] == first  # same (seed, epoch, index) -> same draw
        draws.append(first)
    assert set(draws) == {"a", "b", "c"}
    other = build_dataset(_cfg(rec_dir), "train", True, TOK, seed=6)
    assert [(other.set_epoch(e), other[0][3]["expression"])[1] for e in range(12)] != draws


def test_loader_batches_and_worker_independence(rec_dir):
    ds = build_dataset(_cfg(rec_dir), "train", True, TOK, seed=1)
    runs = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), batch_size=2, seed=3)
        loader = make_loader(ds, 2, sampler, workers)
        sampler.set_epoch(4)
        ds.set_epoch(4)
        batches = list(loader)
        assert isinstance(batches[0], Batch) and batches[0].images.shape == (2, 3, 32, 32)
        runs.append([t["expression"] for b in batches for t in b.targets])
    assert runs[0] == runs[1]


def test_eval_shards_and_batch_counts():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # every sample once, no padding duplicates
    # ceil(10 / 4) = 3; 3 ranks hold ceil(10 / 3) = 4 samples each -> 2 batches of 2; an empty set has none
    assert (batches_per_epoch(10, 4), batches_per_epoch(10, 2, 3), batches_per_epoch(0, 4)) == (3, 2, 0)
    assert batches_per_epoch(5, 32) == 1 == ResumableSampler(5, 32, seed=0).batches_per_epoch()


def _grec_entry():
    return {
        "image_id": 3,
        "height": 30,
        "width": 40,
        "expressions": ["two things", "nothing", "one thing"],
        "bbox": [[[0, 0, 10, 10], [20, 10, 10, 10]], [[0, 0, 0, 0]], [[5, 5, 5, 5]]],
        "annotations": [
            [{"bbox": [0, 0, 10, 10], "category_id": 1}, {"bbox": [20, 10, 10, 10], "category_id": 2}],
            [{"bbox": [0, 0, 0, 0], "category_id": -1}],
            [{"bbox": [5, 5, 5, 5], "category_id": 1}],
        ],
    }


def test_grec_targets_per_expression(tmp_path):
    root = _write(tmp_path / "g", {"train": [_grec_entry()], "val": [_grec_entry()]})
    (root / "meta.json").write_text(json.dumps({"task": "grec"}))
    val = build_dataset(_cfg(root), "val", False, TOK)
    n = {val[i][3]["expression"]: val[i][3]["orig_boxes"] for i in range(len(val))}
    assert [len(n[k]) for k in ("two things", "nothing", "one thing")] == [2, 0, 1]
    torch.testing.assert_close(n["one thing"], torch.tensor([[5.0, 5.0, 10.0, 10.0]]))
    empty = [val[i][3] for i in range(3) if val[i][3]["expression"] == "nothing"][0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # a train visit pairs the drawn expression with its own boxes
    train = build_dataset(_cfg(root), "train", True, TOK)
    for epoch in range(6):
        train.set_epoch(epoch)
        t = train[0][3]
        assert len(t["boxes"]) == {"two things": 2, "nothing": 0, "one thing": 1}[t["expression"]]


def test_grec_bbox_only_placeholder_dropped(tmp_path):
    entry = _grec_entry()
    del entry["annotations"]
    root = _write(tmp_path / "g2", {"val": [entry]})
    val = build_dataset(_cfg(root), "val", False, TOK)
    assert [len(val[i][3]["orig_boxes"]) for i in range(3)] == [2, 0, 1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"bbox": [1, 2, float("nan"), 4]}, "not finite"),
        ({"bbox": [1, 2, -3, 4]}, "non-positive"),
        ({"bbox": [1, 2, 0, 4]}, "non-positive"),
        ({"bbox": [50, 2, 5, 4]}, "outside"),
        ({"bbox": [-5, 2, 3, 4]}, "outside"),
        ({"bbox": [1, 2, 3]}, "not \\[x, y, w, h\\]"),
        ({"expressions": ["   "]}, "empty"),
        ({"expressions": []}, "expressions"),
    ],
)
def test_bad_annotations_raise_or_skip(tmp_path, bad, message):
    root = _write(tmp_path / "bad", {"val": [_rec(1, ["fine"]), {**_rec(2, ["ok"]), **bad}]})
    with pytest.raises(UserError, match=message) as info:
        build_dataset(_cfg(root), "val", False, TOK)
    assert "instances.json" in str(info.value) and "entry 1" in str(info.value) and "image_id 2" in str(info.value)
    ds = build_dataset(_cfg(root, skip_bad=True), "val", False, TOK)
    assert len(ds) == 1 and len(ds.stats["bad"]) == 1


def test_empty_expression_among_good_ones_is_dropped_with_skip_bad(tmp_path):
    root = _write(tmp_path / "e", {"train": [_rec(1, ["good", "", "fine"])]})
    with pytest.raises(UserError, match="expression 1 is empty"):
        build_dataset(_cfg(root), "train", True, TOK)
    ds = build_dataset(_cfg(root, skip_bad=True), "train", True, TOK)
    assert ds.records[0].expressions == ["good", "fine"] and len(ds.stats["dropped_expressions"]) == 1


def test_small_overhang_is_clipped(tmp_path):
    root = _write(tmp_path / "o", {"val": [_rec(1, ["edge"], bbox=(-0.5, 20, 40.7, 10.5))]})
    t = build_dataset(_cfg(root), "val", False, TOK)[0][3]
    torch.testing.assert_close(t["orig_boxes"], torch.tensor([[0.0, 20.0, 40.0, 30.0]]))


def test_bad_images_raise_or_are_replaced_deterministically(tmp_path):
    root = _write(tmp_path / "img", {"val": [_rec(i, [f"e{i}"]) for i in range(1, 5)]})
    (root / "images" / "2.png").unlink()
    (root / "images" / "3.png").write_bytes(b"")
    with pytest.raises(UserError, match="2.png: image not found"):
        build_dataset(_cfg(root), "val", False, TOK)[1]
    ds = build_dataset(_cfg(root, skip_bad=True), "val", False, TOK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ds[1][3], ds[1][3]
        assert a["skipped"] >= 1 and a["expression"] in ("e1", "e4") and a["expression"] == b["expression"]
        assert ds[2][3]["skipped"] >= 1 and ds[0][3]["skipped"] == 0


def test_image_size_disagreeing_with_annotation(tmp_path):
    root = _write(tmp_path / "s", {"val": [_rec(1, ["x"])]}, size=(50, 30))
    with pytest.raises(UserError, match="image is 50x30 but the annotation says 40x30"):
        build_dataset(_cfg(root), "val", False, TOK)[0]


def test_malformed_json_names_line_and_column(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "instances.json").write_text('{"val": [\n  {"image_id": 1,, }\n]}')  # the 2nd comma is column 18
    with pytest.raises(UserError, match=r"instances.json: malformed JSON at line 2, column 18"):
        build_dataset(_cfg(root), "val", False, TOK)


def test_unknown_split_and_dataset(rec_dir):
    with pytest.raises(UserError, match="no split 'testA'"):
        build_dataset(_cfg(rec_dir), "testA", False, TOK)
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset(DataConfig(dataset="imagenet", root=str(rec_dir)), "val", False, TOK)


def _mixed_root(tmp_path):
    root = tmp_path / "data"
    ann = root / "annotations" / "mixed"
    ann.mkdir(parents=True)
    train = [
        _rec(1, ["coco thing"], data_source="coco"),
        _rec(2, ["vg thing"], data_source="vg"),
        _rec(3, ["vg spelled out"], data_source="visual-genome"),
        _rec(4, ["flickr thing"], data_source="flickr"),
    ]
    (ann / "instances.json").write_text(json.dumps({"train": train, "val_refcoco_unc": [_rec(1, ["v"])]}))
    places = {
        1: "mscoco/train2014/COCO_train2014_000000000001.jpg",
        2: "visual-genome/2.jpg",
        3: "visual-genome/3.jpg",
        4: "flickr30k/4.jpg",
    }
    for rel in places.values():
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30)).save(root / "images" / rel)
    return root


def test_mixed_sources_and_vg_alias(tmp_path):
    root = _mixed_root(tmp_path)
    cfg = DataConfig(dataset="mixed", root=str(root), image_size=32, lsj=False)
    mixed = build_dataset(cfg, "train", True, TOK)
    assert len(mixed) == 4  # both spellings of Visual Genome are kept (docs/design.md B9)
    assert mixed.stats["data_sources"] == {"coco": 1, "vg": 2, "flickr": 1}
    assert all(ds[3]["image_id"] for ds in (mixed[i] for i in range(4)))  # every source's image is found
    only_vg = build_dataset(
        DataConfig(dataset="mixed", root=str(root), data_sources=["visual-genome"]), "train", True, TOK
    )
    assert sorted(r.image_id for r in only_vg.records) == [2, 3]
    coco = build_dataset(DataConfig(dataset="cocoall", root=str(root), image_size=32), "train", True, TOK)
    assert [r.image_id for r in coco.records] == [1] and coco.stats["filtered"] == 3
    val = build_dataset(DataConfig(dataset="cocoall", root=str(root), image_size=32), "val_refcoco_unc", False, TOK)
    assert val[0][3]["image_id"] == 1  # val entries without data_source find the COCO folder by split name


def test_file_name_and_custom_dataset(tmp_path):
    root = tmp_path / "c"
    (root / "pics").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "pics" / "cat photo.jpg")
    (root / "mine.json").write_text(json.dumps({"test": [_rec(7, ["cat"], file_name="cat photo.jpg")]}))
    cfg = DataConfig(dataset="custom", root=str(root), ann_file="mine.json", img_dir="pics", image_size=32)
    assert build_dataset(cfg, "test", False, TOK)[0][3]["image_id"] == 7


def test_config_validation():
    with pytest.raises(UserError, match="resize_mode"):
        DataConfig(resize_mode="squash")
    with pytest.raises(UserError, match="jitter"):
        DataConfig(jitter_min=1.5, jitter_max=1.0)


def test_train_with_lsj_and_flip_keeps_valid_boxes(rec_dir):
    cfg = DataConfig(dataset="synthref", root=str(rec_dir), image_size=32, lsj=True, flip_prob=0.5)
    ds = build_dataset(cfg, "train", True, TOK)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            boxes = ds[i][3]["boxes"]
            assert (boxes[:, 2:] > 0).all() and np.isfinite(boxes.numpy()).all()
            assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all() and (
                boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6
            ).all()


def test_dataset_task(tmp_path):
    assert dataset_task(get_spec("refcoco+"), tmp_path) == "rec"
    assert dataset_task(get_spec("grefcoco"), tmp_path) == "grec"
    assert dataset_task(get_spec("synthref"), tmp_path) == "rec"
    (tmp_path / "meta.json").write_text(json.dumps({"task": "grec"}))
    assert dataset_task(get_spec("synthref"), tmp_path) == "grec"


def test_train_kinds_keeps_only_those_expressions(tmp_path):
    splits = {
        "train": [
            _rec(1, ["the red one", "the left one"], kind=["attribute", "position"]),
            _rec(2, ["the third one"], kind=["ordinal"]),
        ],
        "val": [_rec(1, ["the left one"], kind=["position"])],
    }
    root = _write(tmp_path / "kinds", splits)
    train = build_dataset(_cfg(root, train_kinds=["attribute"]), "train", True, TOK)
    assert len(train) == 1 and train.records[0].expressions == ["the red one"] and train.stats["filtered"] == 1
    for seed in range(4):  # the only expression left is drawn every time
        assert (
            build_dataset(_cfg(root, train_kinds=["attribute"]), "train", True, TOK, seed)[0][3]["kind"] == "attribute"
        )
    # Evaluation splits are never filtered.
    assert len(build_dataset(_cfg(root, train_kinds=["attribute"]), "val", False, TOK)) == 1
    _write(tmp_path / "plain", {"train": [_rec(1, ["a"])]})
    with pytest.raises(UserError, match="train_kinds"):
        build_dataset(_cfg(tmp_path / "plain", train_kinds=["attribute"]), "train", True, TOK)
