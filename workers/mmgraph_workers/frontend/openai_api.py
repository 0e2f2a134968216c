"""The OpenAI chat-completions shapes the frontend accepts and returns, and the one error formatter that both
the JSON answer and the SSE stream use (OpenAI's `{"error": {message, type, param, code}}`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmgraph_workers.media.audio import INPUT_FORMATS
from mmgraph_workers.protocol import GenerateEvent


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class URL(BaseModel):
    url: str
    detail: str | None = None  # images only; read by neither vLLM's server nor mmgraph


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: URL
    modality: ClassVar[str] = "image"

    @property
    def url(self) -> str:
        return self.image_url.url


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: URL
    modality: ClassVar[str] = "video"

    @property
    def url(self) -> str:
        return self.video_url.url


class AudioURLPart(BaseModel):
    type: Literal["audio_url"]
    audio_url: URL
    modality: ClassVar[str] = "audio"

    @property
    def url(self) -> str:
        return self.audio_url.url


class InputAudio(BaseModel):
    data: str
    format: str

    @field_validator("format")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in INPUT_FORMATS:
            raise ValueError(f"{value!r} is not accepted: send one of {', '.join(sorted(INPUT_FORMATS))}")
        return value


class InputAudioPart(BaseModel):
    """OpenAI's inline audio: base64 bytes and their format, which becomes a data: URL (as vLLM's server makes
    it), so every stage loads it as it loads any other."""

    type: Literal["input_audio"]
    input_audio: InputAudio
    modality: ClassVar[str] = "audio"

    @property
    def url(self) -> str:
        return f"data:audio/{self.input_audio.format};base64,{self.input_audio.data}"


MediaPart = ImagePart | VideoPart | AudioURLPart | InputAudioPart
PARTS: dict[str, type[TextPart | MediaPart]] = {
    "text": TextPart,
    "image_url": ImagePart,
    "video_url": VideoPart,
    "audio_url": AudioURLPart,
    "input_audio": InputAudioPart,
}


class RequestError(ValueError):
    """The client's request is wrong: answered 4xx in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class ChatMessage(BaseModel):
    """One message; an assistant's earlier tool calls and a tool's answer to one go to the chat template as vLLM
    gives them to it."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: Any = None  # vLLM's server passes a string on to the template and ignores anything else
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # an assistant's earlier reasoning, for templates that interleave it

    def parts(self) -> list[TextPart | MediaPart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        out: list[TextPart | MediaPart] = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind not in PARTS:
                raise RequestError(
                    f"content part {i} has type {kind!r}; mmgraph accepts {', '.join(map(repr, PARTS))}", "messages"
                )
            out.append(PARTS[kind].model_validate(part))
        return out


class Answering(BaseModel):
    """What the frontend itself reads of a request to say how to answer it. Every other field, sampling included,
    is read by vLLM's own request model (see HONOURED)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False  # vLLM's extension: the generated token ids beside the text
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = 1


class ChatRequest(Answering):
    """A chat request: the messages (to template them and find the media) and the logprobs asked for."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class TextRequest(Answering):
    """A (legacy) text completion: one prompt, text or token ids."""

    prompt: str | list[int]


# Every field of vLLM's chat request model (vllm/entrypoints/openai/chat_completion/protocol.py), and what
# mmgraph does with it. HONOURED: as vLLM's server does (sampling fields go through vLLM's own
# `to_sampling_params` to the engine that produces the tokens). IGNORED: vLLM's server ignores it too. REFUSED: a
# client setting it to anything but its default gets a 400 naming it, never an answer as if it were not there.
# A field vLLM adds later is in none of them: a test compares this table with vLLM's model. (`n` > 1: not in
# e-p-d, where each choice would pull pd's KV cache for itself; see Processor._check_choices.)
HONOURED = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
        "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "min_tokens", "bad_words",
        "allowed_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
        "return_token_ids", "add_generation_prompt", "response_format", "structured_outputs", "logprobs",
        "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    }
)  # fmt: skip
IGNORED = frozenset({"user", "include_reasoning"})  # no reasoning parser: vLLM's server ignores it as well
REFUSED = frozenset(
    {
        "prompt_logprobs", "logprob_token_ids", "echo", "documents", "chat_template", "chat_template_kwargs",
        "continue_final_message", "reasoning_effort", "thinking_token_budget",
        "use_beam_search", "length_penalty", "mm_processor_kwargs", "media_io_kwargs", "mm_payload", "priority",
        "request_id", "cache_salt", "truncate_prompt_tokens", "truncation_side", "add_special_tokens",
        "return_tokens_as_token_ids", "return_token_offsets", "return_prompt_text", "return_mm_kwargs",
        "kv_transfer_params", "ec_transfer_params", "routed_experts_prompt_start", "session_id",
        "repetition_detection", "watermarking", "vllm_xargs", "stream_interval",
    }
)  # fmt: skip


# vLLM's text completion request: the chat table's decisions, plus its own fields. Its logprobs are another shape
# (text_offset, token_logprobs), not written here yet.
TEXT_REFUSED = (REFUSED - {"add_special_tokens"}) | {"logprobs", "prompt_embeds", "suffix"}
TEXT_HONOURED = (HONOURED - {"logprobs", "messages", "tools", "tool_choice", "parallel_tool_calls"}) | {
    "prompt",
    "add_special_tokens",
}

# vLLM's /tokenize fields mmgraph does not honour (the rest: model, prompt or messages, add_generation_prompt,
# add_special_tokens, return_token_strs, tools)
TOKENIZE_REFUSED = frozenset(
    {"chat_template", "chat_template_kwargs", "continue_final_message", "media_io_kwargs", "mm_processor_kwargs"}
)


def refuse_unsupported(request: Any, sent: Collection[str], refused: frozenset[str] = REFUSED) -> None:
    """RequestError naming the first field the client sent (`sent`: the body's keys; vLLM's validators fill in
    others) that mmgraph does not honour yet, in vLLM's validated `request`."""
    fields = type(request).model_fields
    for name in sorted(refused.intersection(sent).intersection(fields)):  # others: extras vLLM ignores too
        value = getattr(request, name)
        default = fields[name].get_default(call_default_factory=True)
        if value != default and value not in (None, False, [], {}, ""):  # an explicit "no" asks for nothing
            raise RequestError(f"'{name}' is not supported by mmgraph yet; leave it out (or at {default!r})", name)
    options = getattr(request, "stream_options", None)
    if options is not None and options.continuous_usage_stats:
        raise RequestError(
            "'stream_options.continuous_usage_stats' is not supported by mmgraph yet: usage comes in the last chunk",
            "stream_options",
        )


