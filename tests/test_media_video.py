"""The video loader: the frames vLLM's own loader takes for the same frame count, pixel for pixel, from less
decoding; caps refused before decoding; bad files a 4xx that says why."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.policy import MediaPolicy
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
    ours = decode_video(data, MediaPolicy(), frames)
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
    video = decode_video(data, MediaPolicy(), 8)
    assert video.metadata["frames_indices"][-1] == 599
    assert video.decoded <= most * 600, video.decoded


def test_decoding_holds_the_sampled_frames_not_the_clip():
    """Memory: a 10 s 320x240 clip is 300 frames (69 MB as RGB); sampling 8 keeps 8 (1.8 MB) plus what one frame
    being converted needs."""
    data = clip(seconds=10, size=(320, 240), keyframe_interval=300)
    tracemalloc.start()
    try:
        decode_video(data, MediaPolicy(), 8)
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
        decode_video(data, MediaPolicy(**policy), 8)
    assert info.value.status == status


def test_only_common_containers_open():
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(MediaError, match="container 'gif' is not accepted"):
        decode_video(gif.getvalue(), MediaPolicy(), 8)


def test_decoding_is_bounded_in_time():
    with pytest.raises(MediaError, match="took too long") as info:
        decode_video(clip(seconds=1), MediaPolicy(), 8, timeout=0)
    assert info.value.status == 413
