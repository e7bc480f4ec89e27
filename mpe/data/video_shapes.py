"""The synthetic moving-shapes video world: short clips of one object on a background whose captions name the
object *and what it does* — "a red circle moves from left to right on a striped background", "… grows",
"… turns blue" — rendered with the shapes world's drawing.

Every motion has a reverse (left↔right, top↔bottom, grows↔shrinks, red→blue ↔ blue→red). The test split
is made of pairs: a clip and the same frames in reverse order, with the reverse caption. Their frames are
the same set, so any order-blind pooling (the mean of frame embeddings) gives both clips one embedding and
is exactly at chance on telling the two captions apart; only a temporal model can do better. The pair of a
test clip is in its metadata (``pair``), for the motion-only metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from mpe.data.shapes import BACKGROUNDS, CLASHES, COLOURS, SHAPES, Obj, draw_background, draw_object
from mpe.errors import ConfigError

DIRECTIONS = {  # motion -> (start, end) of the object's centre, as fractions of the frame
    "left_to_right": ((0.2, 0.5), (0.8, 0.5)),
    "right_to_left": ((0.8, 0.5), (0.2, 0.5)),
    "top_to_bottom": ((0.5, 0.2), (0.5, 0.8)),
    "bottom_to_top": ((0.5, 0.8), (0.5, 0.2)),
}
SIZE_CHANGES = {"grows": (0.07, 0.2), "shrinks": (0.2, 0.07)}  # radius as a fraction of the frame
MOTIONS = (*DIRECTIONS, *SIZE_CHANGES, "turns")
REVERSE = {
    "left_to_right": "right_to_left",
    "right_to_left": "left_to_right",
    "top_to_bottom": "bottom_to_top",
    "bottom_to_top": "top_to_bottom",
    "grows": "shrinks",
    "shrinks": "grows",
    "turns": "turns",
}
RADIUS = 0.15  # of the frame, for an object that moves or changes colour
# draw_object draws a "large" object with a radius of LARGE_FRACTION of the canvas it is told
LARGE_FRACTION = 0.17


@dataclass(frozen=True)
class ClipScene:
    """One clip: an object (``colour``, ``shape``) on ``background`` doing ``motion``; ``to_colour`` is the
    colour it turns to (motion ``turns``)."""

    colour: str
    shape: str
    background: str
    motion: str
    to_colour: str | None = None

    def caption(self) -> str:
        what = {
            "left_to_right": "moves from left to right",
            "right_to_left": "moves from right to left",
            "top_to_bottom": "moves from top to bottom",
            "bottom_to_top": "moves from bottom to top",
            "grows": "grows",
            "shrinks": "shrinks",
            "turns": f"turns {self.to_colour}",
        }[self.motion]
        return f"a {self.colour} {self.shape} {what} on a {self.background} background"

    def reversed(self) -> ClipScene:
        """The scene whose clip is this one's frames in reverse order."""
        if self.motion == "turns":
            return replace(self, colour=self.to_colour, to_colour=self.colour)
        return replace(self, motion=REVERSE[self.motion])


def sample_clip_scene(rng: random.Random) -> ClipScene:
    background = rng.choice(BACKGROUNDS)
    colours = [c for c in COLOURS if c not in CLASHES[background]]
    colour, motion = rng.choice(colours), rng.choice(MOTIONS)
    to_colour = rng.choice([c for c in colours if c != colour]) if motion == "turns" else None
    return ClipScene(colour, rng.choice(SHAPES), background, motion, to_colour)


def _draw(frame: Image.Image, scene: ClipScene, colour: str, cx: float, cy: float, radius: float) -> Image.Image:
    out = frame.copy()
    # draw_object sizes a "large" object by the canvas it is given: ask for the canvas that gives `radius`
    draw_object(ImageDraw.Draw(out), Obj(colour, scene.shape, "large"), cx, cy, radius / LARGE_FRACTION)
    return out


def render_clip(scene: ClipScene, size: int, frames: int, seed: int) -> list[Image.Image]:
    """``frames`` RGB frames of ``size``×``size``: one background (its texture fixed by ``seed``), the object
    moving, growing or changing colour linearly from the first frame to the last, its path offset by a
    little seeded jitter."""
    rng = random.Random(seed)
    background = Image.new("RGB", (size, size))
    draw_background(background, scene.background, rng)
    jitter = [rng.uniform(-0.05, 0.05) for _ in range(2)]
    out = []
    for t in range(frames):
        u = t / (frames - 1) if frames > 1 else 0.0
        (x0, y0), (x1, y1) = DIRECTIONS.get(scene.motion, ((0.5, 0.5), (0.5, 0.5)))
        cx = (x0 + (x1 - x0) * u + (jitter[0] if x0 == x1 else 0)) * size
        cy = (y0 + (y1 - y0) * u + (jitter[1] if y0 == y1 else 0)) * size
        r0, r1 = SIZE_CHANGES.get(scene.motion, (RADIUS, RADIUS))
        radius = (r0 + (r1 - r0) * u) * size
        frame = _draw(background, scene, scene.colour, cx, cy, radius)
        if scene.motion == "turns":  # the same geometry in the new colour, blended in over the clip
            frame = Image.blend(frame, _draw(background, scene, scene.to_colour, cx, cy, radius), u)
        out.append(frame)
    return out


@dataclass
class VideoPlan:
    """Training scenes (each rendered several times) and test pairs (a scene and its reverse)."""

    train: list[ClipScene]
    test_pairs: list[ClipScene]


def plan_video_splits(train: int, test_pairs: int, seed: int) -> VideoPlan:
    """Unique captions, none shared between the splits; a test pair's two captions both unseen in training."""
    rng = random.Random(seed * 15_485_863 + 11)
    used: set[str] = set()
    plan = VideoPlan([], [])
    tries = 0
    while len(plan.train) < train or len(plan.test_pairs) < test_pairs:
        tries += 1
        if tries > 200 * (train + test_pairs) + 1000:
            raise ConfigError(
                "data.video_shapes: the moving-shapes world has too few distinct captions for "
                f"{train} training captions and {test_pairs} test pairs; ask for fewer"
            )
        scene = sample_clip_scene(rng)
        if len(plan.train) < train:
            if scene.caption() not in used:
                used.add(scene.caption())
                plan.train.append(scene)
            continue
        captions = {scene.caption(), scene.reversed().caption()}
        if not captions & used:
            used |= captions
            plan.test_pairs.append(scene)
    return plan
