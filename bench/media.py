"""What loading media costs: sampling 8 frames of a 60 s 720p H.264 clip, and decoding + preprocessing images.

Video, one run, three loaders on the same bytes (a clip made here with PyAV):
- mmgraph's (`media/video.py`): index the packets, seek to the last keyframe before a wanted frame when that
  skips work, convert only the wanted frames;
- decode every frame and convert each, as Dynamo's loader does (the baseline the issue names);
- vLLM's OpenCV loader with `num_frames` 8 (what vLLM's server runs): grab every frame, convert the wanted ones.
At two keyframe intervals: 2 s (web and streaming video) and x264's default of 250 frames.

Images: `decode_image` (Pillow, EXIF, RGB) and the tiny Qwen2-VL's image processor, images per second, for a
1280x720 JPEG and PNG.

Writes bench/out/media.json and media.png and prints medians and ratios.

    .venv/bin/python bench/media.py [--repeat 5] [--seconds 60]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from mmgraph_workers.media.image import decode_image
from mmgraph_workers.media.policy import MediaPolicy
from mmgraph_workers.media.samples import clip
from mmgraph_workers.media.video import decode_video
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "bench" / "out"
FRAMES = 8


def decode_every_frame(data: bytes) -> list[np.ndarray]:
    """The baseline: every frame decoded and converted, then 8 taken."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    wanted = np.linspace(0, len(frames) - 1, FRAMES, dtype=int)
    return [frames[i] for i in wanted]


def vllm_opencv(data: bytes) -> np.ndarray:
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    return VideoMediaIO(ImageMediaIO(), num_frames=FRAMES, video_backend="opencv").load_bytes(data).media[0]


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def video_rows(seconds: float, repeat: int) -> list[dict]:
    rows = []
    policy = MediaPolicy(max_seconds=max(seconds * 2, 600))
    for label, interval in [("keyframe every 2 s", 60), ("x264 default (250 frames)", 250)]:
        data = clip(seconds=seconds, size=(1280, 720), keyframe_interval=interval)
        ours = decode_video(data, policy, FRAMES)
        assert np.array_equal(ours.frames, vllm_opencv(data)), "the loaders disagree"
        row = {
            "clip": f"{seconds:g} s 1280x720 H.264, {label}",
            "megabytes": round(len(data) / 1e6, 1),
            "frames_in_clip": ours.metadata["total_num_frames"],
            "frames_decoded_by_mmgraph": ours.decoded,
            "mmgraph_s": timed(lambda d=data: decode_video(d, policy, FRAMES), repeat),
            "decode_every_frame_s": timed(lambda d=data: decode_every_frame(d), repeat),
            "vllm_opencv_s": timed(lambda d=data: vllm_opencv(d), repeat),
        }
        row["speedup_vs_decode_every_frame"] = row["decode_every_frame_s"] / row["mmgraph_s"]
        row["speedup_vs_vllm_opencv"] = row["vllm_opencv_s"] / row["mmgraph_s"]
        rows.append(row)
        print(
            f"{row['clip']}: mmgraph {row['mmgraph_s']:.2f} s ({ours.decoded} of {row['frames_in_clip']} frames "
            f"decoded) | every frame {row['decode_every_frame_s']:.2f} s -> "
            f"{row['speedup_vs_decode_every_frame']:.1f}x | vLLM OpenCV {row['vllm_opencv_s']:.2f} s -> "
            f"{row['speedup_vs_vllm_opencv']:.1f}x"
        )
    return rows


def image_rows(repeat: int) -> list[dict]:
    from mmgraph_workers.tiny_model import build
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        processor = AutoProcessor.from_pretrained(build(Path(tmp) / "tiny")).image_processor
    pixels = (np.random.RandomState(0).rand(720, 1280, 3) * 255).astype("uint8")
    rows = []
    policy = MediaPolicy()
    for kind in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=kind)
        data = buf.getvalue()
        decode = timed(lambda d=data: decode_image(d, policy), repeat * 4)
        image = decode_image(data, policy)
        preprocess = timed(lambda i=image: processor(images=[i], return_tensors="pt"), repeat * 4)
        both = 1 / (decode + preprocess)
        rows.append({"image": f"1280x720 {kind}", "decode_per_s": 1 / decode, "with_preprocess_per_s": both})
        print(f"1280x720 {kind}: decode {1 / decode:.0f}/s, decode + Qwen2-VL preprocess {both:.0f}/s")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = ["mmgraph (seek)", "vLLM OpenCV", "decode every frame"]
    keys = ["mmgraph_s", "vllm_opencv_s", "decode_every_frame_s"]
    width = 0.25
    for i, (label, key) in enumerate(zip(labels, keys, strict=True)):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks([x + width for x in range(len(rows))], [r["clip"] for r in rows], fontsize=7)
    ax.set_ylabel(f"seconds to get {FRAMES} frames (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    video = video_rows(args.seconds, args.repeat)
    images = image_rows(args.repeat)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "media.json").write_text(json.dumps({"video": video, "images": images}, indent=2))
    plot(video, OUT / "media.png")


if __name__ == "__main__":
    main()
