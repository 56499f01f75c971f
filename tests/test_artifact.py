"""The model artifact: official SimVG files (key map, preset inference, layouts, output parity with the authors'
model), model folders, and the one post-processing. Fixtures: tests/fixtures/README.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from simvg.errors import UserError
from simvg.models import SimVG, model_config
from simvg.models.official import DROPPED, infer_config, official_name_to_ours, official_to_ours

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_KEYS = json.loads((FIXTURES / "official_simvg_keys.json").read_text())["presets"]


def meta_state(names_and_shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Shape-only tensors: the three released presets cost no memory."""
    return {name: torch.empty(shape, device="meta") for name, shape in names_and_shapes.items()}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_KEYS))
def test_official_names_map_strictly_onto_every_released_preset(preset):
    """Every official name of the released B/32, B/32-gRefCOCO and L/32 checkpoints lands on one of our weights
    with the same shape, every weight of ours is covered, and only the criterion's class weights are dropped."""
    official = meta_state(OFFICIAL_KEYS[preset])
    ours = official_to_ours(official)
    dropped = [name for name in official if official_name_to_ours(name) is None]
    assert dropped and all(DROPPED.match(name) for name in dropped)
    assert len(ours) == len(official) - len(dropped)  # no two official names land on one of ours

    cfg = infer_config(ours)
    expected = dataclasses.replace(model_config(preset), text_pool="official", text_pos="official")
    assert dataclasses.replace(cfg, encoder=expected.encoder) == expected  # the head, field by field
    for field in ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size", "vocab_size"):
        assert getattr(cfg.encoder, field) == getattr(expected.encoder, field), field
    with torch.device("meta"):
        model = SimVG(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ours.items()}


def test_preset_inference_reads_the_tensors():
    """Width, depth, query count, image size (from the position table) and vocabulary come from shapes alone."""
    b32 = OFFICIAL_KEYS["simvg_b32"]
    l32, grec = infer_config(official_to_ours(meta_state(OFFICIAL_KEYS["simvg_l32"]))), None
    assert (l32.encoder.embed_dim, l32.encoder.depth, l32.encoder.num_heads) == (1024, 24, 16)
    grec = infer_config(official_to_ours(meta_state(OFFICIAL_KEYS["simvg_b32_grec"])))
    assert (grec.num_queries, grec.encoder.embed_dim, grec.encoder.depth) == (10, 768, 12)
    # A 512-px table (3 + 16 * 16 rows) and a shorter vocabulary, as a COCO-all pre-training file would have.
    small = dict(b32, **{"vis_enc.beit3.encoder.embed_positions.A.weight": [259, 768],
                         "vis_enc.beit3.text_embed.weight": [64002, 768]})  # fmt: skip
    cfg = infer_config(official_to_ours(meta_state(small)))
    assert (cfg.encoder.img_size, cfg.encoder.patch_size, cfg.encoder.vocab_size) == (512, 32, 64002)
    bad = dict(b32, **{"vis_enc.beit3.encoder.embed_positions.A.weight": [260, 768]})
    with pytest.raises(UserError, match="260 rows is not 3 \\+ a square patch grid"):
        infer_config(official_to_ours(meta_state(bad)))


def test_an_unknown_official_name_is_an_error_naming_it():
    state = meta_state(OFFICIAL_KEYS["simvg_b32"])
    state["head.some_new_layer.weight"] = torch.empty(3, device="meta")
    with pytest.raises(UserError, match="head.some_new_layer.weight"):
        official_to_ours(state)
    layer = "head.transformer.decoder.layers.0.attentions.2.attn.in_proj_weight"  # a third attention: not ours
    with pytest.raises(UserError, match="attentions.2"):
        official_name_to_ours(layer)
