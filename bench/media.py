"""What loading media costs: sampling 8 frames of a 60 s 720p H.264 clip, and decoding + preprocessing images.

Video, one run, three loaders on the same bytes (a clip made here with PyAV):
- mmgraph's (`media/video.py`): index the packets, seek to the last keyframe before a wanted frame when that
  skips work, convert only the wanted frames;
- decode every frame and convert each, as Dynamo's loader does (the baseline the issue names);
- vLLM's OpenCV loader with `num_frames` 8 (what vLLM's server runs): grab every frame, convert the wanted ones.
At two keyframe intervals: 2 s (web and streaming video) and x264's default of 250 frames.

Images: `decode_image` (Pillow, EXIF, RGB) and the tiny Qwen2-VL's image processor, images per second, for a
1280x720 JPEG and PNG.

Audio: a 30 s clip (the longest Qwen2-Audio takes) to 16 kHz mono float32, clips per second, for a 16 kHz mono
WAV (nothing to resample), a 44.1 kHz stereo MP3 and a 48 kHz stereo FLAC. mmgraph's loader (`media/audio.py`:
libsndfile in blocks, soxr via librosa) against `librosa.load` and the other resamplers librosa can use (soxr at
other qualities, scipy's polyphase filter) and against PyAV decoding and resampling (vLLM's PyAV loader).

Writes bench/out/media.json (the parts run, merged into what is there) and media.png and prints medians and
ratios.

    .venv/bin/python bench/media.py [--repeat 5] [--seconds 60] [--parts video images audio]
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
from PIL import Image

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media.image import decode_image
from mmgraph_workers.media.samples import clip
from mmgraph_workers.media.video import decode_video

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
    policy = MediaSpec(max_seconds=max(seconds * 2, 600))
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
    from transformers import AutoProcessor

    from mmgraph_workers.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp:
        processor = AutoProcessor.from_pretrained(build(Path(tmp) / "tiny")).image_processor
    pixels = (np.random.RandomState(0).rand(720, 1280, 3) * 255).astype("uint8")
    rows = []
    policy = MediaSpec()
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


AUDIO_SECONDS = 30.0
RATE = 16000


def audio_loaders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """Bytes to 16 kHz mono float32, each its own way."""
    import librosa
    import soundfile
    from vllm.multimodal.media.audio import load_audio_pyav

    from mmgraph_workers.media.audio import AudioFormat, decode_audio

    model = AudioFormat(RATE, AUDIO_SECONDS)

    def soundfile_then(res_type: str) -> Callable[[bytes], np.ndarray]:
        def load(data: bytes) -> np.ndarray:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return librosa.resample(samples.mean(axis=1), orig_sr=rate, target_sr=RATE, res_type=res_type)

        return load

    return {
        "mmgraph (blocks + soxr_hq)": lambda d: decode_audio(d, MediaSpec(), model, time.monotonic() + 60).samples,
        "librosa.load (soxr_hq)": lambda d: librosa.load(io.BytesIO(d), sr=RATE)[0],
        "soundfile + soxr_vhq": soundfile_then("soxr_vhq"),
        "soundfile + soxr_mq": soundfile_then("soxr_mq"),
        "soundfile + scipy polyphase": soundfile_then("polyphase"),
        "PyAV decode + resample (vLLM's PyAV loader)": lambda d: load_audio_pyav(io.BytesIO(d), sr=RATE)[0],
    }


def audio_rows(repeat: int) -> list[dict]:
    from mmgraph_workers.media.samples import tone

    clips = {
        "30 s 16 kHz mono WAV": tone(seconds=AUDIO_SECONDS, rate=16000),
        "30 s 44.1 kHz stereo MP3": tone(seconds=AUDIO_SECONDS, rate=44100, channels=2, format="MP3"),
        "30 s 48 kHz stereo FLAC": tone(seconds=AUDIO_SECONDS, rate=48000, channels=2, format="FLAC"),
    }
    rows = []
    for name, data in clips.items():
        row: dict = {"clip": name, "megabytes": round(len(data) / 1e6, 2), "clips_per_s": {}}
        loaders = audio_loaders()
        times: dict[str, list[float]] = {loader: [] for loader in loaders}
        for loader, load in loaders.items():
            assert abs(len(load(data)) - AUDIO_SECONDS * RATE) <= RATE // 10, loader
        for _ in range(repeat):  # rounds alternate the loaders, so each meets the machine's noise alike
            for loader, load in loaders.items():
                started = time.perf_counter()
                load(data)
                times[loader].append(time.perf_counter() - started)
        row["clips_per_s"] = {loader: 1 / statistics.median(t) for loader, t in times.items()}
        ours, librosa_load = (
            row["clips_per_s"]["mmgraph (blocks + soxr_hq)"],
            row["clips_per_s"]["librosa.load (soxr_hq)"],
        )
        row["mmgraph_vs_librosa_load"] = ours / librosa_load
        rows.append(row)
        print(f"{name} ({row['megabytes']} MB): " + ", ".join(f"{k} {v:.1f}/s" for k, v in row["clips_per_s"].items()))
        print(f"  mmgraph / librosa.load: {row['mmgraph_vs_librosa_load']:.2f}x; {ours * AUDIO_SECONDS:.0f}x real time")
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
    parser.add_argument(
        "--parts", nargs="+", choices=["video", "images", "audio"], default=["video", "images", "audio"]
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "media.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "video" in args.parts:
        results["video"] = video_rows(args.seconds, args.repeat)
        plot(results["video"], OUT / "media.png")
    if "images" in args.parts:
        results["images"] = image_rows(args.repeat)
    if "audio" in args.parts:
        results["audio"] = audio_rows(args.repeat)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
