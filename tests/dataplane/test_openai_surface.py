"""The OpenAI surface against vLLM's own server: every chat field mmgraph honours gives the same text,
finish_reason and usage as vLLM's server (same weights, same engine arguments) in every topology, streaming and
not; a field it does not honour yet is a 400 naming it, never an answer as if it were not there."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from media_samples import SAMPLES

from .conftest import CASES, MODEL_NAME, data_url, user

TOPOLOGIES = ["agg", "e-pd", "e-p-d"]

# Each honoured sampling field, alone or with what it needs. Sampled ones are seeded: the same seed must give the
# same tokens wherever the tokens are produced (decode, in e-p-d).
HONOURED_CASES: dict[str, dict[str, Any]] = {
    "temperature+seed": {"temperature": 0.9, "seed": 7},
    "top_p": {"temperature": 0.9, "top_p": 0.5, "seed": 3},
    "top_k": {"temperature": 0.9, "top_k": 5, "seed": 3},
    "min_p": {"temperature": 0.9, "min_p": 0.2, "seed": 3},
    "presence_penalty": {"presence_penalty": 1.5},
    "frequency_penalty": {"frequency_penalty": 1.5},
    "repetition_penalty": {"repetition_penalty": 1.3},
    "logit_bias": {"logit_bias": {"100": 30.0, "101": -100.0}},
    "allowed_token_ids": {"allowed_token_ids": [5, 17, 100, 250]},
    "ignore_eos+min_tokens": {"ignore_eos": True, "min_tokens": 10},
    "max_completion_tokens": {"max_completion_tokens": 5},
    "skip_special_tokens": {"skip_special_tokens": False, "spaces_between_special_tokens": False},
    "n=1": {"n": 1},
    # structured outputs (vLLM's xgrammar backend, on CPU): decode applies the grammar from its first token on
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            },
        },
        "max_tokens": 24,
    },
    "choice": {"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    "regex": {"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}},
}


def body(case: str, extra: dict[str, Any], stream: bool) -> dict[str, Any]:
    out = {"model": MODEL_NAME, "temperature": 0, **CASES[case], **extra, "stream": stream}
    if "max_completion_tokens" in extra:
        out.pop("max_tokens", None)
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def answer(endpoint: str, request: dict[str, Any], path: str = "/v1/chat/completions") -> dict[str, Any]:
    """What a client sees: text, finish_reason and usage, whether streamed or not (chat or text completions)."""
    logprobs: list[dict[str, Any]] = []
    if not request["stream"]:
        r = httpx.post(f"{endpoint}{path}", json=request, timeout=180)
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        text, finish = choice["message"]["content"] if "message" in choice else choice["text"], choice["finish_reason"]
        logprobs = (choice.get("logprobs") or {}).get("content") or []
    else:
        text, finish, usage = "", None, None
        with httpx.stream("POST", f"{endpoint}{path}", json=request, timeout=180) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    text += (choice["delta"].get("content") if "delta" in choice else choice.get("text")) or ""
                    finish = choice.get("finish_reason") or finish
                    logprobs += (choice.get("logprobs") or {}).get("content") or []
                usage = chunk.get("usage") or usage
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    out = {"text": text, "finish_reason": finish, "usage": {k: (usage or {}).get(k) for k in counts}}
    return {**out, "logprobs": logprobs} if request.get("logprobs") else out


def rounded(answer: dict[str, Any]) -> dict[str, Any]:
    """Logprobs to 3 decimals: decode computes the first token's logits from pulled KV, in another kernel shape
    than a prefill, so the last bits can differ; tokens, bytes and the order of the top ones may not."""

    def entry(e: dict[str, Any]) -> dict[str, Any]:
        return {**e, "logprob": round(e["logprob"], 3), "top_logprobs": [entry(t) for t in e.get("top_logprobs", [])]}

    return {**answer, "logprobs": [entry(e) for e in answer.get("logprobs", [])]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("field", HONOURED_CASES)
def test_an_honoured_field_answers_as_vllms_server_does(endpoints, vllm_server, field, stream):
    theirs = answer(vllm_server, body("one-image", HONOURED_CASES[field], stream))
    if field == "choice":  # the constraint is real: random weights would say anything else
        assert theirs["text"] in ("yes", "no", "maybe"), theirs
    if field == "regex":
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", theirs["text"]), theirs
    for topology in TOPOLOGIES:
        assert answer(endpoints[topology], body("one-image", HONOURED_CASES[field], stream)) == theirs, topology


def test_stops_and_bad_words_answer_as_vllms_server_does(endpoints, vllm_server, reference):
    """Stops taken from the greedy answer itself, so they do fire: a stop token id, a stop string (kept in the
    output or not); and a bad word from it."""
    greedy = answer(vllm_server, body("one-image", {}, False))["text"]
    cases = [
        {"stop_token_ids": [reference["one-image"][4]]},
        {"stop": [greedy[6:9]]},
        {"stop": [greedy[6:9]], "include_stop_str_in_output": True},
        {"bad_words": [greedy.split()[0]]},
    ]
    for extra in cases:
        theirs = answer(vllm_server, body("one-image", extra, False))
        assert theirs["finish_reason"] == "stop" or "bad_words" in extra, (extra, theirs)
        for topology in TOPOLOGIES:
            assert answer(endpoints[topology], body("one-image", extra, False)) == theirs, (topology, extra)


@pytest.mark.parametrize("sample", ["exif-rotated-jpeg", "rgba-png"])
def test_an_image_gives_the_answer_vllms_server_gives(endpoints, vllm_server, sample):
    """The pixels are vLLM's loader's (EXIF orientation, transparency on white) in every topology: the encoder
    decodes for e-pd and e-p-d, pd for agg."""
    mime = "image/jpeg" if sample.endswith("jpeg") else "image/png"
    request = {**body("one-image", {}, False), "messages": user(data_url(SAMPLES[sample](), mime), "describe it")}
    theirs = answer(vllm_server, request)
    for topology in TOPOLOGIES:
        assert answer(endpoints[topology], request) == theirs, topology


def test_max_tokens_left_out_is_what_the_context_leaves(endpoints, vllm_server):
    """As vLLM's server: no max_tokens means up to the end of the context (it was 16 here)."""
    request = {"model": MODEL_NAME, "temperature": 0, "messages": CASES["text-only"]["messages"], "ignore_eos": True}
    theirs = answer(vllm_server, {**request, "stream": False})
    assert theirs["finish_reason"] == "length" and theirs["usage"]["total_tokens"] == 1024, theirs
    assert answer(endpoints["e-p-d"], {**request, "stream": False}) == theirs


