"""A tiny SimVG trained with the full DWBD loss memorises 8 samples: both branches reach IoU > 0.9 on every one.

This is the end-to-end check that the model, matcher, criterion and distillation fit together and can learn.
The boxes are visible (a coloured rectangle on black), so the image alone determines the answer.
"""

import torch

from simvg.losses import SimVGLoss
from simvg.models import create_model
from simvg.utils.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou

MAX_STEPS, LR, SIDE = 500, 2e-3, 64


def _fixed_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, 64, 64] with one coloured rectangle each, and its box [n, 4] cxcywh normalised."""
    images, boxes = torch.zeros(n, 3, SIDE, SIDE), []
    for i in range(n):
        w, h = torch.randint(12, 36, (2,), generator=generator).tolist()
        x, y = (torch.randint(0, SIDE - s, (1,), generator=generator).item() for s in (w, h))
        images[i, :, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=generator) * 2 - 0.5
        boxes.append([(x + w / 2) / SIDE, (y + h / 2) / SIDE, w / SIDE, h / SIDE])
    return images, torch.tensor(boxes)


def _min_iou(out: dict, boxes: torch.Tensor) -> dict[str, float]:
    return {
        name: elementwise_box_iou(box_cxcywh_to_xyxy(b["pred_boxes"][:, 0]), box_cxcywh_to_xyxy(boxes)).min().item()
        for name, b in out.items()
    }


def test_tiny_model_overfits_eight_samples():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; one thread is also the fastest for a model this small
    try:
        torch.manual_seed(2)
        g = torch.Generator().manual_seed(2)
        images, boxes = _fixed_batch(8, g)
        ids, pad = torch.randint(4, 100, (8, 6), generator=g), torch.zeros(8, 6, dtype=torch.bool)
        targets = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": boxes[i : i + 1]} for i in range(8)]
        # No dropout (the tiny encoder has no drop-path either), so training outputs equal evaluation outputs.
        model = create_model("simvg_tiny_test", dropout=0.0, **{"encoder.vocab_size": 100})
        loss_fn = SimVGLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / MAX_STEPS)
        for _ in range(MAX_STEPS):
            out = model(images, ids, pad)
            if min(_min_iou(out, boxes).values()) > 0.92:
                break
            opt.zero_grad()
            loss_fn(out, targets)["loss"].backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            ious = _min_iou(model.eval()(images, ids, pad), boxes)
        assert ious["decoder"] > 0.9 and ious["token"] > 0.9, ious
    finally:
        torch.set_num_threads(threads)
