"""The synthetic "shapes" world: scenes, multi-aspect captions, PIL rendering, splits.

A caption names the main object, optionally a secondary object with its relation, and the
background: "a large red circle to the left of a small blue square on a striped background".
Some colour–shape pairs never appear in training (the compositional test).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw

from mpe.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart"]
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
BACKGROUNDS = ["plain gray", "plain white", "green grass", "blue sky", "striped", "dotted"]
RELATIONS = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
# colours that would vanish on a background
CLASHES = {
    "plain white": {"white"},
    "green grass": {"green"},
    "blue sky": {"blue"},
    "plain gray": set(),
    "striped": set(),
    "dotted": set(),
}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    main: Obj
    position: str
    background: str
    relation: str | None = None
    secondary: Obj | None = None

    def caption(self) -> str:
        main = f"a {self.main.size} {self.main.colour} {self.main.shape}"
        if self.secondary is not None:
            sec = self.secondary
            middle = f"{main} {self.relation} a {sec.size} {sec.colour} {sec.shape}"
        else:
            middle = f"{main} {POSITION_PHRASE[self.position]}"
        return f"{middle} on a {self.background} background"

    def pairs(self) -> set[tuple[str, str]]:
        objs = [self.main] + ([self.secondary] if self.secondary else [])
        return {(o.colour, o.shape) for o in objs}


def _words(options) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_OBJ = rf"a (?P<{{p}}size>{_words(SIZES)}) (?P<{{p}}colour>{_words(COLOURS)}) (?P<{{p}}shape>{_words(SHAPES)})"
_CAPTION = re.compile(
    _OBJ.format(p="m")
    + rf"(?: (?P<relation>{_words(RELATIONS)}) "
    + _OBJ.format(p="s")
    + rf"| (?P<phrase>{_words(POSITION_PHRASE.values())}))"
    + rf" on a (?P<background>{_words(BACKGROUNDS)}) background"
)
_PHRASE_POSITION = {v: k for k, v in POSITION_PHRASE.items()}


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of this world describes (the inverse of :meth:`Scene.caption`), or None when the
    text is not a caption of the shapes world's grammar."""
    m = _CAPTION.fullmatch(text)
    if m is None:
        return None
    main = Obj(m["mcolour"], m["mshape"], m["msize"])
    if m["relation"]:
        sec = Obj(m["scolour"], m["sshape"], m["ssize"])
        return Scene(main, RELATIONS[m["relation"]][0], m["background"], m["relation"], sec)
    return Scene(main, _PHRASE_POSITION[m["phrase"]], m["background"])


