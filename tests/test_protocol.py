"""The messages stages exchange (mmgraph_workers.protocol): tensor descriptors checked on arrival, sampling
parameters, the previous protocol version, and how a refusal names the versions a peer speaks."""

from __future__ import annotations

import json

import httpx
import pytest


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"shape": [1 << 40, 1 << 20]}, "not the"),  # a huge shape with a small nbytes: never allocated
        ({"nbytes": 1 << 40, "shape": [1 << 38]}, "less than or equal"),  # over MAX_TENSOR_BYTES
        ({"dtype": "load"}, "dtype"),  # was getattr(torch, dtype)
        ({"shape": []}, "shape"),
        ({"shape": [-4]}, "shape"),
    ],
)
def test_a_descriptor_that_does_not_add_up_is_refused_before_anything_is_allocated(change, why):
    """A TensorRef is a peer's claim: checked on arrival like a client's, before a reader allocates for it."""
    from pydantic import ValidationError

    from mmgraph_workers.protocol import TensorRef

    good = {"handle": "h", "agent": "a", "owner": "http://e:1", "address": 0, "nbytes": 64, "dtype": "float32"}
    TensorRef.model_validate({**good, "shape": [4, 4]})
    with pytest.raises(ValidationError, match=why):
        TensorRef.model_validate({**good, "shape": [4, 4], **change})


def test_sampling_parameters_travel_intact_and_strangers_are_refused():
    """The message carries vLLM's SamplingParams; an engine stage gets exactly them back (logit_bias's int keys
    included), and a field SamplingParams does not have is an error, not silently dropped."""
    from mmgraph_workers.protocol import sampling, sampling_params

    fields = {"max_tokens": 4, "temperature": 0.5, "seed": 3, "logit_bias": {7: 2.0}, "stop": ["x"]}
    params = sampling_params(json.loads(json.dumps(sampling(**fields))))
    assert {k: getattr(params, k) for k in fields} == fields
    with pytest.raises(ValueError, match="unknown fields"):
        sampling_params({"max_tokens": 4, "remote_block_ids": [1]})


def test_a_peer_cannot_smuggle_kv_parameters_in_sampling():
    """vLLM reads kv_transfer_params from SamplingParams.extra_args: decode checks the KV owner only where the
    message names it, so a message's extra_args are refused outright."""
    from mmgraph_workers.protocol import sampling_params

    with pytest.raises(ValueError, match="extra_args"):
        sampling_params({"extra_args": {"kv_transfer_params": {"remote_host": "10.0.0.9"}}})


def test_messages_go_to_the_previous_protocol_version_and_back():
    """What a stage of the previous release reads (media as image URLs) and what this one makes of it again; what
    the previous version cannot say is refused, not dropped."""
    import json

    from mmgraph_workers.protocol import (
        PREVIOUS_VERSION,
        CannotDowngrade,
        EncodeRequest,
        GenerateRequest,
        MediaItem,
        sampling,
    )

    images = [MediaItem(url="data:a"), MediaItem(url="data:b")]
    for message in (
        EncodeRequest(request_id="r", media=images, positions=[1, 0]),
        GenerateRequest(request_id="r", prompt_token_ids=[1, 2], sampling=sampling(max_tokens=3), media=images),
    ):
        old = json.loads(message.dump_for(PREVIOUS_VERSION))
        assert old["version"] == PREVIOUS_VERSION and "media" not in old
        assert (old.get("urls") or old.get("image_urls")) == ["data:a", "data:b"]
        again = type(message).model_validate({**type(message).from_previous(old), "version": message.version})
        assert again == message
        video = message.model_copy(update={"media": [MediaItem(url="data:v", modality="video")]})
        with pytest.raises(CannotDowngrade, match="cannot take video"):
            video.dump_for(PREVIOUS_VERSION)
        with pytest.raises(CannotDowngrade):
            message.dump_for(PREVIOUS_VERSION - 1)


def test_a_refusal_names_the_versions_a_peer_speaks_in_either_releases_words():
    import httpx

    from mmgraph_workers.frontend.stage_client import _versions_spoken

    def refusal(body: object) -> httpx.Response:
        return httpx.Response(400, json=body)

    assert _versions_spoken(refusal({"error": "...", "speaks": [4, 5]})) == {4, 5}
    previous = "protocol version 5 is not spoken here (4); upgrade the graph's stages together"
    assert _versions_spoken(refusal({"error": previous, "status": 400})) == {4}
    assert _versions_spoken(refusal({"error": "bad EncodeRequest: ..."})) == set()
    assert _versions_spoken(refusal(["not", "an", "object"])) == set()
