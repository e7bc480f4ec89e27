"""What the zero-shot video evaluation adds to the default ``make run``, stage by stage, with the default params:
the data stage renders and encodes the moving-shapes test clips (``shards/video_test``), the cache stage runs
the frozen trunk over their captions, and the evaluate stage decodes the clips and embeds them (every frame
through the vision tower, mean-pooled), for the trained and the untrained model (the same untrained model
twice here: the cost does not depend on training; their captions come from the cache in the stage).
Prints seconds per stage and writes ``metrics/video_overhead.json``.

Usage: python benchmarks/video_overhead.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from mpe.cache.compute import cache_texts, load_trunk_tower
    from mpe.config import load_params
    from mpe.data.loader import split_captions
    from mpe.data.video_samples import load_video_split
    from mpe.data.video_sources import write_video_world
    from mpe.model.base_model import prepare_base_model
    from mpe.model.configuration import APT_POOLINGS
    from mpe.model.multi_prompt_clip import MultiPromptCLIP
    from mpe.runtime.precision import autocast_dtype

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    params = load_params(args.params)
    text = params.model.text
    out: dict = {"clips": 2 * params.data.video.shapes.test_pairs, "num_frames": params.model.video.num_frames}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        write_video_world(params.data, params.seed, d, {"video_test": "test"})
        out["data_render_encode_s"] = round(time.perf_counter() - t, 2)
        folder = str(d / "shards" / "video_test")
        captions = split_captions(folder)
        apt = text.num_prompts if text.pooling in APT_POOLINGS else 0
        base = prepare_base_model(params.base_model, d / "base", apt, text.apt_init_seed)
        tower = load_trunk_tower(base, text)
        autocast = autocast_dtype(params.cache.autocast, "cpu")
        t = time.perf_counter()
        cfg = params.cache
        cache_texts(tower, captions, str(d / "texts.safetensors"), cfg.dtype, cfg.batch_size, autocast)
        out["cache_captions_s"] = round(time.perf_counter() - t, 2)
        out["cache_compute_dtype"] = str(autocast)
        model = MultiPromptCLIP.from_base(base, params.model, seed=params.seed).eval()
        t = time.perf_counter()
        for _ in range(2):  # the trained model and its untrained twin: decode, every frame through the tower, pool
            split = load_video_split(folder, params.model.video.num_frames)
            with torch.no_grad():
                model.encode_video([s.frames for s in split.samples])
        out["evaluate_videos_two_models_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(out, indent=2))
    (ROOT / "metrics").mkdir(exist_ok=True)
    (ROOT / "metrics" / "video_overhead.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
