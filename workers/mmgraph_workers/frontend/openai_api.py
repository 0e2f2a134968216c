"""The OpenAI chat-completions shapes the frontend accepts and returns, and the one error formatter that both
the JSON answer and the SSE stream use (OpenAI's `{"error": {message, type, param, code}}`)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mmgraph_workers.protocol import GenerateEvent


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class RequestError(ValueError):
    """The client's request is wrong: answered 4xx in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def parts(self) -> list[TextPart | ImagePart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        out: list[TextPart | ImagePart] = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind == "text":
                out.append(TextPart.model_validate(part))
            elif kind == "image_url":
                out.append(ImagePart.model_validate(part))
            else:
                raise RequestError(
                    f"content part {i} has type {kind!r}; this model accepts 'text' and 'image_url'", "messages"
                )
        return out


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what vLLM's own server accepts
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    return_token_ids: bool = False  # vLLM's extension: the generated token ids beside the text


def error_body(message: str, status: int, param: str | None = None, kind: str | None = None) -> dict[str, Any]:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(message: str, status: int, param: str | None = None, kind: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, kind), status_code=status)


def sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def chunk(request_id: str, model: str, delta: dict, finish: str | None, usage: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def completion(request_id: str, req: ChatRequest, text: str, token_ids: list[int], last: GenerateEvent | None) -> dict:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": last.finish_reason if last else None,
    }
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [choice],
        "usage": usage(last) if last else None,
    }


def usage(event: GenerateEvent) -> dict[str, int]:
    prompt, completion_tokens = event.prompt_tokens or 0, event.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
