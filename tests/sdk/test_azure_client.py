"""The official `AzureOpenAI` client against the gateway's Azure-shaped endpoints: the route
name is the "deployment" in the URL, and the gateway's own provider decides where it goes."""

from conftest import (
    API_VERSION,
    KEY_A,
    MOCK_TEXT,
    UPSTREAM_KEY_AZURE,
    UPSTREAM_KEY_OPENAI,
    prompt_tokens_for,
)

HELLO = [{"role": "user", "content": "Hello Azure"}]


def assert_azure_upstream(req, deployment, operation):
    assert req.method == "POST"
    assert req.path == f"/openai/deployments/{deployment}/{operation}"
    assert req.query == f"api-version={API_VERSION}"
    assert req.header("api-key") == UPSTREAM_KEY_AZURE
    auth = req.header("authorization")
    assert auth is None or KEY_A not in auth
    for k, v in req.headers:
        assert KEY_A not in v, f"client key reached the upstream in header {k}"


def test_chat_plain(azure_client, mock_upstream):
    r = azure_client.chat.completions.create(model="gpt-4o-azure", messages=HELLO)
    assert r.choices[0].message.content == MOCK_TEXT
    assert r.usage.prompt_tokens == prompt_tokens_for(len("Hello Azure"))
    req = mock_upstream.only_request()
    assert_azure_upstream(req, "my-azure-deployment", "chat/completions")
    assert req.json()["messages"] == HELLO


def test_chat_stream(azure_client, mock_upstream):
    chunks = list(azure_client.chat.completions.create(model="gpt-4o-azure", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MOCK_TEXT
    req = mock_upstream.only_request()
    assert_azure_upstream(req, "my-azure-deployment", "chat/completions")
    assert req.json()["stream"] is True


def test_chat_stream_include_usage(azure_client):
    chunks = list(
        azure_client.chat.completions.create(
            model="gpt-4o-azure", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_azure_client_to_an_openai_provider(azure_client, mock_upstream):
    """The client's shape and the upstream's are independent: an Azure client can use a route
    served by an OpenAI-compatible provider."""
    r = azure_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert r.choices[0].message.content == MOCK_TEXT
    req = mock_upstream.only_request()
    assert req.path == "/v1/chat/completions"
    assert req.query is None
    assert req.header("authorization") == f"Bearer {UPSTREAM_KEY_OPENAI}"
    assert req.header("api-key") is None
    assert req.json()["model"] == "gpt-4o-upstream"


def test_openai_client_to_an_azure_provider(client, mock_upstream):
    r = client.chat.completions.create(model="gpt-4o-azure", messages=HELLO)
    assert r.choices[0].message.content == MOCK_TEXT
    assert_azure_upstream(mock_upstream.only_request(), "my-azure-deployment", "chat/completions")


def test_embeddings(azure_client, mock_upstream):
    floats = azure_client.embeddings.create(model="text-embedding-3-small", input="azure text", encoding_format="float")
    default = azure_client.embeddings.create(model="text-embedding-3-small", input="azure text")
    assert len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding == default.data[0].embedding
    for req in mock_upstream.requests():
        assert req.path == "/v1/embeddings"
        assert req.json()["model"] == "emb-upstream"


def test_transcription(azure_client, mock_upstream):
    audio = b"\x00\x01\x02\xff" * 300
    r = azure_client.audio.transcriptions.create(model="whisper", file=("a.mp3", audio, "audio/mpeg"))
    assert r.text == f"mock transcript of {len(audio)} bytes"
    req = mock_upstream.only_request()
    assert_azure_upstream(req, "whisper-dep", "audio/transcriptions")
    assert audio in req.body
    text = azure_client.audio.transcriptions.create(model="whisper", file=("a.mp3", audio), response_format="text")
    assert isinstance(text, str) and text.strip() == f"mock transcript of {len(audio)} bytes"


def test_image_edit(azure_client, mock_upstream):
    png = b"\x89PNG\r\n\x1a\n-an-image-to-edit-"
    r = azure_client.images.edit(model="gpt-image-1", image=("a.png", png, "image/png"), prompt="a fox", n=2)
    assert len(r.data) == 2 and r.data[0].b64_json
    req = mock_upstream.only_request()
    # The route goes to an OpenAI-kind provider: the upstream gets the OpenAI shape.
    assert req.path == "/v1/images/edits"
    assert req.header("authorization") == f"Bearer {UPSTREAM_KEY_OPENAI}"
    assert b"\r\n\r\ngpt-image-1\r\n" in req.body and png in req.body


def test_images(azure_client, mock_upstream):
    r = azure_client.images.generate(model="dall-e-3", prompt="a fox")
    assert r.data[0].b64_json or r.data[0].url
    assert_azure_upstream(mock_upstream.only_request(), "dalle-dep", "images/generations")
