"""SynthRef semantics: what a referring expression means, and which objects of a scene it picks.

An expression is first built as a small ``Program``: an attribute ``Filter`` (shape, colour, size), then an
optional selection among the objects that pass it -- a size superlative ("the biggest"), an extreme position ("the
leftmost", "at the top right"), an ordinal ("the second from the top") or a spatial relation to an anchor object that
an attribute filter alone singles out ("left of the green star"). Only then is it worded (``simvg.synthref.text``).

``resolve`` evaluates a program with three-valued comparisons: two positions closer than ``MARGIN`` times the image
side are "unsure", and a program whose outcome hangs on an unsure comparison resolves to ``None`` and is discarded.
So every kept expression picks its targets with a clear visual margin, and a singular expression exactly one.
Object positions are the centres of their boxes; sets of objects are bit masks (bit i = object i).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from simvg.synthref.scene import COLOURS, SHAPES, SIZES, SceneObject

MARGIN = 0.06  # share of the image side below which two positions or distances count as "about equal"
NEAR_LIMIT = 0.4  # "next to" needs the nearest candidate within this share of the side
CENTER_LIMIT = 0.2  # "in the middle" needs the object's centre this close to the image centre
MAX_ANCHORS = 4  # relation anchors considered per scene

AXES = ("left", "right", "top", "bottom")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = AXES + CORNERS + ("center",)
RELATIONS = ("left", "right", "above", "below", "near")
SPATIAL_OPS = ("extreme", "ordinal", "relation")
_SIZE_RANK = {name: rank for rank, name in enumerate(SIZES)}


@dataclass(frozen=True)
class Filter:
    """Attribute constraints; None = any. The empty filter matches every object ("the shape")."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def is_empty(self) -> bool:
        return self.shape is None and self.colour is None and self.size is None

    def key(self) -> tuple[str, str, str]:
        """A sort key (None sorts first), so enumeration order never depends on set iteration order."""
        return self.shape or "", self.colour or "", self.size or ""


@dataclass(frozen=True)
class Program:
    """The meaning of one expression.

    Attributes:
        op: "attr" | "superlative" | "extreme" | "ordinal" | "relation".
        target: filter on the referred objects.
        direction: a DIRECTIONS entry (extreme), an AXES entry (ordinal), a RELATIONS entry (relation), or
            "large" / "small" (superlative).
        rank: 2 or 3 for an ordinal ("second", "third"), else 0.
        anchor: filter that singles out the relation's anchor object.
        plural: the expression refers to a set ("all red shapes", "the circles left of ...").
        count: exact number a plural names ("the two circles", "both stars"); 0 = any number ("all").
    """

    op: str
    target: Filter
    direction: str | None = None
    rank: int = 0
    anchor: Filter | None = None
    plural: bool = False
    count: int = 0


def kind_of(program: Program, num_targets: int) -> str:
    """Expression kind stored in the dataset: attribute/position/ordinal/relation, or multi / none by target count."""
    if num_targets == 0:
        return "none"
    if num_targets > 1:
        return "multi"
    return {"attr": "attribute", "superlative": "attribute", "extreme": "position"}.get(program.op, program.op)


def family_of(program: Program) -> str:
    """ "attribute" (words about the objects themselves) or "spatial" (positions and relations): testA vs testB."""
    return "spatial" if program.op in SPATIAL_OPS else "attribute"


def bits(mask: int) -> list[int]:
    """Object indices set in a bit mask, ascending."""
    out, i = [], 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return out


