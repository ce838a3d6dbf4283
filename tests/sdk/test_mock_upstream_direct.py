"""The official SDK against the mock upstream directly, with no gateway: proves the mock's
default answers are shapes the SDK parses, so gateway test failures are the gateway's."""

import base64

import pytest
from openai import AzureOpenAI, OpenAI, RateLimitError

from conftest import MOCK_TEXT, prompt_tokens_for, speech_bytes


@pytest.fixture
def direct(mock_upstream):
    with OpenAI(base_url=f"{mock_upstream.url}/v1", api_key="upstream-key", max_retries=0, timeout=10) as c:
        yield c


def test_chat_and_usage(direct, mock_upstream):
    r = direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == MOCK_TEXT
    assert r.usage.prompt_tokens == prompt_tokens_for(5)
    req = mock_upstream.only_request()
    assert req.path == "/v1/chat/completions"
    assert req.header("authorization") == "Bearer upstream-key"


def test_chat_stream_with_usage(direct):
    chunks = list(
        direct.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MOCK_TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_embeddings_default_base64_and_float(direct):
    b = direct.embeddings.create(model="e", input="abc").data[0].embedding
    f = direct.embeddings.create(model="e", input="abc", encoding_format="float").data[0].embedding
    assert len(b) == 8 and b == f


def test_transcription_text(direct):
    text = direct.audio.transcriptions.create(model="w", file=("a.wav", b"x" * 10), response_format="text")
    assert isinstance(text, str) and text.strip() == "mock transcript of 10 bytes"


def test_speech_and_images(direct):
    assert direct.audio.speech.create(model="tts-1", voice="alloy", input="hi").content == speech_bytes()
    img = direct.images.generate(model="dall-e-3", prompt="cat")
    assert base64.b64decode(img.data[0].b64_json).startswith(b"\x89PNG")


def test_responses_stream(direct):
    events = list(direct.responses.create(model="m", input="hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == MOCK_TEXT
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == MOCK_TEXT


def test_scripted_429_is_a_rate_limit_error(direct, mock_upstream):
    mock_upstream.respond(429, {"error": {"message": "slow", "type": "tokens", "param": None, "code": "rate_limit_exceeded"}})
    with pytest.raises(RateLimitError):
        direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices


def test_azure_client_paths(mock_upstream):
    with AzureOpenAI(azure_endpoint=mock_upstream.url, api_key="az", api_version="2024-10-21", max_retries=0) as az:
        r = az.chat.completions.create(model="dep", messages=[{"role": "user", "content": "x"}])
    assert r.model == "dep"
    req = mock_upstream.only_request()
    assert req.path == "/openai/deployments/dep/chat/completions"
    assert req.query == "api-version=2024-10-21"
    assert req.header("api-key") == "az"
