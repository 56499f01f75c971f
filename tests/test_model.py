"""SimVG model: output contract of every preset, branch selection, layers against hand values, presets and configs."""

import math

import pytest
import torch

from simvg.errors import UserError
from simvg.models import (
    MODEL_PRESETS,
    create_model,
    list_models,
    model_config,
)
from simvg.models.decoder import TransformerDecoder
from simvg.models.layers import (
    MLP,
    masked_max_pool,
    masked_max_pool_official,
    sine_position_1d,
    sine_position_1d_official,
    sine_position_2d,
)

VOCAB = 100


def _tiny(name: str, **overrides):
    """Every preset at a test size: the released ones get the tiny encoder, all get a small vocabulary."""
    if name.startswith(("simvg_b32", "simvg_l32")):
        overrides.setdefault("encoder", "tiny")
    overrides["encoder.vocab_size"] = VOCAB
    return create_model(name, **overrides)


def _inputs(model, batch: int = 2, length: int = 7):
    g = torch.Generator().manual_seed(0)
    side = model.cfg.encoder.img_size
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 4:] = True  # first expression padded, second not
    return torch.randn(batch, 3, side, side, generator=g), torch.randint(0, VOCAB, (batch, length), generator=g), mask


def _check_branch(out: dict, batch: int, queries: int, num_aux: int) -> None:
    assert out["pred_logits"].shape == (batch, queries, 2)
    assert out["pred_boxes"].shape == (batch, queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == num_aux
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (batch, queries, 2) and aux["pred_boxes"].shape == (batch, queries, 4)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_forward_backward(name):
    torch.manual_seed(0)
    model = _tiny(name)
    out = model(*_inputs(model))
    q = MODEL_PRESETS[name].num_queries
    assert q == (10 if name.endswith("grec") else 1)
    assert set(out) == {"decoder", "token"}
    _check_branch(out["decoder"], 2, q, model.cfg.decoder_layers - 1)
    _check_branch(out["token"], 2, q, 0)
    loss = sum(b["pred_logits"].sum() + b["pred_boxes"].sum() for b in out.values())
    loss = loss + sum(a["pred_boxes"].sum() for a in out["decoder"]["aux_outputs"])
    loss.backward()
    for part in (model.encoder.text_embed, model.input_proj, model.tqg, model.decoder, model.token, model.cls_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), type(part).__name__


def test_token_branch_does_not_run_the_decoder():
    model = _tiny("simvg_tiny_test").eval()
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append(1))
    inputs = _inputs(model)
    token_only = model(*inputs, branch="token")
    assert set(token_only) == {"token"} and calls == []
    both = model(*inputs, branch="both")
    assert calls == [1]
    assert torch.equal(both["token"]["pred_boxes"], token_only["token"]["pred_boxes"])
    decoder_only = model(*inputs, branch="decoder")
    assert set(decoder_only) == {"decoder"}
    assert torch.equal(both["decoder"]["pred_boxes"], decoder_only["decoder"]["pred_boxes"])
    with pytest.raises(UserError, match="branch"):
        model(*inputs, branch="tokens")


def test_head_options_run_and_change_the_queries():
    base = _tiny("simvg_tiny_test").eval()
    inputs = _inputs(base)
    ref = base(*inputs, branch="token")["token"]["pred_boxes"]
    for option in (dict(text_pool="official"), dict(text_pos="official"), dict(use_tqg=False)):
        model = _tiny("simvg_tiny_test", **option).eval()
        model.load_state_dict(base.state_dict(), strict=option.get("use_tqg") is not False)
        out = model(*inputs, branch="token")["token"]["pred_boxes"]
        assert not torch.allclose(out, ref), option
    assert _tiny("simvg_tiny_test", use_tqg=False).tqg.decoder is None


def test_decoder_init_is_xavier_uniform():
    model = create_model("simvg_tiny_test")
    w = model.decoder.decoder.layers[0].ffn[0].weight  # [ffn, dim]
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_masked_max_pool_and_official_emulation():
    x = torch.tensor(
        [[[1.0, 5.0], [3.0, 0.0], [9.0, 9.0], [-1.0, 2.0]], [[1.0, 5.0], [3.0, 0.0], [0.0, 2.0], [4.0, -3.0]]]
    )
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    assert torch.equal(masked_max_pool(x, pad), torch.tensor([[3.0, 5.0], [4.0, 5.0]]))  # pads ignored
    # B1: padded row -> max(x[-1], x[-2]) = max([-1,2],[9,9]); unpadded row -> x[-1]
    assert torch.equal(masked_max_pool_official(x, pad), torch.tensor([[9.0, 9.0], [4.0, -3.0]]))
    # The emulation equals the official expression, which indexes with ~ of the int64 mask.
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 6, 3, generator=g)
    masks = torch.tensor([[0, 0, 0, 1, 1, 1], [0] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0] * 6])
    official = torch.stack([f[~m].max(dim=0).values for f, m in zip(feats, masks)])
    assert torch.equal(masked_max_pool_official(feats, masks.bool()), official)
    proper = torch.stack([f[~m].max(dim=0).values for f, m in zip(feats, masks.bool())])
    assert torch.equal(masked_max_pool(feats, masks.bool()), proper)


