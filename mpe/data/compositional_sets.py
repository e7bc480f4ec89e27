"""The shapes world's compositional benchmarks, written in the formats users run (so the readers of
``mpe.evaluation.benchmarks`` score them like the released sets), in this world's own phrasing:

- ``sugarcrepe/<category>.json`` — SugarCrepe's ``{id: {filename, caption, negative_caption}}`` over the test
  images: ``replace_att`` (one object's colour), ``replace_obj`` (one object's shape), ``replace_rel`` (the
  relation, or a lone object's position), ``swap_att`` (the two objects' colours swapped), ``swap_obj`` (their
  shapes swapped), ``add_obj`` (an object the image does not hold). SugarCrepe's ``add_att`` has no
  counterpart: a caption here names every attribute of every object;
- ``aro/visual_genome_relation.json`` and ``aro/visual_genome_attribution.json`` — ARO's items over the test
  images (the box is the whole image): the two objects exchanged around their relation (grouped by
  relation), and their colours swapped (grouped by colour pair);
- ``winoground/examples.jsonl`` and ``winoground/images/`` — two scenes whose captions hold the same words in
  another order (colours swapped, shapes swapped, or the objects exchanged), both rendered with the same
  placement.

Only two-object test scenes serve the swaps; at most ``items`` per category and per set.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from mpe.data.hard_negatives import scene_negatives
from mpe.data.shapes import RELATIONS, Obj, Scene, render
from mpe.files.atomic import atomic_path, write_json, write_text

SUGARCREPE_DIR = "sugarcrepe"
ARO_DIR = "aro"
WINOGROUND_DIR = "winoground"
ARO_RELATION = "visual_genome_relation.json"
ARO_ATTRIBUTION = "visual_genome_attribution.json"
WINOGROUND_FILE = "examples.jsonl"
SUGARCREPE_KINDS = {  # category -> the scene change it makes (mpe.data.hard_negatives.scene_negatives)
    "replace_att": "colour",
    "replace_obj": "shape",
    "replace_rel": "relation",
    "swap_att": "swap_colour",
    "swap_obj": "swap_shape",
}
WINOGROUND_KINDS = ("swap_colour", "swap_shape", "swap_objects")
WINOGROUND_TAGS = {"swap_colour": "Object attribute", "swap_shape": "Object", "swap_objects": "Relation"}


def added_object(scene: Scene, rng: random.Random) -> Scene | None:
    """``scene`` with a second object it does not hold, on the side its lone object is not (None when it
    already has two, or its object is in the center)."""
    if scene.secondary is not None:
        return None
    relations = [r for r, (main_pos, _) in RELATIONS.items() if main_pos == scene.position]
    if not relations:
        return None
    main = scene.main
    extra = Obj(
        rng.choice([c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c != main.colour]),
        rng.choice(["circle", "square", "triangle", "star", "cross", "heart"]),
        rng.choice(["small", "large"]),
    )
    return replace(scene, relation=relations[0], secondary=extra)


def sugarcrepe_items(scenes: list[Scene], files: list[str], items: int, seed: int) -> dict[str, dict]:
    """``{category: {id: {filename, caption, negative_caption}}}`` over the test scenes and their image files."""
    rng = random.Random(seed * 7_368_787 + 11)
    out: dict[str, dict] = {c: {} for c in [*SUGARCREPE_KINDS, "add_obj"]}
    for scene, file in zip(scenes, files):
        changed = scene_negatives(scene, rng)
        added = added_object(scene, rng)
        if added is not None:
            changed["add_obj"] = added
        for category in out:
            kind = SUGARCREPE_KINDS.get(category, category)
            if kind in changed and len(out[category]) < items:
                item = {"filename": file, "caption": scene.caption(), "negative_caption": changed[kind].caption()}
                out[category][str(len(out[category]))] = item
    return out


def aro_items(scenes: list[Scene], files: list[str], items: int, size: int) -> tuple[list[dict], list[dict]]:
    """ARO's VG-Relation and VG-Attribution items over the two-object test scenes."""
    box = {"bbox_x": 0, "bbox_y": 0, "bbox_w": size, "bbox_h": size}
    relation, attribution = [], []
    for scene, file in zip(scenes, files):
        if scene.secondary is None:
            continue
        swapped = replace(scene, main=scene.secondary, secondary=scene.main)
        if len(relation) < items:
            relation.append(
                {
                    "image_path": file,
                    **box,
                    "relation_name": scene.relation,
                    "true_caption": scene.caption(),
                    "false_caption": swapped.caption(),
                }
            )
        main, sec = scene.main, scene.secondary
        if main.colour != sec.colour and len(attribution) < items:
            other = replace(scene, main=replace(main, colour=sec.colour), secondary=replace(sec, colour=main.colour))
            attribution.append(
                {
                    "image_path": file,
                    **box,
                    "attributes": [main.colour, sec.colour],
                    "true_caption": scene.caption(),
                    "false_caption": other.caption(),
                }
            )
    return relation, attribution


