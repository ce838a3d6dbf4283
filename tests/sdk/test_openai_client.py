"""The official `OpenAI` client against the gateway, with the mock upstream behind it: every
endpoint works as it did upstream, the upstream sees its own key and model name, and the
client's key never leaves the gateway."""

import base64
import json
import time

import pytest

from conftest import (
    ADMIN_KEY,
    httpx,
    KEY_A,
    MOCK_TEXT,
    ROUTES,
    TOOL_ARGUMENTS,
    UPSTREAM_KEY_OPENAI,
    prompt_tokens_for,
    speech_bytes,
)

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]


def assert_no_client_key(requests):
    for r in requests:
        for k, v in r.headers:
            assert KEY_A not in v, f"client key reached the upstream in header {k}"
        assert KEY_A.encode() not in r.body, "client key reached the upstream in the body"


def assert_openai_upstream(req, path):
    assert req.method == "POST"
    assert req.path == path
    assert req.header("authorization") == f"Bearer {UPSTREAM_KEY_OPENAI}"
    assert req.header("api-key") is None


def test_chat_plain(capturing_client, mock_upstream):
    client, sent = capturing_client
    r = client.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=0.5, max_tokens=20, user="u-1")
    assert r.choices[0].message.content == MOCK_TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == prompt_tokens_for(len(HELLO[0]["content"]))
    assert r.usage.completion_tokens == 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4

    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/chat/completions")
    upstream_body = req.json()
    assert upstream_body["model"] == "gpt-4o-upstream"
    client_body = sent.last_json()
    assert client_body["model"] == "gpt-4o"
    del upstream_body["model"], client_body["model"]
    assert upstream_body == client_body, "every field but model reaches the upstream unchanged"
    assert_no_client_key([req])


def test_chat_body_bytes_unchanged_but_model(capturing_client, mock_upstream):
    """Stricter than test_chat_plain: the gateway changes only the model's value, so the
    upstream gets the SDK's exact bytes otherwise (field order, spacing, unicode escapes)."""
    client, sent = capturing_client
    client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": "Be brief — très brief ✓"}, *HELLO],
        top_p=0.9,
        seed=7,
        metadata={"z": "1", "a": "2"},
    )
    sent_bytes = sent.requests[-1].content
    assert sent_bytes.count(b'"model":"gpt-4o"') == 1
    expected = sent_bytes.replace(b'"model":"gpt-4o"', b'"model":"gpt-4o-upstream"')
    assert mock_upstream.only_request().body == expected


def test_response_headers_say_what_served(client):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.headers.get("x-switchyard-route") == "gpt-4o"
    assert raw.headers.get("x-switchyard-deployment")
    assert raw.headers.get("x-request-id")
    assert raw.parse().choices[0].message.content == MOCK_TEXT


def test_chat_stream(client, mock_upstream):
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MOCK_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The client did not ask for usage: if the gateway asked the upstream for it, it drops
    # the extra chunk again.
    assert all(c.choices for c in chunks), "no choices:[] usage chunk without include_usage"
    assert all(c.usage is None for c in chunks)
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/chat/completions")
    assert req.json()["stream"] is True
    assert req.json()["model"] == "gpt-4o-upstream"
    assert_no_client_key([req])


def test_stream_asks_upstream_for_usage(client, mock_upstream):
    """PRODUCT (Usage): usage comes from the last chunk of a stream, so the gateway asks the
    upstream for `stream_options.include_usage` even when the client did not."""
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert all(c.usage is None for c in chunks)
    body = mock_upstream.only_request().json()
    assert body.get("stream_options", {}).get("include_usage") is True, body


def test_chat_stream_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MOCK_TEXT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == prompt_tokens_for(len(HELLO[0]["content"]))
    assert last.usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def test_tools(client, mock_upstream):
    r = client.chat.completions.create(model="gpt-4o", messages=HELLO, tools=TOOLS, tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
    assert mock_upstream.only_request().json()["tools"] == TOOLS


def test_tools_stream(client):
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, tools=TOOLS, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == TOOL_ARGUMENTS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


# A 2x2 PNG, as a data URL.
PNG_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAYAAABytg0kAAAAFUlEQVR42mP8z8BQz0AEYBxVSF+FAP5FDvcfRYWgAAAAAElFTkSuQmCC"
)


def test_image_input_reaches_upstream_untouched(client, mock_upstream):
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL, "detail": "low"}},
    ]
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content == MOCK_TEXT
    assert mock_upstream.only_request().json()["messages"] == [{"role": "user", "content": content}]


def test_completions(client, mock_upstream):
    r = client.completions.create(model="gpt-4o", prompt="Once upon a time", max_tokens=5)
    assert r.object == "text_completion"
    assert r.choices[0].text == MOCK_TEXT
    assert r.usage.completion_tokens == 4
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/completions")
    assert req.json()["model"] == "gpt-4o-upstream"


