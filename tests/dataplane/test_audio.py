"""Audio through the same stages: a tiny Qwen2-Audio (Whisper-style encoder + projector + Qwen2 language model).
In e-pd and e-p-d the encoder loads each clip, runs the audio tower and projector and pd pulls the embeddings over
NIXL; in agg pd loads the clip itself. Every topology returns exactly the single engine's tokens, and vLLM's own
server's text and usage for 16 kHz audio; bad audio is a 4xx with the workers still serving.

Its graph (encoder, pd, decode and three frontends) and vLLM's server live for this module only."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from mmgraph_contract.graph import parse
from mmgraph_contract.vocabulary import StageName
from mmgraph_workers.media.samples import tone
from mmgraph_workers.ports import free_port
from mmgraph_workers.up import LocalGraph

from .conftest import (
    AUDIO_EXAMPLE,
    FamilyGraph,
    ask,
    assert_same_as_vllm_server,
    chat,
    data_url,
    family_graph,
    graph_spec,
    input_audio,
    metric,
    png,
    start_frontend,
    tokens,
)

NAME = "tiny-qwen2-audio"
TOPOLOGIES = ["agg", "e-pd", "e-p-d"]
CAPS = {"maxBytes": 2_000_000, "maxSeconds": 40}  # a 40 s 16 kHz WAV is 1.3 MB: bytes and seconds are each testable


CLIP = tone(seconds=2.0)
AUDIO_CASES = {
    "one-clip": ask(input_audio(CLIP)),
    "two-clips": ask(input_audio(tone(seconds=1.0)), input_audio(tone(seconds=3.0, format="FLAC"), "flac")),
    "mp3": ask(input_audio(tone(seconds=2.0, format="MP3"), "mp3"), text="describe the sound please"),
    "stereo": ask(input_audio(tone(seconds=2.0, channels=2))),
    "audio-url": ask({"type": "audio_url", "audio_url": {"url": data_url(tone(seconds=5.0), "audio/wav")}}),
    "text-only": {"messages": [{"role": "user", "content": "hello world, what color is the sky"}], "max_tokens": 12},
}
# audio at another rate: resampled to 16 kHz by mmgraph's loader (librosa, soxr); vLLM's server on CPU resamples
# with torchaudio, which its CPU build lacks, so this case is compared with the engine only (docs/architecture.md)
AUDIO_CASES["8khz"] = ask(input_audio(tone(seconds=2.0, rate=8000)))
SAME_AS_SERVER = [c for c in AUDIO_CASES if c != "8khz"]


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyGraph]:
    with family_graph(tmp_path_factory, "qwen2-audio", AUDIO_EXAMPLE, NAME, AUDIO_CASES, **CAPS) as served:
        yield served


def test_the_audio_oracle_tells_clips_apart(audio):
    assert len({tuple(audio.reference[c]) for c in AUDIO_CASES}) == len(AUDIO_CASES)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_topology_returns_the_single_engine_tokens(audio, topology):
    for case in AUDIO_CASES:
        got = tokens(audio.endpoints[topology], case, model=NAME, cases=AUDIO_CASES)
        assert got == audio.reference[case], case


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_vllm_server_gives_the_same_text_and_usage(audio, topology):
    for case in SAME_AS_SERVER:
        assert_same_as_vllm_server(audio.endpoints[topology], audio.vllm_server, case, model=NAME, cases=AUDIO_CASES)


def test_embeddings_travel_from_the_encoder(audio, tmp_path_factory):
    """Control: an encoder whose audio tower has other weights changes the tokens; pd and decode are unchanged."""
    from mmgraph_workers.tiny_model import build

    other = build(tmp_path_factory.mktemp("models") / "tiny-audio-other", family="qwen2-audio", vision_seed=7)
    logs = tmp_path_factory.mktemp("audio-control")
    side = LocalGraph(parse(graph_spec(other, "e-pd", example=AUDIO_EXAMPLE)), logdir=logs)
    side.spawn(StageName.ENCODER, free_port(), {})
    try:
        side.wait_healthy(timeout=120, progress=lambda line: None)
        port = side.stages[StageName.ENCODER].port
        frontend = start_frontend(
            audio.graph, audio.model, "e-pd", logs / "frontend", encoder_port=port, example=AUDIO_EXAMPLE
        )
        try:
            frontend.wait_healthy(timeout=120, progress=lambda line: None)
            assert tokens(frontend.endpoint, "one-clip", NAME, AUDIO_CASES) != audio.reference["one-clip"]
            assert tokens(frontend.endpoint, "text-only", NAME, AUDIO_CASES) == audio.reference["text-only"]
        finally:
            frontend.stop()
    finally:
        side.stop()


def _wav_header_only() -> bytes:
    return CLIP[:30]


BAD = {
    "not audio": (input_audio(png(32, 32, 1)), 400, "cannot decode the audio"),
    "truncated": (input_audio(_wav_header_only()), 400, "cannot decode the audio"),
    "zero-length": (input_audio(b""), 400, "empty"),
    "no samples": (input_audio(tone(seconds=0.0)), 400, "no samples"),
    "too short for the model": (input_audio(tone(seconds=0.005)), 400, "too short"),
    "unknown format": ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}, 400, "'aac' is not"),
    "an AIFF": (input_audio(tone(seconds=1.0, format="AIFF")), 400, "not a flac, mp3, ogg, wav file"),
    "over the model's 30 s": (input_audio(tone(seconds=31.0)), 400, "at most 30 s"),
    "over maxSeconds": (input_audio(tone(seconds=45.0, format="FLAC"), "flac"), 413, "spec.media.maxSeconds"),
    "over maxBytes": (input_audio(tone(seconds=70.0)), 413, "byte limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_audio_is_a_4xx_and_the_graph_still_serves(audio, case):
    part, status, words = BAD[case]
    response = chat(audio.endpoints["e-p-d"], **ask(part), model=NAME)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert tokens(audio.endpoints["e-p-d"], "one-clip", NAME, AUDIO_CASES) == audio.reference["one-clip"]


def test_audio_in_agg_is_refused_as_in_e_p_d(audio):
    """pd loads agg's audio with the same loader and limits as the encoder."""
    response = chat(audio.endpoints["agg"], **ask(input_audio(tone(seconds=31.0))), model=NAME)
    assert response.status_code == 400 and "at most 30 s" in response.json()["error"]["message"], response.text


