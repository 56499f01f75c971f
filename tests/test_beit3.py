"""BEiT-3 encoder: shapes, presets, key padding, position offset, drop-path, and the fused fast path against an
independent torchscale-style reference computation (split/concat per multiway module, explicit softmax)."""

import math

import pytest
import torch
import torch.nn.functional as F

from simvg.errors import UserError
from simvg.models.beit3 import BEIT3_PRESETS, BEiT3, BEiT3Config, EncoderLayer, beit3_config

VOCAB = 500


def tiny(**overrides) -> BEiT3Config:
    return beit3_config("tiny", vocab_size=VOCAB, **overrides)


def make_model(seed: int = 0, **overrides) -> BEiT3:
    torch.manual_seed(seed)
    model = BEiT3(tiny(**overrides)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so a wrong expert choice shows up
        for name, param in model.named_parameters():
            if "layer_norm" in name or "ln" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def inputs(batch: int = 2, length: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 64, 64, generator=gen)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 4:] = True  # sample 0 has 3 pads, sample 1 none
    return image, ids, pad


def reference_forward(model: BEiT3, image, ids, pad) -> torch.Tensor:
    """Written from docs/design.md E1 without the module code: one sequence, split/concat at every multiway module."""
    cfg, p = model.cfg, dict(model.named_parameters())
    batch = image.shape[0]
    patches = F.conv2d(image, p["vision_embed.proj.weight"], p["vision_embed.proj.bias"], stride=cfg.patch_size)
    xv = torch.cat([p["vision_embed.cls_token"].expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    nv, length = xv.shape[1], ids.shape[1]
    xv = xv + p["encoder.embed_positions.A.weight"][torch.arange(nv) + 2]
    xt = p["text_embed.weight"][ids] + p["encoder.embed_positions.B.weight"][torch.arange(length) + 2]
    x = torch.cat([xv, xt], 1)
    key_pad = torch.cat([torch.zeros(batch, nv, dtype=torch.bool), pad], 1)
    x = x * (1 - key_pad.float()).unsqueeze(-1)

    def multiway(prefix, fn, h):
        return torch.cat([fn(h[:, :nv], f"{prefix}.A"), fn(h[:, nv:], f"{prefix}.B")], 1)

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps=1e-5)

    def lin(h, name):
        return h @ p[name + ".weight"].T + p[name + ".bias"]

    def ffn(h, name):
        return lin(ln(F.gelu(lin(h, name + ".fc1")), name + ".ffn_layernorm"), name + ".fc2")

    heads, hd = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    for i in range(cfg.depth):
        pre = f"encoder.layers.{i}."
        h = multiway(pre + "self_attn_layer_norm", ln, x)
        q, k, v = (
            multiway(pre + f"self_attn.{n}_proj", lin, h).view(batch, -1, heads, hd).transpose(1, 2) for n in "qkv"
        )
        scores = (q * hd**-0.5) @ k.transpose(-1, -2)
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, cfg.embed_dim)
        x = x + multiway(pre + "self_attn.out_proj", lin, multiway(pre + "self_attn.inner_attn_ln", ln, attn))
        x = x + multiway(pre + "ffn", ffn, multiway(pre + "final_layer_norm", ln, x))
    return multiway("encoder.layer_norm", ln, x)


def test_presets_have_the_published_sizes():
    base, large = beit3_config("base"), beit3_config("large")
    assert (base.embed_dim, base.depth, base.num_heads, base.ffn_dim) == (768, 12, 12, 3072)
    assert (large.embed_dim, large.depth, large.num_heads, large.ffn_dim) == (1024, 24, 16, 4096)
    assert base.vocab_size == 64010 and base.max_text_positions == 1024
    assert beit3_config("base", img_size=224, patch_size=16).img_size == 224


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: beit3_config("huge"), "unknown BEiT-3 preset 'huge'"),
        (lambda: beit3_config("tiny", drop_path=0.1), "unknown field"),
        (lambda: beit3_config("tiny", num_heads=5), "not divisible by num_heads"),
        (lambda: beit3_config("tiny", img_size=70), "not a multiple of patch_size"),
    ],
)
def test_bad_config_is_a_user_error(call, match):
    with pytest.raises(UserError, match=match):
        call()


