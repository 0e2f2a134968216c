"""The frontend's OpenAI request surface (mmgraph_workers.frontend.openai_api): every field of vLLM's chat and
text completion requests is honoured, ignored or refused, and a refused field at its default is accepted."""

from __future__ import annotations

import pytest


def test_every_field_of_vllms_chat_request_is_honoured_ignored_or_refused():
    """A field vLLM's request model gains later must be decided on, not silently ignored."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from mmgraph_workers.frontend.openai_api import HONOURED, IGNORED, REFUSED

    assert not (HONOURED & IGNORED or HONOURED & REFUSED or IGNORED & REFUSED)
    fields = set(ChatCompletionRequest.model_fields)
    assert fields - (HONOURED | IGNORED | REFUSED) == set(), "new in vLLM: honour, ignore (as vLLM does) or refuse"
    assert (HONOURED | IGNORED | REFUSED) - fields == set(), "gone from vLLM"


def test_a_refused_field_at_its_default_is_accepted():
    """Clients send defaults explicitly (echo: false, priority: 0): only a value that asks for
    something mmgraph does not do is refused."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from mmgraph_workers.frontend.openai_api import RequestError, refuse_unsupported

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for defaults in ({"prompt_logprobs": None}, {"tool_choice": "none"}, {"priority": 0}, {"echo": False}, {"n": 1}):
        refuse_unsupported(ChatCompletionRequest.model_validate({**base, **defaults}), defaults)
    asked_for = (
        {"prompt_logprobs": 2},
        {"priority": 1},
        {"echo": True},
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
    )
    for asked in asked_for:
        with pytest.raises(RequestError) as info:
            refuse_unsupported(ChatCompletionRequest.model_validate({**base, **asked}), asked)
        assert info.value.param == list(asked)[-1]


def test_every_field_of_vllms_text_completion_request_is_decided():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from mmgraph_workers.frontend.openai_api import IGNORED, TEXT_HONOURED, TEXT_REFUSED

    assert not TEXT_HONOURED & TEXT_REFUSED
    assert set(CompletionRequest.model_fields) - (TEXT_HONOURED | IGNORED | TEXT_REFUSED) == set()
