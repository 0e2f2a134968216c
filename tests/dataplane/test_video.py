"""Video end to end: the encoder decodes and samples the frames, runs the tower and sends the embeddings to pd over
NIXL (e-pd, e-p-d); agg's pd loads the video itself. Every topology answers as vLLM's own server with the same
weights, engine arguments and frame count; a bad video is a 4xx and the workers go on serving."""

from __future__ import annotations

import httpx
import pytest

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.media.samples import audio_only, clip
from mmgraph_workers.ports import free_port
from mmgraph_workers.up import LocalGraph

from .conftest import (
    IMG_A,
    answer_of,
    counts,
    data_url,
    graph_spec,
    image,
    media_request,
    metric,
    start_frontend,
    video,
)

TOPOLOGIES = ["agg", "e-pd", "e-p-d"]
VIDEO_A = data_url(clip(seconds=2, size=(96, 64)), "video/mp4")
VIDEO_B = data_url(clip(seconds=1.5, size=(64, 96), codec="libvpx-vp9", container="webm"), "video/webm")


CASES = {
    "one-video": [video(VIDEO_A)],
    "two-videos": [video(VIDEO_A), video(VIDEO_B)],
    "image-and-video": [image(IMG_A), video(VIDEO_B)],
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", CASES)
def test_video_answers_as_vllms_server_does(endpoints, vllm_server, case, stream):
    theirs = counts(answer_of(vllm_server, media_request(*CASES[case], stream=stream)))
    frames_tokens = theirs["usage"]["prompt_tokens"]
    assert frames_tokens > counts(answer_of(vllm_server, media_request(stream=stream)))["usage"]["prompt_tokens"] + 4
    for topology in TOPOLOGIES:
        assert counts(answer_of(endpoints[topology], media_request(*CASES[case], stream=stream))) == theirs, topology


def test_the_encoder_decodes_only_what_the_frames_need(graph, endpoints):
    """A clip of 150 frames with a keyframe every 30: the encoder seeks to each wanted frame's keyframe, and
    says in its metrics how many frames it decoded (fewer than the clip has)."""
    encoder = f"http://127.0.0.1:{graph.stages[StageName.ENCODER].port}"
    body = media_request(video(data_url(clip(seconds=5, size=(80, 48), keyframe_interval=30), "video/mp4")))
    before = metric(encoder, "mmgraph_encoder_video_frames_decoded_total")
    answer_of(endpoints["e-p-d"], body)
    decoded = metric(encoder, "mmgraph_encoder_video_frames_decoded_total") - before
    assert 8 <= decoded < 120, decoded


BAD = {
    "corrupt": (data_url(b"\x00\x01" * 4000, "video/mp4"), 400, "cannot decode the video"),
    "truncated": (data_url(clip(seconds=1)[:3000], "video/mp4"), 400, "cannot decode the video"),
    "zero-length": ("data:video/mp4;base64,", 400, ""),
    "audio-only": (data_url(audio_only(), "video/mp4"), 400, "no video stream"),
    "too-large-frames": (data_url(clip(seconds=0.3, size=(640, 480)), "video/mp4"), 413, "spec.media.maxPixels"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_video_is_a_4xx_and_the_workers_go_on(endpoints, strict_video, case):
    url, status, message = BAD[case]
    for topology, endpoint in {**endpoints, "strict": strict_video}.items():
        if case == "too-large-frames" and topology != "strict":
            continue
        r = httpx.post(f"{endpoint}/v1/chat/completions", json=media_request(video(url)), timeout=120)
        assert 400 <= r.status_code < 500, (topology, r.text)
        if topology == "strict" or case != "too-large-frames":
            assert r.status_code == status and message in r.json()["error"]["message"], (topology, r.text)
    assert answer_of(endpoints["e-p-d"], media_request(video(VIDEO_A)))["finish"] == "length"


@pytest.fixture(scope="module")
def strict_video(graph, tiny_model, tmp_path_factory):
    """An e-pd frontend with its own encoder whose caps are small (0.1 Mpx frames), routed to the session's pd."""
    logs = tmp_path_factory.mktemp("strict-video")
    local = LocalGraph(parse(graph_spec(tiny_model, "e-pd", maxPixels=100_000)), logdir=logs)
    encoder_port = free_port()
    local.spawn(StageName.ENCODER, encoder_port, {})
    peers = {
        StageName.ENCODER: f"http://127.0.0.1:{encoder_port}",
        StageName.PD: f"http://127.0.0.1:{graph.stages[StageName.PD].port}",
    }
    port = free_port()
    local.spawn(StageName.FRONTEND, port, peers)
    try:
        local.wait_healthy(timeout=120, progress=lambda line: None)
        yield f"http://127.0.0.1:{port}"
    finally:
        local.stop()


def test_a_graph_without_video_refuses_a_video_by_name(strict_image_only):
    r = httpx.post(f"{strict_image_only}/v1/chat/completions", json=media_request(video(VIDEO_A)), timeout=60)
    assert r.status_code == 400 and "does not accept video parts" in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def strict_image_only(graph, tiny_model, tmp_path_factory):
    extra = start_frontend(graph, tiny_model, "e-p-d", tmp_path_factory.mktemp("image-only"), modalities=["image"])
    try:
        extra.wait_healthy(timeout=120, progress=lambda line: None)
        yield extra.endpoint
    finally:
        extra.stop()
