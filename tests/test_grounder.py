"""The Python API: post-processing by hand-computed values, loading every format, batching, inputs, branches."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from grounding_helpers import make_checkpoint, make_tokenizer, scene

from simvg import artifact
from simvg.artifact import ModelSpec, Preprocess, object_scores, postprocess
from simvg.data.tokenizer import BEiT3Tokenizer
from simvg.errors import UserError
from simvg.inference.grounder import Grounder, GroundingResult, check_text
from simvg.models import MODEL_PRESETS


class FixedRunner:
    """Returns the same logits [Q, 2] and boxes [Q, 4] for every sample; records the branch it was asked for."""

    def __init__(self, logits, boxes):
        self.logits, self.boxes, self.branches = torch.tensor(logits), torch.tensor(boxes), []

    def __call__(self, images, ids, mask, branch):
        self.branches.append(branch)
        b = images.shape[0]
        return self.logits.expand(b, -1, -1), self.boxes.expand(b, -1, -1)


def assert_boxes_close(a, b, atol: float = 1e-4) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def fixed_grounder(tmp_path, logits, boxes, **data) -> Grounder:
    tokenizer = BEiT3Tokenizer(make_tokenizer(tmp_path), max_len=20)
    spec = ModelSpec(MODEL_PRESETS["simvg_tiny_test"], Preprocess(image_size=64, **data), branch="token")
    return Grounder(FixedRunner(logits, boxes), tokenizer, spec)


def test_object_score_is_softmax_of_index_0():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]])
    assert object_scores(logits).tolist() == pytest.approx([0.5, 0.75, 0.2])


def _logits(p_object: list[float]) -> torch.Tensor:
    """[1, Q, 2] logits whose object probabilities are ``p_object`` (NaN stays NaN)."""
    p = torch.tensor(p_object, dtype=torch.float64)
    return torch.stack((torch.log(p), torch.log1p(-p)), dim=-1)[None].float()


def test_rec_keeps_its_single_query_whatever_the_score():
    det = postprocess(_logits([0.01]), torch.rand(1, 1, 4), 0.7)[0]
    assert det.keep.tolist() == [0]


def test_grec_keeps_queries_at_or_over_threshold_best_first():
    scores = [0.9, 0.2, 0.95, float("nan"), 0.7, 0.69]
    boxes = torch.rand(1, 6, 4)
    det = postprocess(_logits(scores), boxes, 0.7)[0]
    assert det.keep.tolist() == [2, 0, 4]
    assert det.kept_scores.tolist() == pytest.approx([0.95, 0.9, 0.7], abs=1e-6)
    assert torch.equal(det.kept_boxes, boxes[0, [2, 0, 4]])
    assert postprocess(_logits([0.1, 0.3]), torch.rand(1, 2, 4), 0.7)[0].keep.tolist() == []


def test_boxes_come_back_in_original_pixels_stretch(tmp_path):
    # cxcywh (0.5, 0.5, 0.5, 0.5) of a stretched 200x100 image is x 50..150, y 25..75
    g = fixed_grounder(tmp_path, [[math.log(3.0), 0.0]], [[0.5, 0.5, 0.5, 0.5]])
    result = g.ground(scene(200, 100), "the red circle")
    assert result.boxes[0] == pytest.approx([50.0, 25.0, 150.0, 75.0], abs=1e-3)
    assert result.scores == pytest.approx([0.75])
    assert (result.task, result.no_target, result.image_size) == ("rec", False, (200, 100))


def test_boxes_come_back_in_original_pixels_letterbox(tmp_path):
    # 200x100 letterboxed into 64x64 at scale 0.32 (top-left): input box 0..32 px -> 0..100 px of the original
    g = fixed_grounder(tmp_path, [[0.0, 0.0]], [[0.25, 0.25, 0.5, 0.5]], resize_mode="letterbox")
    assert g.ground(scene(200, 100), "the red circle").boxes[0] == pytest.approx([0.0, 0.0, 100.0, 100.0], abs=1e-3)


def test_grec_no_target_is_explicit(tmp_path):
    logits = [[0.0, 0.0], [math.log(9.0), 0.0], [0.0, 5.0]]  # scores 0.5, 0.9, ~0.007
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]
    g = fixed_grounder(tmp_path, logits, boxes)
    result = g.ground(scene(100, 100), "all red shapes")
    assert (result.task, result.no_target, result.scores) == ("grec", False, pytest.approx([0.9]))
    assert result.boxes[0] == pytest.approx([0.0, 0.0, 50.0, 100.0], abs=1e-3)
    g.score_threshold = 0.95
    empty = g.ground(scene(100, 100), "all red shapes")
    assert (empty.no_target, empty.boxes, empty.scores) == (True, [], [])


def test_to_dict_is_json_ready_and_rounded():
    result = GroundingResult("a dog", [[1.23456, 2.0, 3.0, 4.0]], [0.123456], False, "rec", "token", (10, 20), 4, False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["boxes"] == [{"box": [1.23, 2.0, 3.0, 4.0], "score": 0.1235}]
    assert data["image_size"] == {"width": 10, "height": 20}
    assert (data["no_target"], data["truncated"], data["warnings"]) == (False, False, [])


def test_folder_and_training_checkpoint_give_the_same_boxes(folder, grounder):
    from_pth = Grounder.from_checkpoint(folder.parent / "train" / "ckpt.pth")
    a = grounder.ground(scene(), "the red circle on the left")
    b = from_pth.ground(scene(), "the red circle on the left")
    assert_boxes_close(a.boxes, b.boxes)
    assert a.scores == pytest.approx(b.scores, abs=1e-6)
    assert len(a.boxes) == 1 and a.task == "rec"
    x1, y1, x2, y2 = a.boxes[0]
    assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64


def test_batch_matches_single_calls(grounder):
    images, texts = [scene(), scene(50, 120), scene(30, 30)], ["the red circle", "all red shapes", "a small star"]
    batch = grounder.ground_batch(images, texts)
    for image, text, got in zip(images, texts, batch):
        want = grounder.ground(image, text)
        assert_boxes_close(got.boxes, want.boxes)
        assert got.image_size == want.image_size


def test_path_bytes_and_pil_inputs_agree(grounder, tmp_path):
    path = tmp_path / "scene.png"
    scene().save(path)
    results = [grounder.ground(x, "the red circle") for x in (path, str(path), path.read_bytes(), scene())]
    for r in results[1:]:
        assert_boxes_close(r.boxes, results[0].boxes)


def test_token_branch_never_runs_the_decoder(grounder, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoder ran for the token branch")

    monkeypatch.setattr(grounder.runner.model.decoder, "forward", fail)
    assert grounder.ground(scene(), "the red circle").branch == "token"
    with pytest.raises(AssertionError):
        grounder.ground(scene(), "the red circle", branch="decoder")


def test_branch_per_call_and_unknown_branch(grounder):
    token, decoder = grounder.ground(scene(), "a", branch="token"), grounder.ground(scene(), "a", branch="decoder")
    assert (token.branch, decoder.branch) == ("token", "decoder") and token.boxes != decoder.boxes
    with pytest.raises(UserError, match="branch"):
        grounder.ground(scene(), "a", branch="both")
    with pytest.raises(UserError, match="branch"):
        Grounder.from_checkpoint(grounder.source, branch="neither")


def test_grec_model_reports_every_box_over_threshold(tmp_path):
    ckpt = make_checkpoint(tmp_path, num_queries=10)
    everything = Grounder.from_checkpoint(ckpt, score_threshold=0.0).ground(scene(), "all red shapes")
    assert everything.task == "grec" and len(everything.boxes) == 10 and not everything.no_target
    assert everything.scores == sorted(everything.scores, reverse=True)
    nothing = Grounder.from_checkpoint(ckpt, score_threshold=1.0).ground(scene(), "all red shapes")
    assert nothing.no_target and nothing.boxes == []


def test_text_limits_truncation_and_foreign_scripts(grounder):
    with pytest.raises(UserError, match="empty"):
        grounder.ground(scene(), "  \n ")
    with pytest.raises(UserError, match="empty after cleaning"):
        grounder.ground(scene(), "?!.")
    assert grounder.ground(scene(), "a" * 1001).truncated  # no length limit by default: cut to the token budget
    with pytest.raises(UserError, match="limit is 1000"):
        check_text("a" * 1001, 1000)  # a limit when one is set (the server's)
    with pytest.raises(UserError, match="cannot be tokenized"):
        grounder.ground(scene(), "red \ud800 circle")
    long = grounder.ground(scene(), "the red circle on the left " * 6)
    assert long.truncated and long.num_tokens == 20 and "cut" in long.warnings[0]
    short = grounder.ground(scene(), "red circle")
    assert not short.truncated and short.num_tokens < 20 and short.warnings == []
    foreign = grounder.ground(scene(), "красный круг слева")
    assert len(foreign.boxes) == 1 and "unknown" in foreign.warnings[0]


def test_image_size_limit(folder):
    small = Grounder.from_checkpoint(folder, max_pixels=1000)
    with pytest.raises(UserError, match="over the limit"):
        small.ground(scene(), "a")
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    with pytest.raises(UserError, match="decompression bomb"):
        small.ground(buffer.getvalue(), "a")


def test_embedded_default(folder, monkeypatch, tmp_path):
    monkeypatch.setitem(artifact.DEFAULT_MODELS, "rec", folder)
    assert Grounder.from_checkpoint().source == str(folder)
    monkeypatch.setitem(artifact.DEFAULT_MODELS, "rec", tmp_path / "nothing")
    with pytest.raises(UserError, match="no embedded default model"):
        Grounder.from_checkpoint()


def test_import_simvg_is_light_and_exposes_the_api():
    code = "import sys, simvg; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    import simvg
    from simvg.models import create_model

    assert simvg.Grounder is Grounder and simvg.create_model is create_model
    with pytest.raises(AttributeError):
        simvg.no_such_name  # noqa: B018
