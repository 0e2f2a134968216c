"""Videos: bytes to N RGB frames sampled uniformly over the clip, with PyAV, decoding as little as it can.

The frames are the ones vLLM's own loader takes for the same N (its OpenCV loader with `num_frames`: indices
`linspace(0, total - 1, N)` truncated, or every frame of a shorter clip), decoded exactly, so the tokens can
match vLLM's server. Where vLLM's rule degenerates this loader does better: the frame count comes from the
container's packets, not its header, so a stream whose header has no count (WebM, say) is still sampled over
its whole length.

How little it decodes: the packets are read once without decoding (cheap: the bytes are in memory) to number
the frames in presentation order and find the keyframes; then for each wanted frame the decoder either goes on
from where it is or, when a keyframe lies between, seeks to the last keyframe before the frame. Decoding only
ever goes forward to a wanted frame, so it is never slower than decoding the whole stream, and with a keyframe
every 2 s it decodes a fraction of a long clip.

Caps are checked from the headers and the packet index before any frame is decoded: bytes (by the fetch),
pixels per frame, duration, frames; decoding itself is bounded in time.
"""

from __future__ import annotations

import bisect
import io
import time
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from mmgraph_workers.media import MediaError
from mmgraph_workers.media.policy import MediaPolicy

# Containers and codecs mmgraph decodes (FFmpeg's demuxer and decoder names): what browsers and phones produce.
# Anything else FFmpeg could open is refused, as images are restricted to a few formats.
CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
# More packets than this per second of the duration cap is not a video anyone sends (it bounds the index).
MAX_FPS = 240


@dataclass(frozen=True)
class Video:
    """Sampled frames, (n, height, width, 3) uint8 RGB, the metadata vLLM's loader gives with them, and how many
    frames were decoded to get them (the cost, for metrics)."""

    frames: np.ndarray
    metadata: dict[str, Any]
    decoded: int


@dataclass
class _Index:
    """The stream's frames in presentation order: their timestamps, and which of them are keyframes."""

    pts: list[int] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)  # frame numbers, ascending


def sample_indices(total: int, wanted: int) -> list[int]:
    """The frame numbers vLLM's loader takes: all of a clip with no more than `wanted` frames, else `wanted`
    spread evenly from the first frame to the last (numpy's linspace, truncated)."""
    if total <= wanted:
        return list(range(total))
    return np.linspace(0, total - 1, wanted, dtype=int).tolist()


def decode_video(data: bytes, policy: MediaPolicy, frames: int, timeout: float = 30.0) -> Video:
    """`frames` frames of the video in `data` (fewer if it has fewer), or MediaError saying what to change."""
    deadline = time.monotonic() + timeout
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = _video_stream(container)
            _check_header(container, stream, policy)
            index = _index(container, stream, policy)
            wanted = sample_indices(len(index.pts), frames)
            stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of the cost
            decoded, cost = _decode(container, stream, index, wanted, deadline)
            fps = float(stream.average_rate or 0) or _fps(index, stream)
    except MediaError:
        raise
    except av.FFmpegError as err:
        reason = err.strerror or "FFmpeg refused it"
        raise MediaError(f"cannot decode the video ({reason}): send a whole MP4, WebM or AVI file") from None
    except (ValueError, OSError) as err:
        raise MediaError(f"cannot decode the video: {err}") from None
    if not decoded:
        raise MediaError("cannot decode the video: no frame of it decodes")
    total = len(index.pts)
    metadata = {
        "total_num_frames": total,
        "fps": fps,
        "duration": total / fps if fps else 0.0,
        "video_backend": "pyav",
        "frames_indices": [number for number, _ in decoded],
        "do_sample_frames": False,
    }
    return Video(np.stack([frame for _, frame in decoded]), metadata, cost)


def _video_stream(container: Any) -> Any:
    if container.format.name not in CONTAINERS:
        raise MediaError(f"video container {container.format.name!r} is not accepted: send MP4, WebM or AVI")
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context.name not in CODECS:
        raise MediaError(
            f"video codec {stream.codec_context.name!r} is not accepted: send one of {', '.join(sorted(CODECS))}"
        )
    return stream


def _check_header(container: Any, stream: Any, policy: MediaPolicy) -> None:
    """What the headers say, refused before any packet is read."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > policy.max_pixels:
        raise MediaError(
            f"video is {width}x{height} = {width * height} pixels a frame, more than the {policy.max_pixels} pixel "
            "limit (spec.media.maxPixels)",
            status=413,
        )
    if width <= 0 or height <= 0:
        raise MediaError("the video stream has no frame size")
    seconds = container.duration / av.time_base if container.duration else None
    if seconds is not None and seconds > policy.max_seconds:
        raise MediaError(_too_long(seconds, policy), status=413)


def _too_long(seconds: float, policy: MediaPolicy) -> str:
    return f"video is {seconds:.1f} s long, more than the {policy.max_seconds:g} s limit (spec.media.maxSeconds)"


def _index(container: Any, stream: Any, policy: MediaPolicy) -> _Index:
    """Every frame's timestamp and the keyframes, from the packets alone (no decoding). Packets the container
    marks to discard (before an MP4 edit list's start) are not frames a player shows, nor vLLM's loader."""
    packets: list[tuple[int, bool]] = []
    limit = int(policy.max_seconds * MAX_FPS)
    for packet in container.demux(stream):
        if packet.pts is None or packet.is_discard or packet.size == 0:
            continue
        packets.append((packet.pts, packet.is_keyframe))
        if len(packets) > limit:
            raise MediaError(f"video has more than {limit} frames (spec.media.maxSeconds at {MAX_FPS} fps)", 413)
    if not packets:
        raise MediaError("the video stream has no frames")
    packets.sort()
    index = _Index([pts for pts, _ in packets], [n for n, (_, key) in enumerate(packets) if key])
    last = packets[-1][0] - packets[0][0]
    seconds = float(last * stream.time_base) if stream.time_base else 0.0
    if seconds > policy.max_seconds:
        raise MediaError(_too_long(seconds, policy), status=413)
    container.seek(0)
    return index


def _fps(index: _Index, stream: Any) -> float:
    span = (index.pts[-1] - index.pts[0]) * float(stream.time_base or 0)
    return (len(index.pts) - 1) / span if span > 0 else 0.0


def _decode(
    container: Any, stream: Any, index: _Index, wanted: list[int], deadline: float
) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The wanted frames (frame number, RGB array), decoding forward from the last keyframe before each one only
    when that skips work, and how many frames were decoded. A frame that does not decode is left out, as vLLM's
    loader leaves it out."""
    number_of = {pts: n for n, pts in enumerate(index.pts)}
    out: list[tuple[int, np.ndarray]] = []
    cost = 0
    position = -1  # the last frame the decoder gave
    frames = iter(())
    for target in wanted:
        keyframe = index.keyframes[max(bisect.bisect_right(index.keyframes, target) - 1, 0)]
        if keyframe > position or target <= position:
            container.seek(index.pts[keyframe], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            position = keyframe - 1
        for frame in frames:
            cost += 1
            if time.monotonic() > deadline:
                raise MediaError("decoding the video took too long: send a shorter or smaller one", status=413)
            number = number_of.get(frame.pts, -1)
            if number < 0:
                continue  # a frame before the seek point's keyframe, or one the index does not know
            position = number
            if number == target:
                out.append((number, frame.to_ndarray(format="rgb24")))
            if number >= target:
                break
    return out, cost
