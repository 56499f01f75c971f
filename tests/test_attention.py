"""Where the model looked: attention maps are the model's own probabilities, sit on the right original pixels for
every resize mode, leave the outputs untouched, and reach the CLI, the Python API and the server."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from grounding_helpers import scene
from PIL import Image

import simvg.models.decoder as decoder_module
from simvg.cli import main
from simvg.errors import UserError
from simvg.inference.draw import heat_overlay
from simvg.inference.grounder import Grounder
from simvg.models import create_model
from simvg.models.beit3 import MultiwayAttention
from simvg.serve.app import ServeLimits, create_app

GRID = 4  # simvg_tiny_test: 64 px input, patch 16


def tiny_inputs(batch: int = 2):
    torch.manual_seed(0)
    model = create_model("simvg_tiny_test", num_queries=3).eval()
    image = torch.randn(batch, 3, 64, 64)
    ids = torch.randint(3, 60, (batch, 7))
    pad = torch.zeros(batch, 7, dtype=torch.bool)
    pad[0, 5:] = True  # padded text keys must get no attention
    return model, image, ids, pad


def flat_outputs(out: dict) -> list[torch.Tensor]:
    tensors = []
    for branch in sorted(out):
        tensors += [out[branch]["pred_logits"], out[branch]["pred_boxes"]]
        tensors += [t for aux in out[branch]["aux_outputs"] for t in (aux["pred_logits"], aux["pred_boxes"])]
    return tensors


@torch.no_grad()
def test_maps_are_the_models_own_attention_probabilities():
    """Recomputed from the last layers' inputs, by hand: q/k of each expert, scaled, masked, softmax, head mean."""
    model, image, ids, pad = tiny_inputs()
    seen = {}
    attn = model.encoder.encoder.layers[-1].self_attn
    cross = model.decoder.decoder.layers[-1].cross_attn
    hooks = [attn.register_forward_pre_hook(lambda m, a: seen.update(enc=a)),
             cross.register_forward_pre_hook(lambda m, a, k: seen.update(dec=(a, k)), with_kwargs=True)]  # fmt: skip
    with model.capture_attention() as store:
        model(image, ids, pad)
    for h in hooks:
        h.remove()
    hv, ht, _ = seen["enc"]
    q = torch.cat([F.linear(hv, attn.q_proj.A.weight, attn.q_proj.A.bias),
                   F.linear(ht, attn.q_proj.B.weight, attn.q_proj.B.bias)], 1)  # fmt: skip
    k = torch.cat([F.linear(hv, attn.k_proj.A.weight, attn.k_proj.A.bias),
                   F.linear(ht, attn.k_proj.B.weight, attn.k_proj.B.bias)], 1)  # fmt: skip
    heads = attn.num_heads
    q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))  # [B, H, S, hd]
    scores = q[:, :, :1] @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # the CLS (object token) row
    keep = torch.cat([torch.ones(2, hv.shape[1], dtype=torch.bool), ~pad], 1)
    probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)[:, :, 0].mean(1)  # [B, S]
    patches = probs[:, 1 : 1 + GRID * GRID]
    torch.testing.assert_close(store["token"], patches / patches.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(store["token_patch_share"], patches.sum(-1), atol=1e-6, rtol=0)
    assert store["token"].shape == (2, GRID * GRID) and store["grid"] == (GRID, GRID)
    (query, key, _), kwargs = seen["dec"]
    want = cross(query, key, key, key_padding_mask=kwargs.get("key_padding_mask"), need_weights=True)[1]
    torch.testing.assert_close(store["decoder"], want, atol=1e-6, rtol=0)  # [B, Q, N], mean over heads
    assert store["decoder"].shape == (2, 3, GRID * GRID)


def test_cross_attention_probs_match_multihead_attention_with_padding():
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    query, key = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    want = mha(query, key, key, key_padding_mask=mask, need_weights=True, average_attn_weights=False)[1]
    got = decoder_module.cross_attention_probs(mha, query, key, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got[1, :, :, 3:].abs().max() == 0


def test_maps_are_distributions_over_patches(grounder):
    result = grounder.ground(scene(), "the red circle", attention=True)
    for branch in ("token", "decoder"):
        grid = result.attention.grids[branch]
        assert grid.shape == (GRID, GRID) and (grid >= 0).all() and grid.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.attention.maps[branch].shape == (64, 96)  # original pixels: (height, width)
    assert 0.0 < result.attention.token_patch_share <= 1.0


def test_capture_leaves_outputs_bit_identical_and_removes_its_hooks():
    model, image, ids, pad = tiny_inputs()
    with torch.inference_mode():
        before = flat_outputs(model(image, ids, pad))
        with model.capture_attention():
            during = flat_outputs(model(image, ids, pad))
        after = flat_outputs(model(image, ids, pad))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(before, during, after))
    for module in (model.encoder.encoder.layers[-1].self_attn, model.decoder.decoder.layers[-1].cross_attn):
        assert not module._forward_pre_hooks and not module._forward_pre_hooks_with_kwargs  # no cost afterwards


def test_grounding_with_attention_gives_the_same_answer(grounder):
    for branch in ("token", "decoder"):
        plain = grounder.ground(scene(), "the red circle", branch=branch)
        looked = grounder.ground(scene(), "the red circle", branch=branch, attention=True)
        assert (looked.boxes, looked.scores, looked.branch) == (plain.boxes, plain.scores, branch)
        assert looked.attention.boxes[branch] == plain.boxes
    assert grounder.ground(scene(), "a").attention is None


def grounder_with(base: Grounder, resize_mode: str) -> Grounder:
    spec = dataclasses.replace(base.spec, preprocess=dataclasses.replace(base.spec.preprocess, resize_mode=resize_mode))
    return Grounder(base.runner, base.tokenizer, spec)


def force_attention(monkeypatch, token_cell: tuple[int, int], decoder_cell: tuple[int, int]) -> None:
    """Make the object token attend to patch ``token_cell`` and every decoder query to ``decoder_cell`` ((row,
    column) of the input's patch grid) by replacing the softmax inputs: keys are [CLS, patches row-major, text] in
    the encoder and the patches row-major in the decoder."""

    def encoder_scores(self, hv, ht, attn_mask, rows):
        scores = torch.zeros(hv.shape[0], self.num_heads, 1, hv.shape[1] + ht.shape[1])
        scores[..., 1 + token_cell[0] * GRID + token_cell[1]] = 50.0
        return scores

    def decoder_scores(attn, query, key, pad_mask):
        scores = torch.zeros(query.shape[0], attn.num_heads, query.shape[1], key.shape[1])
        scores[..., decoder_cell[0] * GRID + decoder_cell[1]] = 50.0
        return scores

    monkeypatch.setattr(MultiwayAttention, "attention_scores", encoder_scores)
    monkeypatch.setattr(decoder_module, "cross_attention_scores", decoder_scores)


def peak_rectangle(values: np.ndarray) -> tuple[int, int, int, int]:
    """(first column, last column, first row, last row) of the pixels holding the map's maximum."""
    rows, cols = np.nonzero(values == values.max())
    return int(cols.min()), int(cols.max()), int(rows.min()), int(rows.max())


# (image width, height, resize mode, token cell, decoder cell, token peak, decoder peak); peaks by hand:
# stretch 200x100 -> 64x64: a 16-px cell is 50 px wide and 25 px high in the original.
# letterbox 200x100: scale 0.32 -> 64x32 at the top; grid rows 2-3 are padding; a cell is 50 x 50 px.
# letterbox_center 200x100: the 64x32 picture starts at input row 16, so grid row 1 is original rows 0-49.
# letterbox 100x200: 32x64 at the left; grid columns 2-3 are padding.
PLACEMENTS = [
    (200, 100, "stretch", (1, 2), (3, 0), (100, 149, 25, 49), (0, 49, 75, 99)),
    (200, 100, "letterbox", (1, 2), (0, 3), (100, 149, 50, 99), (150, 199, 0, 49)),
    (200, 100, "letterbox_center", (2, 1), (1, 3), (50, 99, 50, 99), (150, 199, 0, 49)),
    (100, 200, "letterbox", (3, 1), (0, 0), (50, 99, 150, 199), (0, 49, 0, 49)),
]


@pytest.mark.parametrize(("width", "height", "mode", "token_cell", "decoder_cell", "token_peak", "decoder_peak"),
                         PLACEMENTS)  # fmt: skip
def test_forced_attention_peaks_at_that_patch_in_original_pixels(
    grounder, monkeypatch, width, height, mode, token_cell, decoder_cell, token_peak, decoder_peak
):
    force_attention(monkeypatch, token_cell, decoder_cell)
    result = grounder_with(grounder, mode).ground(scene(width, height), "the red circle", attention=True)
    maps = result.attention
    assert np.unravel_index(maps.grids["token"].argmax(), (GRID, GRID)) == token_cell
    assert np.unravel_index(maps.grids["decoder"].argmax(), (GRID, GRID)) == decoder_cell
    assert maps.maps["token"].shape == (height, width)
    assert peak_rectangle(maps.maps["token"]) == token_peak
    assert peak_rectangle(maps.maps["decoder"]) == decoder_peak


def test_attention_on_letterbox_padding_lands_nowhere_on_the_image(grounder, monkeypatch):
    force_attention(monkeypatch, (3, 1), (2, 2))  # both grid rows 2-3 are padding for a 200x100 letterbox
    maps = grounder_with(grounder, "letterbox").ground(scene(200, 100), "a", attention=True).attention
    assert maps.grids["token"].sum() == pytest.approx(1.0, abs=1e-5)
    assert maps.maps["token"].max() < 1e-6 and maps.maps["decoder"].max() < 1e-6


def test_runner_without_attention_is_a_clean_error(grounder):
    plain = Grounder(lambda *args: grounder.runner(*args), grounder.tokenizer, grounder.spec)
    with pytest.raises(UserError, match="attention maps need the PyTorch model"):
        plain.ground(scene(), "a", attention=True)
    with pytest.raises(UserError, match="attention=True"):
        plain.ground(scene(), "a").draw_attention(scene())


def test_draw_attention_one_or_both_branches(grounder):
    result = grounder.ground(scene(), "the red circle", attention=True)
    both, token = result.draw_attention(scene()), result.draw_attention(scene(), branch="token")
    # 96 px wide scenes are enlarged 4x (to 384 px); two panels with a 7 px gap, a title strip above
    assert both.width == 2 * 384 + 7 and token.width == 384 and both.height == token.height > 256
    with pytest.raises(UserError, match="no attention map for the both branch"):
        result.draw_attention(scene(), branch="both")


def test_cli_writes_the_attention_picture(folder, image, tmp_path, capsys):
    out = tmp_path / "looked" / "attention.png"
    assert main(["ground", str(image), "the red circle", "--checkpoint", str(folder), "--attention", str(out)]) == 0
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width == 2 * 384 + 7
    assert f"wrote {out}" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["/proc/simvg-attention.png", "{tmp}/a-file/attention.png"])
