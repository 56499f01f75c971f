"""Loading official-layout BEiT-3 checkpoints: key names from docs/design.md E1.7, unwrapping, ignored heads,
224/p16 -> 640/p32 resampling, .safetensors, refusal of pickle-only files, and one-line errors naming file/key."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from simvg.errors import UserError
from simvg.models.beit3 import BEiT3, BEiT3Config, beit3_config, load_beit3_pretrained

EXTRA_KEYS = {"mlm_head.weight": (10, 64), "beit3.pooler.dense.weight": (64, 64), "logit_scale": ()}


def official_shapes(cfg: BEiT3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of torchscale's BEiT3 state dict (docs/design.md E1.7), built from the documentation."""
    d, f, grid = cfg.embed_dim, cfg.ffn_dim, cfg.img_size // cfg.patch_size
    shapes = {
        "text_embed.weight": (cfg.vocab_size, d),
        "vision_embed.mask_token": (1, 1, d),
        "vision_embed.cls_token": (1, 1, d),
        "vision_embed.proj.weight": (d, cfg.in_chans, cfg.patch_size, cfg.patch_size),
        "vision_embed.proj.bias": (d,),
        "encoder.embed_positions.A.weight": (grid * grid + 3, d),
        "encoder.embed_positions.B.weight": (cfg.max_text_positions, d),
    }
    for e in "AB":
        shapes.update({f"encoder.layer_norm.{e}.weight": (d,), f"encoder.layer_norm.{e}.bias": (d,)})
        for i in range(cfg.depth):
            pre = f"encoder.layers.{i}."
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                shapes[f"{pre}self_attn.{proj}.{e}.weight"] = (d, d)
                shapes[f"{pre}self_attn.{proj}.{e}.bias"] = (d,)
            for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                shapes.update({f"{pre}{norm}.{e}.weight": (d,), f"{pre}{norm}.{e}.bias": (d,)})
            shapes.update({f"{pre}ffn.{e}.fc1.weight": (f, d), f"{pre}ffn.{e}.fc1.bias": (f,)})
            shapes.update({f"{pre}ffn.{e}.fc2.weight": (d, f), f"{pre}ffn.{e}.fc2.bias": (d,)})
            shapes.update({f"{pre}ffn.{e}.ffn_layernorm.weight": (f,), f"{pre}ffn.{e}.ffn_layernorm.bias": (f,)})
    return shapes


def official_checkpoint(cfg: BEiT3Config, seed: int = 0, extras: bool = True) -> dict[str, torch.Tensor]:
    """Random values under the released layout: ``beit3.``-prefixed keys plus pretraining-head keys."""
    gen = torch.Generator().manual_seed(seed)
    state = {"beit3." + k: torch.randn(s, generator=gen) for k, s in official_shapes(cfg).items()}
    if extras:
        state.update({k: torch.randn(s, generator=gen) for k, s in EXTRA_KEYS.items()})
    return state


def small(**overrides) -> BEiT3Config:
    return beit3_config("tiny", **{"vocab_size": 300, "max_text_positions": 40, **overrides})


def test_module_tree_matches_the_official_key_list():
    cfg = beit3_config("tiny")
    model_shapes = {k: tuple(v.shape) for k, v in BEiT3(cfg).state_dict().items()}
    assert model_shapes == official_shapes(cfg)
    assert len(official_shapes(beit3_config("base"))) == 491  # the count docs/design.md E1.7 reports for base


def test_official_layout_loads_completely_and_reports_extra_keys(tmp_path):
    cfg = beit3_config("tiny")  # full 64010-row text table, as released
    state = official_checkpoint(cfg)
    path = tmp_path / "beit3_tiny.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model = BEiT3(cfg)
    report = load_beit3_pretrained(model, path)
    assert sorted(report.ignored) == sorted(EXTRA_KEYS) and not report.resized
    assert len(report.loaded) == len(official_shapes(cfg))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["beit3." + key]), key
    text = str(report)
    assert f"loaded {len(report.loaded)} tensors" in text and "mlm_head.weight" in text


@pytest.mark.parametrize("wrap", ["module", "raw", "state_dict"])
def test_other_wrappers_and_unprefixed_keys(tmp_path, wrap):
    cfg = small()
    state = official_checkpoint(cfg, extras=False)
    if wrap == "raw":
        obj = {k.removeprefix("beit3."): v for k, v in state.items()}
    else:
        obj = {wrap: state}
    torch.save(obj, tmp_path / "ckpt.zip")  # SimVG ships .pth files renamed .zip
    model = BEiT3(cfg)
    report = load_beit3_pretrained(model, tmp_path / "ckpt.zip")
    assert not report.ignored and torch.equal(model.text_embed.weight, state["beit3.text_embed.weight"])


def test_outputs_are_deterministic_after_loading(tmp_path):
    cfg = small()
    torch.save({"model": official_checkpoint(cfg)}, tmp_path / "a.pth")
    outs = []
    for _ in range(2):
        model = BEiT3(cfg).eval()
        load_beit3_pretrained(model, tmp_path / "a.pth")
        with torch.inference_mode():
            ids, pad = torch.tensor([[0, 5, 2, 1]]), torch.tensor([[False, False, False, True]])
            outs.append(model(torch.ones(1, 3, 64, 64), ids, pad)[0])
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()


