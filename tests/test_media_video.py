"""The video loader: the frames vLLM's own loader takes for the same frame count, pixel for pixel, from less
decoding; caps refused before decoding; bad files a 4xx that says why."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.samples import audio_only, clip
from mmgraph_workers.media.video import decode_video, sample_indices

CLIPS = {
    "mp4-h264-b-frames": {},
    "mp4-h264-no-b-frames": {"b_frames": False},
    "mp4-h264-keyframe-every-10": {"keyframe_interval": 10},
    "mp4-h264-variable-frame-rate": {"variable_rate": True},
    "mkv-h264": {"container": "matroska"},  # no frame count in the header
    "webm-vp9": {"codec": "libvpx-vp9", "container": "webm"},
    "webm-vp8": {"codec": "libvpx", "container": "webm"},
    "avi-mpeg4-b-frames": {"codec": "mpeg4", "container": "avi"},  # AVI seeks by decode time
    "avi-mpeg4-no-b-frames": {"codec": "mpeg4", "container": "avi", "b_frames": False},
    "avi-mpeg4-keyframe-every-10": {"codec": "mpeg4", "container": "avi", "keyframe_interval": 10},
    "fewer-frames-than-asked": {"seconds": 0.2},
}


@pytest.mark.parametrize("frames", [8, 5])
@pytest.mark.parametrize("name", CLIPS)
def test_the_frames_are_vllms_loaders_pixel_for_pixel(name, frames):
    """vLLM's OpenCV loader with `num_frames` (what `--media-io-kwargs '{"video": {"num_frames": N,
    "video_backend": "opencv"}}'` makes its server use) is the oracle: same frame numbers, same pixels."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    data = clip(**CLIPS[name])
    theirs, metadata = VideoMediaIO(ImageMediaIO(), num_frames=frames, video_backend="opencv").load_bytes(data).media
    ours = decode_video(data, MediaSpec(), frames)
    assert ours.metadata["frames_indices"] == list(metadata["frames_indices"])
    assert ours.metadata["total_num_frames"] == metadata["total_num_frames"]
    assert ours.metadata["fps"] == pytest.approx(metadata["fps"], rel=1e-3)
    assert ours.frames.shape == theirs.shape and ours.frames.dtype == np.uint8
    assert np.array_equal(ours.frames, theirs)
    assert len(set(map(bytes, ours.frames))) == len(ours.frames), "control: every frame differs"


def test_sampling_follows_vllms_rule():
    assert sample_indices(90, 8) == [0, 12, 25, 38, 50, 63, 76, 89]
    assert sample_indices(6, 8) == [0, 1, 2, 3, 4, 5]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(1, 8) == [0]


@pytest.mark.parametrize(
    ("keyframe_interval", "most"), [(60, 0.5), (1000, 1.0)], ids=["keyframe-every-2s", "one-keyframe"]
)
def test_seeking_decodes_less_and_never_more_than_the_whole_stream(keyframe_interval, most):
    """20 s at 30 fps: with a keyframe every 2 s, seeking skips most of the stream (each wanted frame costs about
    half a keyframe interval); with one keyframe, decoding goes forward once, to the last wanted frame."""
    data = clip(seconds=20, keyframe_interval=keyframe_interval, size=(64, 48))
    video = decode_video(data, MediaSpec(), 8)
    assert video.metadata["frames_indices"][-1] == 599
    assert video.decoded <= most * 600, video.decoded


