"""The messages that cross process boundaries between stages (HTTP JSON bodies and NDJSON stream lines).

Typed and versioned: every request carries `version`, and a worker refuses a version it does not speak with a
clear error instead of misreading fields. The OpenAI-facing request/response shapes live in
frontend/openai_api.py; these are internal to a graph.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

PROTOCOL_VERSION = 5  # 2: content keys; 3: a descriptor names its owner, not its metadata; 4: vLLM's SamplingParams;
# 5: media items name their modality (video; audio came later as one more value, which old messages never carry)


PREVIOUS_VERSION = 4  # also spoken, both ways, so a rollout that mixes releases fails no request (server.py, router.py)


class CannotDowngrade(ValueError):
    """The message holds what the previous version cannot say (a video or audio item, for 4)."""


class Message(BaseModel):
    version: int = PROTOCOL_VERSION

    @classmethod
    def from_previous(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A PREVIOUS_VERSION body's fields as this version's (the same, unless the message changed shape)."""
        return data

    def to_previous(self) -> dict[str, Any]:
        """This message as a PREVIOUS_VERSION reader reads it; CannotDowngrade if it cannot say it."""
        return self.model_dump(mode="json")

    def dump_for(self, version: int) -> str:
        """The JSON body for a reader of `version` (this one, or the previous one)."""
        if version == PROTOCOL_VERSION:
            return self.model_dump_json()
        if version != PREVIOUS_VERSION:
            raise CannotDowngrade(f"protocol version {version} is neither {PROTOCOL_VERSION} nor {PREVIOUS_VERSION}")
        return json.dumps({**self.to_previous(), "version": PREVIOUS_VERSION})


def _image_urls(media: list[MediaItem]) -> list[str]:
    """Version 4 named media by URL alone: images."""
    others = sorted({m.modality for m in media} - {"image"})
    if others:
        raise CannotDowngrade(f"a stage of the previous release cannot take {' or '.join(others)}")
    return [m.url for m in media]


# What a reader accepts before it allocates anything for a descriptor: embeddings' dtypes, and a size bound (an
# image's embeddings are megabytes; a descriptor is a peer's claim, checked like a client's).
TENSOR_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "uint8": 1}
MAX_TENSOR_BYTES = 1 << 30


class TensorRef(BaseModel):
    """Where a tensor waits in its owner's memory for a reader to pull it (a NIXL descriptor and its agent).
    Validated on arrival: a known dtype, a shape of 1 to 4 positive dimensions whose size is `nbytes`, at most
    MAX_TENSOR_BYTES; so a reader never allocates for a descriptor that does not add up."""

    handle: str = Field(max_length=64)  # random (uuid4): knowing it is the capability to read or release the buffer
    agent: str = Field(max_length=256)
    owner: str = Field(max_length=300)  # the owner's base URL: a reader checks its host is one of the graph's own
    address: int = Field(ge=0)
    nbytes: int = Field(gt=0, le=MAX_TENSOR_BYTES)
    dtype: Literal["float32", "float16", "bfloat16", "int64", "uint8"]
    shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1, max_length=4)
    mem_type: Literal["DRAM", "VRAM"] = "DRAM"
    device_id: int = Field(default=0, ge=0)
    # Both new in this release, and optional, so the previous release's descriptors still read (unchecked) and its
    # readers ignore them. `generation`: the frame around the bytes (transfer.py) a reader checks, so a buffer the
    # owner freed and reused is never read as this one. `expires_in_seconds`: how long the owner keeps the buffer
    # from when it answered; seconds, not a time, since pods share no clock.
    generation: int | None = Field(default=None, ge=1, lt=1 << 63)
    expires_in_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _adds_up(self) -> TensorRef:
        size = TENSOR_DTYPES[self.dtype]
        for dim in self.shape:
            size *= dim
        if size != self.nbytes:
            raise ValueError(f"shape {self.shape} of {self.dtype} is {size} bytes, not the {self.nbytes} declared")
        return self


Modality = Literal["image", "video", "audio"]


class MediaItem(BaseModel):
    """One media item of a request, in prompt order: what it is and where to get it."""

    modality: Modality = "image"
    url: str
    # The frontend's: which encoder replica should encode the item (a hash of its bytes, or of its URL when the
    # frontend has no bytes). It picks a replica, never keys a cache, and never leaves the frontend.
    route: str = Field(default="", exclude=True)


def image_items(urls: list[str]) -> list[MediaItem]:
    return [MediaItem(url=url) for url in urls]


class EncodedItem(BaseModel):
    """One media item after the encoder: its embeddings and what the engine needs to place them."""

    modality: Modality = "image"
    key: str  # content key (content_key.py): the item's identity in every engine's prefix cache
    embeddings: TensorRef
    num_tokens: int
    metadata: dict[str, Any] = Field(default_factory=dict)  # the model family's, e.g. Qwen's {"grid_thw": [t, h, w]}
    cached: bool = False


class EncodeRequest(Message):
    request_id: str
    media: list[MediaItem] = Field(min_length=1)
    # each item's place among the request's media (a request's items may be split over encoder replicas), so an
    # error names the item the client knows; unset: 0, 1, ...
    positions: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _one_position_per_item(self) -> EncodeRequest:
        if self.positions is not None and len(self.positions) != len(self.media):
            raise ValueError(f"{len(self.positions)} positions for {len(self.media)} media items")
        return self

    def position(self, i: int) -> int:
        return self.positions[i] if self.positions is not None else i

    @classmethod
    def from_previous(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "media": [{"url": url} for url in data.pop("urls", [])]}

    def to_previous(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"media"})
        return {**data, "urls": _image_urls(self.media)}