@dataclass
class Facts:
    """What the resolver needs to know about a scene: attributes and box centres of its objects.

    ``__post_init__`` precomputes bit-mask tables (orders along every direction, relation tables, distance orders)
    so that enumeration can test thousands of programs per scene in a few milliseconds.
    """

    size: int
    shapes: list[str]
    colours: list[str]
    sizes: list[str]
    cx: list[float]
    cy: list[float]

    def __post_init__(self) -> None:
        n = len(self.shapes)
        self.n = n
        self.margin = MARGIN * self.size
        self._masks: dict[tuple[str, str], int] = {}
        for i, key in enumerate(zip(self.shapes, self.colours, self.sizes)):
            for slot, value in zip(("shape", "colour", "size"), key):
                self._masks[(slot, value)] = self._masks.get((slot, value), 0) | (1 << i)
        self.scores = {d: [self.score(d, i) for i in range(n)] for d in DIRECTIONS}
        self.order = {d: sorted(range(n), key=lambda i, d=d: (-self.scores[d][i], i)) for d in DIRECTIONS}
        self.dist = [[self.distance(i, j) for j in range(n)] for i in range(n)]
        self.by_distance = [
            sorted((j for j in range(n) if j != a), key=lambda j, a=a: (self.dist[a][j], j)) for a in range(n)
        ]
        self.rel_true: dict[str, list[int]] = {}
        self.rel_unsure: dict[str, list[int]] = {}
        for r in RELATIONS[:4]:
            true, unsure = [0] * n, [0] * n
            for a in range(n):
                for o in range(n):
                    value = self.relation(r, o, a) if o != a else False
                    true[a] |= int(value is True) << o
                    unsure[a] |= int(value is None) << o
            self.rel_true[r], self.rel_unsure[r] = true, unsure

    @classmethod
    def from_objects(cls, objects: Sequence[SceneObject], size: int) -> Facts:
        centres = [o.center for o in objects]
        return cls(
            size,
            [o.shape for o in objects],
            [o.colour for o in objects],
            [o.size for o in objects],
            [c[0] for c in centres],
            [c[1] for c in centres],
        )

    def match(self, f: Filter) -> int:
        """Bit mask of the objects passing the filter."""
        mask = (1 << self.n) - 1
        for slot, value in (("shape", f.shape), ("colour", f.colour), ("size", f.size)):
            if value is not None:
                mask &= self._masks.get((slot, value), 0)
        return mask

    def score(self, direction: str, i: int) -> float:
        """How far object i lies towards ``direction`` (larger = further); corners use the diagonal."""
        x, y = self.cx[i], self.cy[i]
        if direction == "center":
            return -math.hypot(x - self.size / 2.0, y - self.size / 2.0)
        sx = -x if "left" in direction else (x if "right" in direction else 0.0)
        sy = -y if "top" in direction else (y if "bottom" in direction else 0.0)
        return (sx + sy) / math.sqrt(2.0) if direction in CORNERS else sx + sy

    def in_region(self, direction: str, i: int) -> bool:
        """Corner and centre words also need the object to be in that part of the image, with a margin."""
        half, m = self.size / 2.0, self.margin / 2.0
        x, y = self.cx[i], self.cy[i]
        if direction == "center":
            return math.hypot(x - half, y - half) <= CENTER_LIMIT * self.size
        if direction in CORNERS:
            x_ok = x <= half - m if "left" in direction else x >= half + m
            y_ok = y <= half - m if "top" in direction else y >= half + m
            return x_ok and y_ok
        return True

    def relation(self, r: str, o: int, a: int) -> bool | None:
        """Does object o stand in relation r ("left" = left of) to anchor a? None when too close to call."""
        gap = {
            "left": self.cx[a] - self.cx[o],
            "right": self.cx[o] - self.cx[a],
            "above": self.cy[a] - self.cy[o],
            "below": self.cy[o] - self.cy[a],
        }[r]
        if gap >= self.margin:
            return True
        return False if gap <= 0.0 else None

    def distance(self, i: int, j: int) -> float:
        return math.hypot(self.cx[i] - self.cx[j], self.cy[i] - self.cy[j])


def resolve(program: Program, facts: Facts) -> frozenset[int] | None:
    """Indices of the objects the program refers to; None if ambiguous, unsure, or its presupposition fails."""
    mask = facts.match(program.target)
    if program.op == "attr":
        result = mask
    elif program.op == "superlative":
        result = _superlative(facts, mask, program.direction)
    elif program.op == "extreme":
        result = _extreme(facts, mask, program.direction)
    elif program.op == "ordinal":
        result = _ordinal(facts, mask, program.direction, program.rank)
    elif program.op == "relation":
        anchor = bits(facts.match(program.anchor)) if program.anchor is not None else []
        result = _relation(facts, mask, program.direction, anchor[0]) if len(anchor) == 1 else None
    else:
        raise ValueError(f"unknown program op {program.op!r}")
    if result is None:
        return None
    found = bits(result)
    if (not program.plural and len(found) > 1) or (program.count and len(found) != program.count):
        return None
    return frozenset(found)