def test_cli_unwritable_attention_path_is_one_line_exit_2(folder, image, tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("not a folder")
    path = where.format(tmp=tmp_path)
    assert main(["ground", str(image), "a", "--checkpoint", str(folder), "--attention", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and "Traceback" not in err


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_server_attention_overlays(grounder):
    with TestClient(create_app(grounder, ServeLimits())) as client:

        def post(**extra):
            files = {"image": ("a.png", png(scene()), "image/png")}
            return client.post("/api/ground", files=files, data={"text": "the red circle", **extra})

        plain, looked = post().json(), post(attention="1").json()
        assert "attention" not in plain and post(attention="0").json().keys() == plain.keys()
        # the same answer; both branches ran, so the (token-branch) answer now carries its confidence as well
        assert "confidence" in looked["boxes"][0] and looked["confidence_method"] == "branch_agreement"
        for entry in looked["boxes"]:
            del entry["confidence"]
        drop = ("attention", "elapsed_ms", "confidence_method")
        assert {k: v for k, v in looked.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}
        maps = grounder.ground(scene(), "the red circle", attention=True).attention.maps
        assert set(looked["attention"]) == {"token", "decoder"}
        for branch, url in looked["attention"].items():
            prefix = "data:image/png;base64,"
            assert url.startswith(prefix)
            overlay = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
            assert overlay.size == (96, 64)  # the original image's size
            assert overlay.convert("RGB").tobytes() == heat_overlay(scene(), maps[branch]).tobytes()
        bad = post(attention="maybe")
        assert bad.status_code == 400 and "attention" in bad.json()["error"]
