"""DWBD: teacher targets and weight, the total-loss formula by hand, modes, no gradient through the teacher."""

import math

import pytest
import torch

from simvg.config import LossConfig
from simvg.losses import HungarianMatcher, SimVGLoss, teacher_targets
from simvg.models import create_model

GT = [0.6, 0.5, 0.2, 0.2]  # cxcywh; against (0.5, 0.5, 0.2, 0.2): L1 = 0.1, IoU = GIoU = 1/3


def _logits_for(p_object: list[float]) -> torch.Tensor:
    p = torch.tensor(p_object)
    return torch.stack((p.log(), (1 - p).log()), dim=-1)


def _branch(p: list[float], boxes: list[list[float]], requires_grad: bool = False) -> dict:
    logits = _logits_for(p)[None].clone().requires_grad_(requires_grad)
    return {"pred_logits": logits, "pred_boxes": torch.tensor([boxes]), "aux_outputs": []}


def _target(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    b = torch.tensor(boxes).reshape(-1, 4)
    return {"labels": torch.zeros(len(b), dtype=torch.int64), "boxes": b}


def test_teacher_weight_is_mean_of_score_times_iou():
    # image 0: matched query 1 has p = 0.8 and IoU 1/3; image 1: a perfect box with p = 0.5
    dec = {
        "pred_logits": torch.stack([_logits_for([0.1, 0.8]), _logits_for([0.5, 0.3])]),
        "pred_boxes": torch.tensor(
            [[[0.1, 0.1, 0.05, 0.05], [0.5, 0.5, 0.2, 0.2]], [[0.3, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]]
        ),
    }
    targets = [_target([GT]), _target([[0.3, 0.3, 0.2, 0.2]])]
    pseudo, w = teacher_targets(dec, targets, HungarianMatcher())
    assert math.isclose(w.item(), (0.8 / 3 + 0.5) / 2, rel_tol=1e-5)
    assert torch.allclose(pseudo[0]["boxes"], torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    assert torch.allclose(pseudo[1]["boxes"], torch.tensor([[0.3, 0.3, 0.2, 0.2]]))
    assert pseudo[0]["labels"].tolist() == [0] and pseudo[0]["labels"].dtype == torch.int64
    assert torch.allclose(pseudo[0]["weight"], torch.tensor([0.8 / 3]))


def test_teacher_weight_is_zero_without_pairs():
    dec = {"pred_logits": torch.randn(2, 3, 2), "pred_boxes": torch.rand(2, 3, 4)}
    pseudo, w = teacher_targets(dec, [_target([]), _target([])], HungarianMatcher())
    assert w.item() == 0.0 and all(len(p["boxes"]) == 0 for p in pseudo)


def test_total_loss_hand_computed():
    decoder = _branch([0.8], [[0.5, 0.5, 0.2, 0.2]])
    token = _branch([0.5], [GT])
    out = SimVGLoss(LossConfig())({"decoder": decoder, "token": token}, [_target([GT])])
    w = 0.8 / 3
    l_dec = -math.log(0.8) + 5 * 0.1 + 2 * (1 - 1 / 3)
    l_tok_gt = -math.log(0.5)  # token box equals GT
    l_tok_pseudo = -math.log(0.5) + 5 * 0.1 + 2 * (1 - 1 / 3)  # pseudo box is the decoder's
    assert set(out) == {"loss_dgt", "loss_tgt", "loss_kd", "distill_w", "loss"}
    assert math.isclose(out["distill_w"].item(), w, rel_tol=1e-5)
    assert math.isclose(out["loss_dgt"].item(), 1.0 * l_dec, rel_tol=1e-5)
    assert math.isclose(out["loss_tgt"].item(), 2.0 * (1 - w) * l_tok_gt, rel_tol=1e-5)
    assert math.isclose(out["loss_kd"].item(), 1.0 * w * l_tok_pseudo, rel_tol=1e-5)
    total = l_dec + 2 * (1 - w) * l_tok_gt + w * l_tok_pseudo
    assert math.isclose(out["loss"].item(), total, rel_tol=1e-5)


def test_modes_fixed_none_and_decoder_only():
    outputs = {"decoder": _branch([0.8], [[0.5, 0.5, 0.2, 0.2]]), "token": _branch([0.5], [GT])}
    targets = [_target([GT])]
    fixed = SimVGLoss(LossConfig(distill_mode="fixed", fixed_weight=0.25))(outputs, targets)
    assert math.isclose(fixed["distill_w"].item(), 0.25)
    assert math.isclose(fixed["loss_tgt"].item(), 2.0 * 0.75 * -math.log(0.5), rel_tol=1e-5)
    none = SimVGLoss(LossConfig(distill_mode="none"))
    assert none.required_branch == "both"
    res = none(outputs, targets)
    assert res["loss_kd"].item() == 0 and res["distill_w"].item() == 0
    assert math.isclose(res["loss_tgt"].item(), 2.0 * -math.log(0.5), rel_tol=1e-5)
    stage1 = SimVGLoss(LossConfig(token=0.0, distill=0.0))
    assert stage1.required_branch == "decoder"
    res = stage1({"decoder": outputs["decoder"]}, targets)  # the token branch may be absent
    assert res["loss_tgt"].item() == 0 and res["loss_kd"].item() == 0
    assert math.isclose(res["loss"].item(), res["loss_dgt"].item())
    token_only = SimVGLoss(LossConfig(decoder=0.0, distill_mode="none"))
    assert token_only.required_branch == "token"
    assert token_only({"token": outputs["token"]}, targets)["loss"].item() > 0
    with pytest.raises(ValueError, match="decoder"):
        SimVGLoss(LossConfig())({"token": outputs["token"]}, targets)
    with pytest.raises(ValueError, match="distill_mode"):
        SimVGLoss(LossConfig(distill_mode="soft"))


def test_grec_batch_without_targets_is_finite():
    torch.manual_seed(0)
    outputs = {
        name: {
            "pred_logits": torch.randn(2, 10, 2, requires_grad=True),
            "pred_boxes": torch.rand(2, 10, 4, requires_grad=True),
            "aux_outputs": [],
        }
        for name in ("decoder", "token")
    }
    res = SimVGLoss()(outputs, [_target([]), _target([])])
    assert res["distill_w"].item() == 0.0
    assert all(torch.isfinite(v) for v in res.values())
    res["loss"].backward()
    assert all(torch.isfinite(b["pred_logits"].grad).all() for b in outputs.values())


def _decoder_grads(loss_cfg: LossConfig) -> tuple[list, list]:
    torch.manual_seed(0)
    model = create_model("simvg_tiny_test", **{"encoder.vocab_size": 100})
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 6))
    out = model(images, ids, torch.zeros(2, 6, dtype=torch.bool))
    targets = [_target([[0.5, 0.5, 0.3, 0.3]]), _target([[0.3, 0.6, 0.2, 0.4]])]
    SimVGLoss(loss_cfg)(out, targets)["loss"].backward()
    dec = [p.grad for p in model.decoder.parameters()]
    tok = [p.grad for p in model.token.parameters()]
    return dec, tok


def test_no_gradient_reaches_the_decoder_through_pseudo_targets():
    dec, tok = _decoder_grads(LossConfig(decoder=0.0, token=0.0, distill=1.0, distill_mode="fixed", fixed_weight=1.0))
    assert all(g is None or not g.any() for g in dec)
    assert any(g is not None and g.any() for g in tok)
    dec, _ = _decoder_grads(LossConfig(decoder=1.0, token=0.0, distill=1.0, distill_mode="fixed", fixed_weight=1.0))
    assert any(g is not None and g.any() for g in dec)  # the check above can fail: the GT term does reach it


def test_teacher_weight_is_mean_over_all_matched_pairs_not_per_image():
    """Catches a DWBD weight averaged per image (mean of per-image means) instead of over all matched pairs of the
    batch, which is what the docstring and docs/design.md O3.2 say.

    Image 0 has two targets, both predicted exactly: p*IoU = 0.8 * 1 and 0.6 * 1. Image 1 has one target,
    predicted with IoU 1/3 at p = 0.5: 0.5/3. Image 2 has no target (no pair; it must not count at all).
    Over all pairs: w = (0.8 + 0.6 + 0.5/3) / 3 = 0.5222...; per image it would be ((0.8 + 0.6)/2 + 0.5/3)/2 =
    0.4333... (or NaN with the empty image).
    """
    far = [0.1, 0.9, 0.05, 0.05]
    a, b = [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]
    dec = {
        "pred_logits": torch.stack(
            [_logits_for([0.8, 0.6, 0.1]), _logits_for([0.2, 0.5, 0.1]), _logits_for([0.9] * 3)]
        ),
        "pred_boxes": torch.tensor([[a, b, far], [far, [0.5, 0.5, 0.2, 0.2], far], [a, b, far]]),
    }
    targets = [_target([b, a]), _target([GT]), _target([])]
    pseudo, w = teacher_targets(dec, targets, HungarianMatcher())
    expected = (0.8 + 0.6 + 0.5 / 3) / 3
    assert w.item() == pytest.approx(expected, rel=1e-5)  # per image: 0.4333
    assert sorted(pseudo[0]["weight"].tolist()) == pytest.approx([0.6, 0.8], rel=1e-5)
    assert pseudo[1]["weight"].tolist() == pytest.approx([0.5 / 3], rel=1e-5)
    assert len(pseudo[2]["boxes"]) == 0
    # the loss uses that w: the token branch's GT term is (1 - w) times its distillation-free value
    token = {"pred_logits": dec["pred_logits"].clone(), "pred_boxes": torch.rand(3, 3, 4) * 0.5 + 0.25,
             "aux_outputs": []}  # fmt: skip
    outputs = {"decoder": {**dec, "aux_outputs": []}, "token": token}
    dynamic = SimVGLoss(LossConfig())(outputs, targets)
    plain = SimVGLoss(LossConfig(distill_mode="none"))(outputs, targets)
    assert dynamic["distill_w"].item() == pytest.approx(expected, rel=1e-5)
    assert dynamic["loss_tgt"].item() == pytest.approx((1 - expected) * plain["loss_tgt"].item(), rel=1e-5)


def test_a_missing_branch_is_named_before_any_loss_is_computed():
    """Each branch the configuration needs is checked up front, with the message naming it (a KeyError from deep
    inside the loss would not say which branch to run). Weights of exactly 1 are "needed" too."""
    dec, tok = _branch([0.8], [[0.5, 0.5, 0.2, 0.2]]), _branch([0.5], [GT])
    targets = [_target([GT])]
    cases = [
        (LossConfig(distill_mode="none"), {"token": tok}, "the loss needs the decoder branch"),
        (LossConfig(distill_mode="none"), {"decoder": dec}, "the loss needs the token branch"),
        (LossConfig(token=1.0, distill_mode="none"), {"decoder": dec}, "the loss needs the token branch"),
        (LossConfig(decoder=1.0, token=0.0, distill=0.0), {"token": tok}, "the loss needs the decoder branch"),
        # decoder weight 0 but DWBD on: the teacher is still the decoder
        (LossConfig(decoder=0.0), {"token": tok},
         "distillation needs the decoder branch; call the model with branch='both'"),
    ]  # fmt: skip
    for cfg, outputs, message in cases:
        with pytest.raises(ValueError) as err:
            SimVGLoss(cfg)(outputs, targets)
        assert str(err.value).startswith(message), (str(err.value), message)


def test_token_weight_one_is_applied():
    """A token weight of 1 (not only the default 2) switches the token term on."""
    outputs = {"decoder": _branch([0.8], [[0.5, 0.5, 0.2, 0.2]]), "token": _branch([0.5], [GT])}
    res = SimVGLoss(LossConfig(token=1.0, distill_mode="none"))(outputs, [_target([GT])])
    assert math.isclose(res["loss_tgt"].item(), 1.0 * -math.log(0.5), rel_tol=1e-5)


def test_loss_config_reaches_matcher_and_criterion():
    cfg = LossConfig(cost_class=3.0, cost_bbox=7.0, cost_giou=4.0, weight_class=2.5, weight_bbox=6.0,
                     weight_giou=3.5, eos_coef=0.2)  # fmt: skip
    loss = SimVGLoss(cfg)
    assert (loss.matcher.cost_class, loss.matcher.cost_bbox, loss.matcher.cost_giou) == (3.0, 7.0, 4.0)
    assert loss.criterion.weights == {"loss_class": 2.5, "loss_bbox": 6.0, "loss_giou": 3.5}
    assert loss.criterion.class_weight.tolist() == pytest.approx([1.0, 0.2])


def test_required_branch_with_unit_weights():
    assert SimVGLoss(LossConfig(decoder=0.0, token=1.0, distill_mode="none")).required_branch == "token"
    assert SimVGLoss(LossConfig(decoder=1.0, token=0.0, distill=0.0)).required_branch == "decoder"
    assert SimVGLoss(LossConfig(decoder=0.0, token=0.0, distill=1.0)).required_branch == "both"


def test_teacher_targets_of_an_empty_batch():
    """No sample at all: no pseudo targets and w = 0 as a float32 scalar, whatever the decoder's dtype (bf16 under
    autocast)."""
    out = {"pred_logits": torch.zeros(0, 3, 2, dtype=torch.bfloat16), "pred_boxes": torch.zeros(0, 3, 4)}
    out["pred_boxes"] = out["pred_boxes"].bfloat16()
    pseudo, w = teacher_targets(out, [], HungarianMatcher())
    assert pseudo == [] and w.shape == () and w.dtype == torch.float32 and w.item() == 0.0
