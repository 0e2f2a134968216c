"""Bytes of one media item to what a model's processor takes, by its modality: the one place the encoder (e-pd,
e-p-d) and agg's pd decode media, so both see the same pixels and samples."""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.audio import Audio, AudioFormat, decode_audio
from mmgraph_workers.media.image import decode_image
from mmgraph_workers.media.video import Video, decode_video


def load(
    modality: str, blob: bytes, policy: MediaSpec, deadline: float, audio: AudioFormat | None = None
) -> Image.Image | Video | Audio:
    """An image, a video's `policy.video_frames` sampled frames, or a clip at the model's rate (`audio`: None when
    the model takes no audio), decoded by `deadline` (time.monotonic())."""
    if modality == "video":
        return decode_video(blob, policy, policy.video_frames, deadline - time.monotonic())
    if modality == "audio":
        if audio is None:
            raise MediaError("this model takes no audio")
        return decode_audio(blob, policy, audio, deadline)
    return decode_image(blob, policy)


def vllm_item(media: Image.Image | Video | Audio) -> Any:
    """A loaded item as vLLM's `multi_modal_data` takes it: an image as is (PIL), a video as (frames, metadata), a
    clip as (samples, rate) at the model's rate, so vLLM resamples nothing."""
    if isinstance(media, Video):
        return media.frames, media.metadata
    if isinstance(media, Audio):
        return media.samples, media.rate
    return media