def _first(order: list[int], mask: int, k: int) -> list[int]:
    """The first k objects of ``order`` that are in ``mask``."""
    out = []
    for i in order:
        if mask >> i & 1:
            out.append(i)
            if len(out) == k:
                break
    return out


def _extreme(facts: Facts, mask: int, direction: str) -> int | None:
    top = _first(facts.order[direction], mask, 2)
    if not top:
        return 0
    scores = facts.scores[direction]
    if len(top) > 1 and scores[top[0]] - scores[top[1]] < facts.margin:
        return None
    return 1 << top[0] if facts.in_region(direction, top[0]) else None


def _ordinal(facts: Facts, mask: int, direction: str, rank: int) -> int | None:
    top = _first(facts.order[direction], mask, rank + 1)
    if len(top) < rank or rank < 2:
        return None
    s = [facts.scores[direction][i] for i in top]
    k = rank - 1
    if s[k - 1] - s[k] < facts.margin or (k + 1 < len(s) and s[k] - s[k + 1] < facts.margin):
        return None
    return 1 << top[k]


def _superlative(facts: Facts, mask: int, direction: str) -> int | None:
    idx = bits(mask)
    if not idx:
        return 0
    sign = 1 if direction == "large" else -1
    ranks = [sign * _SIZE_RANK[facts.sizes[i]] for i in idx]
    best = max(ranks)
    return 1 << idx[ranks.index(best)] if ranks.count(best) == 1 else None


def _relation(facts: Facts, mask: int, r: str, anchor: int) -> int | None:
    candidates = mask & ~(1 << anchor)
    if r == "near":
        top = _first(facts.by_distance[anchor], candidates, 2)
        if not top:
            return 0
        d = [facts.dist[anchor][i] for i in top]
        if (len(d) > 1 and d[1] - d[0] < facts.margin) or d[0] > NEAR_LIMIT * facts.size:
            return None
        return 1 << top[0]
    if candidates & facts.rel_unsure[r][anchor]:
        return None
    return candidates & facts.rel_true[r][anchor]


@dataclass
class Candidates:
    """Every valid program of a scene, grouped for sampling.

    singles: object index -> kind -> programs that pick exactly that object.
    multis: (program, target mask) for plural programs with two or more targets.
    nones: programs that certainly pick nothing although they sound plausible.
    """

    singles: dict[int, dict[str, list[Program]]]
    multis: list[tuple[Program, int]] = field(default_factory=list)
    nones: list[Program] = field(default_factory=list)

    def add_single(self, program: Program, result: int | None) -> None:
        if result and result.bit_count() == 1:
            kind = kind_of(program, 1)
            self.singles[result.bit_length() - 1].setdefault(kind, []).append(program)


def subfilters(facts: Facts, i: int) -> list[Filter]:
    """The 8 filters that object i passes, from the empty one to (shape, colour, size)."""
    s, c, z = facts.shapes[i], facts.colours[i], facts.sizes[i]
    return [Filter(a, b, d) for a in (None, s) for b in (None, c) for d in (None, z)]


