"""SynthRef's caption mode: a scene described phrase by phrase, every word linked to the object it describes.

Grounding pre-training needs what SynthRef's scene graph gives for free: which words name which object, and which
image patches show it. ``describe`` writes one phrase per object ("a large green square on the left", "the red
star") joined by "and"; each attribute word (size, colour, shape, location) is linked to its phrase's object and the
function words ("a", "the", "on", "and") to none. Within a phrase an attribute word may be shared with other objects
("green" when two objects are green): the phrase around it is what singles its object out, which is exactly the
binding the encoder has to learn. ``coverage`` gives, per object, the fraction of each patch that shows it (objects
drawn later hide earlier ones, as in the picture).

Everything is a pure function of the scene and a ``numpy.random.Generator``, so a caption is reproducible from
(seed, index) alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simvg.synthref.scene import COLOURS, SHAPES, SIZES, SceneObject, render_mask

NO_OBJECT = -1
# Where an object's centre lies, in thirds of the image: (column, row) -> location phrase.
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "middle", "bottom")
FUNCTION_WORDS = ("a", "the", "one", "and", "at", "on", "in", "corner")
P_SIZE, P_COLOUR, P_LOCATION, P_SHAPE_WORD = 0.5, 0.85, 0.35, 0.85
CAPTION_WORDS = tuple(sorted({*SIZES, *COLOURS, *SHAPES, *COLUMNS, *ROWS, *FUNCTION_WORDS}))  # every word used


@dataclass(frozen=True)
class Caption:
    """A caption as words, each with the index of the object it describes (``NO_OBJECT`` for function words)."""

    words: tuple[str, ...]
    links: tuple[int, ...]
    referent: int = NO_OBJECT  # the object of the first phrase

    @property
    def text(self) -> str:
        return " ".join(self.words)


def location_words(obj: SceneObject, size: int) -> tuple[str, ...]:
    """ "on the left", "at the top", "in the top left corner", "in the middle" from the object's box centre (thirds
    of the image)."""
    cx, cy = obj.center
    col, row = COLUMNS[min(int(3 * cx / size), 2)], ROWS[min(int(3 * cy / size), 2)]
    if col == "middle" and row == "middle":
        return ("in", "the", "middle")
    if col == "middle":
        return ("at", "the", row)
    if row == "middle":
        return ("on", "the", col)
    return ("in", "the", row, col, "corner")


ATTRIBUTES = ("size", "colour", "shape", "location")


def _named(obj: SceneObject, attributes: set[str], size: int) -> set[str]:
    """The content words a phrase naming ``attributes`` of ``obj`` uses (location: its row/column words)."""
    words = {getattr(obj, a) for a in ("size", "colour", "shape") if a in attributes}
    if "location" in attributes:
        words |= {w for w in location_words(obj, size) if w in COLUMNS + ROWS}
    return words


def phrase(
    obj: SceneObject, size: int, rng: np.random.Generator, others: list[SceneObject] | None = None
) -> tuple[list[str], list[bool]]:
    """One object's noun phrase: (words, which words describe the object). At least one attribute is named. With
    ``others``, attributes are added in a random order until the phrase fits no other object, read as a listener
    would: an object fits when it has every content word ("on the right" fits the top right corner too); as far as
    the four attributes allow."""
    chosen = {a for a, p in zip(ATTRIBUTES, (P_SIZE, P_COLOUR, P_SHAPE_WORD, P_LOCATION)) if rng.random() < p}
    chosen = chosen or {"colour"}
    if others:
        missing = [a for a in rng.permutation(ATTRIBUTES).tolist() if a not in chosen]
        while missing and any(_named(obj, chosen, size) <= _named(o, set(ATTRIBUTES), size) for o in others):
            chosen.add(missing.pop(0))
    words, described = [str(rng.choice(("a", "the")))], [False]
    for attribute in ("size", "colour"):
        if attribute in chosen:
            words.append(getattr(obj, attribute))
            described.append(True)
    words.append(obj.shape if "shape" in chosen else "one")
    described.append("shape" in chosen)
    if "location" in chosen:
        where = location_words(obj, size)
        words += where
        described += [w in COLUMNS + ROWS for w in where]
    return words, described


def describe(
    objects: list[SceneObject], size: int, rng: np.random.Generator, fits=None, refer_first: bool = False
) -> Caption:
    """Phrases for the objects in a random order, joined by "and"; ``fits(words)`` (e.g. the text budget in
    tokens) decides whether one more phrase still fits. The first phrase is always kept; with ``refer_first`` it
    singles its object out (``phrase`` with the others), and ``Caption.referent`` names that object."""
    words: list[str] = []
    links: list[int] = []
    order = [int(i) for i in rng.permutation(len(objects))]
    for index in order:
        others = [o for k, o in enumerate(objects) if k != index] if refer_first and not words else None
        part, described = phrase(objects[index], size, rng, others)
        glue = ["and"] if words else []
        candidate = words + glue + part
        if words and fits is not None and not fits(candidate):
            break
        words = candidate
        links += [NO_OBJECT] * len(glue) + [index if d else NO_OBJECT for d in described]
    return Caption(tuple(words), tuple(links), order[0])


def coverage(objects: list[SceneObject], size: int, patch: int) -> np.ndarray:
    """[K, G*G] float32: the share of each patch's pixels (row-major patches of side ``patch``, G = size // patch)
    that shows object k, with later objects drawn over earlier ones."""
    owner = np.full((size, size), -1, dtype=np.int16)
    for k, obj in enumerate(objects):
        mask, x0, y0 = render_mask(obj.shape, obj.cx, obj.cy, obj.extent, size)
        owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = k
    grid = size // patch
    blocks = owner[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch)
    share = np.stack([(blocks == k).mean(axis=(1, 3)).reshape(-1) for k in range(len(objects))])
    return share.astype(np.float32)
