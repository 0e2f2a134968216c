"""What a chat request becomes before any stage works for it: checked (model name, content parts, media count
and schemes, data: URL sizes, context length), rendered with the model's chat template (one placeholder per
image, which the engine expands) and tokenized."""

from __future__ import annotations

import argparse

from mmgraph_workers.frontend.openai_api import ChatRequest, ImagePart, RequestError
from mmgraph_workers.media import MediaError, policy
from mmgraph_workers.media.fetch import check_scheme, decode_data_url, scheme_of
from mmgraph_workers.protocol import Sampling

DEFAULT_MAX_TOKENS = 16


class Processor:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        self.served_model_name = args.served_model_name
        self.policy = policy.from_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(
            args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
        )

    def prepare(self, req: ChatRequest, max_model_len: int | None) -> tuple[list[int], list[str], Sampling]:
        """(prompt token ids, media URLs in prompt order, sampling), or RequestError saying what to change."""
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
        token_ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        if max_model_len is not None and len(token_ids) + max_tokens > max_model_len:
            raise RequestError(
                f"the prompt is {len(token_ids)} tokens and max_tokens is {max_tokens}: together more than the "
                f"model's {max_model_len} token context; lower max_tokens",
                "max_tokens",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = Sampling(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop
        )
        return list(token_ids), urls, sampling

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