def enumerate_programs(facts: Facts, rng: np.random.Generator, want_multi: bool = False) -> Candidates:
    """All valid programs of the scene (plural and no-target ones only when ``want_multi``).

    A selection (extreme, ordinal, superlative, relation) is only offered over a filter that alone matches two or
    more objects: otherwise the plain filter would already do and the extra words say nothing.
    """
    filters = sorted({f for i in range(facts.n) for f in subfilters(facts, i)}, key=Filter.key)
    masks = {f: facts.match(f) for f in filters}
    out = Candidates({i: {} for i in range(facts.n)})
    for f, mask in masks.items():
        count = mask.bit_count()
        if count == 1 and not f.is_empty():
            out.add_single(Program("attr", f), mask)
        if count < 2:
            continue
        for d in DIRECTIONS:
            out.add_single(Program("extreme", f, d), _extreme(facts, mask, d))
        for d in ("large", "small") if f.size is None else ():
            out.add_single(Program("superlative", f, d), _superlative(facts, mask, d))
        for d in AXES if count >= 3 else ():
            for rank in (2, 3):
                out.add_single(Program("ordinal", f, d, rank), _ordinal(facts, mask, d, rank))
    for a, anchor in _anchor_filters(facts, filters, rng).items():
        for f, mask in masks.items():
            _relations_to(facts, out, f, mask, a, anchor, want_multi)
    if want_multi:
        out.multis += _attribute_sets(facts, filters)
        out.nones += _attribute_nones(facts)
    return out


def _relations_to(facts: Facts, out: Candidates, f: Filter, mask: int, a: int, anchor: Filter, multi: bool) -> None:
    """Relation programs from the objects passing ``f`` (bit mask ``mask``) to the anchor object ``a``."""
    rest = mask & ~(1 << a)
    if not rest:
        return
    informative = mask.bit_count() >= 2
    if informative:
        out.add_single(Program("relation", f, "near", anchor=anchor), _relation(facts, mask, "near", a))
    for r in RELATIONS[:4]:  # the directional ones, inlined from _relation: this loop dominates generation time
        if rest & facts.rel_unsure[r][a]:
            continue
        result = rest & facts.rel_true[r][a]
        n = result.bit_count()
        if n == 1 and informative:
            out.add_single(Program("relation", f, r, anchor=anchor), result)
        elif n >= 2 and multi:
            out.multis.append((Program("relation", f, r, anchor=anchor, plural=True), result))
            if n in (2, 3):
                out.multis.append((Program("relation", f, r, anchor=anchor, plural=True, count=n), result))
        elif n == 0 and multi and not f.is_empty():
            out.nones.append(Program("relation", f, r, anchor=anchor))  # "the circle above the red star": none is


def _anchor_filters(facts: Facts, filters: list[Filter], rng: np.random.Generator) -> dict[int, Filter]:
    """Up to MAX_ANCHORS objects that an attribute filter singles out, each with one such filter, at random."""
    unique: dict[int, list[Filter]] = {}
    for f in filters:
        mask = facts.match(f)
        if not f.is_empty() and mask.bit_count() == 1:
            unique.setdefault(mask.bit_length() - 1, []).append(f)
    chosen = sorted(unique)
    if len(chosen) > MAX_ANCHORS:  # enough relation variety per scene at a fraction of the enumeration time
        chosen = sorted(int(a) for a in rng.choice(chosen, size=MAX_ANCHORS, replace=False))
    return {a: unique[a][int(rng.integers(len(unique[a])))] for a in chosen}


def _attribute_sets(facts: Facts, filters: list[Filter]) -> list[tuple[Program, int]]:
    """Plural attribute programs: "all red shapes", "the two circles", "both small stars"."""
    out = []
    for f in filters:
        mask = facts.match(f)
        n = mask.bit_count()
        if f.is_empty() or n < 2:
            continue
        out.append((Program("attr", f, plural=True), mask))
        if n in (2, 3):
            out.append((Program("attr", f, plural=True, count=n), mask))
    return out


def _attribute_nones(facts: Facts) -> list[Program]:
    """Plausible descriptions of nothing: unseen shape-colour pairings of seen attributes, wrong sizes, absentees."""
    seen_shapes, seen_colours = sorted(set(facts.shapes)), sorted(set(facts.colours))
    out = [Program("attr", Filter(s, c)) for s in seen_shapes for c in seen_colours if not facts.match(Filter(s, c))]
    for s in seen_shapes:
        for c in seen_colours:
            if facts.match(Filter(s, c)):
                out += [Program("attr", Filter(s, c, z)) for z in SIZES if not facts.match(Filter(s, c, z))]
    out += [Program("attr", Filter(shape=s)) for s in SHAPES if s not in seen_shapes]
    out += [Program("attr", Filter(colour=c)) for c in COLOURS if c not in seen_colours]
    return out
