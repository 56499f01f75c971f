"""simvg pretrain: linked captions, patch coverage, the alignment/MLM losses against hand values, exact resume, and
the encoder it writes loading into a SimVG through model.pretrained."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from simvg.cli import main
from simvg.data.tokenizer import BEiT3Tokenizer, train_tokenizer
from simvg.errors import UserError
from simvg.models.beit3 import BEiT3, beit3_config, load_beit3_pretrained
from simvg.pretrain.config import CaptionData, load_pretrain_config
from simvg.pretrain.data import IGNORE, CaptionScenes, StepBatches
from simvg.pretrain.objectives import pretrain_losses
from simvg.synthref.captions import CAPTION_WORDS, NO_OBJECT, coverage, describe, location_words
from simvg.synthref.scene import SceneObject, draw_scene, mask_bbox, render_mask
from simvg.utils.checkpoint import load_checkpoint


def _square(cx: float, cy: float, extent: float, colour: str = "red") -> SceneObject:
    mask, x0, y0 = render_mask("square", cx, cy, extent, 16)
    box = mask_bbox(mask, x0, y0)
    return SceneObject("square", colour, "small", cx, cy, extent, (200, 0, 0), box, int(mask.sum()), int(mask.sum()))


def test_coverage_counts_visible_pixels_per_patch():
    """Object 0 fills patch (0, 0) of a 16-px image (patch 8) and half of patch (0, 1); object 1, drawn later,
    covers the right half of object 0's first patch: it takes those pixels away."""
    a, b = _square(5.5, 5.5, 12 / 0.9), _square(6.0, 1.5, 3.9 / 0.9, "blue")
    assert (a.bbox, b.bbox) == ((0, 0, 12, 12), (4, 0, 4, 4))  # the pixels the expectations below count
    bare = coverage([a], 16, 8)
    assert bare.shape == (1, 4)
    assert bare[0].tolist() == pytest.approx([1.0, 4 * 8 / 64, 8 * 4 / 64, 4 * 4 / 64], abs=1e-6)
    both = coverage([a, b], 16, 8)
    assert both[0, 0] == pytest.approx(1.0 - 16 / 64) and both[1, 0] == pytest.approx(16 / 64)
    assert both[0, 1:].tolist() == pytest.approx(bare[0, 1:].tolist()) and both[1, 1:].tolist() == [0, 0, 0]


def test_captions_link_every_attribute_word_to_its_object():
    rng = np.random.default_rng(3)
    for _ in range(30):
        image, objects = draw_scene(rng, 128, 4, "plain")
        cap = describe(objects, 128, rng)
        assert len(cap.words) == len(cap.links) and set(cap.words) <= set(CAPTION_WORDS)
        for word, link in zip(cap.words, cap.links):
            if link == NO_OBJECT:
                continue
            obj = objects[link]
            assert word in (obj.size, obj.colour, obj.shape, *location_words(obj, 128)), (word, obj)
        assert cap.words.count("and") == len({link for link in cap.links if link != NO_OBJECT}) - 1
    # the budget keeps whole phrases, and always the first one
    one = describe(objects, 128, np.random.default_rng(0), fits=lambda words: False)
    assert "and" not in one.words and len({link for link in one.links if link != NO_OBJECT}) == 1


def test_location_words_by_thirds():
    def at(x: int, y: int) -> SceneObject:  # only the box (its centre) matters here
        return SceneObject("square", "red", "small", 0, 0, 0, (0, 0, 0), (x, y, 10, 10), 100, 100)

    assert location_words(at(2, 2), 120) == ("in", "the", "top", "left", "corner")
    assert location_words(at(55, 2), 120) == ("at", "the", "top")
    assert location_words(at(100, 55), 120) == ("on", "the", "right")
    assert location_words(at(55, 55), 120) == ("in", "the", "middle")
    assert location_words(at(34, 34), 120) == ("in", "the", "top", "left", "corner")  # centre 39 < 120 / 3
    assert location_words(at(35, 35), 120) == ("in", "the", "middle")  # centre 40: the middle third starts there


def _batch(sim_words: torch.Tensor, sim_patches: torch.Tensor, links, cover, labels, pad=None):
    links = torch.tensor([links])
    out = {
        "words": sim_words[None],
        "patches": sim_patches[None],
        "mlm_logits": torch.zeros(1, links.shape[1], 5),
        "object": torch.zeros(1, sim_patches.shape[1]),
    }
    batch = {
        "links": links,
        "coverage": torch.tensor([cover], dtype=torch.float32),
        "labels": torch.tensor([labels]),
        "pad": torch.zeros_like(links, dtype=torch.bool) if pad is None else pad,
        "referent": torch.tensor([-1]),
    }
    return out, batch


