"""Errors reach the SDK as the right exception, OpenAI-shaped, without upstream secrets."""

import openai
import pytest
from openai import AzureOpenAI, OpenAI

from conftest import API_VERSION, KEY_LIMITED, UPSTREAM_KEY_AZURE, UPSTREAM_KEY_OPENAI, httpx

HELLO = [{"role": "user", "content": "hi"}]

AZURE_CONTENT_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
        "Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": True, "severity": "high"},
                "jailbreak": {"filtered": False, "detected": False},
            },
        },
    }
}


def assert_openai_shaped(e: openai.APIStatusError, mock_upstream=None):
    body = e.response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    text = e.response.text + str(e)
    for secret in (UPSTREAM_KEY_OPENAI, UPSTREAM_KEY_AZURE, "upstream-secret"):
        assert secret not in text, "an upstream key leaked into an error"
    if mock_upstream is not None:
        assert mock_upstream.addr not in text, "the upstream's URL leaked into an error"
    return body["error"]


def test_bad_key(gateway, mock_upstream):
    with OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    assert_openai_shaped(ei.value)
    assert mock_upstream.requests() == []


def test_missing_key(gateway):
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_bad_key_azure(gateway):
    with AzureOpenAI(azure_endpoint=gateway.url, api_key="sk-wrong", api_version=API_VERSION, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            c.chat.completions.create(model="gpt-4o-azure", messages=HELLO)
    assert ei.value.code == "invalid_api_key"


def test_route_not_allowed_for_key(gateway, mock_upstream):
    with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_LIMITED, max_retries=0) as c:
        with pytest.raises(openai.PermissionDeniedError) as ei:
            c.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert ei.value.status_code == 403
        assert ei.value.code == "permission_denied"
        assert_openai_shaped(ei.value)
        # The same key may use the route it is allowed.
        assert c.chat.completions.create(model="demo", messages=HELLO).choices
    assert mock_upstream.requests() == []


def test_unknown_model(client, mock_upstream):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert ei.value.status_code == 404
    assert ei.value.code == "model_not_found"
    assert_openai_shaped(ei.value)
    assert mock_upstream.requests() == []


def test_unknown_model_azure(azure_client):
    with pytest.raises(openai.NotFoundError) as ei:
        azure_client.chat.completions.create(model="no-such-deployment", messages=HELLO)
    assert ei.value.code == "model_not_found"


def test_invalid_json_body(gateway):
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"authorization": "Bearer sk-test-a", "content-type": "application/json"},
        content=b"{not json",
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"


def test_upstream_content_filter_400(azure_client, mock_upstream):
    mock_upstream.respond(400, AZURE_CONTENT_FILTER, headers=[("apim-request-id", "abc")])
    with pytest.raises(openai.BadRequestError) as ei:
        azure_client.chat.completions.create(model="gpt-4o-azure", messages=HELLO)
    e = ei.value
    assert e.code == "content_filter"
    err = assert_openai_shaped(e, mock_upstream)
    assert "content management policy" in err["message"], "the upstream's message is kept"
    assert len(mock_upstream.requests()) == 1, "a content-filter refusal is not retried"


def test_upstream_500(client, mock_upstream):
    mock_upstream.respond(
        500, {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}}
    )
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert ei.value.status_code == 500
    err = assert_openai_shaped(ei.value, mock_upstream)
    assert "The server had an error" in err["message"]


def test_upstream_429(client, mock_upstream):
    mock_upstream.respond(
        429,
        {"error": {"message": "Rate limit reached for requests", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
        headers=[("retry-after-ms", "1")],
    )
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert ei.value.status_code == 429
    assert_openai_shaped(ei.value, mock_upstream)


def test_upstream_azure_429_string_code(azure_client, mock_upstream):
    mock_upstream.respond(
        429,
        {"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 1 second."}},
        headers=[("retry-after-ms", "1")],
    )
    with pytest.raises(openai.RateLimitError) as ei:
        azure_client.chat.completions.create(model="gpt-4o-azure", messages=HELLO)
    assert_openai_shaped(ei.value, mock_upstream)


def test_upstream_tgi_flat_error_is_normalised(client, mock_upstream):
    mock_upstream.respond(422, {"error": "Input validation error: `inputs` must have less than 4096 tokens", "error_type": "validation"})
    with pytest.raises(openai.UnprocessableEntityError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    err = assert_openai_shaped(ei.value, mock_upstream)
    assert "Input validation error" in err["message"]


def test_upstream_vllm_integer_code(client, mock_upstream):
    mock_upstream.respond(
        400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}}
    )
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    err = assert_openai_shaped(ei.value, mock_upstream)
    assert "max_tokens is too large" in err["message"]


def test_upstream_html_502(client, mock_upstream):
    mock_upstream.respond(502, "<html><body><h1>502 Bad Gateway</h1></body></html>", headers=[("content-type", "text/html")])
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert ei.value.status_code >= 500
    assert_openai_shaped(ei.value, mock_upstream)


def test_stream_status_error_before_first_byte(client, mock_upstream):
    mock_upstream.respond(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
