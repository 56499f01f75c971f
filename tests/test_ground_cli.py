"""``simvg ground`` and ``simvg predict``: output, pictures, JSONL batches, bad lines."""

from __future__ import annotations

import json

import pytest
from grounding_helpers import make_model_folder, scene
from PIL import Image

from simvg.cli import main
from simvg.inference.commands import MAX_REPORTED_BAD
from simvg.inference.grounder import Grounder


def test_ground_prints_json_equal_to_the_api(folder, image, capsys):
    assert main(["ground", str(image), "the red circle", "--checkpoint", str(folder), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == Grounder.from_checkpoint(folder).ground(image, "the red circle").to_dict()


def test_ground_prints_readable_lines_and_draws(folder, image, tmp_path, capsys):
    out = tmp_path / "pictures" / "out.png"
    assert main(["ground", str(image), "the red circle", "--checkpoint", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("'the red circle' (REC, token branch)") and "box x1=" in text and "score" in text
    drawn = Image.open(out)
    assert drawn.size == (96, 64) and drawn.convert("RGB").tobytes() != scene().tobytes()


def test_ground_compare_draws_both_branches_side_by_side(folder, image, tmp_path):
    out = tmp_path / "compare.png"
    argv = ["ground", str(image), "the red circle", "--checkpoint", str(folder), "--out", str(out), "--compare"]
    assert main(argv) == 0
    width, height = Image.open(out).size
    assert width > 2 * 96 and height > 64
    assert main(argv[:-3] + ["--compare"]) == 2  # --compare without --out


def test_ground_unknown_output_format(folder, image, tmp_path, capsys):
    assert main(["ground", str(image), "a", "--checkpoint", str(folder), "--out", str(tmp_path / "x.unknown")]) == 2
    assert "unknown image format" in capsys.readouterr().err


def write_queries(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_predict_writes_one_line_per_query_in_order(folder, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    scene().save(images / "a.png")
    scene(50, 80).save(images / "sub" / "b.jpg")
    queries = [{"image": "a.png", "text": "the red circle", "id": "q1"}, {"image": "sub/b.jpg", "text": "all red"},
               {"image": "a.png", "text": "the blue square", "id": 7}]  # fmt: skip
    write_queries(tmp_path / "q.jsonl", [json.dumps(q) for q in queries])
    out = tmp_path / "preds.jsonl"
    argv = ["predict", "--images", str(images), "--queries", str(tmp_path / "q.jsonl"), "--out", str(out)]
    assert main(argv + ["--checkpoint", str(folder), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", 2, 7] and [r["image"] for r in rows] == ["a.png", "sub/b.jpg", "a.png"]
    single = Grounder.from_checkpoint(folder).ground(images / "sub" / "b.jpg", "all red").to_dict()
    assert rows[1]["boxes"] == single["boxes"] and rows[1]["image_size"] == {"width": 50, "height": 80}


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a.png", "text"]', "expected a JSON object"),
    ('{"image": "a.png"}', "field 'text' is missing"),
    ('{"image": 3, "text": "a"}', "field 'image' is missing or not a string"),
    ('{"image": "../a.png", "text": "a"}', "must be a path inside --images"),
    ('{"image": "missing.png", "text": "a"}', "image not found"),
    ('{"image": "a.png", "text": "   "}', "text is empty"),
    ('{"image": "broken.png", "text": "a"}', "not an image file"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_predict_stops_at_a_bad_line_naming_it(folder, tmp_path, capsys, line, message):
    images = tmp_path / "images"
    images.mkdir()
    scene().save(images / "a.png")
    (images / "broken.png").write_text("hello")
    write_queries(tmp_path / "q.jsonl", ['{"image": "a.png", "text": "a"}', line])
    argv = ["predict", "--images", str(images), "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "p")]
    assert main(argv + ["--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q.jsonl:2: " in err and message in err and "--skip-bad" in err
    assert not (tmp_path / "p").exists()


def test_predict_skip_bad_counts_and_reports(folder, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    scene().save(images / "a.png")
    lines = [line for line, _ in BAD_LINES] * 2 + ['{"image": "a.png", "text": "the red circle"}', ""]
    write_queries(tmp_path / "q.jsonl", lines)
    out = tmp_path / "preds.jsonl"
    argv = ["predict", "--images", str(images), "--queries", str(tmp_path / "q.jsonl"), "--out", str(out)]
    assert main(argv + ["--checkpoint", str(folder), "--skip-bad", "--batch-size", "3"]) == 0
    assert len(out.read_text().splitlines()) == 1
    err = capsys.readouterr().err
    assert f"{2 * len(BAD_LINES)} bad lines skipped ({2 * len(BAD_LINES) - MAX_REPORTED_BAD} more not shown)" in err
    assert err.count("skipped ") == MAX_REPORTED_BAD + 1 and "q.jsonl:1: not valid JSON" in err


def test_demo_grounds_fresh_scenes_and_writes_a_page(folder, tmp_path, capsys):
    grec = make_model_folder(tmp_path / "grec", num_queries=10)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seed", "5", "--num-images", "2", "--checkpoint", str(folder)]
    assert main(argv + ["--grec-checkpoint", str(grec)]) == 0
    printed = capsys.readouterr().out
    assert "REC Acc@0.5:" in printed and "GREC Pr@(F1=1, IoU>=0.5):" in printed and "N-acc" in printed
    assert "seed 5 (repeat with --seed 5)" in printed
    page = (out / "index.html").read_text()
    pictures = sorted(p.relative_to(out).as_posix() for p in out.glob("*rec/*.png"))
    assert pictures and all(f'src="{p}"' in page for p in pictures)
    rec_rows = len(json.loads((out / "synthref_rec" / "instances.json").read_text())["val"])
    assert printed.count("\n") > rec_rows and len(list((out / "rec").glob("*.png"))) == rec_rows


def test_demo_without_grec_default_runs_rec_only(folder, tmp_path, capsys, monkeypatch):
    from simvg import artifact

    monkeypatch.setitem(artifact.DEFAULT_MODELS, "grec", tmp_path / "absent")
    assert main(["demo", "--out", str(tmp_path / "d"), "--num-images", "1", "--checkpoint", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "REC Acc@0.5:" in printed and "GREC skipped: no GREC default model" in printed
    assert not (tmp_path / "d" / "grec").exists()
    monkeypatch.setitem(artifact.DEFAULT_MODELS, "rec", tmp_path / "absent")
    assert main(["demo", "--out", str(tmp_path / "d2"), "--num-images", "1"]) == 2
    assert "no embedded default model" in capsys.readouterr().err
