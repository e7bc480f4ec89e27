"""Video decoders compared on the work mpe gives them: N frames sampled uniformly from one clip, as RGB arrays.
PyAV (mpe's choice, ``mpe.data.video_codec``), torchcodec and decord, each where it imports; a library that
does not import is reported with the reason. Two clips, both H.264 mp4 written with PyAV: the moving-shapes
world's (64 px, 15 frames, from memory) and an MSR-VTT-sized one (320×240, 10 s at 30 fps, from a file).
Prints a table (ms per clip, best of repeats) and writes ``metrics/video_decode.json``.

Usage: python benchmarks/video_decode.py [--frames 12] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _clips(tmp: Path) -> dict[str, Path]:
    from mpe.data.video_codec import encode_mp4
    from mpe.data.video_shapes import ClipScene, render_clip

    small = tmp / "shapes_64px_15f.mp4"
    small.write_bytes(encode_mp4(render_clip(ClipScene("red", "circle", "striped", "left_to_right"), 64, 15, 0), 8))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    frames = [Image.fromarray(np.roll(base, 4 * t, axis=1)) for t in range(300)]  # a panning, textured scene
    big = tmp / "msrvtt_like_320x240_300f.mp4"
    big.write_bytes(encode_mp4(frames, 30, crf=23))
    return {"shapes 64px 15f": small, "320x240 300f (10 s)": big}


def pyav(path: Path, n: int) -> list[np.ndarray]:
    from mpe.data.video_codec import decode_clip

    return [np.asarray(f) for f in decode_clip(path.read_bytes(), n).frames]


def torchcodec(path: Path, n: int) -> list[np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    from mpe.model.vision.temporal import uniform_frame_indices

    dec = VideoDecoder(path.read_bytes(), dimension_order="NHWC")
    batch = dec.get_frames_at(uniform_frame_indices(len(dec), n))
    return list(batch.data.numpy())


def decord(path: Path, n: int) -> list[np.ndarray]:
    import io

    import decord as dc

    from mpe.model.vision.temporal import uniform_frame_indices

    vr = dc.VideoReader(io.BytesIO(path.read_bytes()))
    return list(vr.get_batch(uniform_frame_indices(len(vr), n)).asnumpy())


def best_ms(fn, path: Path, n: int, repeats: int) -> float:
    fn(path, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(path, n)
        best = min(best, time.perf_counter() - t)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}", "frames": args.frames, "decoders": {}}
    with tempfile.TemporaryDirectory() as d:
        clips = _clips(Path(d))
        reference = {name: pyav(p, args.frames) for name, p in clips.items()}
        for name, fn in (("pyav", pyav), ("torchcodec", torchcodec), ("decord", decord)):
            try:
                row = {}
                for clip, path in clips.items():
                    frames = fn(path, args.frames)
                    diff = max(np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, reference[clip]))
                    row[clip] = {"ms": round(best_ms(fn, path, args.frames, args.repeats), 2), "mean_abs_diff": diff}
                result["decoders"][name] = row
            except Exception as err:  # noqa: BLE001 — reported, not raised: the table says which failed and why
                result["decoders"][name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    for name, row in result["decoders"].items():
        if "error" in row:
            print(f"{name:11s} not usable: {row['error']}")
        else:
            cells = "  ".join(f"{c}: {v['ms']:7.2f} ms (|Δ| vs PyAV {v['mean_abs_diff']:.2f})" for c, v in row.items())
            print(f"{name:11s} {cells}")
    out = ROOT / "metrics" / "video_decode.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
