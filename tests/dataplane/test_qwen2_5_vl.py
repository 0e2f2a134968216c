"""Qwen2.5-VL, whose video positions are in seconds: the encoder sends `second_per_grid_ts` (the time between two
temporal patches, from the frames' sampled rate) with the video's embeddings, or vLLM would take 1 s and place
the frames wrongly. A tiny Qwen2.5-VL graph (encoder, pd, decode, three frontends) and vLLM's server, for this
module only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmgraph_workers.media.samples import clip

from .conftest import (
    IMG_A,
    QWEN_EXAMPLE,
    FamilyGraph,
    answer_of,
    counts,
    data_url,
    family_graph,
    image,
    media_request,
    video,
)

TOPOLOGIES = ["agg", "e-pd", "e-p-d"]
# The same 60 frames at 30 fps and at 15 fps: 8 sampled frames are 4 and 2 frames a second, so two temporal
# patches are 0.5 s and 1 s apart (1 s is what vLLM assumes when the embeddings come without it).
AT_30_FPS = data_url(clip(seconds=2, fps=30, size=(96, 64)), "video/mp4")
AT_15_FPS = data_url(clip(seconds=4, fps=15, size=(96, 64)), "video/mp4")


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyGraph]:
    with family_graph(tmp_path_factory, "qwen2.5-vl", QWEN_EXAMPLE, "tiny-qwen2-vl", {}) as served:
        yield served


def test_the_frame_rate_changes_the_answer(qwen25):
    """The control: the same pixels at another frame rate give other tokens in vLLM's server, so an engine that
    took the default spacing instead of the video's would be seen."""
    at_30 = counts(answer_of(qwen25.vllm_server, media_request(video(AT_30_FPS))))
    at_15 = counts(answer_of(qwen25.vllm_server, media_request(video(AT_15_FPS))))
    assert at_30["usage"] == at_15["usage"] and at_30["text"] != at_15["text"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "parts",
    [[video(AT_30_FPS)], [video(AT_15_FPS)], [image(IMG_A), video(AT_30_FPS)], [image(IMG_A)]],
    ids=["video-30fps", "video-15fps", "image-and-video", "image"],
)
def test_qwen2_5_vl_answers_as_vllms_server_does(qwen25, parts, stream):
    theirs = counts(answer_of(qwen25.vllm_server, media_request(*parts, stream=stream)))
    for topology in TOPOLOGIES:
        assert counts(answer_of(qwen25.endpoints[topology], media_request(*parts, stream=stream))) == theirs, topology
