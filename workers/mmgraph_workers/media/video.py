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
pixels per frame, duration, frames; decoding itself is bounded in time. A frame larger than the header said is
refused by the decoder before it is allocated (FFmpeg's max_pixels), and one of another size once decoded.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError

# Containers and codecs mmgraph decodes (FFmpeg's demuxer and decoder names): what browsers and phones produce.
# Anything else FFmpeg could open is refused, as images are restricted to a few formats.
CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
# More packets than this per second of the duration cap is not a video anyone sends (it bounds the index).
MAX_FPS = 240
DECODE_SECONDS = 30.0  # for all of a request's videos
DECODE_THREADS = min(4, os.cpu_count() or 1)  # FFmpeg's default takes every core of the node
# FFmpeg's decoders refuse a frame over their max_pixels before allocating it: the graph's cap plus this much, as
# they check the width padded to their SIMD stride (64) and some their scratch buffers (MPEG-4's, ~50k for a small
# frame), and a frame within the cap must pass.
DECODER_HEADROOM = 1 << 20
log = logging.getLogger("mmgraph.media")


@dataclass(frozen=True)
class Video:
    """Sampled frames, (n, height, width, 3) uint8 RGB, the metadata vLLM's loader gives with them, and how many
    frames were decoded to get them (the cost, for metrics)."""

    frames: np.ndarray
    metadata: dict[str, Any]
    decoded: int


@dataclass
class _Index:
    """The stream's frames in presentation order (their timestamps), and its keyframes: frame numbers, ascending,
    with their decode timestamps (AVI's demuxer seeks by those; MP4's and Matroska's by presentation time)."""

    pts: list[int] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)
    dts: dict[int, int] = field(default_factory=dict)


def sample_indices(total: int, wanted: int) -> list[int]:
    """The frame numbers vLLM's loader takes: all of a clip with no more than `wanted` frames, else `wanted`
    spread evenly from the first frame to the last (numpy's linspace, truncated)."""
    if total <= wanted:
        return list(range(total))
    return np.linspace(0, total - 1, wanted, dtype=int).tolist()