REFUSED_CASES: dict[str, Any] = {
    "top_logprobs": 2,  # without logprobs: vLLM's own check refuses it, naming it
    "prompt_logprobs": 1,
    "echo": True,
    "use_beam_search": True,
    "chat_template": "{{ messages }}",
    "priority": 3,
    "n": 2,
}


@pytest.mark.parametrize("field", REFUSED_CASES)
def test_a_field_not_honoured_yet_is_a_400_naming_it(endpoints, field):
    request = body("text-only", {field: REFUSED_CASES[field]}, False)
    r = httpx.post(f"{endpoints['e-p-d']}/v1/chat/completions", json=request, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field or field in error["message"], error


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "noop"}},
]
# A conversation that went through a tool call: the assistant's call (arguments as a JSON string, as OpenAI's
# clients send them) and the tool's answer (as text parts).
TOOL_HISTORY = [
    *CASES["one-image"]["messages"],
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny, 21 C"}]},
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tools_answer_as_vllms_server_does(endpoints, vllm_server, stream):
    """tool_choice "none": the tools and the tool-call history go through the chat template as in vLLM's server,
    and the answer is text."""
    request = {**body("one-image", {"tools": TOOLS, "tool_choice": "none"}, stream), "messages": TOOL_HISTORY}
    theirs = answer(vllm_server, request)
    plain = answer(vllm_server, body("one-image", {}, stream))
    assert theirs["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"], "the history is in the prompt"
    for topology in TOPOLOGIES:
        assert answer(endpoints[topology], request) == theirs, topology


@pytest.mark.parametrize(
    "tool_choice",
    [None, "auto", "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["default", "auto", "required", "named"],
)
def test_a_tool_choice_that_needs_a_tool_parser_is_a_400_as_in_vllms_server(endpoints, vllm_server, tool_choice):
    """Without a tool-call parser (vLLM's server started as the graph's engine is), only tool_choice "none" can be
    answered; vLLM's server refuses the rest, and so does mmgraph, naming the field."""
    request = body("text-only", {"tools": TOOLS} | ({"tool_choice": tool_choice} if tool_choice else {}), False)
    assert httpx.post(f"{vllm_server}/v1/chat/completions", json=request, timeout=60).status_code == 400
    for topology in TOPOLOGIES:
        r = httpx.post(f"{endpoints[topology]}/v1/chat/completions", json=request, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", (topology, r.text)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "extra",
    [
        {"logprobs": True},
        {"logprobs": True, "top_logprobs": 3},
        {"logprobs": True, "top_logprobs": 5, "temperature": 0.8, "seed": 11},
    ],
    ids=["chosen", "top-3", "sampled-top-5"],
)
def test_logprobs_answer_as_vllms_server_does(endpoints, vllm_server, extra, stream):
    theirs = rounded(answer(vllm_server, body("one-image", extra, stream)))
    assert len(theirs["logprobs"]) == theirs["usage"]["completion_tokens"], theirs
    assert all(len(e["top_logprobs"]) == extra.get("top_logprobs", 0) for e in theirs["logprobs"]), theirs
    for topology in TOPOLOGIES:
        assert rounded(answer(endpoints[topology], body("one-image", extra, stream))) == theirs, topology


TOKENIZER_CALLS = [
    ("/tokenize", {"model": MODEL_NAME, "prompt": "hello world, what color is the sky"}),
    ("/tokenize", {"prompt": "hello <|im_start|> there", "add_special_tokens": False, "return_token_strs": True}),
    ("/tokenize", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi there"}]}),
    (
        "/tokenize",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "add_generation_prompt": False,
            "return_token_strs": True,
        },
    ),
    ("/tokenize", {"messages": [{"role": "user", "content": "weather?"}, *TOOL_HISTORY[-2:]], "tools": TOOLS}),
    ("/detokenize", {"model": MODEL_NAME, "tokens": [100, 200, 300, 151644]}),
]


@pytest.mark.parametrize(("path", "request_body"), TOKENIZER_CALLS)
def test_tokenize_and_detokenize_answer_as_vllms_server_does(endpoints, vllm_server, path, request_body):
    theirs = httpx.post(f"{vllm_server}{path}", json=request_body, timeout=30)
    ours = httpx.post(f"{endpoints['e-p-d']}{path}", json=request_body, timeout=30)
    assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
    assert ours.json() == theirs.json()


def test_tokenize_refuses_what_it_cannot_count(endpoints, vllm_server):
    """A model that is not served is a 404, as in vLLM's server; images are a 400 here (vLLM's server counts the
    engine's expanded image tokens, which only the engine knows)."""
    wrong = {"model": "gpt-9", "prompt": "hi"}
    assert httpx.post(f"{endpoints['e-p-d']}/tokenize", json=wrong, timeout=30).status_code == 404
    assert httpx.post(f"{vllm_server}/tokenize", json=wrong, timeout=30).status_code == 404
    images = {"messages": CASES["one-image"]["messages"]}
    r = httpx.post(f"{endpoints['e-p-d']}/tokenize", json=images, timeout=30)
    assert r.status_code == 400 and "leave the media parts out" in r.json()["error"]["message"]


TEXT_CASES: dict[str, dict[str, Any]] = {
    "greedy": {"prompt": "The sky is blue and", "max_tokens": 12, "temperature": 0},
    "token-ids": {"prompt": [100, 200, 300, 400], "max_tokens": 8, "temperature": 0},
    "default-max-tokens": {"prompt": "hello there", "temperature": 0},  # 16, as the legacy API says
    "seeded": {"prompt": "Once upon", "temperature": 0.9, "seed": 5, "max_tokens": 10},
    "penalties+stop-ids": {
        "prompt": "a b a b a b",
        "repetition_penalty": 1.4,
        "stop_token_ids": [13],
        "max_tokens": 12,
        "temperature": 0,
    },
    "json": {"prompt": "data:", "response_format": {"type": "json_object"}, "max_tokens": 10, "temperature": 0},
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_completions_answer_as_vllms_server_does(endpoints, vllm_server, case, stream):
    request = {"model": MODEL_NAME, **TEXT_CASES[case], "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    theirs = answer(vllm_server, request, "/v1/completions")
    for topology in TOPOLOGIES:
        assert answer(endpoints[topology], request, "/v1/completions") == theirs, topology


def test_a_text_prompt_the_model_cannot_read_is_a_400_as_in_vllms_server(endpoints, vllm_server):
    request = {"model": MODEL_NAME, "prompt": [1, 10**6], "max_tokens": 2}
    assert httpx.post(f"{vllm_server}/v1/completions", json=request, timeout=30).status_code == 400
    for topology in TOPOLOGIES:
        r = httpx.post(f"{endpoints[topology]}/v1/completions", json=request, timeout=30)
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"], (topology, r.text)


def choices(endpoint: str, request: dict[str, Any], path: str = "/v1/chat/completions") -> dict[str, Any]:
    """Every choice's text and finish_reason, by index, and the usage: streamed or not."""
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    if not request["stream"]:
        r = httpx.post(f"{endpoint}{path}", json=request, timeout=180)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            texts[c["index"]] = c["message"]["content"] if "message" in c else c["text"]
            finishes[c["index"]] = c["finish_reason"]
        usage = r.json()["usage"]
    else:
        usage = None
        with httpx.stream("POST", f"{endpoint}{path}", json=request, timeout=180) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or []:
                        piece = c["delta"].get("content") if "delta" in c else c.get("text")
                        texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
                        finishes[c["index"]] = c.get("finish_reason") or finishes.get(c["index"])
                    usage = chunk.get("usage") or usage
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {"texts": texts, "finishes": finishes, "usage": {k: (usage or {}).get(k) for k in counts}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n_choices_answer_as_vllms_server_does_where_the_topology_allows(endpoints, vllm_server, path, stream):
    """n = 3, sampled with a seed: the same three answers and the usage of all three as vLLM's server, in agg and
    e-pd; e-p-d refuses it by name (each choice would pull pd's KV cache for itself)."""
    prompt = {"messages": CASES["one-image"]["messages"]} if path.endswith("chat/completions") else {"prompt": "Hi"}
    request = {"model": MODEL_NAME, **prompt, "n": 3, "temperature": 0.9, "seed": 4, "max_tokens": 8, "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    theirs = choices(vllm_server, request, path)
    assert sorted(theirs["texts"]) == [0, 1, 2] and len(set(theirs["texts"].values())) > 1, theirs
    for topology in ("agg", "e-pd"):
        assert choices(endpoints[topology], request, path) == theirs, topology
    r = httpx.post(f"{endpoints['e-p-d']}{path}", json=request, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def token_ids(endpoint: str, request: dict[str, Any], path: str) -> dict[str, Any]:
    """return_token_ids as a client reads it: the prompt's ids, and each choice's, streamed or not."""
    prompt, per_choice = None, {}
    if not request["stream"]:
        body = httpx.post(f"{endpoint}{path}", json=request, timeout=180).json()
        prompt = body.get("prompt_token_ids")
        for c in body["choices"]:
            per_choice[c["index"]] = c["token_ids"]
            prompt = c.get("prompt_token_ids", prompt)
    else:
        with httpx.stream("POST", f"{endpoint}{path}", json=request, timeout=180) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    prompt = chunk.get("prompt_token_ids") or prompt
                    for c in chunk.get("choices") or []:
                        prompt = c.get("prompt_token_ids") or prompt
                        per_choice[c["index"]] = per_choice.get(c["index"], []) + (c.get("token_ids") or [])
    return {"prompt": prompt, "choices": per_choice}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_return_token_ids_answers_as_vllms_server_does(endpoints, vllm_server, path, stream):
    prompt = {"messages": CASES["one-image"]["messages"]} if path.endswith("chat/completions") else {"prompt": "Hi"}
    request = {"model": MODEL_NAME, **prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
    request["return_token_ids"] = True
    theirs = token_ids(vllm_server, request, path)
    assert theirs["prompt"] and len(theirs["choices"][0]) == 6, theirs
    for topology in TOPOLOGIES:
        assert token_ids(endpoints[topology], request, path) == theirs, topology


@pytest.mark.parametrize(
    ("path", "request_body", "status"),
    [
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "tools": None, "max_tokens": 2}, 200),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "add_special_tokens": False, "max_tokens": 2}, 200),
        (
            "/v1/chat/completions",
            {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "parallel_tool_calls": False,
                "max_tokens": 2,
            },
            200,
        ),
        ("/tokenize", None, 400),
        ("/tokenize", 1, 400),
        ("/tokenize", [{}], 400),
        ("/detokenize", {"tokens": [4294967296]}, 400),
        ("/detokenize", {"tokens": [200000]}, None),
        (
            "/v1/chat/completions",
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi", "tool_calls": 5}]},
            400,
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "structured_outputs": "x"},
            400,
        ),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "structured_outputs": "x"}, 400),
        *(
            (
                "/v1/chat/completions",
                {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}],
                    "max_tokens": 2,
                },
                None,
            )
            for call in (
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}},
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
                {"id": "1", "type": "code", "function": {"name": "f"}},
                {"id": "1", "function": "f"},
            )
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL_NAME,
                "messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                "max_tokens": 2,
            },
            None,
        ),
    ],
)
def test_odd_requests_get_what_vllms_server_gives_never_a_500(endpoints, vllm_server, path, request_body, status):
    """Found by a review: fields another request model lacks, bodies that are not objects, vLLM validators that
    fail with TypeError, ids past the vocabulary. `None`: whatever vLLM's server answers (a template's refusal)."""
    if status is None:
        status = httpx.post(f"{vllm_server}{path}", json=request_body, timeout=60).status_code
    r = httpx.post(f"{endpoints['e-pd']}{path}", json=request_body, timeout=60)
    assert r.status_code == status, r.text
