"""Bytes of one media item to what a model's processor takes, by its modality: the one place the encoder (e-pd,
e-p-d) and agg's pd decode media, so both see the same pixels."""

from __future__ import annotations

import time

from PIL import Image

from mmgraph_workers.media.image import decode_image
from mmgraph_workers.media.policy import MediaPolicy
from mmgraph_workers.media.video import Video, decode_video


def load(modality: str, blob: bytes, policy: MediaPolicy, deadline: float) -> Image.Image | Video:
    """An image, or a video's `policy.video_frames` sampled frames, decoded by `deadline` (time.monotonic())."""
    if modality == "video":
        return decode_video(blob, policy, policy.video_frames, deadline - time.monotonic())
    return decode_image(blob, policy)
