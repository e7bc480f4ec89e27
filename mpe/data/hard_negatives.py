"""Hard-negative captions, as NegCLIP makes them (Yuksekgonul et al., "When and why vision-language models
behave like bags-of-words"): the caption with one aspect replaced, or two of its attributes swapped.

A caption of the shapes world is parsed back into its scene (``mpe.data.shapes.parse_caption``) and changed
in its structure: one object's colour, shape or size, the relation (or position), the background; or the
two objects' colours, sizes or shapes swapped. Any other caption (a URL list's) is changed by word-level
rules: a colour, number, size or spatial word replaced by another of its class, or two colour or size words
swapped, with the article before a replaced word kept in agreement ("an orange" → "a red").

The negatives of a caption are a function of its text and a seed, so the cache stage and the training
stream make the same ones independently.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import replace

from mpe.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, Scene, parse_caption

# Bumped whenever a change here changes which negatives a caption gets: cached negatives of an older
# version are recomputed (it is part of their shards' identity).
GENERATOR_VERSION = 1

# -- the shapes world: changes of a scene's structure ------------------------------------------------
SCENE_KINDS = (
    "colour",
    "shape",
    "size",
    "relation",
    "background",
    "swap_colour",
    "swap_size",
    "swap_shape",
    "swap_objects",
)


def _other(rng: random.Random, options, current):
    return rng.choice([o for o in options if o != current])


def scene_negatives(scene: Scene, rng: random.Random) -> dict[str, Scene]:
    """For each kind that applies to ``scene``, one scene that differs from it in that kind only: one object's
    colour, shape or size replaced (which object is drawn at random), the relation (two objects) or position
    (one) replaced, the background replaced; or, with two objects, their colours, sizes or shapes swapped
    (only where the two differ in it), or the two objects exchanged around the relation (ARO's VG-Relation:
    "a red circle to the left of a blue square" → "a blue square to the left of a red circle")."""
    objs = ["main"] + (["secondary"] if scene.secondary is not None else [])
    out: dict[str, Scene] = {}
    for kind, attr, options in (("colour", "colour", list(COLOURS)), ("shape", "shape", SHAPES)):
        which = rng.choice(objs)
        obj = getattr(scene, which)
        out[kind] = replace(scene, **{which: replace(obj, **{attr: _other(rng, options, getattr(obj, attr))})})
    which = rng.choice(objs)
    obj = getattr(scene, which)
    out["size"] = replace(scene, **{which: replace(obj, size="small" if obj.size == "large" else "large")})
    if scene.secondary is not None:
        relation = _other(rng, list(RELATIONS), scene.relation)
        out["relation"] = replace(scene, relation=relation, position=RELATIONS[relation][0])
    else:
        out["relation"] = replace(scene, position=_other(rng, POSITIONS, scene.position))
    out["background"] = replace(scene, background=_other(rng, BACKGROUNDS, scene.background))
    if scene.secondary is not None:
        main, sec = scene.main, scene.secondary
        for kind, attr in (("swap_colour", "colour"), ("swap_size", "size"), ("swap_shape", "shape")):
            if getattr(main, attr) != getattr(sec, attr):
                out[kind] = replace(
                    scene,
                    main=replace(main, **{attr: getattr(sec, attr)}),
                    secondary=replace(sec, **{attr: getattr(main, attr)}),
                )
        out["swap_objects"] = replace(scene, main=sec, secondary=main)
    return out


# -- any caption: word-level rules ---------------------------------------------------------------------
WORD_CLASSES = {
    "colour": (
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "white",
        "black",
        "brown",
        "pink",
        "gray",
        "grey",
    ),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "size": ("small", "large", "big", "little", "tiny", "huge", "tall", "short"),
}
# spatial words are replaced by their opposite, not by any word of the class
OPPOSITES = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "top": "bottom",
    "bottom": "top",
    "over": "under",
    "under": "over",
    "inside": "outside",
    "outside": "inside",
    "front": "back",
    "back": "front",
    "up": "down",
    "down": "up",
}
WORD_KINDS = ("replace_colour", "replace_number", "replace_size", "replace_spatial", "swap_colour", "swap_size")
_WORD = re.compile(r"[A-Za-z]+")
_VOWEL_SOUND = re.compile(r"^[aeiou]", re.IGNORECASE)


def _class_of(word: str) -> str | None:
    w = word.lower()
    if w in OPPOSITES:
        return "spatial"
    return next((c for c, words in WORD_CLASSES.items() if w in words), None)


def _cased(new: str, like: str) -> str:
    return new.capitalize() if like[:1].isupper() else new


def _respell(tokens: list[str], changed: set[int]) -> str:
    """Join the tokens back, with "a"/"an" before each changed word agreeing with it."""
    words = [i for i, t in enumerate(tokens) if _WORD.fullmatch(t)]
    for prev, nxt in zip(words, words[1:]):
        if nxt in changed and tokens[prev].lower() in ("a", "an"):
            article = "an" if _VOWEL_SOUND.match(tokens[nxt]) else "a"
            tokens[prev] = _cased(article, tokens[prev])
    return "".join(tokens)


def word_negatives(caption: str, rng: random.Random) -> dict[str, str]:
    """For each word-level rule that applies to ``caption``, one negative caption (see the module docstring)."""
    tokens = re.split(r"([A-Za-z]+)", caption)  # words at the odd indices, everything else kept as it is
    found: dict[str, list[int]] = {}
    for i in range(1, len(tokens), 2):
        cls = _class_of(tokens[i])
        if cls is not None:
            found.setdefault(cls, []).append(i)
    out: dict[str, str] = {}
    for cls, where in found.items():
        i = rng.choice(where)
        word = tokens[i].lower()
        new = OPPOSITES[word] if cls == "spatial" else _other(rng, WORD_CLASSES[cls], word)
        if cls == "colour" and {word, new} == {"gray", "grey"}:
            new = _other(rng, [c for c in WORD_CLASSES["colour"] if c not in ("gray", "grey")], word)
        changed = list(tokens)
        changed[i] = _cased(new, tokens[i])
        out[f"replace_{cls}"] = _respell(changed, {i})
    for cls in ("colour", "size"):
        where = found.get(cls, [])
        pairs = [(i, j) for i in where for j in where if i < j and tokens[i].lower() != tokens[j].lower()]
        if pairs:
            i, j = rng.choice(pairs)
            changed = list(tokens)
            changed[i], changed[j] = _cased(tokens[j].lower(), tokens[i]), _cased(tokens[i].lower(), tokens[j])
            out[f"swap_{cls}"] = _respell(changed, {i, j})
    return {k: v for k, v in out.items() if v != caption}


# -- both ---------------------------------------------------------------------------------------------
def text_id(text: str) -> int:
    """A signed 64-bit id of a text (the first 8 bytes of its sha256): equal texts, equal ids; what the loss
    compares to leave out a negative that is a caption of the batch."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)


def caption_rng(caption: str, seed: int) -> random.Random:
    """The generator a caption's negatives are drawn with: the same caption and seed, the same negatives."""
    digest = hashlib.sha256(f"{seed}\0{caption}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def negative_candidates(caption: str, seed: int = 0) -> dict[str, str]:
    """Every kind of hard negative that applies to ``caption``, one caption each."""
    rng = caption_rng(caption, seed)
    scene = parse_caption(caption)
    if scene is not None:
        out = {k: s.caption() for k, s in scene_negatives(scene, rng).items()}
    else:
        out = word_negatives(caption, rng)
    return {k: v for k, v in out.items() if v != caption}


def hard_negatives(caption: str, n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct hard negatives of ``caption``, each of another kind, drawn at random from
    :func:`negative_candidates` (fewer when fewer kinds apply; none for a caption no rule changes)."""
    candidates = negative_candidates(caption, seed)
    kinds = sorted(candidates)
    caption_rng(caption, seed + 1).shuffle(kinds)
    out: list[str] = []
    for k in kinds:
        if len(out) == n:
            break
        if candidates[k] not in out:
            out.append(candidates[k])
    return out
