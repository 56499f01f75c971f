"""SynthRef: resolver semantics on hand-built scenes, wording round trips, and generated folders (boxes, expressions,
splits, GREC format and proportions, determinism, worker independence, CLI)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simvg.cli import main
from simvg.data.tokenizer import BEiT3Tokenizer, clean_expression
from simvg.errors import UserError
from simvg.synthref.generator import DEFAULT_SPLITS, encode_png, generate_synthref, split_plan
from simvg.synthref.lang import Facts, enumerate_programs, resolve
from simvg.synthref.scene import (
    COLOURS,
    MAX_HIDDEN,
    SIZES,
    SceneObject,
    draw_scene,
    mask_bbox,
    render_background,
    render_mask,
)
from simvg.synthref.text import parse, render, vocabulary

SPATIAL_KINDS = {"position", "ordinal", "relation"}


def facts(*objects: tuple[str, str, str, float, float], size: int = 100) -> Facts:
    """A scene of (shape, colour, size, cx, cy) objects; the margin is 6 px at size 100."""
    shapes, colours, sizes, cx, cy = (list(v) for v in zip(*objects))
    return Facts(size, shapes, colours, sizes, cx, cy)


SCENE = [
    ("circle", "red", "small", 20.0, 50.0),
    ("circle", "red", "small", 50.0, 50.0),
    ("star", "green", "large", 80.0, 50.0),
    ("square", "blue", "medium", 50.0, 85.0),
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the red circle", None),  # two red circles: a singular phrase is ambiguous
        ("the leftmost red circle", {0}),
        ("the red disc on the far right", {1}),
        ("both red circles", {0, 1}),
        ("all three red circles", None),  # the count is wrong
        ("the circle left of the green star", None),  # both circles are left of it
        ("the circles to the left of the green star", {0, 1}),
        ("the circle closest to the green star", {1}),  # distances 30 and 60
        ("the box below the green star", {3}),
        ("the shape below the red circle", None),  # the anchor is not unique
        ("the purple star", set()),
        ("the star above the blue square", {2}),  # 35 px higher
        ("the second circle from the left", {1}),
        ("the third circle from the left", None),
        ("the biggest shape", {2}),
        ("the smallest shape", None),  # two small circles tie
        ("the shape in the middle", {1}),
        ("the shape at the top left", None),  # best on the diagonal, but not in the upper half
    ],
)
def test_resolver_on_hand_built_scene(text, expected):
    result = resolve(parse(text), facts(*SCENE))
    assert (None if result is None else set(result)) == expected


def test_margins_make_close_calls_unsure():
    near = facts(("circle", "red", "small", 20.0, 50.0), ("circle", "red", "small", 25.0, 50.0))
    assert resolve(parse("the leftmost circle"), near) is None  # 5 px apart, margin 6
    apart = facts(("circle", "red", "small", 20.0, 50.0), ("circle", "red", "small", 26.0, 50.0))
    assert resolve(parse("the leftmost circle"), apart) == {0}
    side = facts(("circle", "red", "small", 47.0, 20.0), ("square", "blue", "small", 50.0, 80.0))
    assert resolve(parse("the circle left of the square"), side) is None  # 3 px left: unsure
    corner = facts(("circle", "red", "small", 20.0, 30.0), ("circle", "red", "small", 70.0, 70.0))
    assert resolve(parse("the shape at the top left"), corner) == {0}


def test_parse_rejects_unknown_words():
    with pytest.raises(ValueError, match="banana"):
        parse("the red banana")
    with pytest.raises(ValueError):
        parse("the second circle")  # an ordinal needs "from the <side>"


def test_render_parse_round_trip_and_clean_text():
    for i in range(6):
        rng = np.random.default_rng([11, i])
        _, objects = draw_scene(rng, 128)
        f = Facts.from_objects(objects, 128)
        cands = enumerate_programs(f, rng, want_multi=True)
        programs = [p for kinds in cands.singles.values() for ps in kinds.values() for p in ps]
        programs += [p for p, _ in cands.multis] + cands.nones
        assert programs
        for p in programs:
            text = render(p, rng)
            assert parse(text) == p, text
            assert clean_expression(text) == text


def test_vocabulary_covers_rendered_words():
    words = set(vocabulary())
    rng = np.random.default_rng(5)
    _, objects = draw_scene(rng, 128)
    cands = enumerate_programs(Facts.from_objects(objects, 128), rng, want_multi=True)
    for p, _ in cands.multis[:50]:
        assert set(render(p, rng).split()) <= words


def test_size_classes_are_separable_by_area():
    areas: dict[str, list[float]] = {name: [] for name in SIZES}
    for i in range(120):
        _, objects = draw_scene(np.random.default_rng([7, i]), 96)
        for o in objects:
            areas[o.size].append(o.area / 96**2)
            assert max(o.bbox[2], o.bbox[3]) >= 0.12 * 96 - 1  # a pixel of rasterisation slack
    assert max(areas["small"]) < min(areas["medium"])
    assert max(areas["medium"]) < min(areas["large"])


def test_split_plan_counts():
    assert [split_plan(20, DEFAULT_SPLITS).count(s) for s in DEFAULT_SPLITS] == [17, 1, 1, 1]
    assert [split_plan(100, DEFAULT_SPLITS).count(s) for s in DEFAULT_SPLITS] == [79, 7, 7, 7]
    assert split_plan(3, {"val": 1.0}) == ["val"] * 3
    with pytest.raises(UserError, match="too few"):
        split_plan(3, DEFAULT_SPLITS)


def test_png_round_trip():
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)


# ------------------------------------------------------------------ generated folders


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec")
    generate_synthref(out, "rec", num_images=20, image_size=80, seed=3)
    return out


@pytest.fixture(scope="module")
def grec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grec")
    generate_synthref(out, "grec", num_images=40, image_size=64, seed=4)
    return out


def _load(root: Path):
    instances = json.loads((root / "instances.json").read_text())
    scenes = {int(k): [SceneObject.from_json(o) for o in v["objects"]] for k, v in
              json.loads((root / "scenes.json").read_text()).items()}  # fmt: skip
    meta = json.loads((root / "meta.json").read_text())
    return instances, scenes, meta


def _targets(entry: dict, j: int, task: str) -> set[int]:
    if task == "rec":
        return {entry["object_id"]}
    return {a["object_id"] for a in entry["annotations"][j] if a["category_id"] != -1}


@pytest.mark.parametrize("name", ["rec", "grec"])
def test_every_expression_resolves_to_exactly_its_targets(name, rec_dir, grec_dir):
    root = rec_dir if name == "rec" else grec_dir
    instances, scenes, meta = _load(root)
    tok = BEiT3Tokenizer(root / "tokenizer.spm")
    checked = 0
    for entries in instances.values():
        for e in entries:
            f = Facts.from_objects(scenes[e["image_id"]], meta["image_size"])
            for j, text in enumerate(e["expressions"]):
                assert resolve(parse(text), f) == _targets(e, j, name), text
                assert 3 not in tok.piece_ids(text) and len(tok.piece_ids(text)) <= 18, text
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", ["rec", "grec"])
def test_boxes_are_tight_around_drawn_shapes(name, rec_dir, grec_dir):
    root = rec_dir if name == "rec" else grec_dir
    _, scenes, meta = _load(root)
    size, seed = meta["image_size"], meta["seed"]
    for image_id, objects in scenes.items():
        png = np.asarray(Image.open(root / "images" / f"{image_id}.png").convert("RGB"))
        assert png.shape == (size, size, 3)
        # the background is the first thing drawn from the image's generator, so it can be drawn again
        changed = np.any(png != render_background(np.random.default_rng([seed, image_id]), size), axis=2)
        covered = np.zeros((size, size), dtype=bool)
        full = []
        for o in objects:
            mask, x0, y0 = render_mask(o.shape, o.cx, o.cy, o.extent, size)
            assert mask_bbox(mask, x0, y0) == o.bbox
            canvas = np.zeros((size, size), dtype=bool)
            canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
            full.append(canvas)
            x, y, w, h = o.bbox
            covered[y : y + h, x : x + w] = True
        assert not (changed & ~covered).any()  # nothing drawn outside the boxes
        for k, (o, canvas) in enumerate(zip(objects, full)):
            visible = canvas & ~np.any(full[k + 1 :], axis=0) if k + 1 < len(full) else canvas
            assert visible.sum() == o.visible >= (1 - MAX_HIDDEN) * canvas.sum()
            assert changed[visible].mean() > 0.97
            _assert_hue(png[visible], o.colour)


def _assert_hue(pixels: np.ndarray, colour: str) -> None:
    hsv = np.asarray(Image.fromarray(pixels[None].astype(np.uint8), "RGB").convert("HSV"))[0]
    hue = hsv[:, 0].astype(float) * 360 / 255
    diff = np.abs((hue - COLOURS[colour][0] + 180) % 360 - 180)
    assert np.median(diff) < 12, colour


def test_rec_format_and_splits(rec_dir):
    instances, scenes, meta = _load(rec_dir)
    assert list(instances) == ["testA", "testB", "train", "val"]  # sorted keys
    assert meta["task"] == "rec" and meta["num_images"] == 20
    assert sum(c["images"] for c in meta["counts"].values()) == 20
    images = {s: {e["image_id"] for e in es} for s, es in instances.items()}
    assert sum(len(v) for v in images.values()) == len(set().union(*images.values()))  # disjoint images
    for split, entries in instances.items():
        for e in entries:
            n = len(e["expressions"])
            assert n >= 1 and (split == "train" or n == 1)
            assert len(e["kind"]) == len(e["family"]) == n
            assert list(e["bbox"]) == list(scenes[e["image_id"]][e["object_id"]].bbox)
            assert e["height"] == e["width"] == 80 and 1 <= e["category_id"] <= 7
    assert {k for e in instances["testA"] for k in e["kind"]} == {"attribute"}
    assert {k for e in instances["testB"] for k in e["kind"]} <= SPATIAL_KINDS
    assert len({k for e in instances["train"] for k in e["kind"]}) == 4


def test_grec_format_proportions_and_splits(grec_dir):
    instances, _, meta = _load(grec_dir)
    kinds = [k for es in instances.values() for e in es for k in e["kind"]]
    assert 0.04 < kinds.count("none") / len(kinds) < 0.2
    assert 0.15 < kinds.count("multi") / len(kinds) < 0.45
    for split, entries in instances.items():
        for e in entries:
            n = len(e["expressions"])
            assert len(e["bbox"]) == len(e["annotations"]) == len(e["kind"]) == n
            assert split == "train" or n == 1
            for boxes, anns, kind in zip(e["bbox"], e["annotations"], e["kind"]):
                if kind == "none":
                    assert boxes == [[0, 0, 0, 0]]
                    assert anns == [{"bbox": [0, 0, 0, 0], "category_id": -1, "object_id": -1, "area": 0}]
                else:
                    assert len(boxes) == len(anns) == (1 if kind != "multi" else len(boxes)) >= 1
                    assert kind != "multi" or len(boxes) >= 2
                    assert [a["bbox"] for a in anns] == boxes
    assert {f for e in instances["testA"] for f in e["family"]} == {"attribute"}
    assert {f for e in instances["testB"] for f in e["family"]} == {"spatial"}
    assert meta["task"] == "grec"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = generate_synthref(tmp_path / "a", "grec", num_images=8, image_size=64, seed=9, workers=1)
    generate_synthref(tmp_path / "b", "grec", num_images=8, image_size=64, seed=9, workers=2)
    generate_synthref(tmp_path / "c", "grec", num_images=8, image_size=64, seed=10, workers=1)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 8 + 5 and files_a == files_b  # images, 3 JSON files, tokenizer model and vocab
    assert _files(tmp_path / "c")["instances.json"] != files_a["instances.json"]
    assert a["images_per_second"] > 0


def test_cli_success_and_overwrite(tmp_path, capsys):
    out = str(tmp_path / "d")
    args = ["data", "synth", "--out", out, "--num-images", "4", "--image-size", "64", "--workers", "1"]
    assert main(args) == 0
    assert "train: 1 images" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--task", "grec"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["--image-size", "16"], "--image-size must be between"),
        (["--seed", "-1"], "--seed must be"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--num-images", "2"], "too few"),
        (["--task", "vqa"], "invalid choice"),
        (["--num-images", "many"], "invalid int"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, extra, message):
    assert main(["data", "synth", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "instances.json").exists()


def test_easier_levels_cap_objects_and_plain_background():
    for i in range(20):
        image, objects = draw_scene(np.random.default_rng([3, i]), 96, max_objects=3, background="plain")
        assert 2 <= len(objects) <= 3
        outside = np.ones(image.shape[:2], dtype=bool)
        for o in objects:
            x, y, w, h = o.bbox
            outside[y : y + h, x : x + w] = False
        assert len(np.unique(image[outside].reshape(-1, 3), axis=0)) == 1  # one flat colour around the objects
    counts = [len(draw_scene(np.random.default_rng([3, i]), 96)[1]) for i in range(40)]
    assert max(counts) > 4  # the standard level keeps its busier scenes


def test_scene_options_reach_meta_and_are_checked(tmp_path, capsys):
    meta = generate_synthref(tmp_path / "e", "rec", num_images=6, image_size=64, max_objects=3, background="plain")
    assert meta["scene"] == {"max_objects": 3, "background": "plain"}
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["scene"]["background"] == "plain"
    for extra, message in ((["--max-objects", "9"], "--max-objects must be between 2 and 8"),
                           (["--background", "noise"], "invalid choice")):  # fmt: skip
        assert main(["data", "synth", "--out", str(tmp_path / "y"), "--num-images", "4", *extra]) == 2
        assert message in capsys.readouterr().err
