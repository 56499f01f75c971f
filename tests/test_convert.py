"""Converters on small fixtures written in each source format, and the restricted unpickler."""

import io
import json
import os
import pickle

import pytest
import torch
from PIL import Image

from simvg.cli import main
from simvg.config import DataConfig
from simvg.data.convert import convert_grefcoco, convert_mdetr, convert_refer, convert_transvg, summarize
from simvg.data.datasets import build_dataset
from simvg.data.safe_pickle import fix_latin1, safe_load
from simvg.errors import UserError


class Py2Pickler(pickle._Pickler):
    """Writes str the way Python 2 wrote its byte strings (SHORT_BINSTRING, UTF-8 bytes), like refs(unc).p."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("utf-8")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str


def _py2_pickle(obj, path):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


COCO = {
    "images": [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40},
        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 60, "width": 80},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1},
        {"id": 11, "image_id": 1, "bbox": [5, 6, 7, 8], "category_id": 3},
        {"id": 12, "image_id": 2, "bbox": [9, 9, 20, 10], "category_id": 1},
    ],
    "categories": [{"id": 1, "name": "person"}],
}


def test_refer_pickle_and_coco(tmp_path):
    refs = [
        {
            "ref_id": 0,
            "ann_id": 10,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "sentences": [{"sent": "left man", "raw": "Left man."}, {"sent": "café guy", "raw": "x"}],
        },
        {"ref_id": 1, "ann_id": 12, "image_id": 2, "split": "val", "sentences": [{"sent": "a"}, {"sent": "b"}]},
        {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "testA", "sentences": [{"raw": "Only Raw"}]},
    ]
    _py2_pickle(refs, tmp_path / "refs(unc).p")
    (tmp_path / "instances.json").write_text(json.dumps(COCO))
    splits = convert_refer(tmp_path / "refs(unc).p", tmp_path / "instances.json")
    train = splits["train"]
    assert len(train) == 1 and train[0]["expressions"] == ["left man", "café guy"]  # UTF-8 recovered
    assert train[0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and (train[0]["width"], train[0]["height"]) == (40, 30)
    assert [e["expressions"] for e in splits["val"]] == [["a"], ["b"]]  # one entry per sentence
    assert splits["val"][0]["bbox"] == [9.0, 9.0, 20.0, 10.0] and splits["val"][0]["image_id"] == 2
    assert splits["testA"][0]["expressions"] == ["Only Raw"]


def test_refer_cli_end_to_end(tmp_path, capsys):
    src = tmp_path / "refcoco"
    src.mkdir()
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "thing"}]}]
    _py2_pickle(refs, src / "refs(unc).p")
    (src / "instances.json").write_text(json.dumps(COCO))
    out = tmp_path / "out"
    assert main(["data", "convert", "--from", "refer", str(src), "--out", str(out), "--dataset", "refcoco"]) == 0
    printed = capsys.readouterr().out
    assert "val" in printed and "1 entries" in printed and "(published: 10834)" in printed
    (out / "images").mkdir()
    Image.new("RGB", (40, 30)).save(out / "images" / "COCO_train2014_000000000001.jpg")
    ds = build_dataset(DataConfig(dataset="custom", root=str(out), image_size=16), "val", False, _Tok())
    torch.testing.assert_close(ds[0][3]["orig_boxes"], torch.tensor([[1.0, 2.0, 4.0, 6.0]]))
    assert main(["data", "convert", "--from", "refer", str(src), "--out", str(out)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


class _Tok:
    def encode_one(self, text):
        return torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil()}], protocol=2))
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|nt|os)\.system from .*refs\(unc\)\.p"):
        safe_load(path)


def test_safe_pickle_plain_data_and_damage(tmp_path):
    data = {"a": [1, 2.5, None, True], "b": (b"raw", "text"), "c": {1, 2}, "d": frozenset([3])}
    path = tmp_path / "ok.p"
    path.write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load(path) == data
    # Python 2's default protocol 0 (text), as refer's own files were written: S'...' strings, I ints
    path.write_bytes(b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xc3\\xa9 man'\np3\nsS'ann_id'\np4\nI12\nsa.")
    (loaded,) = safe_load(path)
    assert loaded["ann_id"] == 12 and fix_latin1(loaded["sent"]) == "café man"
    path.write_bytes(pickle.dumps(data)[:20])
    with pytest.raises(UserError, match="not a readable pickle"):
        safe_load(path)


def test_grefcoco_raw(tmp_path):
    grefs = [
        {
            "ref_id": 0,
            "ann_id": [10, 11],
            "image_id": 1,
            "split": "train",
            "sentences": [{"sent": "both"}, {"sent": "two"}],
        },
        {"ref_id": 1, "ann_id": [-1], "image_id": 1, "split": "train", "sentences": [{"sent": "the giraffe"}]},
        {"ref_id": 2, "ann_id": [12], "image_id": 2, "split": "val", "sentences": [{"sent": "p"}, {"sent": "q"}]},
        {"ref_id": 3, "ann_id": -1, "image_id": 2, "split": "val", "sentences": [{"sent": "nobody"}]},
    ]
    (tmp_path / "grefs(unc).json").write_text(json.dumps(grefs))
    (tmp_path / "instances.json").write_text(json.dumps(COCO))
    splits = convert_grefcoco(tmp_path / "grefs(unc).json", tmp_path / "instances.json")
    (train,) = splits["train"]  # grouped per image
    assert train["expressions"] == ["both", "two", "the giraffe"]
    assert train["bbox"] == [[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]] * 2 + [[[0, 0, 0, 0]]]
    assert train["annotations"][2] == [{"bbox": [0, 0, 0, 0], "category_id": -1}]
    assert [e["expressions"] for e in splits["val"]] == [["p"], ["q"], ["nobody"]]  # per expression
    counts = summarize(splits)
    assert (counts["train"]["multi_target"], counts["train"]["no_target"], counts["val"]["no_target"]) == (2, 1, 1)


def test_transvg_box_conventions(tmp_path):
    torch.save(
        [
            ("COCO_train2014_000000000005.jpg", 7, [1, 2, 3, 4], "man", []),
            ("COCO_train2014_000000000005.jpg", 7, [1, 2, 3, 4], "tall man", []),
            ("COCO_train2014_000000000005.jpg", 8, [5, 5, 5, 5], "dog", []),
        ],
        tmp_path / "unc+_train.pth",
    )
    torch.save([("8756.jpg", 3, [10, 20, 30, 60], "tree", [])], tmp_path / "referit_test.pth")
    torch.save([("1000.jpg", [5, 5, 15, 25], "a dog")], tmp_path / "flickr_val.pth")
    torch.save([("COCO_train2014_000000000009.jpg", 1, [0, 0, 2, 2], "x", [])], tmp_path / "gref_umd_val.pth")
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (50, 70)).save(images / "8756.jpg")
    referit = convert_transvg([tmp_path / "referit_test.pth"], str(images))
    assert referit["test"] == [
        {
            "image_id": 8756,
            "file_name": "8756.jpg",
            "bbox": [10.0, 20.0, 20.0, 40.0],
            "expressions": ["tree"],
            "width": 50,
            "height": 70,
        }
    ]
    splits = convert_transvg([tmp_path / "flickr_val.pth", tmp_path / "unc+_train.pth"])
    assert splits["val"][0]["bbox"] == [5.0, 5.0, 10.0, 20.0]  # flickr: x1y1x2y2 -> xywh
    train = splits["train"]  # unc+: xywh kept, grouped per (image, ann id)
    assert [(e["bbox"], e["expressions"]) for e in train] == [
        ([1.0, 2.0, 3.0, 4.0], ["man", "tall man"]),
        ([5.0, 5.0, 5.0, 5.0], ["dog"]),
    ]
    assert train[0]["image_id"] == 5
    assert len(convert_transvg([tmp_path / "unc+_train.pth"], group_train=False)["train"]) == 3
    assert list(convert_transvg([tmp_path / "gref_umd_val.pth"])) == ["val"]
    with pytest.raises(UserError, match="split 'val' twice"):
        convert_transvg([tmp_path / "flickr_val.pth", tmp_path / "gref_umd_val.pth"])


class _Opaque:
    pass


def test_transvg_refuses_objects_and_bad_names(tmp_path):
    torch.save([_Opaque()], tmp_path / "unc_val.pth")
    with pytest.raises(UserError, match="weights_only"):
        convert_transvg([tmp_path / "unc_val.pth"])
    torch.save([], tmp_path / "mystery_val.pth")
    with pytest.raises(UserError, match="name must start with"):
        convert_transvg([tmp_path / "mystery_val.pth"])


def _mdetr(images, anns):
    return {"images": images, "annotations": anns, "categories": []}


def test_mdetr_rec_and_grec(tmp_path):
    img = {"original_id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40}
    rec = _mdetr(
        [{**img, "id": 100, "caption": "left dog"}, {**img, "id": 101, "caption": "brown dog"}],
        [
            {"id": 0, "image_id": 100, "bbox": [1, 1, 5, 5], "category_id": 18, "original_id": 55},
            {"id": 1, "image_id": 101, "bbox": [1, 1, 5, 5], "category_id": 18, "original_id": 55},
        ],
    )
    (tmp_path / "finetune_refcoco_train.json").write_text(json.dumps(rec))
    (tmp_path / "finetune_refcoco_val.json").write_text(json.dumps(rec))
    grec = _mdetr(
        [{**img, "id": 200, "caption": "two dogs"}, {**img, "id": 201, "caption": "the cat"}],
        [
            {"id": 0, "image_id": 200, "bbox": [1, 1, 5, 5], "category_id": 18, "original_id": 55},
            {"id": 1, "image_id": 200, "bbox": [9, 9, 5, 5], "category_id": 18, "original_id": 56},
            {"id": 2, "image_id": 201, "bbox": [0, 0, 0, 0], "category_id": -1, "original_id": -1, "empty": True},
        ],
    )
    (tmp_path / "finetune_grefcoco_testB.json").write_text(json.dumps(grec))
    splits = convert_mdetr(sorted(tmp_path.glob("*.json")))
    (train,) = splits["train"]
    assert (
        train["expressions"] == ["left dog", "brown dog"] and train["image_id"] == 1 and train["bbox"] == [1, 1, 5, 5]
    )
    assert [e["expressions"] for e in splits["val"]] == [["left dog"], ["brown dog"]]
    test_b = splits["testB"]
    assert [len(e["annotations"][0]) for e in test_b] == [2, 1]
    assert test_b[1]["annotations"][0][0]["category_id"] == -1 and test_b[1]["bbox"] == [[[0, 0, 0, 0]]]


def test_convert_bad_inputs(tmp_path, capsys):
    (tmp_path / "finetune_x_val.json").write_text('{"images": [}')
    assert main(["data", "convert", "--from", "mdetr", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "malformed JSON at line 1" in capsys.readouterr().err
    assert main(["data", "convert", "--from", "refer", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
