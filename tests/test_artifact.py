"""The model artifact: official SimVG files (key map, preset inference, layouts, output parity with the authors'
model), model folders, and the one post-processing. Fixtures: tests/fixtures/README.md."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from engine_data import make_config, make_dataset, write_config
from grounding_helpers import make_tokenizer, scene
from safetensors.torch import load_file, save_file

from simvg import load_model
from simvg.artifact import read_weights
from simvg.cli import main
from simvg.engine.train import init_weights
from simvg.errors import UserError
from simvg.models import SimVG, model_config
from simvg.models.official import DROPPED, infer_config, official_name_to_ours, official_to_ours
from simvg.utils.checkpoint import load_model_state

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


@pytest.mark.parametrize("preset", sorted(OFFICIAL_KEYS))
def test_official_files_of_every_preset_load_strictly(preset, tmp_path):
    """Files in the official save_checkpoint layout with the released names and shapes (meta tensors: no memory),
    DDP prefix on the raw weights, EMA shadow without: read, mapped, preset inferred, loaded strictly."""
    state = meta_state(OFFICIAL_KEYS[preset])
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 29, "state_dict": {"module." + k: v for k, v in state.items()}, "ema_state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, path)  # fmt: skip
    for weights in ("auto", "raw"):
        read = read_weights(path, weights)
        assert read.kind == "official" and read.spec.weights == ("ema" if weights == "auto" else "raw")
        cfg = read.spec.architecture
        expected = model_config(preset)
        assert (cfg.encoder.embed_dim, cfg.encoder.depth, cfg.num_queries, cfg.encoder.img_size) == (
            expected.encoder.embed_dim,
            expected.encoder.depth,
            expected.num_queries,
            expected.encoder.img_size,
        )
        assert read.spec.preprocess.image_size == 640 and read.spec.task == ("grec" if "grec" in preset else "rec")
        with torch.device("meta"):
            model = SimVG(cfg)
        assert load_model_state(model, read.state, strict=True) == ([], [])
    del state["head.bbox_embed_decoder.layers.0.bias"]
    torch.save({"state_dict": state}, path)
    with torch.device("meta"):
        model = SimVG(cfg)
    with pytest.raises(UserError, match="missing.*decoder.bbox_embed.layers.0.bias"):
        load_model_state(model, read_weights(path).state, strict=True, source=str(path))


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


# ----------------------------------------------------------------------------------------------------------------
# output parity with the authors' model (tensors computed by their code: tests/fixtures/README.md)

PARITY_TOL = 1e-5  # fp32, the same operations in another order: measured 5e-7


def parity_fixture(task: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(official state dict, every other tensor) of ``official_tiny_{task}.safetensors``."""
    tensors = load_file(FIXTURES / f"official_tiny_{task}.safetensors")
    state = {k.removeprefix("state_dict/"): v for k, v in tensors.items() if k.startswith("state_dict/")}
    return state, {k: v for k, v in tensors.items() if not k.startswith("state_dict/")}


@pytest.mark.parametrize("task", ["rec", "grec"])
def test_official_weights_give_the_official_outputs(task):
    """Both branches, an unpadded and two padded expressions: our model with the official weights (mapped, the
    architecture inferred, text_pool/text_pos "official") reproduces the authors' forward pass. A wrong name in the
    map, a transposed tensor or a missing B1/B2 emulation moves these outputs by far more than the tolerance."""
    state, io = parity_fixture(task)
    cfg = infer_config(official_to_ours(state))
    assert (cfg.num_queries, cfg.encoder.img_size, cfg.encoder.patch_size) == ((1 if task == "rec" else 10), 64, 16)
    model = SimVG(cfg).eval()
    model.load_state_dict(official_to_ours(state), strict=True)
    mask = io["input/text_pad_mask"].bool()
    assert not mask[0].any() and mask[1:].any(dim=1).all()
    with torch.no_grad():
        out = model(io["input/image"], io["input/text_ids"], mask)
    for branch in ("decoder", "token"):
        torch.testing.assert_close(out[branch]["pred_logits"], io[f"output/{branch}_logits"], atol=PARITY_TOL, rtol=0)
        torch.testing.assert_close(out[branch]["pred_boxes"], io[f"output/{branch}_boxes"], atol=PARITY_TOL, rtol=0)
    # Given a bool mask, the official pooling is a real masked max: our default ("max") equals it there.
    fixed = SimVG(dataclasses.replace(cfg, text_pool="max")).eval()
    fixed.load_state_dict(official_to_ours(state), strict=True)
    with torch.no_grad():
        out = fixed(io["input/image"], io["input/text_ids"], mask)
    for branch in ("decoder", "token"):
        want = io[f"output_bool_mask/{branch}_logits"]
        torch.testing.assert_close(out[branch]["pred_logits"], want, atol=PARITY_TOL, rtol=0)
        assert (want - io[f"output/{branch}_logits"]).abs().max() > 100 * PARITY_TOL  # the two poolings differ