def test_alignment_losses_against_hand_values():
    """Two patches, three tokens (function word, word of object 0, word of object 1), unit vectors along axes:
    token 1 matches patch 0 (cos 1) and token 2 nothing (cos 0 with both). Temperature 1."""
    words = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # token 2 a zero vector: similarity 0 everywhere
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cover = [[1.0, 0.25], [0.0, 0.75]]  # object 0: all of patch 0, a quarter of patch 1; object 1: 3/4 of patch 1
    out, batch = _batch(words, patches, [NO_OBJECT, 0, 1], cover, [IGNORE, IGNORE, 3])
    losses = pretrain_losses(out, batch, temperature=1.0)
    # token 1: logits [1, 0], target [0.8, 0.2]; token 2: logits [0, 0], target [0, 1]
    t1 = -(0.8 * math.log(math.e / (math.e + 1)) + 0.2 * math.log(1 / (math.e + 1)))
    assert float(losses["align_t2p"]) == pytest.approx((t1 + math.log(2)) / 2, rel=1e-6)
    # patch 0 belongs to object 0 (token 1): logits over tokens [0, 1, 0]; patch 1 to object 1 (token 2): [1, 0, 0]
    p0 = -math.log(math.e / (math.e + 2))
    p1 = -math.log(1 / (math.e + 2))
    assert float(losses["align_p2t"]) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    assert float(losses["mlm"]) == pytest.approx(math.log(5), rel=1e-6)  # zero logits over 5 ids
    # token 1's best patch shows object 0: a hit; token 2's argmax (patch 0, a tie) does not show object 1
    assert (float(losses["t2p_hits"]), float(losses["t2p_items"])) == (1.0, 2.0)
    assert (float(losses["mlm_hits"]), float(losses["mlm_items"])) == (0.0, 1.0)


