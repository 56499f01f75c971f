"""The pre-training model (a BEiT-3 encoder plus two small heads) and its objectives.

Word-region alignment, the supervision MDETR (contrastive alignment) and GLIP (word-region alignment) use for
grounding pre-training, with SynthRef's links in place of human annotation:
- token -> patches: for every text token linked to object k, a softmax over the image's patches of the cosine
  similarity (projected, temperature ``tau``) is pulled towards the patches that show k (target proportional to
  each patch's coverage by k);
- patch -> tokens: for every patch mostly covered by one object k (share >= 0.5), a softmax over the caption's
  tokens is pulled towards the tokens linked to k (uniform over them).
Object-token alignment (optional, ``loss.object``): the vision [CLS] token, which SimVG's token branch reads as its
object token, against the patches of the object the caption's first phrase singles out (soft target by coverage).
Masked language modelling: object words replaced by ``<mask>`` are predicted from the image and the rest of the
caption, through a linear head on the text features.

Tensor names: B batch, N patches, L text tokens, K objects (padded to ``MAX_OBJECTS``), D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simvg.models.beit3 import BEiT3, BEiT3Config
from simvg.pretrain.data import IGNORE
from simvg.synthref.captions import NO_OBJECT

OWNED = 0.5  # a patch belongs to an object for patch -> token alignment when the object covers half of it


class PretrainModel(nn.Module):
    """``beit3`` (saved under the names ``model.pretrained`` loads) plus the alignment projections and MLM head."""

    def __init__(self, cfg: BEiT3Config, align_dim: int) -> None:
        super().__init__()
        self.beit3 = BEiT3(cfg)
        self.align_text = nn.Linear(cfg.embed_dim, align_dim)
        self.align_image = nn.Linear(cfg.embed_dim, align_dim)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.align_object = nn.Linear(cfg.embed_dim, align_dim)

    def forward(self, image: Tensor, ids: Tensor, pad: Tensor) -> dict[str, Tensor]:
        """image [B, 3, S, S], ids / pad [B, L] -> ``object`` [B, A] (the [CLS] token), ``patches`` [B, N, A] and
        ``words`` [B, L, A] (unit vectors), ``mlm_logits`` [B, L, V]."""
        x, split = self.beit3(image, ids, pad)
        patches, text = x[:, 1:split], x[:, split:]
        return {
            "object": F.normalize(self.align_object(x[:, 0]), dim=-1),
            "patches": F.normalize(self.align_image(patches), dim=-1),
            "words": F.normalize(self.align_text(text), dim=-1),
            "mlm_logits": self.mlm_head(text),
        }


def _soft_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean over ``valid`` rows of -sum(target * log_softmax(logits)); logits/target [..., C], valid [...] bool."""
    if not valid.any():
        return logits.sum() * 0.0  # keeps the graph (DDP needs every parameter in it) and the loss finite
    loss = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    return loss[valid].mean()


def pretrain_losses(out: dict[str, Tensor], batch: dict[str, Tensor], temperature: float) -> dict[str, Tensor]:
    """``align_t2p``, ``align_p2t``, ``align_object`` and ``mlm`` losses (each a mean over its valid items) plus
    the counts behind the accuracies: ``t2p_hits`` / ``t2p_items``, ``object_hits`` / ``object_items``,
    ``mlm_hits`` / ``mlm_items`` (detached)."""
    sim = out["words"] @ out["patches"].transpose(1, 2) / temperature  # [B, L, N]
    links, cover, pad = batch["links"], batch["coverage"], batch["pad"]
    linked = links.ne(NO_OBJECT)  # [B, L]
    index = links.clamp(min=0)[..., None].expand(-1, -1, cover.shape[-1])  # [B, L, N]
    token_cover = torch.gather(cover, 1, index)  # [B, L, N]: coverage of each token's object
    has_pixels = linked & token_cover.sum(-1).gt(0)
    t2p_target = token_cover / token_cover.sum(-1, keepdim=True).clamp(min=1e-6)
    align_t2p = _soft_cross_entropy(sim, t2p_target, has_pixels)

    share, owner = cover.max(1)  # [B, N]: the patch's main object and its share
    owned = share.ge(OWNED)
    match = links[:, None, :].eq(owner[:, :, None]) & linked[:, None, :]  # [B, N, L]: tokens naming the owner
    valid = owned & match.any(-1)
    p2t_target = match.float() / match.sum(-1, keepdim=True).clamp(min=1)
    logits = sim.transpose(1, 2).masked_fill(pad[:, None, :], -1e9)  # [B, N, L]; not -inf: 0 * -inf is NaN
    logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))  # rows never used: keep them finite
    align_p2t = _soft_cross_entropy(logits, p2t_target, valid)

    labels = batch["labels"]
    masked = labels.ne(IGNORE)
    if masked.any():
        mlm_logits = out["mlm_logits"][masked].float()
        mlm = F.cross_entropy(mlm_logits, labels[masked])
        mlm_hits = mlm_logits.argmax(-1).eq(labels[masked]).sum()
    else:
        mlm, mlm_hits = out["mlm_logits"].sum() * 0.0, labels.new_zeros(())
    # object token -> patches of the first phrase's object
    ref_cover = cover[torch.arange(cover.shape[0]), batch["referent"].clamp(min=0)]  # [B, N]
    has_ref = batch["referent"].ge(0) & ref_cover.sum(-1).gt(0)
    obj_sim = (out["object"][:, None, :] * out["patches"]).sum(-1) / temperature  # [B, N]
    align_object = _soft_cross_entropy(obj_sim, ref_cover / ref_cover.sum(-1, keepdim=True).clamp(min=1e-6), has_ref)
    with torch.no_grad():
        best = sim.argmax(-1, keepdim=True)  # [B, L, 1]: each token's most similar patch
        hit = torch.gather(token_cover, 2, best)[..., 0].gt(0) & has_pixels
        obj_hit = torch.gather(ref_cover, 1, obj_sim.argmax(-1, keepdim=True))[:, 0].gt(0) & has_ref
    return {
        "align_object": align_object,
        "object_hits": obj_hit.sum().float(),
        "object_items": has_ref.sum().float(),
        "align_t2p": align_t2p,
        "align_p2t": align_p2t,
        "mlm": mlm,
        "t2p_hits": hit.sum().float(),
        "t2p_items": has_pixels.sum().float(),
        "mlm_hits": mlm_hits.float(),
        "mlm_items": masked.sum().float(),
    }