def logprobs(
    req: ChatRequest, token_ids: list[int], steps: list | None, decode: Callable[[int], str]
) -> dict[str, Any] | None:
    """OpenAI's `logprobs` of a choice (or of a stream chunk's tokens), as vLLM's server writes it: each token
    with its logprob and UTF-8 bytes and the first `top_logprobs` entries of its position; `decode` is the
    tokenizer's, for what the engine did not detokenize."""
    if not req.logprobs:
        return None
    content = []
    for token_id, step in zip(token_ids, steps or [], strict=False):
        chosen = next((entry for entry in step if entry[0] == token_id), None)
        if chosen is None:
            token = decode(token_id)
            content.append({"token": token, "logprob": -9999.0, "bytes": list(token.encode("utf-8", "replace"))})
            continue
        top = []
        for i, (other, logprob, _rank, decoded) in enumerate(step):
            if req.top_logprobs == -1 or (req.top_logprobs is not None and i < req.top_logprobs):
                text = decoded if decoded is not None else decode(other)
                top.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))})
        decoded = chosen[3]
        content.append(
            {
                "token": decoded if decoded is not None else decode(token_id),
                "logprob": chosen[1],
                "bytes": None if decoded is None else list(decoded.encode("utf-8", "replace")),
                "top_logprobs": top,
            }
        )
    return {"content": content}


def error_body(message: str, status: int, param: str | None = None, kind: str | None = None) -> dict[str, Any]:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(message: str, status: int, param: str | None = None, kind: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, kind), status_code=status)


def sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


@dataclass(frozen=True)
class Shape:
    """How an answer is written: a chat completion (a message, streamed as deltas) or a text completion."""

    prefix: str  # of the response id
    object: str
    chunk_object: str
    chat: bool

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: dict | None, streamed: bool
    ) -> dict[str, Any]:
        if not self.chat:
            body: dict[str, Any] = {"text": text}
        elif streamed:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("cmpl", "text_completion", "text_completion", chat=False)


def chunk(shape: Shape, request_id: str, model: str, choice: dict | None, usage: dict | None = None) -> dict:
    """One streamed event: a choice's delta, or (choice None) the usage at the end."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": shape.chunk_object,
        "created": int(time.time()),
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@dataclass
class Choice:
    """One choice of an answer, as it accumulates."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    steps: list = field(default_factory=list)  # logprobs, per token (GenerateEvent.logprobs)
    finish_reason: str | None = None

    def add(self, event: GenerateEvent) -> None:
        self.text.append(event.text)
        self.token_ids += event.token_ids
        self.steps += event.logprobs or []
        self.finish_reason = event.finish_reason or self.finish_reason


def completion(
    shape: Shape,
    request_id: str,
    req: Answering,
    prompt_ids: list[int],
    choices: dict[int, Choice],
    last: GenerateEvent | None,
    logprobs: Callable[[Choice], dict[str, Any] | None],
) -> dict:
    """A whole answer. With return_token_ids (vLLM's extension), as vLLM's server: each choice's token ids, and
    the prompt's, at the top for chat and in each choice for text completions."""
    out = []
    for index in sorted(choices):
        c = choices[index]
        choice = shape.choice(index, "".join(c.text), c.finish_reason, logprobs(c), streamed=False)
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
            if not shape.chat:
                choice["prompt_token_ids"] = prompt_ids
        out.append(choice)
    body = {
        "id": request_id,
        "object": shape.object,
        "created": int(time.time()),
        "model": req.model,
        "choices": out,
        "usage": usage(last) if last else None,
    }
    if req.return_token_ids and shape.chat:
        body["prompt_token_ids"] = prompt_ids
    return body


def usage(event: GenerateEvent) -> dict[str, int]:
    prompt, completion_tokens = event.prompt_tokens or 0, event.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