def test_geometry_helpers():
    model = BEiT3(tiny(img_size=96, patch_size=32))
    assert model.grid_size == (3, 3) and model.num_patches == 9 and model.embed_dim == 64
    assert model.encoder.embed_positions.A.weight.shape == (9 + 1 + 2, 64)


def test_output_shapes_and_split_for_every_call_form():
    model = make_model()
    image, ids, pad = inputs()
    x, split = model(image, ids, pad)
    assert x.shape == (2, 1 + 16 + 7, 64) and split == 17
    x, split = model(image)
    assert x.shape == (2, 17, 64) and split == 17
    x, split = model(None, ids, pad)
    assert x.shape == (2, 7, 64) and split == 0
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("fuse_qkv", [True, False])
def test_fast_path_matches_reference(fuse_qkv):
    model = make_model(fuse_qkv=fuse_qkv)
    image, ids, pad = inputs()
    with torch.inference_mode():
        x, _ = model(image, ids, pad)
    with torch.no_grad():
        ref = reference_forward(model, image, ids, pad)
    assert (x - ref).abs().max() < 1e-5


def test_single_modality_calls_use_one_expert():
    """Image-only = vision experts only; text-only = text experts only (checked against the same reference maths)."""
    model = make_model()
    image, ids, pad = inputs()
    with torch.no_grad():
        ref = reference_forward(model, image, ids[:, :0], pad[:, :0])  # empty text: vision part alone
        x, _ = model(image)
        assert (x - ref).abs().max() < 1e-5
        text_only, _ = model(None, ids, pad)
        dummy = torch.zeros(2, 3, 64, 64)
        both, split = model(dummy, ids, pad)
    assert not torch.allclose(text_only, both[:, split:], atol=1e-3)  # joint attention differs from text alone


def test_fused_cache_follows_in_place_weight_updates():
    model = make_model()
    image, ids, pad = inputs()
    with torch.inference_mode():
        before, _ = model(image, ids, pad)
    with torch.no_grad():
        model.encoder.layers[0].self_attn.k_proj.B.weight.mul_(2.0)
    with torch.inference_mode():
        after, _ = model(image, ids, pad)
    with torch.no_grad():
        ref = reference_forward(model, image, ids, pad)
    assert not torch.allclose(before, after) and (after - ref).abs().max() < 1e-5


def test_gradients_reach_the_original_projection_parameters():
    grads = {}
    for fuse in (True, False):
        model = make_model(fuse_qkv=fuse, drop_path_rate=0.0).train()
        x, _ = model(*inputs())
        x.square().mean().backward()
        grads[fuse] = {n: q.grad for n, q in model.named_parameters() if "proj" in n and "layers.1" in n}
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, grads[False][name], atol=1e-6), name


def test_eval_is_deterministic():
    model = make_model()
    image, ids, pad = inputs()
    with torch.inference_mode():
        assert torch.equal(model(image, ids, pad)[0], model(image, ids, pad)[0])


@pytest.mark.parametrize("with_image", [True, False])
def test_padded_positions_do_not_influence_other_tokens(with_image):
    model = make_model()
    image, ids, pad = inputs()
    image = image if with_image else None
    changed = ids.clone()
    changed[pad] = (changed[pad] + 17) % VOCAB  # new ids only under the pad mask
    with torch.inference_mode():
        x, split = model(image, ids, pad)
        y, _ = model(image, changed, pad)
        real_changed = ids.clone()
        real_changed[0, 1] = (ids[0, 1] + 17) % VOCAB
        z, _ = model(image, real_changed, pad)
    keep = torch.cat([torch.ones(2, split, dtype=torch.bool), ~pad], 1)
    assert torch.equal(x[keep], y[keep])
    assert not torch.allclose(x[0][keep[0]], z[0][keep[0]])  # a real token does matter (the check can fail)