def decode_video(data: bytes, policy: MediaSpec, frames: int, timeout: float = DECODE_SECONDS) -> Video:
    """`frames` frames of the video in `data` (fewer if it has fewer), or MediaError saying what to change.
    Everything, the packet index included, is done within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = _video_stream(container)
            width, height = _check_header(container, stream, policy)
            index = _index(container, stream, policy, deadline)
            wanted = sample_indices(len(index.pts), frames)
            stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of the cost
            stream.codec_context.thread_count = DECODE_THREADS
            # a frame larger than the header said is refused by the decoder, not decoded and then refused
            stream.codec_context.options = {"max_pixels": str(policy.max_pixels + DECODER_HEADROOM)}
            numbers, pixels, cost = _decode(container, stream, index, wanted, (height, width), policy, deadline)
            fps = float(stream.average_rate or 0) or _fps(index, stream)
    except MediaError:
        raise
    except av.FFmpegError as err:
        reason = err.strerror or "FFmpeg refused it"
        raise MediaError(f"cannot decode the video ({reason}): send a whole MP4, WebM or AVI file") from None
    except (ValueError, OSError) as err:
        raise MediaError(f"cannot decode the video: {err}") from None
    if not numbers:
        raise MediaError("cannot decode the video: no frame of it decodes")
    if len(numbers) < len(wanted):
        log.warning(
            "video: %d of the %d sampled frames did not decode; using the others",
            len(wanted) - len(numbers),
            len(wanted),
        )
    total = len(index.pts)
    metadata = {
        "total_num_frames": total,
        "fps": fps,
        "duration": total / fps if fps else 0.0,
        "video_backend": "pyav",
        "frames_indices": numbers,
        "do_sample_frames": False,
    }
    return Video(pixels, metadata, cost)


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


def _check_header(container: Any, stream: Any, policy: MediaSpec) -> tuple[int, int]:
    """What the headers say, refused before any packet is read; the frame size (every decoded frame is checked
    against it again: a stream can change size midway)."""
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_pixels(width, height, policy)
    if width <= 0 or height <= 0:
        raise MediaError("the video stream has no frame size")
    seconds = container.duration / av.time_base if container.duration else None
    if seconds is not None and seconds > policy.max_seconds:
        raise MediaError(_too_long(seconds, policy), status=413)
    return width, height


def _check_pixels(width: int, height: int, policy: MediaSpec) -> None:
    if width * height > policy.max_pixels:
        raise MediaError(f"video is {width}x{height} = {width * height} pixels a frame, {_over(policy)}", status=413)


def _over(policy: MediaSpec) -> str:
    return f"more than the {policy.max_pixels} pixel limit (spec.media.maxPixels)"


def _too_long(seconds: float, policy: MediaSpec) -> str:
    return f"video is {seconds:.1f} s long, more than the {policy.max_seconds:g} s limit (spec.media.maxSeconds)"


def _index(container: Any, stream: Any, policy: MediaSpec, deadline: float) -> _Index:
    """Every frame's timestamp and the keyframes, from the packets alone (no decoding). Packets the container
    marks to discard (before an MP4 edit list's start) are not frames a player shows, nor vLLM's loader."""
    packets: list[tuple[int, bool, int | None]] = []
    limit = int(policy.max_seconds * MAX_FPS)
    for count, packet in enumerate(container.demux(stream)):
        if count > limit:  # every packet counts, shown or not
            raise MediaError(f"video has more than {limit} frames (spec.media.maxSeconds at {MAX_FPS} fps)", 413)
        _in_time(deadline)
        if packet.pts is None or packet.is_discard or packet.size == 0:
            continue
        packets.append((packet.pts, packet.is_keyframe, packet.dts))
    if not packets:
        raise MediaError("the video stream has no frames")
    packets.sort(key=lambda p: p[0])
    index = _Index(pts=[pts for pts, _, _ in packets])
    for number, (pts, key, dts) in enumerate(packets):
        if key:
            index.keyframes.append(number)
            index.dts[number] = pts if dts is None else dts
    if not index.keyframes or index.keyframes[0] != 0:
        index.keyframes.insert(0, 0)  # before the first keyframe: from the stream's start
    seconds = float((packets[-1][0] - packets[0][0]) * stream.time_base) if stream.time_base else 0.0
    if seconds > policy.max_seconds:
        raise MediaError(_too_long(seconds, policy), status=413)
    container.seek(0)
    return index


def _in_time(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise MediaError("decoding the video took too long: send a shorter or smaller one", status=413)


def _fps(index: _Index, stream: Any) -> float:
    span = (index.pts[-1] - index.pts[0]) * float(stream.time_base or 0)
    return (len(index.pts) - 1) / span if span > 0 else 0.0


def _decode(
    container: Any,
    stream: Any,
    index: _Index,
    wanted: list[int],
    size: tuple[int, int],
    policy: MediaSpec,
    deadline: float,
) -> tuple[list[int], np.ndarray, int]:
    """The wanted frames' numbers and RGB pixels (turned as the stream's rotation says, as OpenCV's loader does),
    and how many frames were decoded. Decoding goes forward from where it is, or from the last keyframe before a
    wanted frame when one lies in between. The seek is by the keyframe's presentation time; if that lands past the
    frame (AVI's demuxer seeks by decode time), by its decode time, then from the start. A frame the decoder does
    not give is left out, as vLLM's loader leaves it out."""
    number_of = {pts: n for n, pts in enumerate(index.pts)}
    numbers: list[int] = []
    out: np.ndarray | None = None
    cost, position, ended = 0, -1, False  # position: the last frame the decoder gave
    frames: Iterator[Any] = iter(())
    for target in wanted:
        keyframe = index.keyframes[max(bisect.bisect_right(index.keyframes, target) - 1, 0)]
        fallbacks: list[int | None] = []
        if keyframe > position or target <= position:
            seek_points = (
                [index.pts[keyframe], index.dts.get(keyframe, index.pts[keyframe]), None] if keyframe else [None]
            )
            fallbacks = list(dict.fromkeys(seek_points))
            frames, position, ended = _frames_from(container, stream, fallbacks.pop(0), policy, deadline), -1, False
        elif ended:
            break  # the stream ended before this frame: every later one is missing too
        while (frame := next(frames, None)) is not None:
            cost += 1
            number = number_of.get(frame.pts, -1)
            if number < 0:
                continue  # a frame before the seek point's keyframe, or one the index does not know
            if position < 0 and number > target and fallbacks:  # the seek landed past the frame
                frames = _frames_from(container, stream, fallbacks.pop(0), policy, deadline)
                continue
            position = number
            if number == target:
                pixels = _pixels(frame, size)
                if out is None:
                    out = np.empty((len(wanted), *pixels.shape), np.uint8)  # the sampled frames, once
                out[len(numbers)] = pixels
                numbers.append(number)
            if number >= target:
                break
        else:
            ended = True
    if out is None:
        return [], np.empty((0, *size, 3), np.uint8), cost
    return numbers, out[: len(numbers)], cost


def _pixels(frame: Any, size: tuple[int, int]) -> np.ndarray:
    """One frame as RGB, checked against the header's size first: a stream can change size midway, and the
    caps were checked on the header."""
    if (frame.height, frame.width) != size:
        height, width = size
        raise MediaError(f"the video changes frame size midway ({width}x{height} to {frame.width}x{frame.height})")
    pixels = frame.to_ndarray(format="rgb24")
    if frame.rotation:
        pixels = np.ascontiguousarray(np.rot90(pixels, k=frame.rotation // 90))
    return pixels


def _frames_from(
    container: Any, stream: Any, timestamp: int | None, policy: MediaSpec, deadline: float
) -> Iterator[Any]:
    """Decoded frames from the keyframe at or before `timestamp` (None: the stream's start), checking the
    deadline at every packet, including those that give no frame. EINVAL from the decoder is its max_pixels
    refusing a frame's size (H.264's decoder reports it as invalid data: the generic refusal, still before any
    allocation)."""
    if timestamp is None:
        container.seek(0)
    else:
        container.seek(timestamp, stream=stream, backward=True, any_frame=False)
    for packet in container.demux(stream):
        _in_time(deadline)
        try:
            frames = packet.decode()
        except av.ArgumentError:
            raise MediaError(f"a frame of the video is larger than its header says, {_over(policy)}", 413) from None
        yield from frames