def test_224_p16_checkpoint_is_resampled_to_640_p32(tmp_path):
    source = small(img_size=224, patch_size=16)
    state = official_checkpoint(source)
    table = state["beit3.encoder.embed_positions.A.weight"]
    assert table.shape == (199, 64)
    # Patch grid varying along columns only: after a row-major reshape and resize every row must be identical.
    cols = torch.linspace(-1, 1, 14)
    table[3:] = (cols[None, :, None] * torch.arange(1, 65)[None, None, :]).expand(14, 14, 64).reshape(196, 64)
    torch.save({"model": state}, tmp_path / "p16.pth")
    model = BEiT3(small(img_size=640, patch_size=32))
    report = load_beit3_pretrained(model, tmp_path / "p16.pth")
    assert report.resized == {
        "encoder.embed_positions.A.weight": ((199, 64), (403, 64)),
        "vision_embed.proj.weight": ((64, 3, 16, 16), (64, 3, 32, 32)),
    }
    new = model.encoder.embed_positions.A.weight.detach()
    assert new.shape == (403, 64) and torch.equal(new[:3], table[:3])  # offset rows + CLS bit-exact
    grid = new[3:].reshape(20, 20, 64)
    assert torch.allclose(grid, grid[:1].expand(20, -1, -1), atol=1e-6)
    assert grid[0, 0, 0] < grid[0, 10, 0] < grid[0, 19, 0]
    assert model.vision_embed.proj.weight.shape == (64, 3, 32, 32)
    assert torch.equal(model.vision_embed.proj.bias, state["beit3.vision_embed.proj.bias"])
    assert "resized encoder.embed_positions.A.weight: [199, 64] -> [403, 64]" in str(report)


def test_half_precision_checkpoint_is_cast_after_resampling(tmp_path):
    state = {k: v.half() for k, v in official_checkpoint(small(img_size=224, patch_size=16)).items()}
    torch.save({"model": state}, tmp_path / "fp16.pth")
    model = BEiT3(small(img_size=640, patch_size=32))
    load_beit3_pretrained(model, tmp_path / "fp16.pth")
    table = model.encoder.embed_positions.A.weight
    assert table.dtype == torch.float32
    assert torch.equal(table[:3], state["beit3.encoder.embed_positions.A.weight"][:3].float())


def test_bicubic_resize_keeps_a_constant_kernel_constant(tmp_path):
    cfg16 = small(img_size=64, patch_size=16)
    state = official_checkpoint(cfg16)
    state["beit3.vision_embed.proj.weight"] = torch.full((64, 3, 16, 16), 0.25)
    torch.save({"model": state}, tmp_path / "k.pth")
    model = BEiT3(small(img_size=64, patch_size=32))
    load_beit3_pretrained(model, tmp_path / "k.pth")
    # No magnitude correction (SimVG): a constant 0.25 kernel stays 0.25 (sum grows 4x).
    assert torch.allclose(model.vision_embed.proj.weight, torch.tensor(0.25), atol=1e-6)


def test_safetensors_checkpoint(tmp_path):
    cfg = small()
    state = official_checkpoint(cfg)
    save_file({k: v.contiguous() for k, v in state.items() if v.dim() > 0}, str(tmp_path / "w.safetensors"))
    model = BEiT3(cfg)
    report = load_beit3_pretrained(model, tmp_path / "w.safetensors")
    assert len(report.loaded) == len(official_shapes(cfg)) and "mlm_head.weight" in report.ignored
    assert torch.equal(model.encoder.layers[1].ffn.B.fc2.weight, state["beit3.encoder.layers.1.ffn.B.fc2.weight"])


class TrainingArgs:
    """A custom class: unpickling it needs arbitrary code, which weights_only loading refuses."""

    lr = 1e-4


@pytest.mark.parametrize("payload", [TrainingArgs(), argparse.Namespace(lr=1e-4)])
def test_pickle_only_file_is_refused_unless_opted_in(tmp_path, payload):
    cfg = small()
    path = tmp_path / "pickled.pth"
    torch.save({"model": official_checkpoint(cfg, extras=False), "args": payload}, path)
    with pytest.raises(UserError) as err:
        load_beit3_pretrained(BEiT3(cfg), path)
    message = str(err.value)
    assert str(path) in message and "allow_pickle=True" in message and "--allow-pickle" in message
    assert "\n" not in message
    if isinstance(payload, argparse.Namespace):  # importable class: the explicit opt-in loads it
        assert load_beit3_pretrained(BEiT3(cfg), path, allow_pickle=True).loaded


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state = official_checkpoint(small(vocab_size=123))
    torch.save({"model": state}, tmp_path / "v.pth")
    with pytest.raises(UserError, match=r"text_embed\.weight has shape \[123, 64\] in the checkpoint but \[300, 64\]"):
        load_beit3_pretrained(BEiT3(small()), tmp_path / "v.pth")


def test_unresizable_vision_table_is_an_error(tmp_path):
    state = official_checkpoint(small())
    state["beit3.encoder.embed_positions.A.weight"] = torch.zeros(22, 64)  # 19 grid rows: not a square
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"encoder\.embed_positions\.A\.weight has shape \[22, 64\]"):
        load_beit3_pretrained(BEiT3(small()), tmp_path / "bad.pth")


def test_missing_key_is_named(tmp_path):
    state = official_checkpoint(small())
    del state["beit3.encoder.layers.1.ffn.B.ffn_layernorm.bias"]
    torch.save({"model": state}, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"missing BEiT-3 key\(s\) encoder\.layers\.1\.ffn\.B\.ffn_layernorm\.bias"):
        load_beit3_pretrained(BEiT3(small()), tmp_path / "m.pth")


@pytest.mark.parametrize("content", [None, b"not a checkpoint \x80\x02", "truncated"])
def test_missing_or_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    if content == "truncated":
        torch.save({"model": {"a": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="broken.pth") as err:
        load_beit3_pretrained(BEiT3(small()), path)
    assert ("not found" in str(err.value)) == (content is None)


def test_corrupt_safetensors_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="broken.safetensors"):
        load_beit3_pretrained(BEiT3(small()), path)