def held_out_pairs(n: int, seed: int) -> set[tuple[str, str]]:
    """``n`` colour–shape pairs that training never shows, at most one per colour and per shape where possible."""
    rng = random.Random(seed * 7919 + 1)
    colours, shapes = list(COLOURS), list(SHAPES)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    return {(colours[i % len(colours)], shapes[(i + i // len(shapes)) % len(shapes)]) for i in range(n)}


def _obj(rng: random.Random, pairs_ok, size: str | None = None, avoid: set[str] = frozenset()) -> Obj:
    while True:
        o = Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), size or rng.choice(SIZES))
        if o.colour not in avoid and pairs_ok((o.colour, o.shape)):
            return o


def sample_scene(rng: random.Random, pairs_ok, p_secondary: float, main_ok=None) -> Scene:
    """A random scene whose objects all satisfy ``pairs_ok`` (and the main one ``main_ok``)."""
    background = rng.choice(BACKGROUNDS)
    avoid = CLASHES[background]
    main_pred = main_ok or pairs_ok
    main = _obj(rng, main_pred, avoid=avoid)
    if rng.random() < p_secondary:
        relation = rng.choice(list(RELATIONS))
        while True:
            sec = _obj(rng, pairs_ok, avoid=avoid)
            if (sec.colour, sec.shape) != (main.colour, main.shape):
                break
        return Scene(main, RELATIONS[relation][0], background, relation, sec)
    return Scene(main, rng.choice(POSITIONS), background)


# -- rendering ---------------------------------------------------------------------------------
def _anchor(position: str, size: int, rng: random.Random, jitter: float) -> tuple[float, float]:
    c = size / 2
    off = size * 0.27
    x, y = {"left": (c - off, c), "right": (c + off, c), "top": (c, c - off), "bottom": (c, c + off), "center": (c, c)}[
        position
    ]
    j = size * jitter
    return x + rng.uniform(-j, j), y + rng.uniform(-j, j)


def _polygon_star(cx, cy, r):
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


# an object's radius as a share of the canvas, by size (object_scale multiplies both)
RADIUS = {"large": 0.17, "small": 0.09}


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, canvas: int, scale: float = 1.0) -> None:
    r = canvas * RADIUS[obj.size] * scale
    fill = COLOURS[obj.colour]
    outline = (0, 0, 0) if obj.colour != "black" else (90, 90, 90)
    box = [cx - r, cy - r, cx + r, cy + r]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif obj.shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill, outline=outline)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, outline=outline)
    elif obj.shape == "star":
        draw.polygon(_polygon_star(cx, cy, r * 1.1), fill=fill, outline=outline)
    elif obj.shape == "cross":
        w = r * 0.38
        draw.polygon(
            [
                (cx - w, cy - r),
                (cx + w, cy - r),
                (cx + w, cy - w),
                (cx + r, cy - w),
                (cx + r, cy + w),
                (cx + w, cy + w),
                (cx + w, cy + r),
                (cx - w, cy + r),
                (cx - w, cy + w),
                (cx - r, cy + w),
                (cx - r, cy - w),
                (cx - w, cy - w),
            ],
            fill=fill,
            outline=outline,
        )
    elif obj.shape == "heart":
        q = r * 0.52
        draw.ellipse([cx - r, cy - r * 0.75, cx - r + 2 * q, cy - r * 0.75 + 2 * q], fill=fill)
        draw.ellipse([cx + r - 2 * q, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * q], fill=fill)
        draw.polygon([(cx - r * 0.98, cy - r * 0.2), (cx + r * 0.98, cy - r * 0.2), (cx, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def draw_background(img: Image.Image, background: str, rng: random.Random) -> None:
    d = ImageDraw.Draw(img)
    w, h = img.size
    if background == "plain gray":
        d.rectangle([0, 0, w, h], fill=(128, 128, 128))
    elif background == "plain white":
        d.rectangle([0, 0, w, h], fill=(235, 235, 235))
    elif background == "green grass":
        d.rectangle([0, 0, w, h], fill=(70, 140, 50))
        for _ in range(w * 2):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            d.line([x, y, x + rng.uniform(-2, 2), y - rng.uniform(2, 5)], fill=(40, 100, 30))
    elif background == "blue sky":
        for y in range(h):
            t = y / h
            d.line([0, y, w, y], fill=(int(90 + 80 * t), int(150 + 60 * t), 235))
        for _ in range(3):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([x - 7, y - 3, x + 7, y + 3], fill=(245, 245, 250))
    elif background == "striped":
        step = max(4, w // 10)
        off = rng.randrange(step)
        for x in range(-step, w + step, step):
            d.rectangle([x + off, 0, x + off + step // 2 - 1, h], fill=(200, 170, 120))
            d.rectangle([x + off + step // 2, 0, x + off + step - 1, h], fill=(120, 90, 60))
    elif background == "dotted":
        d.rectangle([0, 0, w, h], fill=(230, 220, 200))
        step = max(5, w // 9)
        off = rng.randrange(step)
        for x in range(off, w, step):
            for y in range(off, h, step):
                d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(90, 90, 140))
    else:
        raise ValueError(f"unknown background {background!r}")


def render(scene: Scene, size: int, seed: int, jitter: float = 0.06, object_scale: float = 1.0) -> Image.Image:
    """Draw ``scene`` on a ``size``×``size`` RGB canvas; ``seed`` fixes texture and placement jitter;
    ``object_scale`` multiplies the objects' radii."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size))
    draw_background(img, scene.background, rng)
    draw = ImageDraw.Draw(img)
    cx, cy = _anchor(scene.position, size, rng, jitter)
    if scene.secondary is not None:
        sec_pos = RELATIONS[scene.relation][1]
        sx, sy = _anchor(sec_pos, size, rng, jitter)
        draw_object(draw, scene.secondary, sx, sy, size, object_scale)
    draw_object(draw, scene.main, cx, cy, size, object_scale)
    return img


@dataclass
class SplitPlan:
    """Scenes per split, and the negation set (query, image without / with the negated object)."""

    train: list[Scene] = field(default_factory=list)
    val: list[Scene] = field(default_factory=list)
    test: list[Scene] = field(default_factory=list)
    test_compositional: list[bool] = field(default_factory=list)
    negation: list[tuple[str, Scene, Scene]] = field(default_factory=list)
    held_out: set = field(default_factory=set)


def plan_splits(
    train: int,
    val: int,
    test: int,
    negation: int,
    held_out: int,
    p_secondary: float,
    seed: int,
    minimal_pairs: float = 0.0,
) -> SplitPlan:
    """Unique captions per split, no caption shared across splits, held-out pairs only in test.

    Half of the test captions have a held-out pair as their main object (compositional), half are
    new scenes of seen pairs. With ``minimal_pairs`` > 0, that share of the training scenes comes with a
    twin that differs from it in one aspect only (drawn at random among ``ASPECTS``), so that a batch more
    often holds two captions only that aspect tells apart.
    """
    rng = random.Random(seed)
    hold = held_out_pairs(held_out, seed)
    seen = lambda p: p not in hold  # noqa: E731
    used: set[str] = set()
    plan = SplitPlan(held_out=hold)

    def draw_unique(n, pairs_ok, main_ok=None):
        out, tries = [], 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ConfigError(
                    f"data.shapes: the shapes world has too few distinct captions for {n} more; "
                    "ask for fewer train/val/test captions"
                )
            s = sample_scene(rng, pairs_ok, p_secondary, main_ok)
            c = s.caption()
            if c not in used:
                used.add(c)
                out.append(s)
        return out

    if minimal_pairs > 0:
        twin_rng = random.Random(seed * 7907 + 3)  # its own stream: the base scenes are drawn as without twins
        plan.train = []
        while len(plan.train) < train:
            (scene,) = draw_unique(1, seen)
            plan.train.append(scene)
            if len(plan.train) < train and twin_rng.random() < minimal_pairs:
                aspect = twin_rng.choice(ASPECTS)
                twin = aspect_variant_scenes(scene, twin_rng)[aspect]
                if all(seen(p) for p in twin.pairs()) and twin.caption() not in used:
                    used.add(twin.caption())
                    plan.train.append(twin)
    else:
        plan.train = draw_unique(train, seen)
    plan.val = draw_unique(val, seen)
    n_comp = test // 2 if hold else 0
    comp = draw_unique(n_comp, lambda p: True, main_ok=lambda p: p in hold)
    plain = draw_unique(test - n_comp, seen)
    plan.test = comp + plain
    plan.test_compositional = [True] * len(comp) + [False] * len(plain)
    for _ in range(negation):
        background = rng.choice(BACKGROUNDS)
        avoid = CLASHES[background]
        main = _obj(rng, seen, avoid=avoid)
        while True:
            neg = _obj(rng, seen, avoid=avoid)
            if (neg.colour, neg.shape) != (main.colour, main.shape):
                break
        relation = rng.choice(list(RELATIONS))
        pos = RELATIONS[relation][0]
        without = Scene(main, pos, background)
        with_neg = Scene(main, pos, background, relation, neg)
        query = f"a {main.colour} {main.shape} and no {neg.colour} {neg.shape}"
        plan.negation.append((query, without, with_neg))
    return plan


def zero_shot_prompts() -> dict[str, dict[str, list[str]]]:
    """Zero-shot tasks on the main object: task → class name → prompt texts.

    One grid of prompts "a {colour} {shape}" serves both tasks: a shape's prompts are its phrase in
    every colour, a colour's its phrase on every shape (prompt ensembling, as CLIP does with templates).
    """
    return {
        "shape": {s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES},
        "colour": {c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS},
    }


ASPECTS = ("colour", "shape", "size", "position", "background")


def aspect_variants(scene: Scene, rng: random.Random) -> dict[str, str]:
    """For each aspect, the caption of ``scene`` with only that aspect of the main object (or the
    background) changed: what a prompt that encodes the aspect must tell apart from the true caption."""
    return {a: s.caption() for a, s in aspect_variant_scenes(scene, rng).items()}


def aspect_variant_scenes(scene: Scene, rng: random.Random) -> dict[str, Scene]:
    """For each aspect, ``scene`` with only that aspect of the main object (or the background, or the relation
    / position) changed."""
    main, out = scene.main, {}
    out["colour"] = rng.choice([c for c in COLOURS if c != main.colour and c not in CLASHES[scene.background]])
    out["shape"] = rng.choice([x for x in SHAPES if x != main.shape])
    variants = {
        "colour": replace(scene, main=replace(main, colour=out["colour"])),
        "shape": replace(scene, main=replace(main, shape=out["shape"])),
        "size": replace(scene, main=replace(main, size="small" if main.size == "large" else "large")),
        "background": replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background])),
    }
    if scene.secondary is not None:
        relation = rng.choice([r for r in RELATIONS if r != scene.relation])
        variants["position"] = replace(scene, relation=relation, position=RELATIONS[relation][0])
    else:
        variants["position"] = replace(scene, position=rng.choice([p for p in POSITIONS if p != scene.position]))
    return {a: variants[a] for a in ASPECTS}