def official_checkpoint(state: dict[str, torch.Tensor], seed: int = 2) -> dict:
    """The dict the official ``save_checkpoint`` writes after DDP training: ``module.`` names, an EMA shadow."""
    gen = torch.Generator().manual_seed(seed)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}
    return {
        "epoch": 3, "d_acc": 81.2, "miou": 0.0, "best_d_acc": 81.2, "best_miou": 0.0, "amp": False, "lr": 5e-4,
        "state_dict": {"module." + k: v for k, v in state.items()},
        "ema_state_dict": {"module." + k: v for k, v in ema.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0, 1]}, {"lr": 5e-4, "params": [2]}]},
        "scheduler": {"last_epoch": 3, "lr_lambdas": [None, None, None]},
    }  # fmt: skip


def _outputs(model: SimVG, io: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(io["input/image"], io["input/text_ids"], io["input/text_pad_mask"].bool())
    return torch.cat([out[b][k].flatten() for b in ("decoder", "token") for k in ("pred_logits", "pred_boxes")])


def test_official_checkpoint_layouts_load_with_ema_by_default(tmp_path, caplog):
    state, io = parity_fixture("rec")
    ckpt = official_checkpoint(state)
    torch.save(ckpt, tmp_path / "simvg_l32_grec.pth")  # a misleading name: the architecture comes from tensors
    torch.save(ckpt["state_dict"], tmp_path / "bare_ddp.pth")
    torch.save(state, tmp_path / "bare.pth")
    save_file(state, str(tmp_path / "official.safetensors"))
    want_raw = torch.cat([io[f"output/{b}_{k}"].flatten() for b in ("decoder", "token") for k in ("logits", "boxes")])

    with caplog.at_level("INFO", logger="simvg"):
        ema = load_model(tmp_path / "simvg_l32_grec.pth")  # "auto": the EMA shadow, as the official test evaluates
    assert "text_pool and text_pos set to 'official'" in caplog.text and "ema weights" in caplog.text
    assert ema.cfg.num_queries == 1 and not ema.training
    ema_ref = SimVG(ema.cfg).eval()
    ema_ref.load_state_dict(official_to_ours(ckpt["ema_state_dict"]))
    assert torch.equal(_outputs(ema, io), _outputs(ema_ref, io))
    assert (_outputs(ema, io) - want_raw).abs().max() > 1e-3  # the EMA weights really differ
    for path, kw in (("simvg_l32_grec.pth", dict(weights="raw")), ("bare_ddp.pth", {}), ("bare.pth", {}),
                     ("official.safetensors", {})):  # fmt: skip
        got = _outputs(load_model(tmp_path / path, **kw), io)
        torch.testing.assert_close(got, want_raw, atol=PARITY_TOL, rtol=0, msg=path)
    with pytest.raises(UserError, match="bare.pth: EMA weights asked for, but a bare state dict holds no EMA"):
        load_model(tmp_path / "bare.pth", weights="ema")


def test_broken_and_foreign_files_are_one_clear_error(tmp_path):
    state, _ = parity_fixture("rec")
    torch.save(official_checkpoint(state), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated.pth: not a readable checkpoint"):
        load_model(tmp_path / "truncated.pth")
    torch.save({"model_state": {"backbone.conv1.weight": torch.zeros(1)}, "epoch": 1}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other.pth: not a SimVG checkpoint .*top-level keys: epoch, model_state"):
        load_model(tmp_path / "other.pth")
    missing = dict(state)
    del missing["head.bbox_embed_token.layers.2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing.pth.*token.bbox_embed.layers.2.weight"):
        load_model(tmp_path / "missing.pth")
    extra = dict(state, **{"head.new_branch.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="extra.pth: unknown official SimVG weight 'head.new_branch.weight'"):
        load_model(tmp_path / "extra.pth")


# ----------------------------------------------------------------------------------------------------------------
# official files through the command line, export, eval and training init


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """The tiny official REC and GREC models as official checkpoints, a tokenizer that fits them, a picture."""
    root = tmp_path_factory.mktemp("official")
    for task in ("rec", "grec"):
        torch.save(official_checkpoint(parity_fixture(task)[0]), root / f"official_{task}.pth")
    tokenizer = make_tokenizer(root)
    scene(96, 64).save(root / "photo.png")
    return root, tokenizer


def _ground_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["ground", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ground_and_export_of_an_official_file(official_files, tmp_path, capsys):
    root, tokenizer = official_files
    photo, ckpt = str(root / "photo.png"), str(root / "official_rec.pth")
    direct = _ground_json(capsys, photo, "the red circle", "--checkpoint", ckpt, "--tokenizer", str(tokenizer))
    assert len(direct["boxes"]) == 1 and direct["branch"] == "decoder"  # the model's default branch
    assert "the authors' released SimVG weights" in direct["trained_on"] and "official_rec.pth" in direct["trained_on"]

    out = tmp_path / "folder"
    assert main(["export", "weights", "--checkpoint", ckpt, "--tokenizer", str(tokenizer), "--out", str(out)]) == 0
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["architecture"]["text_pool"] == spec["architecture"]["text_pos"] == "official"
    assert spec["weights"] == "ema" and spec["tokenizer"] == "tokenizer.spm"
    assert _ground_json(capsys, photo, "the red circle", "--checkpoint", str(out)) == direct
    for branch in ("token", "decoder"):
        a = _ground_json(capsys, photo, "the red circle", "--checkpoint", ckpt, "--tokenizer", str(tokenizer),
                         "--branch", branch)  # fmt: skip
        assert _ground_json(capsys, photo, "the red circle", "--checkpoint", str(out), "--branch", branch) == a


def test_official_file_errors_on_the_command_line(official_files, tmp_path, capsys):
    root, tokenizer = official_files
    photo, ckpt = str(root / "photo.png"), str(root / "official_rec.pth")
    capsys.readouterr()
    assert main(["ground", photo, "a", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no tokenizer comes with this model; pass --tokenizer SPM" in err
    # a tokenizer with more ids than the embedding has rows (a shortened official text table)
    state = parity_fixture("rec")[0]
    state["vis_enc.beit3.text_embed.weight"] = state["vis_enc.beit3.text_embed.weight"][:40]
    torch.save(state, tmp_path / "short_vocab.pth")
    assert main(["ground", photo, "a", "--checkpoint", str(tmp_path / "short_vocab.pth"), "--tokenizer",
                 str(tokenizer)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(
        r"tokenizer.spm: \d+ token ids but the model's text embedding has 40 rows", err
    )
    assert main(["ground", photo, "a", "--checkpoint", ckpt, "--tokenizer", str(tmp_path / "nope.spm")]) == 2
    assert "nope.spm: tokenizer not found" in capsys.readouterr().err


def test_eval_of_official_files_with_a_dataset_config(official_files, tmp_path, capsys):
    root, _ = official_files
    data = make_dataset(tmp_path / "data", "rec")
    config = write_config(make_config(data, tmp_path / "run"), tmp_path / "rec.yaml")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(root / "official_rec.pth"), "--config", str(config), "--split", "val",
                 "--json"]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_samples"] == 8
    assert (
        main(["eval", "--checkpoint", str(root / "official_grec.pth"), "--config", str(config), "--split", "val"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "a GREC model (10 queries) cannot be evaluated on synthref, a REC dataset" in err


def test_training_starts_from_an_official_file(official_files, caplog):
    """model.init_from with an official file: the pre-train -> fine-tune flow (raw weights, as the official
    finetune_from loads them, unless init_use_ema)."""
    root, _ = official_files
    state = parity_fixture("rec")[0]
    cfg = dataclasses.replace(infer_config(official_to_ours(state), official=False))
    model = SimVG(cfg)  # a fine-tuning run: the fixed pooling and positions, the official architecture
    with caplog.at_level("INFO", logger="simvg"):
        init_weights(model, str(root / "official_rec.pth"), use_ema=False)
    assert "official SimVG checkpoint" in caplog.text and "missing" not in caplog.text
    for name, value in official_to_ours(state).items():
        assert torch.equal(model.state_dict()[name], value), name
    init_weights(model, str(root / "official_rec.pth"), use_ema=True)
    ema = official_to_ours(official_checkpoint(state)["ema_state_dict"])
    assert torch.equal(model.state_dict()["decoder.class_embed.weight"], ema["decoder.class_embed.weight"])
