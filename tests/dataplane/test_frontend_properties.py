"""Property-based: no request body a client can send makes the frontend answer 5xx or hang.

Hypothesis builds bodies around the chat API's shape (so they get past JSON parsing and reach the checks behind
it) and plain garbage, and sends each to the session graph's e-p-d frontend. The only URLs it can produce are
data: URLs and loopback ones (free text has no ':' or '/'), so nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import json

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .conftest import MODEL_NAME, png

TEXT = st.text(alphabet=st.characters(blacklist_characters=":/", blacklist_categories=("Cs",)), max_size=40)
SMALL_PNG = base64.b64encode(png(32, 32, 1)).decode()
URLS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            f"data:image/png;base64,{SMALL_PNG}",  # a real image: the request may succeed
            f"data:image/png;base64,{SMALL_PNG[:50]}",  # truncated
            "data:image/png;base64,!!!",
            "data:,",
            "data:text/plain,hello",
            "http://127.0.0.1:9/x.png",  # loopback, nothing listens (and private addresses are refused)
            "file:///etc/passwd",
            "ftp://127.0.0.1/x",
        ]
    ),
    st.binary(max_size=64).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": URLS}),
    st.fixed_dictionaries({"type": TEXT}),
    ANY_JSON,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot"]),
        "content": st.one_of(TEXT, st.lists(PART, max_size=3), ANY_JSON),
    }
)
BODY = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL_NAME), TEXT), "messages": st.one_of(st.lists(MESSAGE, max_size=3), ANY_JSON)},
    optional={
        "max_tokens": st.one_of(st.integers(-5, 5), st.integers(), JSON_SCALARS),
        "max_completion_tokens": st.one_of(st.integers(-2, 4), JSON_SCALARS),
        "temperature": st.one_of(st.floats(-1, 3), JSON_SCALARS),
        "top_p": st.one_of(st.floats(-1, 2), JSON_SCALARS),
        "seed": st.one_of(st.integers(), JSON_SCALARS),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), JSON_SCALARS),
        "n": st.one_of(st.integers(-1, 3), JSON_SCALARS),
        "stream": st.one_of(st.booleans(), JSON_SCALARS),
        "stream_options": ANY_JSON,
        "return_token_ids": st.one_of(st.booleans(), JSON_SCALARS),
        "tools": ANY_JSON,
        "logprobs": st.one_of(st.booleans(), ANY_JSON),
        "top_logprobs": st.one_of(st.integers(-1, 30), JSON_SCALARS),
        "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), ANY_JSON),
        "top_k": st.one_of(st.integers(-3, 5), JSON_SCALARS),
        "min_p": st.one_of(st.floats(-1, 2), JSON_SCALARS),
        "logit_bias": st.one_of(st.dictionaries(st.integers(-5, 10**6).map(str), st.floats(-200, 200)), ANY_JSON),
        "stop_token_ids": st.one_of(st.lists(st.integers(-5, 10**6), max_size=3), ANY_JSON),
        "allowed_token_ids": st.one_of(st.lists(st.integers(-5, 10**6), max_size=3), ANY_JSON),
        "bad_words": st.one_of(st.lists(TEXT, max_size=2), ANY_JSON),
        "min_tokens": st.one_of(st.integers(-2, 20), JSON_SCALARS),
        "repetition_penalty": st.one_of(st.floats(-1, 3), JSON_SCALARS),
        "structured_outputs": ANY_JSON,  # vLLM's validators fail with TypeError on some shapes (a review found it)
        "response_format": st.one_of(st.sampled_from([{"type": "json_object"}, {"type": "text"}]), ANY_JSON),
    },
)
RAW = st.one_of(
    BODY.map(lambda body: json.dumps(body).encode()),
    ANY_JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=256),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=RAW)
@example(body=b"\x80")  # found by this test: not UTF-8, json.loads raised UnicodeDecodeError, a 500
def test_no_request_body_makes_the_frontend_fail_or_hang(endpoints, body: bytes):
    with httpx.stream(
        "POST",
        f"{endpoints['e-p-d']}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=httpx.Timeout(60),  # a hang is a ReadTimeout: the test fails
    ) as r:
        text = r.read().decode(errors="replace")
    assert r.status_code < 500, (body[:300], r.status_code, text[:500])
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in text.splitlines():  # a stream's error comes as an event after the 200
            if line.startswith("data: {") and '"error"' in line:
                assert json.loads(line[6:])["error"]["code"] < 500, (body[:300], line)
