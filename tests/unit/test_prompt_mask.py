"""The prompt-wise mask and sequence layout, checked against their definition cell by cell."""

import torch

from mpe.model.text.prompt_mask import allowed_pairs, prompt_attention_mask
from mpe.model.text.prompt_sequence import PromptLayout, arrange, build_batch

LAYOUT = PromptLayout(segments=((7, 8), (9, 10, 11)), readouts=((1,), (2,)), num_positive=2)


def test_layout_is_left_padded_and_positions_restart_per_segment():
    b = arrange([3, 1], LAYOUT)
    assert b.length == 3 + 5
    assert b.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [-1, -1, 0, 1, 1, 2, 2, 2]]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b.position_ids[1, 2:].tolist() == [0, 1, 2, 1, 2, 3]
    assert b.readout_cols.tolist() == [4, 7]


def test_build_batch_places_ids():
    b = build_batch([[1, 2, 3], [1]], LAYOUT, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 7, 8, 9, 10, 11], [0, 0, 1, 7, 8, 9, 10, 11]]


def test_allowed_pairs_match_definition():
    b = arrange([3, 1], LAYOUT)
    a = allowed_pairs(b.segment_ids)
    seg = b.segment_ids
    for r in range(2):
        for q in range(b.length):
            for k in range(b.length):
                sq, sk = seg[r, q].item(), seg[r, k].item()
                if sq == -1:
                    expect = q == k
                elif sk == -1:
                    expect = False
                elif sq == 0:
                    expect = sk == 0 and k <= q
                else:
                    expect = sk == 0 or (sk == sq and k <= q)
                assert a[r, q, k].item() == expect, (r, q, k)


def test_additive_mask_values_and_sliding_window():
    b = arrange([3, 1], LAYOUT)
    m = prompt_attention_mask(b.segment_ids, torch.float32)
    assert m.shape == (2, 1, 8, 8)
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    w = allowed_pairs(b.segment_ids, b.position_ids, sliding_window=2)
    # row 0, last token of segment 2 (position 5) sees positions 4 and 5 only: its own segment's cols 6,7
    assert w[0, 7].nonzero().flatten().tolist() == [6, 7]
