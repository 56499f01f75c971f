"""SynthRef wording: programs -> English referring expressions with synonyms and varied word order, and back.

``render`` words a ``Program`` (``lang``) at random: "the small red circle", "the circle that is small and
red", "the leftmost triangle", "the box on the far left", "the second disk from the top", "the square to the left of
the green star", "both blue shapes", ... Expressions come out already in the form SimVG's cleaning produces
(lower-case, no punctuation), so cleaning leaves them unchanged.

``parse`` is the inverse: it reads an expression with the same word tables and rebuilds its program. It is strict
(an unknown word raises), so a wording bug cannot pass silently; tests re-resolve every written expression from its
text alone through ``parse`` and ``lang.resolve``.
"""

from __future__ import annotations

import re

import numpy as np

from simvg.synthref.lang import Filter, Program

SHAPE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (("circle", "disk", "disc"), ("circles", "disks", "discs")),
    "square": (("square", "box", "block"), ("squares", "boxes", "blocks")),
    "triangle": (("triangle",), ("triangles",)),
    "star": (("star",), ("stars",)),
    "diamond": (("diamond", "rhombus"), ("diamonds", "rhombuses")),
    "cross": (("cross",), ("crosses",)),
    "hexagon": (("hexagon",), ("hexagons",)),
}
GENERIC_WORDS = (("shape", "object", "thing", "figure"), ("shapes", "objects", "things", "figures"))
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big"),
}
SUPERLATIVE_WORDS = {"large": ("biggest", "largest"), "small": ("smallest", "tiniest")}
EXTREME_PREFIX = {
    "left": ("leftmost",),
    "right": ("rightmost",),
    "top": ("topmost", "highest", "uppermost"),
    "bottom": ("bottommost", "lowest"),
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "center": ("most central", "centermost"),
}
EXTREME_SUFFIX = {
    "left": ("on the far left", "furthest to the left", "farthest left"),
    "right": ("on the far right", "furthest to the right", "farthest right"),
    "top": ("at the very top", "furthest up"),
    "bottom": ("at the very bottom", "furthest down"),
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
    "center": ("in the center", "in the middle"),
}
ORDINAL_WORDS = {2: "second", 3: "third"}
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left side of", "west of"),
    "right": ("right of", "to the right of", "on the right side of", "east of"),
    "above": ("above", "over", "higher than", "north of"),
    "below": ("below", "under", "beneath", "underneath", "lower than", "south of"),
    "near": ("next to", "closest to", "nearest to", "beside"),
}
COUNT_WORDS = {"both": 2, "two": 2, "three": 3}
QUANTIFIERS = ("all", "every")
FILLERS = ("the", "that", "which", "is", "are", "located", "in", "and", "sized")
NUMBER_WORDS = {2: "two", 3: "three"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def render(program: Program, rng: np.random.Generator) -> str:
    """Word a program; the result is lower-case words separated by single spaces."""
    p = program
    pre: list[str] = []
    post: list[str] = []
    if p.op == "superlative":
        pre = [_pick(rng, SUPERLATIVE_WORDS[p.direction])]
    elif p.op == "extreme":
        if rng.random() < 0.5:
            pre = [_pick(rng, EXTREME_PREFIX[p.direction])]
        else:
            post = [_pick(rng, EXTREME_SUFFIX[p.direction])]
    elif p.op == "ordinal":
        if rng.random() < 0.7:
            pre, post = [ORDINAL_WORDS[p.rank]], [f"from the {p.direction}"]
        else:
            post = [_pick(rng, ("that is", "which is")), ORDINAL_WORDS[p.rank], f"from the {p.direction}"]
    clause_ok = p.op in ("attr", "extreme") and not post
    det, plural_noun = _determiner(p, rng)
    words = det + _noun_phrase(p.target, rng, plural_noun, pre, post, clause_ok)
    if p.op == "relation":
        verb = ("that are", "which are") if plural_noun else ("that is", "which is")
        connector = _pick(rng, ("", "", *verb, "located"))
        anchor = ["the"] + _noun_phrase(p.anchor, rng, False, [], [], False)
        words += [connector, _pick(rng, RELATION_WORDS[p.direction])] + anchor
    return " ".join(w for w in words if w)


def _determiner(p: Program, rng: np.random.Generator) -> tuple[list[str], bool]:
    """Determiner words and whether the noun is plural ("every" takes a singular noun)."""
    if not p.plural:
        return (["the"] if p.op != "attr" or rng.random() < 0.9 else []), False
    if p.count == 0:
        det = _pick(rng, ("all", "all the", "the", "every"))
        return [det], det != "every"
    if p.count == 2:
        return [_pick(rng, ("the two", "both", "both the"))], True
    return [_pick(rng, ("the three", "all three"))], True


def _noun_phrase(
    f: Filter, rng: np.random.Generator, plural: bool, pre: list[str], post: list[str], clause_ok: bool
) -> list[str]:
    """Words for the objects passing ``f``, with selection words before (``pre``) or after (``post``) the noun."""
    size = [_pick(rng, SIZE_WORDS[f.size])] if f.size else []
    colour = [_pick(rng, COLOUR_WORDS[f.colour])] if f.colour else []
    if f.shape:
        noun = _pick(rng, SHAPE_WORDS[f.shape][int(plural)])
    elif (size or colour or pre or post) and rng.random() < 0.35:
        noun = "ones" if plural else "one"
    else:
        noun = _pick(rng, GENERIC_WORDS[int(plural)])
    form = int(rng.integers(3))
    if form == 1 and clause_ok and (size or colour) and noun not in ("one", "ones"):
        verb = _pick(rng, ("that are", "which are") if plural else ("that is", "which is"))
        return pre + [noun, verb, " and ".join(size + colour)]
    if form == 2 and colour:
        return pre + size + [noun, "in"] + colour + post
    return pre + size + colour + [noun] + post


# ---------------------------------------------------------------- parsing


def _alternation(phrases) -> str:
    """Regex alternation of whole-word phrases, longest first so "to the left of" wins over "left of"."""
    return "|".join(re.escape(x) for x in sorted(set(phrases), key=lambda s: (-len(s), s)))


_PHRASE_TO = {
    "relation": {w: k for k, ws in RELATION_WORDS.items() for w in ws},
    "extreme": {w: k for table in (EXTREME_PREFIX, EXTREME_SUFFIX) for k, ws in table.items() for w in ws},
    "superlative": {w: k for k, ws in SUPERLATIVE_WORDS.items() for w in ws},
}
_REGEX = {name: re.compile(rf"\b({_alternation(table)})\b") for name, table in _PHRASE_TO.items()}
_ORDINAL_FROM = re.compile(r"\bfrom the (left|right|top|bottom)\b")
_ORDINAL_WORD = re.compile(rf"\b({'|'.join(ORDINAL_WORDS.values())})\b")
_TOKENS: dict[str, tuple[str, str]] = {}
for _name, (_singular, _plural) in SHAPE_WORDS.items():
    _TOKENS.update({w: ("shape", _name) for w in _singular})
    _TOKENS.update({w: ("shapes", _name) for w in _plural})
_TOKENS.update({w: ("shape", "") for w in GENERIC_WORDS[0] + ("one",)})
_TOKENS.update({w: ("shapes", "") for w in GENERIC_WORDS[1] + ("ones",)})
_TOKENS.update({w: ("colour", _name) for _name, ws in COLOUR_WORDS.items() for w in ws})
_TOKENS.update({w.split()[0]: ("size", _name) for _name, ws in SIZE_WORDS.items() for w in ws})
_TOKENS.update({w: ("count", str(n)) for w, n in COUNT_WORDS.items()})
_TOKENS.update({w: ("all", "") for w in QUANTIFIERS})
_TOKENS.update({w: ("filler", "") for w in FILLERS})


def parse(text: str) -> Program:
    """Rebuild the program of an expression written by ``render``; ValueError on anything it cannot read."""
    text = " ".join(text.split())
    m = _REGEX["relation"].search(text)
    if m is None:
        return _parse_target(text)
    target = _parse_target(text[: m.start()])
    anchor = _parse_target(text[m.end() :])
    if target.op != "attr" or anchor.op != "attr" or anchor.plural or anchor.target.is_empty():
        raise ValueError(f"cannot read relation expression {text!r}")
    relation = _PHRASE_TO["relation"][m.group(1)]
    return Program("relation", target.target, relation, anchor=anchor.target, plural=target.plural, count=target.count)


def _take(regex: re.Pattern, text: str) -> tuple[str | None, str]:
    """First match of ``regex`` and the text with it blanked out; a second match is an error."""
    m = regex.search(text)
    if m is None:
        return None, text
    rest = text[: m.start()] + " " + text[m.end() :]
    if regex.search(rest):
        raise ValueError(f"more than one {regex.pattern!r} phrase in {text!r}")
    return m.group(1), rest


def _parse_target(text: str) -> Program:
    side, text = _take(_ORDINAL_FROM, text)
    ordinal, text = _take(_ORDINAL_WORD, text)
    if (side is None) != (ordinal is None):
        raise ValueError(f"ordinal without a side (or a side without an ordinal) in {text!r}")
    extreme, text = _take(_REGEX["extreme"], text)
    superlative, text = _take(_REGEX["superlative"], text)
    slots: dict[str, str] = {}
    for word in text.split():
        if word not in _TOKENS:
            raise ValueError(f"unknown word {word!r} in expression {text!r}")
        slot, value = _TOKENS[word]
        if slot == "filler":
            continue
        if slot in slots:
            raise ValueError(f"two {slot} words in {text!r}")
        slots[slot] = value
    if "shape" in slots and "shapes" in slots:
        raise ValueError(f"singular and plural nouns in {text!r}")
    f = Filter(slots.get("shape", slots.get("shapes")) or None, slots.get("colour"), slots.get("size"))
    count = int(slots.get("count", 0))
    plural = "shapes" in slots or "all" in slots or count > 0
    if ordinal is not None:
        rank = next(k for k, w in ORDINAL_WORDS.items() if w == ordinal)
        return Program("ordinal", f, side, rank, plural=plural, count=count)
    if extreme is not None:
        return Program("extreme", f, _PHRASE_TO["extreme"][extreme], plural=plural, count=count)
    if superlative is not None:
        return Program("superlative", f, _PHRASE_TO["superlative"][superlative], plural=plural, count=count)
    return Program("attr", f, plural=plural, count=count)


def vocabulary() -> list[str]:
    """Every word ``render`` can produce, sorted (the tokenizer corpus includes them all)."""
    phrases: list[str] = [*FILLERS, *QUANTIFIERS, *COUNT_WORDS, *ORDINAL_WORDS.values(), "from", "the", "one", "ones"]
    phrases += ["left", "right", "top", "bottom"]
    for singular, plural in (*SHAPE_WORDS.values(), GENERIC_WORDS):
        phrases += [*singular, *plural]
    for table in (COLOUR_WORDS, SIZE_WORDS, SUPERLATIVE_WORDS, EXTREME_PREFIX, EXTREME_SUFFIX, RELATION_WORDS):
        phrases += [w for ws in table.values() for w in ws]
    return sorted({w for phrase in phrases for w in phrase.split()})
