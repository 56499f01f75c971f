"""What a model cannot know: images unlike its training scenes and words outside its vocabulary.

A model trained on SynthRef only has seen coloured shapes on muted backgrounds; asked about a photograph it still
answers with a box (and, for REC, a score near 1). ``Grounder`` adds a warning to such a result, from two
measurable checks:

- ``unlike_synthref(image)``: the share of pixels whose colour SynthRef never draws. SynthRef paints every pixel
  either in a muted background colour (saturation <= 0.3 by construction; here <= 0.35, value >= 0.2, so white and
  grey backgrounds of drawings also count) or in one of its eight object colours (a nominal hue +-7 degrees and a
  saturation range per colour; here +-15 degrees and the range widened by 0.12 below and 0.08 above). The image is
  first reduced to at most 128 px a side (area average). Measured on 720 generated scenes (plain and textured, 128,
  256 and 640 px, PNG and JPEG at quality 70) the share is at most 0.08; on the photographs we tried it is 0.5 (a
  circuit board) and 0.83 (a portrait), on small icons 0.1-0.7. ``PHOTO_THRESHOLD`` (0.25) separates scenes from
  photographs; an image above it "does not look like a SynthRef scene".
- ``unknown_words(tokenizer, text)``: the words of the (cleaned) expression the tokenizer can only spell out in
  fragments of at most two characters (``xyzzy`` -> ``x y z z y``, ``cat`` -> ``c at`` in a SynthRef vocabulary).
  Such a word has no learned meaning for the model. Subword splits into longer pieces (``skate board er``) are how
  large vocabularies such as BEiT-3's spell real words, and are not reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from simvg.data.tokenizer import UNK_ID, clean_expression
from simvg.synthref.scene import COLOURS

PHOTO_THRESHOLD = 0.25
_SIDE = 128


def unlike_synthref(image: Image.Image) -> float:
    """Share (0-1) of the pixels of ``image`` whose colour no SynthRef scene has (see the module docstring)."""
    small = image.convert("RGB")
    small.thumbnail((_SIDE, _SIDE), Image.Resampling.BOX)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    if hsv.size == 0:
        return 0.0
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    muted = (sat <= 0.35) & (val >= 0.2)
    hues = np.array([c[0] for c in COLOURS.values()], dtype=np.float32)
    sat_lo = np.array([c[1][0] for c in COLOURS.values()], dtype=np.float32) - 0.12
    sat_hi = np.array([c[1][1] for c in COLOURS.values()], dtype=np.float32) + 0.08
    hue_off = np.abs((hue[..., None] - hues + 180.0) % 360.0 - 180.0)
    painted = (hue_off <= 15.0) & (sat[..., None] >= sat_lo) & (sat[..., None] <= sat_hi) & (val[..., None] >= 0.3)
    return float(1.0 - (muted | painted.any(-1)).mean())


def photo_warning(image: Image.Image) -> str | None:
    """The warning for a SynthRef-only model asked about ``image``, or None when it looks like a SynthRef scene."""
    share = unlike_synthref(image)
    if share <= PHOTO_THRESHOLD:
        return None
    return (
        f"this image does not look like a SynthRef scene ({100 * share:.0f}% of its pixels have colours SynthRef "
        "never draws) and the model was trained on SynthRef synthetic shapes only: its box means little here"
    )


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """Words of ``text`` (cleaned as the model sees it) that ``tokenizer`` spells out in fragments of <= 2
    characters, or that hold an unknown piece; each once, in order."""
    words: list[str] = []
    for word in dict.fromkeys(clean_expression(text).split()):
        if len(word) < 3:
            continue
        pieces = [(p.replace("\u2581", ""), i) for p, i in zip(tokenizer.tokenize(word), tokenizer.piece_ids(word))]
        pieces = [(p, i) for p, i in pieces if p]
        if any(i == UNK_ID for _, i in pieces) or (len(pieces) > 1 and all(len(p) <= 2 for p, _ in pieces)):
            words.append(word)
    return words


def vocabulary_warning(tokenizer: Any, text: str) -> str | None:
    """The warning naming the words the model's vocabulary does not know, or None."""
    words = unknown_words(tokenizer, text)
    if not words:
        return None
    return f"words the model's vocabulary does not know (it can only spell them in fragments): {', '.join(words)}"