class EncodeResponse(Message):
    items: list[EncodedItem]


def sampling(**fields: Any) -> dict[str, Any]:
    """vLLM's SamplingParams with these fields, as a message carries them (msgspec builtins: its non-default
    fields). The frontend makes them with vLLM's own request model, so every field means what it means in vLLM's
    server; an engine stage turns them back with `sampling_params`, where vLLM's own checks run again."""
    import msgspec
    from vllm.sampling_params import SamplingParams

    return msgspec.to_builtins(SamplingParams(**fields), str_keys=True)


def sampling_params(fields: dict[str, Any]) -> Any:
    """The SamplingParams a message carries; ValueError if they are not valid ones."""
    import msgspec
    from vllm.sampling_params import SamplingParams

    if fields.get("extra_args"):  # vLLM reads kv_transfer_params from there: the stage sets them, after its checks
        raise ValueError("bad sampling parameters: extra_args are the stage's own, not a message's")
    unknown = set(fields) - set(SamplingParams.__struct_fields__)
    if unknown:  # msgspec would drop them: a sender of another vLLM version, or not sampling parameters at all
        raise ValueError(f"bad sampling parameters: unknown fields {sorted(unknown)}")
    try:
        return msgspec.convert(fields, SamplingParams, str_keys=True)
    except msgspec.ValidationError as err:
        raise ValueError(f"bad sampling parameters: {err}") from err


class PlaceholderItem(BaseModel):
    """What decode needs for an image it will not compute: its content key (decode's prefix cache keys the item by
    it, never by the placeholder's values), the embedding shape and the family's metadata (positions may depend
    on it, e.g. Qwen's grid)."""

    modality: Modality = "image"
    key: str
    num_tokens: int
    hidden_size: int
    metadata: dict[str, Any] = Field(default_factory=dict)


class GenerateRequest(Message):
    """To a vLLM stage. Exactly one way of giving the media: `media` (agg: the engine loads and encodes it),
    `encoded` (pd fed by the encoder), or `placeholders` (decode: KV comes from pd)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # vLLM's SamplingParams (`sampling`, `sampling_params`)
    media: list[MediaItem] = Field(default_factory=list)
    encoded: list[EncodedItem] = Field(default_factory=list)
    placeholders: list[PlaceholderItem] = Field(default_factory=list)
    prefill_only: bool = False  # e-p-d's pd: compute the KV, keep it for decode, return kv_transfer_params
    return_prompt_token_ids: bool = False  # the first event carries the prompt as the engine saw it (expanded)
    kv_transfer_params: dict[str, Any] | None = None  # decode: where the KV is
    # decode: seconds (from when the frontend sent this) within which the first token must come, i.e. the KV must
    # have been pulled; after that pd's lease may have ended and the blocks may hold another request's KV.
    kv_deadline_seconds: float | None = None

    @classmethod
    def from_previous(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "media": [{"url": url} for url in data.pop("image_urls", [])]}

    def to_previous(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"media"})
        for item in data["encoded"] + data["placeholders"]:
            if item["modality"] != "image":
                raise CannotDowngrade(f"a stage of the previous release cannot take {item['modality']}")
        return {**data, "image_urls": _image_urls(self.media)}


class GenerateEvent(BaseModel):
    """One NDJSON line of a /generate stream."""

    index: int = 0  # the choice (n > 1)
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # this choice's
    final: bool = False  # the request's last event: it carries the usage (all choices) and pd's KV parameters
    prompt_token_ids: list[int] | None = None  # on the first event, if asked: each image's tokens expanded
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    kv_transfer_params: dict[str, Any] | None = None
    hidden_size: int | None = None
    # when asked for: per new token, vLLM's logprobs of that position in its order (the sampled token, then the
    # top ones), each [token id, logprob (at least -9999), rank, decoded text or None]
    logprobs: list[list[tuple[int, float, int | None, str | None]]] | None = None
    error: str | None = None
    status: int | None = None  # HTTP-like status of an error: 4xx for the request, 5xx for the stage
    retry: bool = False  # the error happened before any work on the request: sending it again is safe


class StageErrorBody(BaseModel):
    """The one error envelope between stages: every error answer of a stage's own endpoints says what failed, its
    HTTP status and whether another replica may take the request (`retry`); a /generate stream says the same in
    its last GenerateEvent. A client of the OpenAI API never sees it: the frontend answers in OpenAI's shape."""

    error: str
    status: int
    retry: bool = False
    speaks: list[int] | None = None  # a protocol refusal: the versions to send instead (router.py)
    stage: str | None = None  # a failure of ours: where, and the id its log line carries
    request_id: str | None = None


class AgentInfo(BaseModel):
    """What an encoder answers at AGENT_PATH: its NIXL agent, asked of the encoder itself by pd (never taken from a
    message), so a descriptor cannot point pd's agent anywhere but the graph's own encoders."""

    agent: str
    metadata: str


class WorkerInfo(BaseModel):
    stage: str
    model: str
    served_model_name: str
    max_model_len: int | None = None
    hidden_size: int | None = None
    # the engine's defaults from the model's generation_config.json (and --override-generation-config), exactly
    # what vLLM's own server applies to a request that does not set them
    default_sampling: dict[str, Any] = Field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    # an engine's vLLM: NIXL moves KV only between engines of one vLLM version (its handshake compares them), so
    # the frontend pairs pd and decode replicas by it while a rollout changes vLLM (None: an encoder, or a release
    # that did not say)
    vllm_version: str | None = None
