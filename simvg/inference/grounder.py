"""Grounding as a product: ``Grounder`` turns (image, expression) into boxes in original-image pixels.

``Grounder.from_checkpoint(path)`` accepts every kind of model file ``simvg.artifact`` reads (the embedded default,
a model or run folder, a training checkpoint, a ``.safetensors``, an official SimVG checkpoint with ``tokenizer=``
BEiT-3's ``beit3.spm``) and an ONNX file with its ``model.yaml`` and tokenizer beside it.

Post-processing is ``simvg.artifact.postprocess`` (the official demo's): REC (one query) returns that query without
a threshold; GREC (several queries) keeps every query whose object probability reaches ``score_threshold`` (0.7),
and an empty set is an explicit ``no_target``. There is no NMS. By default the branch the model's spec names answers.

Confidence (``GroundingResult.confidences``): the agreement of the two branches, per reported box the IoU (in
original pixels) with the best-matching box the other branch reports from the same forward pass (0 when it reports
none); for REC simply IoU(token box, decoder box). The score cannot serve: REC training never pushes the one query
towards "no object", so a REC score is ~1.00 for any input. Measured on fresh SynthRef scenes (docs/design.md S8),
low agreement marks likely-wrong boxes. It costs nothing when the decoder answers
(the token head is three small layers on the already computed object token); when the token branch answers it would
run the decoder as well, which the token branch exists to skip (B14), so then it is computed only on request
(``confidence=True``). ``attention=True`` also returns where each branch looked (``simvg.inference.attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from simvg import artifact
from simvg.data.transforms import boxes_to_original, preprocess
from simvg.errors import UserError
from simvg.inference import loading, provenance
from simvg.inference.attention import AttentionMaps, place_on_original
from simvg.inference.draw import draw_attention, draw_result
from simvg.models.quantize import set_threads
from simvg.utils.box_ops import box_iou

ImageInput = str | Path | bytes | Image.Image | np.ndarray  # an array: [H, W] or [H, W, 3|4], RGB(A) order
BRANCHES = artifact.BRANCHES  # ("token", "decoder"), defined once with the model spec
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo is fine; a decompression bomb is not
NO_PIXEL_LIMIT = 2**62  # drawing on an image that was already grounded (and size-checked) re-checks nothing
# No limit by default: a long expression is cut to the model's token budget and the result's warnings say so. The
# server checks its own limit (simvg.serve.app.ServeLimits.max_text_chars) before a text reaches the grounder.
DEFAULT_MAX_TEXT_CHARS: int | None = None
CONFIDENCE_METHOD = "branch_agreement"  # what a result's "confidence" is (see the module docstring)


@dataclass
class GroundingResult:
    """What the model found for one expression. Boxes are xyxy in original-image pixels, best first."""

    text: str
    boxes: list[list[float]]  # [K, 4] xyxy pixels
    scores: list[float]  # [K] object probability
    no_target: bool  # GREC: nothing reached the threshold; always False for REC
    task: str  # "rec" (one query) or "grec" (several)
    branch: str  # "token" or "decoder"
    image_size: tuple[int, int]  # (width, height) of the original image, after EXIF rotation
    num_tokens: int  # text tokens the model saw (BOS/EOS included)
    truncated: bool  # the expression was longer than the model's text length and was cut
    warnings: list[str] = field(default_factory=list)
    trained_on: str = ""  # the model's provenance (model.yaml), so that no answer hides what the model knows
    # [K] per box: IoU with the other branch's best-matching box (module docstring); None when not computed
    confidences: list[float] | None = None
    score_threshold: float | None = None  # GREC: the object probability a box needed; None for REC (no threshold)
    attention: AttentionMaps | None = None  # where each branch looked, when asked for (ground(..., attention=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (boxes rounded to 0.01 px, scores and confidences to 1e-4). Each box carries its
        ``confidence`` and the dict ``"confidence_method": "branch_agreement"`` when the confidence was computed;
        ``score_threshold`` is the GREC threshold applied (null for REC). Attention maps are not included."""
        boxes = [{"box": [round(float(v), 2) for v in box], "score": round(float(s), 4)}
                 for box, s in zip(self.boxes, self.scores)]  # fmt: skip
        extra: dict[str, Any] = {}
        if self.confidences is not None:
            for entry, c in zip(boxes, self.confidences):
                entry["confidence"] = round(float(c), 4)
            extra["confidence_method"] = CONFIDENCE_METHOD
        return {
            "text": self.text,
            "task": self.task,
            "branch": self.branch,
            "score_threshold": self.score_threshold,
            "image_size": {"width": self.image_size[0], "height": self.image_size[1]},
            "no_target": self.no_target,
            "boxes": boxes,
            **extra,
            "num_tokens": self.num_tokens,
            "truncated": self.truncated,
            "warnings": list(self.warnings),
            "trained_on": self.trained_on,
        }

    def draw(self, image: Any) -> Image.Image:
        """``image`` (what was grounded: a path, bytes, PIL image or array) with this result's boxes drawn."""
        if isinstance(image, np.ndarray):
            image = array_to_image(image)
        return draw_result(loading.open_rgb(image, max_pixels=NO_PIXEL_LIMIT), self)  # EXIF-rotated, as when grounded

    def draw_attention(self, image: Any, branch: str | None = None) -> Image.Image:
        """``image`` with where the model looked (``ground(..., attention=True)``): both branches side by side, or
        only ``branch``'s map; each with that branch's boxes."""
        if self.attention is None:
            raise UserError("this result has no attention maps: ground with attention=True")
        if isinstance(image, np.ndarray):
            image = array_to_image(image)
        return draw_attention(loading.open_rgb(image, max_pixels=NO_PIXEL_LIMIT), self, branch)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A numpy image (``[H, W]`` gray or ``[H, W, 3|4]`` RGB(A), as PIL, imageio and matplotlib give; uint8, or
    floats in [0, 1]) as a PIL image. OpenCV arrays are BGR: pass ``array[..., ::-1]``."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise UserError(f"<array>: expected an image array [H, W] or [H, W, 3|4], got shape {tuple(array.shape)}")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        values = np.nan_to_num(array.astype(np.float64), nan=0.0)
        array = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"<array>: expected uint8 or float pixels, got {array.dtype}")
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def check_text(text: object, max_chars: int | None) -> str:
    """The expression with whitespace normalised; UserError when it is not text, empty or longer than ``max_chars``
    (None: no limit)."""
    if not isinstance(text, str):
        raise UserError(f"text must be a string, got {type(text).__name__}")
    clean = " ".join(text.split())
    if not clean:
        raise UserError("text is empty: give an expression such as 'the red car on the left'")
    if max_chars is not None and len(clean) > max_chars:
        raise UserError(f"text is {len(clean)} characters long; the limit is {max_chars}")
    return clean