def test_padded_tokens_take_no_part_and_no_nan():
    words = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pad = torch.tensor([[False, False, True]])
    out, batch = _batch(words, patches, [0, 0, 0], [[1.0, 0.0]], [IGNORE] * 3, pad)
    batch["links"][0, 2] = NO_OBJECT
    losses = pretrain_losses(out, batch, temperature=1.0)
    assert all(math.isfinite(float(v)) for v in losses.values())
    # patch 0 -> tokens 0 and 1 (the pad at token 2 excluded): logits [1, 1], target uniform: log 2
    assert float(losses["align_p2t"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(losses["mlm"]) == 0.0 and float(losses["mlm_items"]) == 0.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [" ".join(CAPTION_WORDS)] * 20 + ["the small red square on the left and a large blue circle"] * 5
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.spm", vocab_size=60)


def test_samples_are_a_function_of_the_index_and_links_follow_the_pieces(tokenizer):
    tok = BEiT3Tokenizer(tokenizer, max_len=24)
    data = CaptionScenes(CaptionData(tokenizer=str(tokenizer), max_tokens=24, mask_prob=0.3), tok, 64, 16, stream=0)
    a, b, c = data[5], data[5], data[6]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["ids"], b["ids"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], c["image"])
    real = (~a["pad"]).sum()
    assert a["ids"][0] == 0 and a["ids"][real - 1] == 2 and a["links"][0] == NO_OBJECT  # <s> ... </s>
    unmasked = torch.where(a["labels"] != IGNORE, a["labels"], a["ids"])
    expected = [0] + [i for w in a["caption"].split() for i in tok.piece_ids(w)] + [2]
    assert unmasked[:real].tolist() == expected
    assert (a["labels"] != IGNORE).sum() == (a["ids"] == tok.vocab_size - 1).sum()
    assert a["coverage"].shape == (8, 16) and a["coverage"].sum(0).max() <= 1.0 + 1e-6
    batches = list(StepBatches(3, 5, 2, rank=1, world=2))
    assert batches == [[14, 15], [18, 19]]  # step s, rank 1 of 2: samples from (2 s + 1) * 2


def _config(tmp_path, tokenizer, steps: int) -> str:
    cfg = {
        "encoder": {"preset": "simvg_tiny_test", "overrides": {"encoder.vocab_size": 64}},
        "data": {"tokenizer": str(tokenizer), "max_tokens": 32, "val_samples": 4, "max_objects": 3},
        "train": {"output_dir": str(tmp_path / "run"), "device": "cpu", "batch_size": 2, "max_steps": steps,
                  "warmup": 2, "checkpoint_every_steps": 2, "eval_every_steps": 2, "log_every_steps": 1},
    }  # fmt: skip
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_pretrain_resumes_exactly_and_its_encoder_loads_into_simvg(tmp_path, tokenizer):
    config = _config(tmp_path, tokenizer, steps=4)
    whole = tmp_path / "whole"
    assert main(["pretrain", config, "--output", str(whole)]) == 0
    part = tmp_path / "part"
    assert main(["pretrain", config, "--output", str(part), "--set", "train.max_steps=2"]) == 0
    assert main(["pretrain", config, "--output", str(part), "--resume"]) == 0
    a, b = load_checkpoint(whole / "last.pth"), load_checkpoint(part / "last.pth")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # beit3.pth loads like Microsoft's files into a fresh encoder, here at twice the image size (table resampled)
    encoder = BEiT3(beit3_config("tiny", vocab_size=64, img_size=128))
    report = load_beit3_pretrained(encoder, whole / "beit3.pth")
    assert "encoder.embed_positions.A.weight" in report.resized and not report.ignored
    assert torch.equal(encoder.text_embed.weight, a["model"]["beit3.text_embed.weight"])
    # ... but not into an encoder of another width: one error naming the file and the first mismatched key
    narrow = BEiT3(beit3_config("tiny", vocab_size=64, embed_dim=32, ffn_dim=64))
    with pytest.raises(
        UserError, match=r"beit3\.pth: text_embed.weight has shape \[64, 64\] in the checkpoint but \[64, 32\]"
    ):
        load_beit3_pretrained(narrow, whole / "beit3.pth")


def test_a_first_phrase_longer_than_the_text_budget_is_an_error_not_cut(tokenizer):
    """Eight positions hold <s>, </s> and six pieces; SynthRef's first phrase ("a large green square on the top
    left") often needs more. Cutting it would teach words without their object; the sample must refuse instead."""
    tok = BEiT3Tokenizer(tokenizer, max_len=8)
    data = CaptionScenes(CaptionData(tokenizer=str(tokenizer), max_tokens=8), tok, 64, 16, stream=0)
    lengths = []
    with pytest.raises(UserError, match=r"data.max_tokens 8 cannot hold the caption .* raise data.max_tokens"):
        for index in range(200):
            sample = data[index]
            lengths.append(int((~sample["pad"]).sum()))
    assert all(n <= 8 for n in lengths)  # every sample before the refusal fitted whole


def test_bad_pretrain_configs_are_one_line(tmp_path, tokenizer, capsys):
    config = _config(tmp_path, tokenizer, steps=2)
    cases = {
        "data.max_objects=9": "data.max_objects must be in [2, 8]",
        "data.mask_prob=1.5": "data.mask_prob must be in [0, 1)",
        "loss.align=0": "loss.align, loss.mlm and loss.object must be >= 0 and not all 0",
        "data.nope=1": "unknown key data.nope",
        "encoder.overrides={encoder.vocab_size: 10}": "62 token ids but the encoder's text embedding has 10 rows",
        f"data.tokenizer={tmp_path}/missing.spm": "missing.spm",
    }
    for override, message in cases.items():
        extra = ["--set", "loss.mlm=0"] if override.startswith("loss.") else []
        assert main(["pretrain", config, "--set", override, *extra, "--output", str(tmp_path / "x")]) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (override, err)
    with pytest.raises(UserError, match="background"):
        load_pretrain_config(config, ["data.background=stripes"])


def test_the_first_phrase_singles_its_object_out():
    """refer_first: no other object has every attribute the first phrase names (when the four attributes can tell
    them apart), and the referent is that phrase's object."""
    rng = np.random.default_rng(11)
    attributes = {"large", "medium", "small", *CAPTION_WORDS} - {"a", "the", "one", "and", "at", "on", "in", "corner"}
    for _ in range(60):
        _, objects = draw_scene(rng, 128, 4, "plain")
        cap = describe(objects, 128, rng, refer_first=True)
        first = cap.words.index("and") if "and" in cap.words else len(cap.words)
        named = [w for w, link in zip(cap.words[:first], cap.links[:first]) if link != NO_OBJECT]
        assert {link for link in cap.links[:first] if link != NO_OBJECT} == {cap.referent}
        assert set(named) <= attributes

        def fits(o: SceneObject, named: list[str] = named) -> bool:
            values = {o.size, o.colour, o.shape, *location_words(o, 128)}
            return all(w in values for w in named)

        target = objects[cap.referent]
        full = [w for w in (target.size, target.colour, target.shape, *location_words(target, 128)) if w in attributes]
        if not any(fits(o, full) for k, o in enumerate(objects) if k != cap.referent):
            assert [k for k, o in enumerate(objects) if fits(o)] == [cap.referent], (cap.text, objects)


def test_object_token_loss_against_hand_values():
    """[CLS] along axis 0; patch 0 along it (cos 1), patch 1 orthogonal; the referent covers patch 0 fully and a
    third of patch 1: target [0.75, 0.25] over logits [1, 0] (temperature 1)."""
    words = torch.zeros(1, 2)
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out, batch = _batch(words, patches, [NO_OBJECT], [[1.0, 1 / 3]], [IGNORE])
    out["object"] = torch.tensor([[1.0, 0.0]])
    batch["referent"] = torch.tensor([0])
    losses = pretrain_losses(out, batch, temperature=1.0)
    expected = -(0.75 * math.log(math.e / (math.e + 1)) + 0.25 * math.log(1 / (math.e + 1)))
    assert float(losses["align_object"]) == pytest.approx(expected, rel=1e-6)
    assert (float(losses["object_hits"]), float(losses["object_items"])) == (1.0, 1.0)
    batch["referent"] = torch.tensor([-1])  # no referent: no item, a finite zero
    losses = pretrain_losses(out, batch, temperature=1.0)
    assert float(losses["align_object"]) == 0.0 and float(losses["object_items"]) == 0.0
