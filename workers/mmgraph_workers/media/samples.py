"""Synthetic media made on the spot (nothing can be downloaded here): video clips encoded with PyAV, for the demo,
the tests and the benchmarks. Every frame differs (a moving band, a per-frame tint, noise), so a loader that
takes the wrong frame gives other pixels."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def clip(
    seconds: float = 3.0,
    fps: int = 30,
    size: tuple[int, int] = (160, 96),
    keyframe_interval: int = 60,
    codec: str = "libx264",
    container: str = "mp4",
    b_frames: bool = True,
    variable_rate: bool = False,
    seed: int = 0,
) -> bytes:
    """An encoded clip of `seconds` at `fps` (`variable_rate`: frame gaps alternate between 20 and 70 ms), with a
    keyframe every `keyframe_interval` frames; `seed` picks the noise, so clips of other seeds differ."""
    width, height = size
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        options = {"g": str(keyframe_interval)}
        if codec == "mpeg4" and b_frames:
            options["bf"] = "2"  # as Xvid-style AVI files have them
        if codec == "libx264":
            options |= {"bf": "2" if b_frames else "0", "keyint_min": str(keyframe_interval), "sc_threshold": "0"}
            options |= {"preset": "veryfast"}
        stream.options = options
        if variable_rate:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(int(seconds * fps)):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[..., 0] = (i * 7) % 256
            pixels[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
            pixels[(i * 3) % height :, :, 2] = 200
            pixels += rng.randint(0, 30, pixels.shape).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if variable_rate:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += 20 if i % 3 else 70
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def audio_only(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """An MP4 with one AAC stream of silence and no video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        for i in range(int(seconds * rate / 1024)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def tone(
    seconds: float = 2.0,
    rate: int = 16000,
    channels: int = 1,
    format: str = "WAV",
    subtype: str | None = None,
    seed: int | None = None,
) -> bytes:
    """A clip of `seconds` with a sweeping tone per channel and a little noise (so clips of other lengths, rates,
    channels or seeds decode to other samples), in a container libsndfile writes (WAV, FLAC, MP3, OGG)."""
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.RandomState(channels if seed is None else seed)
    waves = [0.3 * np.sin(2 * np.pi * (220 * (c + 1) + 40 * t) * t) + 0.01 * rng.randn(len(t)) for c in range(channels)]
    buf = io.BytesIO()
    soundfile.write(buf, np.stack(waves, axis=1).astype(np.float32), rate, format=format, subtype=subtype)
    return buf.getvalue()
