"""What a chat request becomes before any stage works for it: checked (model name, content parts, media count
and schemes, data: URL sizes, context length: first from the text's size alone, then in tokens), rendered with the
model's chat template (one placeholder per image, which the engine expands) and tokenized."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import blake3
import jinja2
import msgspec
from pydantic import BaseModel, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError

from mmgraph_contract.settings import ApiSettings
from mmgraph_workers.frontend.openai_api import (
    PARTS,
    REFUSED,
    TEXT_REFUSED,
    TOKENIZE_REFUSED,
    ChatMessage,
    ChatRequest,
    RequestError,
    TextPart,
    TextRequest,
    refuse_unsupported,
)
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import check_scheme, decode_data_url, scheme_of
from mmgraph_workers.models import UnsupportedModel, adapter_for
from mmgraph_workers.protocol import MediaItem

M = TypeVar("M", bound=BaseModel)


class Processor:
    def __init__(self, api: ApiSettings):
        from transformers import AutoTokenizer

        weights = api.weights
        self.served_model_name = weights.served_model_name
        self.topology = api.routes.topology.value
        self.policy = api.media
        self.tokenizer = AutoTokenizer.from_pretrained(
            weights.model, revision=weights.revision, trust_remote_code=weights.trust_remote_code
        )
        try:  # which media kinds the family takes; agg serves models of other families too, as vLLM does
            family = adapter_for(weights.model, weights.revision, weights.trust_remote_code)
            self.family, self.family_modalities = family.family, family.modalities
        except UnsupportedModel:
            self.family, self.family_modalities = "unknown", ("image", "video", "audio")
        self.longest_token = longest_token_bytes(self.tokenizer)

    def check_fits(self, body: Any, max_model_len: int | None) -> None:
        """RequestError (400) for a request whose prompt cannot fit the context, told from its size alone: no token
        stands for more than `longest_token` bytes, so text longer than max_model_len of them (every message's and
        tool's text, or the prompt's) cannot fit, nor can more prompt token ids than max_model_len. Called on the
        parsed JSON before anything else: refusing a 20 MB prompt costs its parse, not a tokenizer pass of tens of
        seconds and gigabytes. Text under the bound may still be too long; the count after tokenizing says so."""
        if max_model_len is None or not isinstance(body, dict):
            return
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) > max_model_len:
                raise RequestError(too_long(max_model_len, f"{len(prompt)} prompt tokens", "prompt"), "prompt")
            return
        size = text_bytes([body.get("messages"), body.get("tools"), prompt])
        if size > max_model_len * self.longest_token:
            field = "messages" if "messages" in body else "prompt"
            held = f"{size} bytes of text, more than {max_model_len} tokens of at most {self.longest_token} bytes hold"
            raise RequestError(too_long(max_model_len, held, field), field)

    def prepare(
        self, req: ChatRequest, body: dict[str, Any], max_model_len: int | None, defaults: dict[str, Any]
    ) -> tuple[list[int], list[MediaItem], dict[str, Any]]:
        """(prompt token ids, media items in prompt order, vLLM's SamplingParams as the message carries them), or
        RequestError saying what to change. `body` goes through vLLM's own request model, so its fields are checked
        and mean what they do in vLLM's server; `defaults` are the engine's (the model's generation config)."""
        self._check_model(req.model)
        conversation, media = self._conversation(req.messages)
        vllm_req = checked(ChatCompletionRequest, body, REFUSED)
        self._check_choices(vllm_req.n)
        _check_tool_choice(vllm_req)
        token_ids = self._template(conversation, vllm_req.add_generation_prompt, tool_dicts(vllm_req.tools))
        requested = req.max_completion_tokens or req.max_tokens
        return list(token_ids), media, _sampling(vllm_req, len(token_ids), requested, max_model_len, defaults)

    def prepare_text(
        self, req: TextRequest, body: dict[str, Any], max_model_len: int | None, defaults: dict[str, Any]
    ) -> tuple[list[int], list[str], dict[str, Any]]:
        """As `prepare`, for a text completion: one prompt, a string (tokenized as vLLM's server does, special
        tokens added unless asked not to) or token ids."""
        self._check_model(req.model)
        vllm_req = checked(CompletionRequest, body, TEXT_REFUSED)
        self._check_choices(vllm_req.n)
        if isinstance(req.prompt, str):
            token_ids = self.tokenizer(req.prompt, add_special_tokens=vllm_req.add_special_tokens).input_ids
        else:
            token_ids = req.prompt
        if not token_ids:
            raise RequestError("the prompt is empty", "prompt")
        requested = vllm_req.max_tokens  # 16 when unset: the legacy API's default, as in vLLM's server
        return list(token_ids), [], _sampling(vllm_req, len(token_ids), requested, max_model_len, defaults)

    def tokenize(self, body: dict[str, Any], max_model_len: int | None) -> dict[str, Any]:
        """vLLM's `/tokenize`: a prompt, or text-only messages through the chat template (an image's tokens are
        the engine's to count: vLLM's server expands each image there, the frontend cannot)."""
        self.check_fits(body, max_model_len)
        kind = TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeCompletionRequest
        req = checked(kind, body, TOKENIZE_REFUSED)
        if req.model is not None:
            self._check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            conversation, media = self._conversation([ChatMessage.model_validate(m) for m in req.messages])
            if media:
                raise RequestError("/tokenize counts text here: leave the media parts out", "messages")
            ids = self._template(conversation, req.add_generation_prompt, tool_dicts(req.tools))
        else:
            ids = self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        strs = self.tokenizer.convert_ids_to_tokens(list(ids)) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": list(ids), "token_strs": strs}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's `/detokenize`: token ids back to text (an id the tokenizer lacks is skipped, as in vLLM's
        server)."""
        req = validated(DetokenizeRequest, body)
        if req.model is not None:
            self._check_model(req.model)
        if bad := [t for t in req.tokens if t >= 2**32]:  # the fast tokenizer overflows; ids it lacks it skips
            raise RequestError(f"token id {bad[0]} is out of vocabulary", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _template(
        self, conversation: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """The conversation (and the tools, for a template that shows them to the model) through the model's chat
        template, tokenized; a template that refuses the messages (roles out of order, say) is the caller's 400,
        as in vLLM's server."""
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        except jinja2.TemplateError as err:
            raise RequestError(f"the chat template refused the messages: {err}", "messages") from None

    def _check_choices(self, n: int) -> None:
        """n > 1 is vLLM's: one engine request fans out into n. Not in e-p-d, where each choice would pull pd's
        KV cache for itself, and pd frees it after the first pull."""
        if n > 1 and self.topology == "e-p-d":
            raise RequestError("'n' > 1 is not supported in e-p-d (agg and e-pd have it): ask n times", "n")

    def _check_model(self, model: str) -> None:
        if model != self.served_model_name:
            raise RequestError(
                f"model {model!r} is not served here; this endpoint serves {self.served_model_name!r}", "model", 404
            )

    def _conversation(self, messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[MediaItem]]:
        """The messages as the chat template takes them (one image or video part per item) and the media items in
        prompt order, checked."""
        conversation, media = [], []
        for message in messages:
            parts = []
            for part in message.parts():
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                modality = part.modality
                if message.role != "user":
                    raise RequestError(f"{modality} parts are accepted in user messages only", "messages")
                if modality not in self.policy.modalities:
                    raise RequestError(
                        f"this graph does not accept {modality} parts (spec.media.modalities is "
                        f"{', '.join(self.policy.modalities)})",
                        "messages",
                    )
                if modality not in self.family_modalities:
                    raise RequestError(f"this model ({self.family}) takes no {modality}", "messages")
                media.append(MediaItem(modality=modality, url=part.url, route=self._checked_route(modality, part.url)))
                parts.append({"type": modality})
            conversation.append(_templated(message, parts))
        if len(media) > self.policy.max_items:
            raise RequestError(
                f"{len(media)} media items in one request, more than the {self.policy.max_items} allowed", "messages"
            )
        return conversation, media

    def decode(self, token_id: int) -> str:
        """One token's text, as vLLM's server decodes a token its engine did not (for logprobs)."""
        return self.tokenizer.decode(token_id)

    def _checked_route(self, modality: str, url: str) -> str:
        """The item's routing key (a full-width hash of its bytes for a data: URL, of the URL otherwise), once
        scheme, and for data: URLs size and encoding, are checked: before any stage works (the encoder checks the
        rest where it connects)."""
        try:
            check_scheme(url, self.policy)
            data = decode_data_url(url, self.policy) if scheme_of(url) == "data" else url.encode()
        except MediaError as err:
            raise RequestError(str(err), "messages", err.status) from None
        return f"{modality}:{blake3.blake3(data).hexdigest()}"


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text one token of `tokenizer`'s vocabulary stands for (added and special tokens
    included): the larger of its decoded text and its piece (a byte-level piece is one character per byte, and a
    lone byte of a longer character decodes to U+FFFD's three), so an upper bound. Once per process."""
    ids = list(range(len(tokenizer)))
    if backend := getattr(tokenizer, "backend_tokenizer", None):  # a fast tokenizer's: all in one Rust call
        texts = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    else:
        texts = [tokenizer.decode([i]) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return max(utf8_len(text) for text in [*texts, *(p for p in pieces if isinstance(p, str))])


MEDIA_PARTS = frozenset(PARTS) - {"text"}
STRUCTURE = frozenset({"type", "role"})  # keys whose values say what a part or message is, not what it says


def text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a request's JSON `value`: its strings, but a media part's (a URL or base64) and
    the names of types and roles."""
    size, stack = 0, [value]
    while stack:  # not recursive: JSON can nest as deep as its parser let it
        item = stack.pop()
        if isinstance(item, str):
            size += utf8_len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict) and item.get("type") not in MEDIA_PARTS:
            stack.extend(v for k, v in item.items() if k not in STRUCTURE)
    return size


def utf8_len(text: str) -> int:
    """len(text.encode()), without the copy for ASCII text (a flag CPython keeps on each string)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def too_long(max_model_len: int, what: str, field: str) -> str:
    """A context-length refusal, worded as vLLM's server words its own."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, your request has {what}. "
        f"Please reduce the length of the {field}."
    )


def _templated(message: ChatMessage, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A message as vLLM's server gives it to the chat template: an assistant's tool calls with their arguments as
    objects (templates expect a mapping; vLLM makes arguments that are not a JSON object `{}`), a tool's answer as
    one string, the tool call it answers and a name."""
    out: dict[str, Any] = {"role": message.role, "content": parts}
    if message.role == "assistant" and message.tool_calls:
        out["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
    if message.role == "assistant" and message.reasoning is not None:
        out["reasoning"] = out["reasoning_content"] = message.reasoning
    if message.role == "tool":
        out["content"] = "\n".join(part["text"] for part in parts)
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
    if isinstance(message.name, str):
        out["name"] = message.name
    return out


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise RequestError("an assistant's tool_calls are of type 'function', with a 'function' object", "tool_calls")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            arguments = {}  # as vLLM: a malformed call in the history must not fail every later turn
    return {**call, "function": {**function, "arguments": arguments if isinstance(arguments, dict) else {}}}


def tool_dicts(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The request's tools as vLLM's server gives them to the chat template."""
    return None if tools is None else [tool.model_dump() for tool in tools]


def _check_tool_choice(vllm_req: ChatCompletionRequest) -> None:
    """Tools are shown to the model (tool_choice "none"); turning its answer into tool calls ("auto", "required",
    a named function) takes a tool-call parser, which mmgraph does not run, nor does vLLM's server unless it is
    started with one: a 400 naming the field, as vLLM's server gives."""
    choice = vllm_req.tool_choice
    if vllm_req.tools and choice not in (None, "none"):
        asked = choice if isinstance(choice, str) else f"function {choice.function.name!r}"
        raise RequestError(
            f"tool_choice={asked} needs a tool-call parser, which mmgraph does not run: send tool_choice 'none' "
            "(the tools are shown to the model, its answer is text) or leave the tools out",
            "tool_choice",
        )


def _sampling(
    vllm_req: Any, prompt_len: int, requested: int | None, max_model_len: int | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """vLLM's SamplingParams for a request, as the message carries them: max_tokens as vLLM's server sets it
    (unset, what the context leaves, or the generation config's), made by vLLM's `to_sampling_params`."""
    if max_model_len is not None and requested is not None and prompt_len + requested > max_model_len:
        raise RequestError(
            f"the prompt is {prompt_len} tokens and max_tokens is {requested}: together more than the "
            f"model's {max_model_len} token context; lower max_tokens",
            "max_tokens",
        )
    try:
        max_tokens = get_max_tokens(max_model_len or 2**31, requested, prompt_len, defaults)
        params = vllm_req.to_sampling_params(max_tokens, defaults)
    except (ValueError, VLLMClientError) as err:  # vLLM's own checks of the values (e.g. a negative top_k)
        raise RequestError(str(err), getattr(err, "parameter", None)) from None
    return msgspec.to_builtins(params, str_keys=True)


def checked(kind: type[M], body: dict[str, Any], refused: frozenset[str]) -> M:
    """`body` read by vLLM's model `kind`, with a 400 naming the first field it sets that mmgraph refuses."""
    sent = set(body) if isinstance(body, dict) else set()  # before vLLM's validators fill in fields in place
    request = validated(kind, body)
    refuse_unsupported(request, sent, refused)
    return request


def validated(kind: type[M], body: dict[str, Any]) -> M:
    """`body` as vLLM's server reads it, with vLLM's model `kind`. Its field checks fail with pydantic's
    ValidationError (the app names the field) or vLLM's own VLLMValidationError, which names its parameter."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, VLLMClientError) as err:  # vLLM's "before" checks
        raise RequestError(str(err), getattr(err, "parameter", None)) from None