def test_sine_1d_is_a_sinusoid_and_official_is_not():
    pe = sine_position_1d(3, 4)  # frequencies 1 and 10000^(-1/2) = 0.01
    assert torch.allclose(pe[1], torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]))
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    big = sine_position_1d(20, 256)
    # channel pair (20, 21) has frequency 10000^(-20/256)
    freq = 10000 ** (-20 / 256)
    pos = torch.arange(20.0)
    assert torch.allclose(big[:, 20], (pos * freq).sin(), atol=1e-6)
    assert torch.allclose(big[:, 21], (pos * freq).cos(), atol=1e-6)
    official = sine_position_1d_official(3, 6)
    assert torch.allclose(official[2], torch.tensor([math.sin(2), math.cos(2), 0, 1, 0, 1]))


def test_sine_2d_hand_values():
    pe = sine_position_2d(2, 2, num_feats=2)  # dim_t = [1, 1]; coordinates pi and 2*pi
    expected = torch.tensor([[0.0, -1, 0, -1], [0, -1, 0, 1], [0, 1, 0, -1], [0, 1, 0, 1]])
    assert torch.allclose(pe, expected, atol=1e-5)
    pe4 = sine_position_2d(1, 2, num_feats=4)  # dim_t = [1, 1, 100, 100]; y = 2*pi, x = pi then 2*pi
    y = [0.0, 1.0, math.sin(2 * math.pi / 100), math.cos(2 * math.pi / 100)]
    x0 = [0.0, -1.0, math.sin(math.pi / 100), math.cos(math.pi / 100)]
    assert torch.allclose(pe4[0], torch.tensor(y + x0), atol=1e-5)
    assert pe4.shape == (2, 8)


def test_mlp_and_decoder_stack():
    mlp = MLP(4, 8, 2, 1)
    assert len(mlp.layers) == 1 and mlp(torch.ones(3, 4)).shape == (3, 2)
    assert [tuple(layer.weight.shape) for layer in MLP(4, 8, 2, 3).layers] == [(8, 4), (8, 8), (2, 8)]
    dec = TransformerDecoder(3, 16, 4, 32, 0.0, return_intermediate=True)
    hs = dec(torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(5, 16))
    assert hs.shape == (3, 2, 3, 16)
    # the shared final LayerNorm (identity affine at init) normalises every layer's output
    assert torch.allclose(hs.mean(-1), torch.zeros(3, 2, 3), atol=1e-5)


def test_presets_overrides_and_serialisation():
    assert {"simvg_b32", "simvg_l32", "simvg_b32_grec", "simvg_tiny_test", "simvg_synth_s"} <= set(list_models())
    b32 = MODEL_PRESETS["simvg_b32"]
    assert (b32.encoder.embed_dim, b32.encoder.img_size, b32.encoder.patch_size) == (768, 640, 32)
    assert MODEL_PRESETS["simvg_l32"].encoder.embed_dim == 1024
    cfg = model_config("simvg_b32", encoder=dict(depth=2), num_queries=10, **{"encoder.img_size": 320})
    assert (cfg.encoder.depth, cfg.encoder.img_size, cfg.num_queries, cfg.encoder.embed_dim) == (2, 320, 10, 768)
    assert MODEL_PRESETS["simvg_b32"].encoder.depth == 12  # presets are not mutated
    assert model_config("simvg_b32", encoder="tiny").encoder.embed_dim == 64
    for bad in (dict(num_querys=2), {"encoder.depthh": 1}, dict(text_pool="mean"), dict(embed_dim=30)):
        with pytest.raises(UserError):
            model_config("simvg_tiny_test", **bad)
    with pytest.raises(UserError, match="unknown model"):
        create_model("simvg_b16")


def test_head_init_follows_the_official_deep_copies():
    """detrex builds a stack from one layer deep-copied per layer, and each layer's two attentions from one module:
    the TQG starts with equal layers and self-attention == cross-attention; the decoder branch re-draws every matrix
    (Xavier) but keeps the copied vectors (FFN biases equal across its layers)."""
    torch.manual_seed(0)
    model = _tiny("simvg_tiny_test")
    tqg = model.tqg.decoder.layers
    assert len(tqg) >= 2
    for layer in tqg:
        assert torch.equal(layer.self_attn.in_proj_weight, layer.cross_attn.in_proj_weight)
        assert torch.equal(layer.self_attn.out_proj.weight, layer.cross_attn.out_proj.weight)
        for (name, a), b in zip(layer.state_dict().items(), tqg[0].state_dict().values()):
            assert torch.equal(a, b), name
    dec = model.decoder.decoder.layers
    assert not torch.equal(dec[0].self_attn.in_proj_weight, dec[0].cross_attn.in_proj_weight)
    assert not torch.equal(dec[0].ffn[0].weight, dec[1].ffn[0].weight)
    assert torch.equal(dec[0].ffn[0].bias, dec[1].ffn[0].bias) and torch.equal(dec[0].ffn[3].bias, dec[2].ffn[3].bias)
    assert not torch.equal(dec[0].ffn[0].bias, tqg[0].ffn[0].bias)  # separate stacks, separate draws