class Grounder:
    """Ground referring expressions with a SimVG model (PyTorch or ONNX Runtime).

    Build it with ``Grounder.from_checkpoint``; the constructor takes already loaded parts.
    """

    def __init__(
        self,
        runner: loading.Runner,
        tokenizer: Any,
        spec: artifact.ModelSpec,
        branch: str | None = None,
        score_threshold: float = artifact.SCORE_THRESHOLD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
        source: str = "",
        notices: list[str] | None = None,
        threads: int | None = None,
        confidence: bool | None = None,
    ) -> None:
        """``confidence``: True computes the branch agreement for every answer, False never, None (auto) whenever
        that costs no extra run of the decoder (the decoder answers)."""
        set_threads(threads)  # torch's intra-op threads (None: as they are); process-wide
        self.runner = runner
        self.tokenizer = tokenizer
        self.spec = spec
        self.branch = branch or spec.branch
        self.score_threshold = score_threshold
        self.max_pixels = max_pixels
        self.max_text_chars = max_text_chars
        self.source = source
        self.notices = list(notices or [])  # what loading the model had to say (e.g. an official file's settings)
        self.confidence = confidence

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        branch: str | None = None,
        tokenizer: str | Path | None = None,
        backend: str = "torch",
        score_threshold: float = artifact.SCORE_THRESHOLD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
        weights: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        compile: bool = False,
        confidence: bool | None = None,
    ) -> Grounder:
        """Load a model; ``path=None`` is the embedded default. An ``.onnx`` path implies ``backend="onnx"``.

        ``branch=None`` answers with the model's default branch (``spec.branch``; an ONNX file's own branch);
        ``tokenizer`` is a sentencepiece file for models that carry none (official SimVG files: ``beit3.spm``).
        ``precision`` "int8": dynamic int8 on the CPU (PyTorch), or an ONNX graph exported with ``--int8``; "fp32" or
        None: the model as stored. ``threads``: intra-op threads of torch and ONNX Runtime (None: unchanged).
        ``compile``: an fp32 PyTorch model runs under ``torch.compile`` with freezing (each new batch size or branch
        compiles first, minutes for ViT-B; then ~15% faster: for long-running services). ``confidence``: see
        ``Grounder.__init__``.
        """
        if branch is not None and branch not in BRANCHES:
            raise UserError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise UserError(f"score threshold must lie in [0, 1], got {score_threshold}")
        if path is not None and str(path).endswith(".onnx"):
            backend = "onnx"
        bundle = loading.load_bundle(path, device, branch, backend, tokenizer=tokenizer, weights=weights,
                                     precision=precision, threads=threads, compile=compile)  # fmt: skip
        return cls(
            bundle.runner,
            bundle.tokenizer,
            bundle.spec,
            branch=bundle.branch,
            score_threshold=score_threshold,
            max_pixels=max_pixels,
            max_text_chars=max_text_chars,
            source=str(bundle.source),
            notices=bundle.notices,
            confidence=confidence,
        )

    def ground(
        self, image: ImageInput, text: str, branch: str | None = None, attention: bool = False
    ) -> GroundingResult:
        """Ground one expression in one image (path, encoded bytes, PIL image or numpy array).

        ``branch`` overrides the grounder's branch for this call ("token" or "decoder"). ``attention``: also run
        both branches and return where each looked (``result.attention``, ``result.draw_attention``); the boxes
        are the same as without it. PyTorch models only.
        """
        return self.ground_batch([image], [text], branch, attention)[0]

    def branches_to_run(self, branch: str, attention: bool = False) -> tuple[str, ...]:
        """The answering ``branch`` first, then the other one when the confidence or the attention maps need it."""
        other = "token" if branch == "decoder" else "decoder"
        if attention:
            return branch, other
        if self.confidence is False or other not in loading.runnable_branches(self.runner):
            return (branch,)
        if self.confidence is None and branch == "token":
            return (branch,)  # auto: keep the token branch's fast path (no decoder)
        return branch, other

    def ground_batch(
        self, images: Sequence[ImageInput], texts: Sequence[str], branch: str | None = None, attention: bool = False
    ) -> list[GroundingResult]:
        """Ground ``texts[i]`` in ``images[i]`` for every i, in one forward pass (see ``ground``)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        branch = branch or self.branch
        if branch not in BRANCHES:
            raise UserError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        clean = [check_text(t, self.max_text_chars) for t in texts]
        return self.ground_checked([self.open_image(img) for img in images], clean, branch, attention)

    def ground_checked(
        self, images: Sequence[Image.Image], texts: Sequence[str], branch: str | None = None, attention: bool = False
    ) -> list[GroundingResult]:
        """``ground_batch`` of inputs already checked, each once: ``images`` decoded by ``open_image``, ``texts``
        cleaned by ``check_text`` (with ``max_text_chars``), ``branch`` None or one of ``BRANCHES``. For callers
        that check every input themselves to report a bad one on its own (``simvg predict``)."""
        branch = branch or self.branch
        if not images:
            return []
        tensors, metas = zip(*(preprocess(p, self.spec.preprocess) for p in images))
        ids, pad_mask, infos = loading.tokenize(self.tokenizer, list(texts))
        run = loading.run_branches(self.runner, torch.stack(tensors), ids, pad_mask,
                                   self.branches_to_run(branch, attention), attention)  # fmt: skip
        detections = {b: artifact.postprocess(*out, self.score_threshold) for b, out in run.outputs.items()}
        results = []
        for i, (text, pil, meta, info) in enumerate(zip(texts, images, metas, infos)):
            result = self._result(text, pil, meta, detections[branch][i], info, branch)
            others = {b: kept_original(d[i], meta)[0] for b, d in detections.items() if b != branch}
            if others:
                result.confidences = agreement(torch.tensor(result.boxes).reshape(-1, 4), *others.values()).tolist()
            if run.attention is not None:
                boxes = {branch: result.boxes, **{b: v.tolist() for b, v in others.items()}}
                result.attention = attention_maps(run.attention, i, meta, boxes, detections["decoder"][i])
            results.append(result)
        return results

    def open_image(self, image: ImageInput) -> Image.Image:
        """Decode a path, bytes, PIL image or numpy array into an RGB PIL image (EXIF-rotated, size-checked)."""
        if isinstance(image, np.ndarray):
            image = array_to_image(image)
        if not isinstance(image, str | Path | bytes | Image.Image):
            raise UserError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")
        pil = loading.open_rgb(image, self.max_pixels)
        if pil.width == 0 or pil.height == 0:
            raise UserError(f"<image>: empty image ({pil.width}x{pil.height} pixels)")
        return pil

    def _result(
        self, text: str, image: Image.Image, meta: dict, det: artifact.Detections, info: dict, branch: str
    ) -> GroundingResult:
        """One sample's post-processed outputs -> a GroundingResult in original-image pixels."""
        notes = list(info["warnings"])
        if not (torch.isfinite(det.scores).all() and torch.isfinite(det.boxes).all()):
            notes.append("the model's output is not finite (NaN or infinity): no box is reported for it")
        vocabulary = provenance.vocabulary_warning(self.tokenizer, text)  # words it cannot know
        photo = provenance.photo_warning(image) if self.spec.synthetic_only else None  # an image unlike its training
        notes += [note for note in (vocabulary, photo) if note]
        boxes_px, scores = kept_original(det, meta)
        task = "rec" if det.scores.numel() == 1 else "grec"
        return GroundingResult(
            text=text,
            boxes=boxes_px.tolist(),
            scores=scores.tolist(),
            no_target=task == "grec" and det.keep.numel() == 0,
            task=task,
            branch=branch,
            image_size=image.size,
            num_tokens=info["num_tokens"],
            truncated=info["truncated"],
            warnings=notes,
            trained_on=self.spec.trained_on,
            score_threshold=self.score_threshold if task == "grec" else None,
        )


