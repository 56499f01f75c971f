"""``simvg data check``: clean folders pass (exit 0); every kind of problem is reported (exit 2)."""

import json

from PIL import Image

from simvg.cli import main
from simvg.data.check import check_dataset


def _entry(image_id, bbox=(2, 2, 10, 10), exprs=("a thing",), **kw):
    return {"image_id": image_id, "bbox": list(bbox), "expressions": list(exprs), "width": 40, "height": 30, **kw}


def _folder(tmp_path, splits, ids=(1, 2, 3), meta=True):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "instances.json").write_text(json.dumps(splits))
    if meta:
        (root / "meta.json").write_text(json.dumps({"task": "rec"}))
    for i in ids:
        Image.new("RGB", (40, 30)).save(root / "images" / f"{i}.png")
    return root


def test_clean_folder_exits_zero(tmp_path, capsys):
    root = _folder(tmp_path, {"train": [_entry(1, exprs=("a", "b"))], "val": [_entry(2), _entry(3)]})
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found" in out and "images referenced: 3" in out
    assert "train" in out and "val" in out


def test_every_problem_kind_is_reported(tmp_path, capsys):
    splits = {
        "val": [
            _entry(1, bbox=(1, 1, float("nan"), 3)),
            _entry(2, bbox=(1, 1, -4, 3)),
            _entry(3, bbox=(100, 1, 4, 3)),
            _entry(1, exprs=("  ",)),
            _entry(4),  # image missing
            _entry(5),  # image unreadable
            _entry(6),  # image size disagrees
        ]
    }
    root = _folder(tmp_path, splits)
    (root / "images" / "5.png").write_bytes(b"not a png")
    Image.new("RGB", (41, 30)).save(root / "images" / "6.png")
    assert main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out
    for kind in (
        "bad boxes: 3",
        "empty expressions: 1",
        "missing images: 1",
        "unreadable images: 1",
        "image size mismatch: 1",
    ):
        assert f"PROBLEM {kind}" in out, kind
    assert "not finite" in out and "non-positive" in out and "outside" in out and "4.png" in out


def test_quick_only_stats(tmp_path):
    root = _folder(tmp_path, {"val": [_entry(1), _entry(2)]}, ids=(1, 2))
    (root / "images" / "1.png").write_bytes(b"garbage")
    (root / "images" / "2.png").write_bytes(b"")
    report = check_dataset(root, quick=True)
    assert report.problems["unreadable images"] == [f"{root / 'images' / '2.png'}: empty file (0 bytes)"]
    assert len(check_dataset(root).problems["unreadable images"]) == 2


def test_published_counts_are_compared(tmp_path, capsys):
    root = tmp_path / "data"
    ann = root / "annotations" / "refcoco-unc"
    ann.mkdir(parents=True)
    img = "images/mscoco/train2014/COCO_train2014_000000000001.jpg"
    (root / img).parent.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / img)
    splits = {"train": [_entry(1, exprs=("a", "b"))], "val": [_entry(1)], "testA": [_entry(1)]}
    (ann / "instances.json").write_text(json.dumps(splits))
    assert main(["data", "check", str(root), "--dataset", "refcoco"]) == 2
    out = capsys.readouterr().out
    assert "train: 2 expressions, published 120624" in out and "testB: missing" in out
    assert "PROBLEM split counts: 4" in out and "missing images" not in out


def test_mixed_data_sources(tmp_path, capsys):
    root = tmp_path / "data"
    ann = root / "annotations" / "mixed"
    ann.mkdir(parents=True)
    train = [_entry(1, data_source="vg"), _entry(2, data_source="visual-genome"), _entry(3, data_source="imagenet")]
    (ann / "instances.json").write_text(json.dumps({"train": train}))
    report = check_dataset(root, "mixed", quick=True)
    assert report.problems["unknown data_source"] == ["train: 1 entries with data_source 'imagenet'"]
    assert report.sources["train"] == {"vg": 1, "visual-genome": 1, "imagenet": 1}
    missing = report.problems["missing images"]
    assert any("visual-genome/1.jpg" in m for m in missing) and any("visual-genome/2.jpg" in m for m in missing)


def test_malformed_json_and_missing_folder(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "instances.json").write_text('{"val": [1, 2,]}')  # "]" after the trailing comma: column 15
    assert main(["data", "check", str(root)]) == 2
    assert "malformed JSON at line 1, column 15" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
