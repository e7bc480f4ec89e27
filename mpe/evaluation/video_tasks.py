"""Evaluating a model on a video split: text↔video retrieval (R@k, MdR, MnR both ways) and, where clips come in
motion pairs (a clip and its frames reversed, ``meta["pair"]``), the motion-only two-choice accuracies —
does a clip prefer its own caption to its reverse's (``motion_video_to_text_accuracy``), does a caption
prefer its clip to the reversed clip (``motion_text_to_video_accuracy``). Order-blind pooling scores 0.5 on
both, exactly: the two clips of a pair hold the same frames."""

from __future__ import annotations

from collections import defaultdict

import torch

from mpe.data.video_samples import VideoSample, load_video_split
from mpe.evaluation.video_metrics import two_choice_accuracy, video_retrieval_metrics

MOTION_KEYS = ("motion_video_to_text_accuracy", "motion_text_to_video_accuracy")


@torch.no_grad()
def embed_videos(model, clips: list, batch_size: int = 8) -> torch.Tensor:
    return model.encode_video(clips, batch_size)


def video_retrieval_on(samples: list[VideoSample], embed_text, video_emb: torch.Tensor, ks) -> dict:
    texts = list(dict.fromkeys(s.caption for s in samples))
    pos = torch.tensor([[s.caption == t for s in samples] for t in texts], dtype=torch.bool)
    res = video_retrieval_metrics(embed_text(texts), video_emb, pos, ks)
    res["n_texts"], res["n_videos"] = len(texts), len(samples)
    return res


def motion_pairs(samples: list[VideoSample]) -> list[tuple[int, int]]:
    """Index pairs of the clips that share a ``pair`` id (exactly two each)."""
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        if s.meta.get("pair") is not None:
            groups[s.meta["pair"]].append(i)
    return [(g[0], g[1]) for g in groups.values() if len(g) == 2]


def motion_metrics(samples: list[VideoSample], embed_text, video_emb: torch.Tensor) -> dict:
    pairs = motion_pairs(samples)
    if not pairs:
        return {}
    a, b = (torch.tensor(x) for x in zip(*pairs))
    text = embed_text([s.caption for s in samples])
    own = (text * video_emb).sum(1)  # s(caption i, clip i)
    cross = (text[a] * video_emb[b]).sum(1), (text[b] * video_emb[a]).sum(1)  # s(c_a, v_b), s(c_b, v_a)
    return {
        "motion_video_to_text_accuracy": two_choice_accuracy(torch.cat([own[a], own[b]]), torch.cat(cross[::-1])),
        "motion_text_to_video_accuracy": two_choice_accuracy(torch.cat([own[a], own[b]]), torch.cat(cross)),
        "motion_pairs": len(pairs),
    }


def evaluate_videos(model, folder: str, embed_text, ks=(1, 5, 10), batch_size: int = 8) -> dict:
    """Retrieval and motion metrics of one model on the video split in ``folder``, with what was left out."""
    split = load_video_split(folder, model.cfg.video.num_frames)
    if not split.samples:
        return {"skipped_video_samples": dict(split.skipped), "bad_videos": split.bad}
    emb = embed_videos(model, [s.frames for s in split.samples], batch_size)
    res = video_retrieval_on(split.samples, embed_text, emb, ks)
    res.update(motion_metrics(split.samples, embed_text, emb))
    return {"video": res, "skipped_video_samples": dict(split.skipped), "bad_videos": split.bad}


def video_flat(result: dict) -> dict:
    """The headline video numbers of one model (R@k, MdR, MnR both ways, motion accuracies)."""
    return {k: v for k, v in result.get("video", {}).items() if not k.startswith(("n_", "motion_pairs"))}


def video_chance(result: dict, ks) -> dict:
    """What random scores would give on the same video set."""
    if "video" not in result:
        return {}
    nv, nt = result["video"]["n_videos"], result["video"]["n_texts"]
    out = {f"text_to_video_R@{k}": min(1.0, k / nv) for k in ks}
    out.update({f"video_to_text_R@{k}": min(1.0, k / nt) for k in ks})
    out.update(text_to_video_MdR=(nv + 1) / 2, text_to_video_MnR=(nv + 1) / 2)
    out.update(video_to_text_MdR=(nt + 1) / 2, video_to_text_MnR=(nt + 1) / 2)
    if "motion_pairs" in result["video"]:
        out.update(dict.fromkeys(MOTION_KEYS, 0.5))
    return out