def kept_original(det: artifact.Detections, meta: dict) -> tuple[Tensor, Tensor]:
    """A sample's reported boxes [K, 4] as xyxy original pixels and their scores [K], the non-finite ones left out
    (a model giving NaN reports no box for it)."""
    finite = torch.isfinite(det.kept_scores) & torch.isfinite(det.kept_boxes).all(-1)
    return boxes_to_original(det.kept_boxes[finite], meta), det.kept_scores[finite]


def agreement(boxes: Tensor, other: Tensor) -> Tensor:
    """Branch agreement: for each box [K, 4] (xyxy) its best IoU with ``other`` [M, 4]; 0 when ``other`` is empty.
    REC (K = M = 1): IoU(token box, decoder box)."""
    if boxes.shape[0] == 0 or other.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    return box_iou(boxes.float(), other.float()).max(dim=1).values


def attention_maps(
    store: dict[str, Any], i: int, meta: dict, boxes: dict[str, list[list[float]]], decoder: artifact.Detections
) -> AttentionMaps:
    """Sample ``i`` of ``SimVG.capture_attention``'s record as per-branch grids and original-pixel maps; the decoder
    map is that of the decoder's highest-scoring query."""
    h, w = store["grid"]
    query = int(torch.nan_to_num(decoder.scores, nan=-1.0).argmax())
    grids = {"token": store["token"][i].reshape(h, w).numpy()}
    if "decoder" in store:
        grids["decoder"] = store["decoder"][i, query].reshape(h, w).numpy()
    maps = {name: place_on_original(grid, meta) for name, grid in grids.items()}
    share = float(store["token_patch_share"][i])
    return AttentionMaps(grids, maps, boxes, token_patch_share=share, decoder_query=query)
