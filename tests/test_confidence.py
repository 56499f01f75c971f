"""Confidence = branch agreement: hand-computed IoUs, when it is computed, and that JSON, CLI and API carry it."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from grounding_helpers import make_tokenizer, scene

from simvg.artifact import ModelSpec, Preprocess
from simvg.cli import main
from simvg.data.tokenizer import BEiT3Tokenizer
from simvg.inference.grounder import Grounder
from simvg.inference.loading import RunOutput
from simvg.models import MODEL_PRESETS
from simvg.serve.app import ServeLimits, create_app


def logits(p_object: list[float]) -> torch.Tensor:
    """[Q, 2] logits whose object probabilities are ``p_object``."""
    p = torch.tensor(p_object, dtype=torch.float64)
    return torch.stack((torch.log(p), torch.log1p(-p)), dim=-1).float()


class TwoBranchRunner:
    """A runner with ``run``: fixed (logits [Q, 2], boxes [Q, 4] cxcywh) per branch; records what it was asked."""

    branches = ("token", "decoder")

    def __init__(self, outputs: dict[str, tuple[list[float], list[list[float]]]]) -> None:
        self.outputs = {b: (logits(p), torch.tensor(x)) for b, (p, x) in outputs.items()}
        self.asked: list[tuple[str, ...]] = []

    def run(self, images, ids, mask, branches, attention=False):
        self.asked.append(tuple(branches))
        n = images.shape[0]
        return RunOutput({b: tuple(t.expand(n, -1, -1) for t in self.outputs[b]) for b in branches})


def grounder_for(tmp_path, outputs, num_queries=1, **options) -> tuple[Grounder, TwoBranchRunner]:
    tokenizer = BEiT3Tokenizer(make_tokenizer(tmp_path), max_len=20)
    arch = dataclasses.replace(MODEL_PRESETS["simvg_tiny_test"], num_queries=num_queries)
    runner = TwoBranchRunner(outputs)
    return Grounder(runner, tokenizer, ModelSpec(arch, Preprocess(image_size=64), branch="decoder"), **options), runner


# On a 100 x 100 image (stretched): cxcywh (0.25, 0.5, 0.5, 1) is x 0..50, (0.5, 0.5, 0.5, 1) is x 25..75 and
# (0.75, 0.5, 0.5, 1) is x 50..100, all over the full height.
LEFT, MIDDLE, RIGHT = [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0]


@pytest.mark.parametrize(
    ("token", "decoder", "expected"),
    [
        (LEFT, MIDDLE, 1 / 3),  # overlap 25 x 100 = 2500, union 5000 + 5000 - 2500 = 7500
        (MIDDLE, MIDDLE, 1.0),  # the branches agree
        (LEFT, RIGHT, 0.0),  # they touch at x = 50 and share no area
        (LEFT, [0.25, 0.25, 0.5, 0.5], 0.5),  # the top half of the token box: 2500 / 5000
    ],
)
def test_rec_confidence_is_the_iou_of_the_two_branch_boxes(tmp_path, token, decoder, expected):
    g, _ = grounder_for(tmp_path, {"token": ([0.999], [token]), "decoder": ([0.999], [decoder])})
    result = g.ground(scene(100, 100), "the red circle")
    assert result.confidences == pytest.approx([expected], abs=1e-6)
    entry = result.to_dict()["boxes"][0]
    assert entry["confidence"] == round(expected, 4) and entry["score"] == 0.999  # the score is kept beside it
    assert result.to_dict()["confidence_method"] == "branch_agreement"


def test_a_wrong_box_scored_one_gets_low_confidence(tmp_path):
    """The issue's case: a REC score near 1.00 whatever the box; the branches' disagreement shows it."""
    g, _ = grounder_for(tmp_path, {"token": ([1.0 - 1e-6], [LEFT]), "decoder": ([1.0 - 1e-6], [RIGHT])})
    low = g.ground(scene(100, 100), "the cat")
    g2, _ = grounder_for(tmp_path, {"token": ([1.0 - 1e-6], [RIGHT]), "decoder": ([1.0 - 1e-6], [RIGHT])})
    high = g2.ground(scene(100, 100), "the blue square")
    assert low.scores == pytest.approx(high.scores) and low.confidences == [0.0] and high.confidences == [1.0]


def test_rec_reports_no_threshold_and_grec_its_threshold(tmp_path):
    rec, _ = grounder_for(tmp_path, {"token": ([0.9], [LEFT]), "decoder": ([0.9], [LEFT])})
    assert rec.ground(scene(100, 100), "a").to_dict()["score_threshold"] is None
    outputs = {"token": ([0.9, 0.1], [LEFT, RIGHT]), "decoder": ([0.9, 0.1], [LEFT, RIGHT])}
    grec, _ = grounder_for(tmp_path, outputs, num_queries=2, score_threshold=0.6)
    assert grec.ground(scene(100, 100), "a").to_dict()["score_threshold"] == 0.6


TOP_LEFT = [0.25, 0.25, 0.5, 0.5]  # x 0..50, y 0..50


def test_grec_confidence_is_each_box_best_iou_with_the_other_branch(tmp_path):
    # The decoder keeps LEFT (0.95) and RIGHT (0.8). The token branch keeps MIDDLE (0.9) and TOP_LEFT (0.75) and
    # drops RIGHT (0.2). LEFT: IoU 1/3 with MIDDLE, 2500 / 5000 = 0.5 with TOP_LEFT -> 0.5 (its best match, not the
    # token branch's best-scoring box). RIGHT: 1/3 with MIDDLE, 0 with TOP_LEFT and the dropped RIGHT not counted.
    outputs = {"decoder": ([0.8, 0.95, 0.1], [RIGHT, LEFT, MIDDLE]),
               "token": ([0.2, 0.9, 0.75], [RIGHT, MIDDLE, TOP_LEFT])}  # fmt: skip
    g, _ = grounder_for(tmp_path, outputs, num_queries=3)
    result = g.ground(scene(100, 100), "all shapes")
    assert result.scores == pytest.approx([0.95, 0.8])  # best first: LEFT, then RIGHT
    assert result.confidences == pytest.approx([0.5, 1 / 3], abs=1e-6)
    nothing = {"decoder": outputs["decoder"], "token": ([0.2, 0.3, 0.1], [RIGHT, MIDDLE, TOP_LEFT])}
    g, _ = grounder_for(tmp_path, nothing, num_queries=3)
    assert g.ground(scene(100, 100), "all shapes").confidences == [0.0, 0.0]  # the token branch reports nothing


def test_which_branches_run(tmp_path):
    """Auto: the confidence when the decoder answers (the token head is nearly free), not when the token branch
    answers (it would run the decoder the token branch exists to skip); True and False force it."""
    outputs = {"token": ([0.9], [LEFT]), "decoder": ([0.9], [MIDDLE])}
    g, runner = grounder_for(tmp_path, outputs)
    assert g.ground(scene(100, 100), "a").confidences is not None
    token = g.ground(scene(100, 100), "a", branch="token")
    assert token.confidences is None and "confidence" not in token.to_dict()["boxes"][0]
    assert "confidence_method" not in token.to_dict()
    assert runner.asked == [("decoder", "token"), ("token",)]
    forced, runner = grounder_for(tmp_path, outputs, confidence=True)
    assert forced.ground(scene(100, 100), "a", branch="token").confidences == pytest.approx([1 / 3])
    off, runner = grounder_for(tmp_path, outputs, confidence=False)
    assert off.ground(scene(100, 100), "a").confidences is None and runner.asked == [("decoder",)]


def test_a_runner_with_one_branch_gives_no_confidence(tmp_path):
    """An exported ONNX graph holds one branch: no agreement to measure, and no error."""
    g, runner = grounder_for(tmp_path, {"token": ([0.9], [LEFT]), "decoder": ([0.9], [MIDDLE])}, confidence=True)
    runner.branches = ("decoder",)
    assert g.ground(scene(100, 100), "a").confidences is None and runner.asked == [("decoder",)]


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes, written out independently of simvg.utils.box_ops."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def test_real_model_confidence_matches_its_two_answers_and_leaves_them_unchanged(folder):
    with_conf = Grounder.from_checkpoint(folder, confidence=True)
    plain = Grounder.from_checkpoint(folder, confidence=False)
    for branch in ("token", "decoder"):
        result = with_conf.ground(scene(), "the red circle", branch=branch)
        alone = plain.ground(scene(), "the red circle", branch=branch)
        assert result.boxes == alone.boxes and result.scores == alone.scores  # one pass for both: same answer
    token = plain.ground(scene(), "the red circle", branch="token").boxes[0]
    decoder = plain.ground(scene(), "the red circle", branch="decoder").boxes[0]
    expected = iou(token, decoder)
    assert not math.isclose(expected, 1.0)
    for branch in ("token", "decoder"):
        got = with_conf.ground(scene(), "the red circle", branch=branch).confidences
        assert got == pytest.approx([expected], abs=1e-5)


def test_cli_json_carries_the_confidence(folder, image, capsys):
    argv = ["ground", str(image), "the red circle", "--checkpoint", str(folder), "--json"]
    assert main(argv + ["--branch", "decoder"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert 0.0 <= printed["boxes"][0]["confidence"] <= 1.0 and printed["confidence_method"] == "branch_agreement"
    assert printed["branch"] == "decoder" and printed["score_threshold"] is None
    assert main(argv + ["--branch", "token"]) == 0
    assert "confidence" not in json.loads(capsys.readouterr().out)["boxes"][0]
    assert main(argv + ["--branch", "token", "--confidence"]) == 0
    assert "confidence" in json.loads(capsys.readouterr().out)["boxes"][0]
    assert main(argv[:-1] + ["--branch", "decoder"]) == 0
    assert "(branch agreement)" in capsys.readouterr().out


def test_predict_jsonl_and_coco_carry_the_confidence(folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    scene().save(images / "a.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "text": "the red circle", "id": 1}) + "\n")
    argv = ["predict", "--images", str(images), "--queries", str(tmp_path / "q.jsonl"), "--checkpoint", str(folder),
            "--branch", "decoder"]  # fmt: skip
    assert main(argv + ["--out", str(tmp_path / "p.jsonl")]) == 0
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert 0.0 <= row["boxes"][0]["confidence"] <= 1.0
    assert main(argv + ["--out", str(tmp_path / "p.json"), "--format", "coco"]) == 0
    assert json.loads((tmp_path / "p.json").read_text())[0]["confidence"] == row["boxes"][0]["confidence"]


def test_server_answer_carries_confidence_threshold_and_branch(folder):
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    with TestClient(create_app(Grounder.from_checkpoint(folder), ServeLimits())) as client:
        files = {"image": ("a.png", buffer.getvalue(), "image/png")}
        body = client.post("/api/ground", files=files, data={"text": "the red circle", "branch": "decoder"}).json()
    assert body["branch"] == "decoder" and body["score_threshold"] is None
    assert body["confidence_method"] == "branch_agreement" and 0.0 <= body["boxes"][0]["confidence"] <= 1.0
