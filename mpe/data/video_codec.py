"""Video files in and out with PyAV (FFmpeg's libraries, shipped inside its wheels): frames to an mp4, and an
mp4 (bytes or a file) to ``n`` frames sampled uniformly over the clip (``uniform_frame_indices``, the
model's rule). A zero-length file, a file that does not decode and a clip shorter than ``n`` frames are told
apart, so a loader can count and name them instead of failing a whole run.

Why PyAV (docs/BENCHMARKS.md, "Video decoding", ``benchmarks/video_decode.py``): its wheels carry FFmpeg, so
``pip`` alone installs it beside torch 2.13 CPU; torchcodec's wheels need a system FFmpeg of a matching
major version, and decord's last release (0.6.0, 2021) is unmaintained. On the clips mpe reads it was the
fastest of those that installed, measured on this project's machine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mpe.data.tar_stream import VIDEO_EXTS  # noqa: F401  (re-exported: the containers mpe reads)
from mpe.errors import DataError
from mpe.model.vision.temporal import uniform_frame_indices

MAX_FRAME_PIXELS = 4096 * 4096  # larger frames are refused from their header, before any is decoded
MAX_DECODED_FRAMES = 100_000  # about an hour at 30 fps: a clip longer than that is not a clip


class BadVideo(DataError):
    """A video that cannot be used; ``reason`` is the counter it goes to (``empty_video``, ``bad_video``,
    ``video_too_large``, ``video_too_long``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Clip:
    """The frames sampled from one video: ``frames[i]`` is frame number ``indices[i]`` of ``total``."""

    frames: list[Image.Image]
    indices: list[int]
    total: int
    truncated: bool = False  # the stream ended (or broke) before the frame count its header gave

    @property
    def short(self) -> bool:
        """Fewer frames than asked for: some were used twice (``uniform_frame_indices`` repeats them)."""
        return self.total < len(self.indices)


def _open(source: bytes | Path):
    import av

    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")


def _errors():
    import av

    return (av.FFmpegError, OSError, ValueError, EOFError, IndexError)


def _frame_count(container, source: bytes | Path) -> int:
    """The clip's frame count: its header's, else its video packets counted without decoding."""
    stream = container.streams.video[0]
    if stream.frames > 0:
        return int(stream.frames)
    with _open(source) as again:  # counting reads the packets: a second handle leaves this one at the start
        return sum(1 for packet in again.demux(again.streams.video[0]) if packet.size)


def _decode_at(container, indices: list[int]) -> tuple[dict[int, Image.Image], int, bool]:
    """The frames at ``indices`` (RGB), the number of frames decoded, and whether the stream broke."""
    wanted, last = set(indices), max(indices)
    found: dict[int, Image.Image] = {}
    decoded, broke = 0, False
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            decoded = i + 1
            if i in wanted:
                found[i] = frame.to_image()
            if i >= last or decoded >= MAX_DECODED_FRAMES:
                break
    except _errors():
        broke = True  # a damaged tail: what decoded before it is kept
    return found, decoded, broke


def decode_clip(source: bytes | str | Path, n: int, where: str = "", max_frames: int = MAX_DECODED_FRAMES) -> Clip:
    """``n`` RGB frames spread uniformly over the video ``source`` (its bytes, or a file); a
    :class:`BadVideo` naming ``where`` (default: the file) when it cannot be used, or when it holds more than
    ``max_frames`` frames (counted from its packets, before any is decoded)."""
    if not isinstance(source, bytes):
        source = Path(source)
    where = where or str(source if isinstance(source, Path) else "video")
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    if size == 0:
        raise BadVideo("empty_video", f"{where}: zero-length video file")
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise BadVideo("bad_video", f"{where}: no video stream ({size} bytes)")
            ctx = container.streams.video[0].codec_context
            if ctx.width * ctx.height > MAX_FRAME_PIXELS:
                raise BadVideo(
                    "video_too_large",
                    f"{where}: frames of {ctx.width}×{ctx.height} pixels, over the limit of 4096×4096",
                )
            total = _frame_count(container, source)
            if total == 0:
                raise BadVideo("bad_video", f"{where}: the video stream holds no frame ({size} bytes)")
            if total > max_frames:
                raise BadVideo("video_too_long", f"{where}: {total} frames, over the limit of {max_frames}")
            indices = uniform_frame_indices(total, n)
            found, decoded, broke = _decode_at(container, indices)
        truncated = broke or decoded <= max(indices) and decoded < total
        if truncated and decoded:  # fewer frames than the header said: sample again over those that decode
            total = decoded
            indices = uniform_frame_indices(total, n)
            with _open(source) as container:
                found, decoded, _ = _decode_at(container, indices)
    except BadVideo:
        raise
    except _errors() as err:
        raise BadVideo("bad_video", f"{where}: does not decode ({size} bytes): {err}") from None
    if not found or any(i not in found for i in indices):
        raise BadVideo("bad_video", f"{where}: no frame decodes ({size} bytes)")
    return Clip([found[i] for i in indices], indices, total, truncated)


def encode_mp4(frames: list[Image.Image], fps: int, crf: int = 12, lossless: bool = False) -> bytes:
    """The frames (RGB, even sides, all one size) as an H.264 mp4 — yuv420p at ``crf`` quality, or with
    ``lossless`` RGB that decodes to the very pixels — written bit-exactly and single-threaded, so that the
    same frames give the same bytes on any machine."""
    import av

    buf = io.BytesIO()
    width, height = frames[0].size
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": "0" if lossless else str(crf), "threads": "1", "preset": "medium"}
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
