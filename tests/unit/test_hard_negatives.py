"""Hard-negative captions are what they claim: for a shapes caption, a caption of the world's grammar whose
scene differs in exactly one aspect, or in two attributes exchanged between the objects; for any other
caption, one word replaced by another of its class or two words of a class exchanged, articles agreeing;
never the caption itself, the same for the same caption and seed; and the loss leaves out a negative that
is a caption of the (global) batch."""

import random
import re
from dataclasses import asdict

import pytest
import torch

from mpe.data.hard_negatives import (
    OPPOSITES,
    WORD_CLASSES,
    hard_negatives,
    negative_candidates,
    text_id,
    word_negatives,
)
from mpe.data.shapes import parse_caption, plan_splits
from mpe.model.losses import Dist, HardNegatives, hard_negative_mask

SCENES = plan_splits(300, 0, 60, 0, 6, 0.6, 3).train


def facts(scene) -> dict:
    """A scene as named facts: each object's attributes, the relation (or position), the background."""
    out = {f"main.{k}": v for k, v in asdict(scene.main).items()}
    if scene.secondary is not None:
        out.update({f"secondary.{k}": v for k, v in asdict(scene.secondary).items()})
        out["relation"] = scene.relation
    else:
        out["position"] = scene.position
    out["background"] = scene.background
    return out


def is_one_change(before: dict, after: dict) -> bool:
    """One fact replaced, or two attributes of the same kind exchanged between the two objects (or the two
    objects exchanged whole)."""
    if before.keys() != after.keys():
        return False
    diff = [k for k in before if before[k] != after[k]]
    if len(diff) == 1:
        return True
    swapped = {k.split(".", 1)[1] for k in diff}
    if all(k.startswith(("main.", "secondary.")) for k in diff) and all(
        after[f"main.{a}"] == before[f"secondary.{a}"] and after[f"secondary.{a}"] == before[f"main.{a}"]
        for a in swapped
    ):
        return len(swapped) == 1 or swapped == {"colour", "shape", "size"} - {
            a for a in ("colour", "shape", "size") if before[f"main.{a}"] == before[f"secondary.{a}"]
        }
    return False


def test_every_shapes_negative_is_a_caption_of_the_world_with_exactly_one_aspect_changed():
    kinds_seen = set()
    for scene in SCENES:
        caption = scene.caption()
        candidates = negative_candidates(caption, seed=0)
        assert len(candidates) >= 5  # colour, shape, size, relation/position, background at least
        for kind, negative in candidates.items():
            other = parse_caption(negative)
            assert other is not None, f"not a caption of the world: {negative!r}"  # grammatical
            assert negative != caption
            assert is_one_change(facts(scene), facts(other)), (kind, caption, negative)
            kinds_seen.add(kind)
    assert {"swap_colour", "swap_shape", "swap_size", "swap_objects", "relation"} <= kinds_seen


def test_a_swap_exchanges_two_attributes_between_the_objects():
    caption = "a large red circle to the left of a small blue square on a striped background"
    c = negative_candidates(caption, seed=0)
    assert c["swap_colour"] == "a large blue circle to the left of a small red square on a striped background"
    assert c["swap_shape"] == "a large red square to the left of a small blue circle on a striped background"
    assert c["swap_size"] == "a small red circle to the left of a large blue square on a striped background"
    assert c["swap_objects"] == "a small blue square to the left of a large red circle on a striped background"


def test_negatives_are_distinct_of_different_kinds_and_the_same_for_the_same_caption_and_seed():
    for scene in SCENES[:50]:
        caption = scene.caption()
        negs = hard_negatives(caption, 3, seed=7)
        assert len(negs) == 3 and len(set(negs)) == 3 and caption not in negs
        assert hard_negatives(caption, 3, seed=7) == negs
        kinds = {k for k, v in negative_candidates(caption, 7).items() if v in negs}
        assert len(kinds) >= 3  # each of another kind (two kinds may make the same caption)
    drawn = {tuple(hard_negatives(s.caption(), 2, seed)) for s in SCENES[:20] for seed in (0, 1)}
    assert len(drawn) > 20  # another seed draws other negatives


WORD_OF = {w: c for c, words in WORD_CLASSES.items() for w in words} | {w: "spatial" for w in OPPOSITES}


def test_word_negatives_replace_one_word_by_another_of_its_class_or_swap_two():
    caption = "An orange cat sits left of two small brown dogs on a red sofa, a big one."
    words = re.findall(r"[A-Za-z]+", caption)
    for seed in range(20):
        for kind, negative in word_negatives(caption, random.Random(seed)).items():
            new = re.findall(r"[A-Za-z]+", negative)
            assert len(new) == len(words) and negative != caption
            # punctuation and spacing are kept
            assert re.sub(r"[A-Za-z]+", "w", negative) == re.sub(r"[A-Za-z]+", "w", caption)
            changed = [i for i, (a, b) in enumerate(zip(words, new)) if a.lower() != b.lower()]
            content = [i for i in changed if words[i].lower() not in ("a", "an")]
            if kind.startswith("replace_"):
                assert len(content) == 1
                i = content[0]
                cls = kind.removeprefix("replace_")
                assert WORD_OF[words[i].lower()] == cls and WORD_OF[new[i].lower()] == cls
                if cls == "spatial":
                    assert new[i].lower() == OPPOSITES[words[i].lower()]
            else:
                assert len(content) == 2
                i, j = content
                assert new[i].lower() == words[j].lower() and new[j].lower() == words[i].lower()
            for i in range(len(new) - 1):  # every article agrees with the word after it
                if new[i].lower() in ("a", "an") and i + 1 in changed:
                    assert new[i].lower() == ("an" if new[i + 1][0].lower() in "aeiou" else "a"), negative
            assert new[0][0].isupper()  # the capital stays


def test_a_caption_no_rule_applies_to_has_no_negatives():
    assert hard_negatives("a photo of my cat", 3) == []


def test_the_loss_leaves_out_negatives_that_are_captions_of_the_batch():
    captions = ["a", "b", "c"]
    negatives = ["x", "b", "y", "a", "c", "z"]  # "b", "a", "c" are captions of the batch: left out
    ids = lambda ts: torch.tensor([text_id(t) for t in ts])  # noqa: E731
    keep = hard_negative_mask(HardNegatives(torch.zeros(6, 4), ids(negatives), ids(captions)), Dist())
    assert keep.tolist() == [True, False, True, False, False, True]
    assert text_id("a") == text_id("a") and text_id("a") != text_id("a ")


@pytest.mark.parametrize("n", [1, 4])
def test_a_training_batch_pads_short_negative_lists_with_the_caption_itself(n):
    """The stream's rule: a caption with fewer negatives than asked repeats itself, which the mask drops."""
    caption = "a photo of two cats"  # one rule applies (number)
    negs = hard_negatives(caption, n)
    padded = negs + [caption] * (n - len(negs))
    keep = hard_negative_mask(
        HardNegatives(torch.zeros(n, 2), torch.tensor([text_id(t) for t in padded]), torch.tensor([text_id(caption)]))
    )
    assert keep.sum().item() == min(n, 1)