def winoground_pairs(scenes: list[Scene], items: int) -> list[tuple[str, Scene, Scene]]:
    """``(kind, scene, its twin)``: two-object scenes and the scene whose caption holds the same words in
    another order, the kinds taken in turn (a kind that does not apply to a scene is passed over)."""
    out = []
    turn = 0
    for scene in scenes:
        if scene.secondary is None or len(out) >= items:
            continue
        for step in range(len(WINOGROUND_KINDS)):
            kind = WINOGROUND_KINDS[(turn + step) % len(WINOGROUND_KINDS)]
            twin = scene_negatives(scene, random.Random(0)).get(kind)
            if twin is not None:
                out.append((kind, scene, twin))
                turn += step + 1
                break
    return out


def write_compositional_sets(
    out: Path,
    scenes: list[Scene],
    files: list[str],
    items: int,
    size: int,
    seed: int,
    render_seed,
    object_scale: float = 1.0,
) -> dict[str, int]:
    """Write the three sets under ``out`` for the test ``scenes`` (rendered as ``files``, relative to the
    test image folder); ``render_seed(i)`` is the seed test image ``i`` was drawn with. Returns the counts."""
    cats = sugarcrepe_items(scenes, files, items, seed)
    for category, entries in cats.items():
        write_json(out / SUGARCREPE_DIR / f"{category}.json", entries)
    relation, attribution = aro_items(scenes, files, items, size)
    write_json(out / ARO_DIR / ARO_RELATION, relation)
    write_json(out / ARO_DIR / ARO_ATTRIBUTION, attribution)
    lines = []
    index = {id(s): i for i, s in enumerate(scenes)}
    for n, (kind, scene, twin) in enumerate(winoground_pairs(scenes, items)):
        names = [f"ex_{n}_img_0", f"ex_{n}_img_1"]
        for name, sc in zip(names, (scene, twin)):  # the same seed: the same placement and texture
            target = out / WINOGROUND_DIR / "images" / f"{name}.png"
            with atomic_path(target, suffix=".png") as tmp:
                render(sc, size, render_seed(index[id(scene)]), object_scale=object_scale).save(tmp, format="PNG")
        lines.append(
            json.dumps(
                {
                    "id": n,
                    "caption_0": scene.caption(),
                    "caption_1": twin.caption(),
                    "tag": kind,
                    "image_0": names[0],
                    "image_1": names[1],
                    "collapsed_tag": WINOGROUND_TAGS[kind],
                }
            )
        )
    write_text(out / WINOGROUND_DIR / WINOGROUND_FILE, "\n".join(lines) + "\n")
    return {
        **{f"sugarcrepe_{c}": len(e) for c, e in cats.items()},
        "aro_relation": len(relation),
        "aro_attribution": len(attribution),
        "winoground": len(lines),
    }