SECONDS = "mmgraph_encoder_audio_seconds_decoded_total"


def test_the_encoder_counts_what_it_encoded(audio):
    encoder = f"http://127.0.0.1:{audio.graph.stages[StageName.ENCODER].port}"
    before = {name: metric(encoder, name) for name in ("mmgraph_encoder_items_total", SECONDS)}
    fresh = ask(input_audio(tone(seconds=1.5, channels=3)), text="count me")
    assert chat(audio.endpoints["e-p-d"], model=NAME, **fresh).status_code == 200
    assert metric(encoder, "mmgraph_encoder_items_total") == before["mmgraph_encoder_items_total"] + 1
    assert metric(encoder, SECONDS) == pytest.approx(before[SECONDS] + 1.5)


def test_an_audio_part_is_refused_where_the_graph_or_model_takes_none(endpoints, graph, tiny_model, tmp_path_factory):
    """The Qwen2-VL graph does not enable audio (400 naming spec.media.modalities); a Qwen2-VL graph that lists
    audio is refused by the model's family (400 naming it), before any stage fetches anything."""
    body = {**ask(input_audio(CLIP)), "model": "tiny-qwen2-vl"}
    response = httpx.post(f"{endpoints['e-p-d']}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "does not accept audio parts" in response.json()["error"]["message"]
    logs = tmp_path_factory.mktemp("audio-on-qwen2-vl")
    frontend = start_frontend(graph, tiny_model, "e-pd", logs, modalities=["image", "audio"])
    try:
        frontend.wait_healthy(timeout=120, progress=lambda line: None)
        response = httpx.post(f"{frontend.endpoint}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert "this model (qwen2-vl) takes no audio" in response.json()["error"]["message"]
    finally:
        frontend.stop()