def test_text_positions_start_at_row_two():
    model = make_model()
    image, ids, pad = inputs()
    with torch.inference_mode():
        x, _ = model(image, ids, pad)
        for table in (model.encoder.embed_positions.A.weight, model.encoder.embed_positions.B.weight):
            table[:2] += 5.0  # the two fairseq offset rows are never read
        y, _ = model(image, ids, pad)
        model.encoder.embed_positions.B.weight[2] += 5.0  # first text token's row
        z, _ = model(image, ids, pad)
    assert torch.equal(x, y) and not torch.allclose(x, z)


def test_drop_path_factor_is_zero_or_inverse_keep_probability():
    layer = EncoderLayer(tiny(), drop_path=0.5).train()
    torch.manual_seed(0)
    factors = torch.cat([layer._keep(torch.zeros(64, 3, 8)).flatten() for _ in range(20)])
    assert set(factors.unique().tolist()) == {0.0, 2.0}  # 1 / (1 - 0.5)
    assert 0.4 < (factors == 0).float().mean() < 0.6
    assert layer.eval()._keep(torch.zeros(4, 3, 8)) is None


@pytest.mark.parametrize("preset", sorted(BEIT3_PRESETS))
def test_drop_path_is_active_for_every_preset_rate(preset):
    """Bug B3 (ViT-L silently trained without drop-path): every preset's depth and rate reach the layers."""
    ref = beit3_config(preset)
    assert ref.drop_path_rate > 0
    model = make_model(depth=ref.depth, drop_path_rate=ref.drop_path_rate)
    rates = [layer.drop_path for layer in model.encoder.layers]
    expected = [ref.drop_path_rate * i / (ref.depth - 1) for i in range(ref.depth)]
    assert rates == pytest.approx(expected) and rates[-1] == pytest.approx(ref.drop_path_rate)
    image, ids, pad = inputs(batch=8)
    model.train()
    torch.manual_seed(0)  # fixed draws: with rate 0.1 three forwards all keeping every sample is possible
    outs = [model(image, ids, pad)[0] for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_gradient_checkpointing_gives_the_same_result():
    image, ids, pad = inputs()
    results = []
    for flag in (False, True):
        model = make_model(grad_checkpointing=flag).train()
        torch.manual_seed(5)
        x, _ = model(image, ids, pad)
        x.sum().backward()
        results.append((x.detach(), model.encoder.layers[0].ffn.A.fc1.weight.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_magneto_init_gain():
    """fc1/fc2/out_proj/v_proj start sqrt(log(2 * depth)) times wider than q/k (torchscale's sub-LN init)."""
    torch.manual_seed(0)
    model = BEiT3(tiny(depth=4, embed_dim=128, ffn_dim=128))
    attn = model.encoder.layers[0].self_attn
    ratio = (attn.v_proj.A.weight.std() / attn.q_proj.A.weight.std()).item()
    assert ratio == pytest.approx(math.sqrt(math.log(8)), rel=0.03)


def test_bf16_autocast_stays_close_to_fp32():
    model = make_model()
    image, ids, pad = inputs()
    with torch.no_grad():
        ref, _ = model(image, ids, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(image, ids, pad)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max() < 0.1


def test_frozen_encoder_cache_built_in_inference_mode_works_with_autograd():
    """A frozen encoder reuses the fused weights built under inference_mode; gradients still reach the input."""
    model = make_model().requires_grad_(False)
    image, ids, pad = inputs()
    with torch.inference_mode():
        model(image, ids, pad)
    image.requires_grad_(True)
    x, _ = model(image, ids, pad)
    x.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_sincos_position_init_puts_grid_sinusoids_in_the_tables():
    enc = BEiT3(beit3_config("tiny", pos_init="sincos"))  # 64 px / patch 16 -> 4x4 grid, dim 64
    table_v = enc.encoder.embed_positions.A.weight
    table_t = enc.encoder.embed_positions.B.weight
    assert torch.count_nonzero(table_v[2]) == 0  # CLS row
    # Patch (row 0, col 1) is table row 2 + 1 + 1; its x half starts at channel 32: sin(2*pi*2/4), cos(...).
    angle_x = 2 / (4 + 1e-6) * 2 * math.pi
    assert torch.allclose(table_v[4, 32:34], torch.tensor([math.sin(angle_x), math.cos(angle_x)]), atol=1e-6)
    angle_y = 1 / (4 + 1e-6) * 2 * math.pi  # first grid row: y = 1
    assert torch.allclose(table_v[4, 0:2], torch.tensor([math.sin(angle_y), math.cos(angle_y)]), atol=1e-6)
    # Text index 3 (table row 5), channel pair 0 has frequency 1.
    assert torch.allclose(table_t[5, 0:2], torch.tensor([math.sin(3.0), math.cos(3.0)]), atol=1e-6)
    with pytest.raises(UserError):
        beit3_config("tiny", pos_init="learned")


def test_token_embed_std_sets_the_text_embedding_scale():
    torch.manual_seed(0)
    wide = BEiT3(beit3_config("tiny", vocab_size=4000, token_embed_std=0.5)).text_embed.weight.std().item()
    torch.manual_seed(0)
    default = BEiT3(beit3_config("tiny", vocab_size=4000)).text_embed.weight.std().item()
    assert abs(default - 0.02) < 0.002 and abs(wide - 0.5) < 0.05
    with pytest.raises(UserError):
        beit3_config("tiny", token_embed_std=0.0)


def test_conv_stem_keeps_the_token_grid_and_a_unit_scale_signal():
    torch.manual_seed(0)
    enc = BEiT3(beit3_config("tiny", stem="conv"))  # 64 px, patch 16: 3->8->16->32 at 32, 16, 8 px; 2x2 proj -> 4x4
    stem = enc.vision_embed.stem
    widths = [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32] and enc.vision_embed.proj.in_channels == 32
    assert enc.vision_embed.proj.kernel_size == (2, 2) and enc.vision_embed.proj.stride == (2, 2)
    tokens = enc.vision_embed(torch.randn(4, 3, 64, 64))
    assert tokens.shape == (4, 1 + 16, 64)
    # He init: patch tokens neither vanish nor explode (0.02 init through three convs would give ~1e-3).
    assert 0.3 < tokens[:, 1:].std().item() < 3.0
    # Token 1 + k is grid cell (k // 4, k % 4); the stem's receptive field is 23 px, so editing the top-right 16x16
    # block changes that cell's token and at most its neighbours, never the CLS token or the far cells.
    image = torch.randn(1, 3, 64, 64)
    edited = image.clone()
    edited[..., :16, 48:] += 1.0
    delta = (enc.vision_embed(edited) - enc.vision_embed(image)).abs().sum(-1)[0]
    changed = {int(i) - 1 for i in torch.nonzero(delta)}
    assert 3 in changed and changed <= {2, 3, 6, 7}
    x, split = enc(torch.randn(2, 3, 64, 64), torch.randint(5, 100, (2, 6)), torch.zeros(2, 6, dtype=torch.bool))
    assert x.shape == (2, 1 + 16 + 6, 64) and split == 17


def test_conv_stem_config_errors():
    with pytest.raises(UserError, match="stem"):
        beit3_config("tiny", stem="resnet")
    with pytest.raises(UserError, match="power-of-two"):
        beit3_config("tiny", stem="conv", patch_size=12, img_size=60)
