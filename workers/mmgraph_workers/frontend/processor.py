"""What a chat request becomes before any stage works for it: checked (model name, content parts, media count
and schemes, data: URL sizes, context length), rendered with the model's chat template (one placeholder per
image, which the engine expands) and tokenized."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError

from mmgraph_workers.frontend.openai_api import ChatRequest, ImagePart, RequestError, refuse_unsupported
from mmgraph_workers.media import MediaError, policy
from mmgraph_workers.media.fetch import check_scheme, decode_data_url, scheme_of


class Processor:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        self.served_model_name = args.served_model_name
        self.policy = policy.from_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(
            args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
        )

    def prepare(
        self, req: ChatRequest, body: dict[str, Any], max_model_len: int | None, defaults: dict[str, Any]
    ) -> tuple[list[int], list[str], dict[str, Any]]:
        """(prompt token ids, media URLs in prompt order, vLLM's SamplingParams as the message carries them), or
        RequestError saying what to change. `body` goes through vLLM's own request model, so its fields are checked
        and mean what they do in vLLM's server; `defaults` are the engine's (the model's generation config)."""
        if req.model != self.served_model_name:
            raise RequestError(
                f"model {req.model!r} is not served here; this endpoint serves {self.served_model_name!r}",
                "model",
                404,
            )
        conversation, urls = [], []
        for message in req.messages:
            parts = []
            for part in message.parts():
                if isinstance(part, ImagePart):
                    if message.role != "user":
                        raise RequestError("images are accepted in user messages only", "messages")
                    urls.append(self._checked_url(part.image_url.url))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
            conversation.append({"role": message.role, "content": parts})
        if "image" not in self.policy.modalities and urls:
            raise RequestError("this graph does not accept images", "messages")
        if len(urls) > self.policy.max_items:
            raise RequestError(
                f"{len(urls)} images in one request, more than the {self.policy.max_items} allowed", "messages"
            )
        sent = set(body)  # before vLLM's validators, which fill in fields (tools brings tool_choice) in place
        vllm_req = vllm_request(body)
        refuse_unsupported(vllm_req, sent)
        token_ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=vllm_req.add_generation_prompt, tokenize=True, return_dict=False
        )
        requested = req.max_completion_tokens or req.max_tokens
        if max_model_len is not None and requested is not None and len(token_ids) + requested > max_model_len:
            raise RequestError(
                f"the prompt is {len(token_ids)} tokens and max_tokens is {requested}: together more than the "
                f"model's {max_model_len} token context; lower max_tokens",
                "max_tokens",
            )
        try:
            # as vLLM's server: unset, max_tokens is what the context leaves (or the generation config's)
            max_tokens = get_max_tokens(max_model_len or 2**31, requested, len(token_ids), defaults)
            params = vllm_req.to_sampling_params(max_tokens, defaults)
        except (ValueError, VLLMClientError) as err:  # vLLM's own checks of the values (e.g. a negative top_k)
            raise RequestError(str(err), getattr(err, "parameter", None)) from None
        return list(token_ids), urls, msgspec.to_builtins(params, str_keys=True)

    def decode(self, token_id: int) -> str:
        """One token's text, as vLLM's server decodes a token its engine did not (for logprobs)."""
        return self.tokenizer.decode(token_id)

    def _checked_url(self, url: str) -> str:
        """Scheme, and for data: URLs size and encoding, checked before any stage works (the encoder checks the
        rest where it connects)."""
        try:
            check_scheme(url, self.policy)
            if scheme_of(url) == "data":
                decode_data_url(url, self.policy)
        except MediaError as err:
            raise RequestError(str(err), "messages", err.status) from None
        return url


def vllm_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """`body` as vLLM's server reads it. Its field checks fail with pydantic's ValidationError (the app names the
    field) or vLLM's own VLLMValidationError, which names its parameter."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError:
        raise
    except (ValueError, VLLMClientError) as err:
        raise RequestError(str(err), getattr(err, "parameter", None)) from None
