"""Losses against open_clip 3.3.0 (the installed file), single process and 2 real gloo ranks."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mpe.model.losses import Dist, HardNegatives, clip_loss, diversity_loss, negation_loss, siglip_loss
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


# -- hard negatives (NegCLIP): more text columns for every image, captions of the batch left out ------------
def _brute_hard_negative_losses(img, txt, neg, neg_ids, cap_ids, scale, bias, rows):
    """The reference, one python loop per image row over the global tensors: CLIP's image→text softmax over every
    caption and every kept negative, its text→image side as before; SigLIP's sum over every pair plus one
    negative pair per kept negative. ``rows``: the local images (a rank's slice)."""
    keep = [bool(n not in set(cap_ids.tolist())) for n in neg_ids.tolist()]
    clip_rows, clip_cols, sig = [], [], 0.0
    for i in rows:
        logits = [scale * img[i] @ txt[j] for j in range(len(txt))]
        logits += [scale * img[i] @ neg[m] for m in range(len(neg)) if keep[m]]
        logits = torch.stack(logits)
        clip_rows.append(-(logits[i] - torch.logsumexp(logits, 0)))
        col = torch.stack([scale * txt[i] @ img[j] for j in range(len(img))])
        clip_cols.append(-(col[i] - torch.logsumexp(col, 0)))
        for j in range(len(txt)):
            z = scale * img[i] @ txt[j] + bias
            sig = sig - F.logsigmoid(z if i == j else -z)
        for m in range(len(neg)):
            if keep[m]:
                sig = sig - F.logsigmoid(-(scale * img[i] @ neg[m] + bias))
    clip = (torch.stack(clip_rows).mean() + torch.stack(clip_cols).mean()) / 2
    return clip, sig / len(rows)


def _hard_batch(n, m, d, seed):
    """Images, captions, 2 negatives per caption; negative 1 of caption 2 is the text of caption 0, and negative
    0 of the last caption is its own caption (padding): both must be left out."""
    img, txt, neg = feats(n, d, seed), feats(n, d, seed + 1), feats(n * m, d, seed + 2)
    cap_ids = torch.arange(100, 100 + n)
    neg_ids = torch.arange(1000, 1000 + n * m)
    neg_ids[2 * m + 1] = cap_ids[0]
    neg_ids[(n - 1) * m] = cap_ids[n - 1]
    return img, txt, neg, neg_ids, cap_ids


def test_hard_negatives_match_a_brute_force_negclip_loss_in_one_process():
    img, txt, neg, neg_ids, cap_ids = _hard_batch(6, 2, 16, 0)
    scale, bias = torch.tensor(12.0), torch.tensor(-4.0)
    hn = HardNegatives(neg, neg_ids, cap_ids)
    ref_clip, ref_sig = _brute_hard_negative_losses(img, txt, neg, neg_ids, cap_ids, scale, bias, range(6))
    assert torch.allclose(clip_loss(img, txt, scale, negatives=hn), ref_clip, atol=1e-5)
    assert torch.allclose(siglip_loss(img, txt, scale, bias, negatives=hn), ref_sig, atol=1e-4)
    # more negatives only make the loss larger; a negative equal to the image's own caption is left out, not
    # counted as a wrong answer
    assert clip_loss(img, txt, scale, negatives=hn) > clip_loss(img, txt, scale)
    same = HardNegatives(txt.repeat_interleave(2, 0), cap_ids.repeat_interleave(2), cap_ids)
    assert torch.allclose(clip_loss(img, txt, scale, negatives=same), clip_loss(img, txt, scale), atol=1e-6)


def _hard_rank_main(rank, world, init_file, out_dir):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n, m, d = 3, 2, 16
        img, txt, neg, neg_ids, cap_ids = _hard_batch(n * world, m, d, 0)
        sl, nsl = slice(rank * n, (rank + 1) * n), slice(rank * n * m, (rank + 1) * n * m)
        scale, bias = torch.tensor(12.0), torch.tensor(-4.0)
        res = {}
        for name in ("clip", "siglip"):
            i, t, g = (x[s].clone().requires_grad_(True) for x, s in ((img, sl), (txt, sl), (neg, nsl)))
            hn = HardNegatives(g, neg_ids[nsl], cap_ids[sl])
            dist = Dist(rank, world)
            loss = clip_loss(i, t, scale, dist, hn) if name == "clip" else siglip_loss(i, t, scale, bias, dist, hn)
            loss.backward()
            res[f"{name}_loss"] = loss.detach().numpy()
            for tag, x in (("img", i), ("txt", t), ("neg", g)):
                res[f"{name}_g{tag}"] = x.grad.numpy()
        np.savez(f"{out_dir}/hard{rank}.npz", **res)
    finally:
        torch_dist.destroy_process_group()


def test_hard_negatives_across_two_ranks_match_the_brute_force_loss_and_its_gradients(tmp_path):
    """Each rank's local loss is the reference over its own images against the global batch's captions and
    negatives (a negative of rank 1 that is a caption of rank 0 is left out too); its gradients are those of
    the sum of every rank's local loss (the gather passes gradient back to where a feature came from)."""
    world, n, m = 2, 3, 2
    mp.spawn(_hard_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [np.load(tmp_path / f"hard{r}.npz") for r in range(world)]
    img, txt, neg, neg_ids, cap_ids = _hard_batch(n * world, m, 16, 0)
    scale, bias = torch.tensor(12.0), torch.tensor(-4.0)
    for k, name in enumerate(("clip", "siglip")):
        x = [t.clone().requires_grad_(True) for t in (img, txt, neg)]
        local = [
            _brute_hard_negative_losses(*x, neg_ids, cap_ids, scale, bias, range(r * n, (r + 1) * n))[k]
            for r in range(world)
        ]
        sum(local).backward()
        for r in range(world):
            np.testing.assert_allclose(ranks[r][f"{name}_loss"], local[r].item(), rtol=1e-5, atol=1e-5)
            for tag, g, rows in (("img", x[0], n), ("txt", x[1], n), ("neg", x[2], n * m)):
                np.testing.assert_allclose(
                    ranks[r][f"{name}_g{tag}"], g.grad[r * rows : (r + 1) * rows].numpy(), rtol=1e-4, atol=1e-5
                )