def test_decoding_holds_the_sampled_frames_not_the_clip():
    """Memory: a 10 s 320x240 clip is 300 frames (69 MB as RGB); sampling 8 keeps 8 (1.8 MB) plus what one frame
    being converted needs."""
    data = clip(seconds=10, size=(320, 240), keyframe_interval=300)
    tracemalloc.start()
    try:
        decode_video(data, MediaSpec(), 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    frame = 320 * 240 * 3
    assert peak < 20 * frame, f"peak {peak / frame:.1f} frames' worth"


@pytest.mark.parametrize(
    ("data", "policy", "status", "message"),
    [
        (b"", {}, 400, "cannot decode the video"),
        (b"\0" * 1000, {}, 400, "cannot decode the video"),
        (clip(seconds=2)[:4000], {}, 400, "cannot decode the video"),
        (audio_only(), {}, 400, "no video stream"),
        (clip(seconds=0.5, size=(640, 480)), {"max_pixels": 100_000}, 413, "spec.media.maxPixels"),
        (clip(seconds=3), {"max_seconds": 2}, 413, "spec.media.maxSeconds"),
    ],
    ids=["empty", "not-a-video", "truncated", "audio-only", "too-many-pixels", "too-long"],
)
def test_a_bad_video_is_refused_saying_why(data, policy, status, message):
    with pytest.raises(MediaError, match=message) as info:
        decode_video(data, MediaSpec(**policy), 8)
    assert info.value.status == status


def test_only_common_containers_open():
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(MediaError, match="container 'gif' is not accepted"):
        decode_video(gif.getvalue(), MediaSpec(), 8)


def test_decoding_is_bounded_in_time():
    with pytest.raises(MediaError, match="took too long") as info:
        decode_video(clip(seconds=1), MediaSpec(), 8, timeout=0)
    assert info.value.status == 413


def mjpeg_avi(*sides: int) -> bytes:
    """An MJPEG AVI of square frames of these sides, muxed as they are: its header says the first one's size."""
    from PIL import Image

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = sides[0], sides[0], "yuvj420p"
        for number, side in enumerate(sides):
            jpeg = io.BytesIO()
            Image.new("RGB", (side, side), (90, 120, 200)).save(jpeg, format="JPEG", quality=50)
            packet = av.Packet(jpeg.getvalue())
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, number, number, Fraction(1, 10)
            out.mux(packet)
    return buf.getvalue()


# Decodes the AVI at argv[1] under the default policy, after a warm-up decode of argv[2] (the libraries' own first-use
# memory is not the video's), and prints the growth of its peak RSS and the outcome. The peak is VmHWM, the
# process's own since exec: ru_maxrss keeps the parent's across exec, and pytest's is the larger.
MEASURE = r"""
import json, re, sys
from pathlib import Path
from mmgraph_workers.media import MediaError
from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media.video import decode_video

def peak():
    return int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text())[1]) << 10

data, policy = Path(sys.argv[1]).read_bytes(), MediaSpec()
decode_video(Path(sys.argv[2]).read_bytes(), policy, 8)
before = peak()
try:
    outcome = {"frames": len(decode_video(data, policy, 8).frames)}
except MediaError as err:
    outcome = {"status": err.status, "message": str(err)}
print(json.dumps({**outcome, "growth": peak() - before}))
"""


def peak_growth(tmp_path: Path, data: bytes) -> dict:
    """decode_video on `data` in a fresh process: the growth of its peak RSS in bytes (FFmpeg's allocations are
    C memory, which tracemalloc does not see) and what it answered."""
    video, warm = tmp_path / "video.avi", tmp_path / "warm.avi"
    video.write_bytes(data)
    warm.write_bytes(mjpeg_avi(64))
    args = [sys.executable, "-c", MEASURE, str(video), str(warm)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_frame_larger_than_the_header_says_is_refused_before_it_is_decoded(tmp_path):
    """The header and the first frame say 64x64, the next frame is 8000x8000 (96 MB as YUV 4:2:0, past the
    default 16.7 M pixel cap): FFmpeg's decoder refuses it (max_pixels) before allocating it, where checking the
    decoded frame's size cost those 96 MB first."""
    outcome = peak_growth(tmp_path, mjpeg_avi(64, 8000, 64))
    assert outcome.get("status") == 413 and "spec.media.maxPixels" in outcome["message"], outcome
    assert outcome["growth"] < 16 << 20, f"{outcome['growth'] >> 20} MiB to refuse the frame"
    control = peak_growth(tmp_path, mjpeg_avi(4000))  # decoded: 72 MB with its RGB
    assert control.get("frames") == 1 and control["growth"] > 48 << 20, f"control: the measurement sees {control}"


@pytest.mark.parametrize(
    "options", [{}, {"codec": "libvpx-vp9", "container": "webm"}, {"codec": "mpeg4", "container": "avi"}]
)
def test_a_video_exactly_at_the_pixel_cap_decodes(options):
    """The decoder's own cap leaves room for what decoders check besides the frame (a padded width, MPEG-4's
    scratch buffers): a frame within the graph's cap is never refused by it."""
    video = decode_video(clip(seconds=0.3, size=(66, 38), **options), MediaSpec(max_pixels=66 * 38), 8)
    assert video.frames.shape == (8, 38, 66, 3)