def test_completions_stream(client):
    chunks = list(client.completions.create(model="gpt-4o", prompt="Once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == MOCK_TEXT


def test_embeddings_float_and_sdk_default_base64(capturing_client, mock_upstream):
    client, sent = capturing_client
    floats = client.embeddings.create(model="text-embedding-3-small", input="hello world", encoding_format="float")
    default = client.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert sent.last_json()["encoding_format"] == "base64", "the SDK asks for base64 by default"
    assert len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding == default.data[0].embedding
    assert floats.usage.prompt_tokens == prompt_tokens_for(len("hello world"))
    reqs = mock_upstream.requests()
    assert len(reqs) == 2
    for req in reqs:
        assert_openai_upstream(req, "/v1/embeddings")
        assert req.json()["model"] == "emb-upstream"
    assert_no_client_key(reqs)


def test_embeddings_batch_and_dimensions(client):
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"], dimensions=4)
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 4 for d in r.data)
    assert r.data[0].embedding != r.data[1].embedding


def test_images_generate(client, mock_upstream):
    r = client.images.generate(model="dall-e-3", prompt="a lighthouse", size="1024x1024", response_format="b64_json")
    png = base64.b64decode(r.data[0].b64_json)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert r.data[0].revised_prompt == "a lighthouse"
    req = mock_upstream.only_request()
    assert req.path == "/openai/deployments/dalle-dep/images/generations"
    assert req.header("api-key") == "upstream-secret-azure"


def spent_on(gateway, model, than=None):
    """The ledger's spend on `model` (0 when none); with `than`, once it differs from it
    (the ledger writes within 250 ms)."""
    cost = 0.0
    for _ in range(40):
        spend = httpx.get(
            f"{gateway.url}/admin/spend?by=model", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        ).json()
        cost = next((row["cost_usd"] for row in spend["rows"] if row["name"] == model), 0.0)
        if than is None or cost != than:
            break
        time.sleep(0.05)
    return cost


def test_gpt_image_usage_and_its_price(client, gateway, mock_upstream):
    """A GPT Image answer carries its tokens (the SDK reads them), and the ledger prices them:
    5 USD per 1M input, 40 per 1M output, nothing per image on top."""
    before = spent_on(gateway, "gpt-image-1")
    r = client.images.generate(model="gpt-image-1", prompt="a fox", quality="low", size="1024x1024")
    assert base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (2, 272)
    assert_openai_upstream(mock_upstream.only_request(), "/v1/images/generations")
    cost = spent_on(gateway, "gpt-image-1", before) - before
    assert cost == pytest.approx(2 * 5e-6 + 272 * 40e-6, abs=1e-12)


def test_gpt_image_edit_and_its_price(client, gateway, mock_upstream):
    """`images.edit` uploads the image as a form: the gateway routes it by its `model` field,
    sends the image upstream untouched, and prices the edit by its tokens, the uploaded
    image's at 10 USD per 1M (the mock bills 323 per image)."""
    before = spent_on(gateway, "gpt-image-1")
    png = b"\x89PNG\r\n\x1a\n-an-image-to-edit-"
    r = client.images.edit(
        model="gpt-image-1", image=("fox.png", png, "image/png"), prompt="a fox", quality="low", size="1024x1024"
    )
    assert base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (2 + 323, 272)
    assert r.usage.input_tokens_details.image_tokens == 323
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/images/edits")
    assert png in req.body
    cost = spent_on(gateway, "gpt-image-1", before) - before
    assert cost == pytest.approx(2 * 5e-6 + 323 * 10e-6 + 272 * 40e-6, abs=1e-12)


AUDIO = b"RIFF" + bytes(range(256)) * 8  # not real audio; the upstream only counts bytes


def test_audio_transcription(client, mock_upstream):
    r = client.audio.transcriptions.create(model="whisper", file=("speech.wav", AUDIO, "audio/wav"))
    assert r.text == f"mock transcript of {len(AUDIO)} bytes"
    req = mock_upstream.only_request()
    assert req.path == "/openai/deployments/whisper-dep/audio/transcriptions"
    assert req.query == "api-version=2024-10-21"
    assert req.header("content-type").startswith("multipart/form-data; boundary=")
    assert AUDIO in req.body, "the file reaches the upstream byte for byte"
    assert req.header("api-key") == "upstream-secret-azure"
    assert_no_client_key([req])


def test_audio_transcription_text_format(client):
    r = client.audio.transcriptions.create(model="whisper", file=("speech.wav", AUDIO), response_format="text")
    assert isinstance(r, str)
    assert r.strip() == f"mock transcript of {len(AUDIO)} bytes"


def test_audio_translation(client, mock_upstream):
    r = client.audio.translations.create(model="whisper", file=("speech.wav", AUDIO))
    assert r.text == f"mock translation of {len(AUDIO)} bytes"
    assert mock_upstream.only_request().path == "/openai/deployments/whisper-dep/audio/translations"
    r = client.audio.translations.create(model="whisper", file=("speech.wav", AUDIO), response_format="text")
    assert isinstance(r, str) and r.strip() == f"mock translation of {len(AUDIO)} bytes"


def test_audio_speech(client, mock_upstream):
    r = client.audio.speech.create(model="tts", voice="alloy", input="Hello there")
    assert r.content == speech_bytes()
    assert r.response.headers["content-type"] == "audio/mpeg"
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/audio/speech")
    assert req.json()["model"] == "tts-1"


def test_moderations(client, mock_upstream):
    r = client.moderations.create(model="omni-moderation-latest", input="I love puppies")
    assert r.results[0].flagged is False
    assert r.results[0].categories.self_harm_intent is False
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/moderations")


def test_moderations_without_model_go_to_openais_default(client, mock_upstream):
    # The SDK makes `model` optional; OpenAI then uses omni-moderation-latest, and so does the
    # gateway: the route of that name (it refused the request with a 400).
    r = client.moderations.create(input="I love puppies")
    assert r.results[0].flagged is False
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/moderations")
    assert req.json()["model"] == "omni-moderation-latest"


def test_responses(client, mock_upstream):
    r = client.responses.create(model="gpt-4o", input="Say hello")
    assert r.output_text == MOCK_TEXT
    assert r.usage.input_tokens == prompt_tokens_for(len("Say hello"))
    assert r.usage.output_tokens == 4
    req = mock_upstream.only_request()
    assert_openai_upstream(req, "/v1/responses")
    assert req.json()["model"] == "gpt-4o-upstream"


def test_responses_stream(client):
    events = list(client.responses.create(model="gpt-4o", input="Say hello", stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    seq = [e.sequence_number for e in events]
    assert seq == sorted(seq) and len(set(seq)) == len(seq)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == MOCK_TEXT
    assert events[-1].response.usage.output_tokens == 4


def test_models_list_shows_the_gateways_routes(client, mock_upstream):
    ids = [m.id for m in client.models.list()]
    assert set(ROUTES) <= set(ids), ids
    assert "upstream-model" not in ids
    assert mock_upstream.requests() == []


def test_models_retrieve(client):
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"


def test_demo_route_chat(client, mock_upstream):
    r = client.chat.completions.create(model="demo", messages=HELLO)
    assert r.choices[0].message.content
    assert r.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert mock_upstream.requests() == [], "the built-in mock provider needs no upstream"


def test_demo_route_stream_include_usage(client):
    chunks = list(
        client.chat.completions.create(model="demo", messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize("header", ["authorization", "api-key"])
def test_both_key_headers_are_accepted(gateway, header):
    
    value = f"Bearer {KEY_A}" if header == "authorization" else KEY_A
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={header: value},
        json={"model": "demo", "messages": HELLO},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_responses_stream_helper_on_an_upstream_and_on_the_mock(client):
    # The SDK's helper checks the event sequence (an item and its part open before any text).
    for model in ["gpt-4o", "demo"]:
        with client.responses.stream(model=model, input="Say hello") as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
        assert text, model
        assert final.output_text == text, model
        assert final.usage.output_tokens > 0, model


def test_the_mock_answers_n_choices_plain_and_streamed(client):
    one = client.chat.completions.create(model="demo", messages=HELLO)
    three = client.chat.completions.create(model="demo", messages=HELLO, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content == one.choices[0].message.content for c in three.choices)
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    texts = {}
    for chunk in client.chat.completions.create(model="demo", messages=HELLO, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {0: one.choices[0].message.content, 1: one.choices[0].message.content}


def test_structured_outputs_parse_on_the_mock(client):
    from typing import List, Literal, Optional

    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        population: int

    class Trip(BaseModel):
        name: str
        kind: Literal["train", "plane"]
        stops: List[Place]
        budget: Optional[float]

    r = client.chat.completions.parse(model="demo", messages=HELLO, response_format=Trip)
    trip = r.choices[0].message.parsed
    assert trip == Trip(name="mock", kind="train", stops=[Place(city="mock", population=0)], budget=0)
    r = client.responses.parse(model="demo", input="Plan a trip", text_format=Trip)
    assert r.output_parsed == trip
    r = client.chat.completions.create(model="demo", messages=HELLO, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content)["reply"]
    with client.chat.completions.stream(model="demo", messages=HELLO, response_format=Trip) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == trip
