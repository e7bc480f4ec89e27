"""Losses against open_clip 3.3.0 (the installed file), single process and 2 real gloo ranks."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mpe.model.losses import Dist, clip_loss, diversity_loss, negation_loss, siglip_loss
from tests.open_clip_reference import load_open_clip_loss

OC = load_open_clip_loss()


def feats(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_open_clip():
    img, txt = feats(8, 16, 0), feats(8, 16, 1)
    scale = torch.tensor(1 / 0.07)
    ref = OC.ClipLoss()(img, txt, scale)
    assert torch.allclose(clip_loss(img, txt, scale), ref, atol=1e-6)


def test_siglip_loss_matches_open_clip():
    img, txt = feats(8, 16, 0), feats(8, 16, 1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ref = OC.SigLipLoss()(img, txt, scale, bias)
    assert torch.allclose(siglip_loss(img, txt, scale, bias), ref, atol=1e-5)


def test_diversity_loss_brute_force():
    p = torch.randn(5, 4, 8)
    expect = []
    for n in range(5):
        sims = [F.cosine_similarity(p[n, i], p[n, j], dim=0) for i in range(4) for j in range(4) if i != j]
        expect.append(torch.stack(sims).mean())
    assert torch.allclose(diversity_loss(p), torch.stack(expect).mean(), atol=1e-6)
    same = torch.randn(3, 1, 8).expand(3, 4, 8)
    assert torch.allclose(diversity_loss(same), torch.tensor(1.0), atol=1e-6)


def test_negation_loss_is_one_more_softmax_column():
    img, txt, neg = feats(6, 16, 0), feats(6, 16, 1), feats(6, 16, 2)
    s = 12.0
    got = negation_loss(img, txt, neg, s)
    rows = []
    for i in range(6):
        logits = [s * img[i] @ txt[j] for j in range(6)] + [s * img[i] @ neg[i]]
        logits = torch.stack(logits)
        rows.append(-(logits[i] - torch.logsumexp(logits, 0)))
    assert torch.allclose(got, torch.stack(rows).mean(), atol=1e-5)
    # a negated embedding equal to the positive one is the hardest negative: loss grows
    assert negation_loss(img, txt, txt, s) > got
    sig = negation_loss(img, txt, neg, s, torch.tensor(-3.0), kind="siglip")
    brute = sum(-math.log(1 / (1 + math.exp(s * (img[i] @ neg[i]).item() - 3.0))) for i in range(6)) / 6
    assert abs(sig.item() - brute) < 1e-5


def _rank_main(rank, world, init_file, out_dir):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n, d = 4, 16
        all_img, all_txt = feats(n * world, d, 0), feats(n * world, d, 1)
        sl = slice(rank * n, (rank + 1) * n)
        scale, bias = torch.tensor(1 / 0.07), torch.tensor(-10.0)
        res = {}
        for name, mine, ref in [
            (
                "clip",
                lambda i, t: clip_loss(i, t, scale, Dist(rank, world)),
                lambda i, t: OC.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
                    i, t, scale
                ),
            ),
            (
                "siglip",
                lambda i, t: siglip_loss(i, t, 10.0 * scale / scale, bias, Dist(rank, world)),
                lambda i, t: OC.SigLipLoss(rank=rank, world_size=world)(i, t, 10.0 * scale / scale, bias),
            ),
        ]:
            for tag, fn in (("mine", mine), ("ref", ref)):
                img = all_img[sl].clone().requires_grad_(True)
                txt = all_txt[sl].clone().requires_grad_(True)
                loss = fn(img, txt)
                loss.backward()
                res[f"{name}_{tag}_loss"] = loss.detach().numpy()
                res[f"{name}_{tag}_gimg"] = img.grad.numpy()
                res[f"{name}_{tag}_gtxt"] = txt.grad.numpy()
        np.savez(f"{out_dir}/rank{rank}.npz", **res)
    finally:
        torch_dist.destroy_process_group()


def test_distributed_losses_match_open_clip_on_two_ranks(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for r in ranks:
        for name in ("clip", "siglip"):
            for part in ("loss", "gimg", "gtxt"):
                np.testing.assert_allclose(r[f"{name}_mine_{part}"], r[f"{name}_ref_{part}"], atol=1e-5, rtol=1e-5)
    # local losses average to the single-process loss over the global batch
    g_img, g_txt = feats(8, 16, 0), feats(8, 16, 1)
    glob = clip_loss(g_img, g_txt, torch.tensor(1 / 0.07)).item()
    assert abs(np.mean([r["clip_mine_loss"] for r in ranks]) - glob) < 1e-5
    # with gradient through the gather, rank 0's text features get gradient from rank 1's images too
    assert np.abs(ranks[0]["clip_mine_gtxt"]).sum() > 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_aligned_orthogonal_pairs_score_lower_than_random(kind):
    img, txt = feats(4, 8, 0), feats(4, 8, 1)
    loss = clip_loss(img, txt, 10.0) if kind == "clip" else siglip_loss(img, txt, 10.0, -10.0)
    assert torch.isfinite(loss)
    ortho = torch.eye(4, 8)
    perfect = clip_loss(ortho, ortho, 100.0) if kind == "clip" else siglip_loss(ortho, ortho, 100.0, -10.0)
    assert perfect < loss
