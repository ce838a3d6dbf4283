"""Streams from awkward upstreams (wire-formats §6) reach the SDK intact, and a client that
goes away cancels the upstream request."""

import base64
import json
import time

import openai
import pytest
from openai import OpenAI

from conftest import KEY_A, httpx

HELLO = [{"role": "user", "content": "hi"}]


def chunk(content=None, finish=None, role=None):
    """One chat.completion.chunk SSE line (without the blank line that ends the event)."""
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return "data: " + json.dumps(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def stream_text(client, **kw):
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def b64(data: bytes) -> dict:
    return {"base64": base64.b64encode(data).decode()}


def test_split_writes_crlf_comments_and_eof_without_done(client, mock_upstream):
    """One event split across writes (inside its JSON and inside a two-byte UTF-8 character),
    several events in one write, CRLF line ends, `data:` without a space, a comment line, and
    EOF with no [DONE]: the SDK still gets every delta (wire-formats §6 #1-5, #19)."""
    first = chunk("Hé", role="assistant").encode() + b"\r\n\r\n"
    cut = first.index("é".encode()) + 1  # between the two bytes of "é"
    mock_upstream.script(
        {
            "stream": {
                "chunks": [
                    [0, b64(b": keep-alive\r\n\r\n")],
                    [0, b64(first[:cut])],
                    [30, b64(first[cut:-2])],
                    [30, b64(b"\r\n")],
                    [0, b64((chunk("llo") + "\n\n" + chunk(" world") + "\n\n").encode())],
                    [10, b64(("data:" + chunk(finish="stop")[len("data: "):] + "\n\n").encode())],
                ],
                "end": "finish",
            }
        }
    )
    text, chunks = stream_text(client)
    assert text == "Héllo world"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_mid_stream_abort_is_an_error_not_a_clean_end(client, mock_upstream):
    mock_upstream.script(
        {
            "stream": {
                "chunks": [[0, chunk("", role="assistant") + "\n\n"], [10, chunk("partial") + "\n\n"]],
                "end": "abort",
            }
        }
    )
    got = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for c in client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True):
            got.extend(c.choices)
    assert "partial" in "".join(ch.delta.content or "" for ch in got)


def test_mid_stream_error_event_raises_api_error(client, mock_upstream):
    err = '{"error":{"message":"engine died","type":"InternalServerError","param":null,"code":500}}'
    mock_upstream.script(
        {"stream": {"chunks": [[0, chunk("Hi", role="assistant") + "\n\n"], [10, f"data: {err}\n\n"]], "end": "finish"}}
    )
    with pytest.raises(openai.APIError) as ei:
        list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "engine died" in str(ei.value)
    assert len(mock_upstream.requests()) == 1, "a stream that has started is never retried"


def test_azure_filter_chunks_pass_through(client, mock_upstream):
    annotations = (
        'data: {"id":"","object":"","created":0,"model":"","choices":[],'
        '"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
    )
    mock_upstream.script(
        {
            "stream": {
                "chunks": [
                    [0, annotations],
                    [5, chunk("Hello", role="assistant") + "\n\n"],
                    [5, chunk(finish="content_filter") + "\n\n"],
                    [0, "data: [DONE]\n\n"],
                ],
                "end": "finish",
            }
        }
    )
    text, chunks = stream_text(client)
    assert text == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"


def wait_in_flight(mock_upstream, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mock_upstream.in_flight() == n:
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_cancels_upstream_request(gateway, mock_upstream):
    mock_upstream.script({"hang": None})
    with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_A, max_retries=0, timeout=0.5) as c:
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert wait_in_flight(mock_upstream, 0), "the gateway kept the upstream request open after the client left"


def test_client_closing_a_stream_cancels_upstream_stream(gateway, mock_upstream):
    mock_upstream.script(
        {
            "stream": {
                "chunks": [[0, chunk("", role="assistant") + "\n\n"], [0, chunk("one") + "\n\n"], [30000, "data: [DONE]\n\n"]],
                "end": "finish",
            }
        }
    )
    with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_A, max_retries=0, timeout=30) as c:
        stream = c.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        next(iter(stream))
        assert mock_upstream.in_flight() == 1
        stream.close()
    assert wait_in_flight(mock_upstream, 0), "the gateway kept reading the upstream stream after the client left"


def test_a_stream_the_sdk_closes_at_done_is_cached(client, mock_upstream):
    """The SDK closes the response at `[DONE]`; an upstream whose body ends a second later has
    still sent a whole stream: it is stored, and the next identical request is a hit."""
    usage = "data: " + json.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        separators=(",", ":"),
    )
    events = [chunk("", role="assistant"), chunk("Kept"), chunk(finish="stop"), usage, "data: [DONE]"]
    mock_upstream.script(
        {
            "stream": {
                "chunks": [[0, e + "\n\n"] for e in events] + [[1000, ": the body ends later\n\n"]],
                "end": "finish",
            }
        }
    )
    ask = {"model": "gpt-4o-cached", "messages": [{"role": "user", "content": "keep me"}], "stream": True}
    seen = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ask)
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        seen.append((raw.headers.get("x-switchyard-cache"), text))
    assert seen == [("miss", "Kept"), ("hit", "Kept")]
    assert len(mock_upstream.requests()) == 1
