"""Fixtures for the black-box SDK tests: the mock upstream and the gateway as real processes.

The mock upstream (`examples/mock_upstream.rs`) and the gateway (`switchyard serve`) are each
started once per session on port 0; each writes "127.0.0.1:PORT" to a ready file. Their logs
go to files, and the part written during a failed test is attached to its report.
Binaries: $MOCK_UPSTREAM_BIN and $SWITCHYARD_BIN, else the debug builds under target/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import time
from typing import Any, Iterable

import openai
import pytest

# The HTTP library of the installed SDK: httpx up to openai 2.x, httpx2 from 3.0. Tests use it
# for raw requests and for hooks on the SDK's own client, so they run on either.
if int(openai.__version__.split(".")[0]) >= 3:
    import httpx2 as httpx
else:
    import httpx

REPO = pathlib.Path(__file__).resolve().parents[2]

ADMIN_KEY = "test-admin-key"
KEY_A = "sk-test-a"
KEY_LIMITED = "sk-test-limited"
UPSTREAM_KEY_OPENAI = "upstream-secret-openai"
UPSTREAM_KEY_AZURE = "upstream-secret-azure"
API_VERSION = "2024-10-21"

# name -> (log path, offset at the start of the current test)
_LOGS: dict[str, list[Any]] = {}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _binary(env: str, default: str) -> pathlib.Path:
    p = pathlib.Path(os.environ.get(env) or default)
    return p if p.is_absolute() else REPO / p


def sha256_key(plain: str) -> str:
    return "sha256:" + hashlib.sha256(plain.encode()).hexdigest()


class Process:
    """A child process that announces its address in a ready file."""

    def __init__(self, name: str, cmd: list[str], ready_file: pathlib.Path, log_path: pathlib.Path, cwd: pathlib.Path):
        self.name = name
        self.ready_file = ready_file
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "NO_COLOR": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )
        _LOGS[name] = [log_path, 0]

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                addr = self.ready_file.read_text().strip()
                if addr:
                    return addr
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        status = self.proc.poll()
        self.stop()
        why = f"exited with status {status}" if status is not None else f"did not write {self.ready_file} within {timeout}s"
        raise RuntimeError(f"{self.name} {why}; its log:\n{self.log_text()}")

    def log_text(self, offset: int = 0, max_lines: int = 200) -> str:
        try:
            data = self.log_path.read_bytes()[offset:]
        except OSError:
            return ""
        lines = _ANSI.sub("", data.decode("utf-8", "replace")).splitlines()
        if len(lines) > max_lines:
            lines = [f"... ({len(lines) - max_lines} earlier lines)"] + lines[-max_lines:]
        return "\n".join(lines)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _start(name: str, binary: pathlib.Path, args: list[str], workdir: pathlib.Path) -> tuple[Process, str]:
    if not binary.exists():
        raise RuntimeError(f"{binary} does not exist: run `cargo build --all-targets` first (or set the env var)")
    ready = workdir / f"{name}.ready"
    proc = Process(name, [str(binary), *args, "--ready-file", str(ready)], ready, workdir / f"{name}.log", workdir)
    return proc, proc.wait_ready()


# ------------------------------------------------------------------------------------------
# The mock upstream


class Recorded:
    """A request the mock upstream received (see GET /__mock/requests)."""

    def __init__(self, raw: dict):
        self.method: str = raw["method"]
        self.path: str = raw["path"]
        self.query: str | None = raw["query"]
        self.headers: list[tuple[str, str]] = [(k, v) for k, v in raw["headers"]]
        self.body: bytes = base64.b64decode(raw["body"]) if raw["body_base64"] else raw["body"].encode()

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Recorded {self.method} {self.path}{'?' + self.query if self.query else ''}>"


class MockUpstream:
    """Client of the mock upstream's control endpoints."""

    def __init__(self, addr: str, process: Process | None = None):
        self.addr = addr
        self.url = f"http://{addr}"
        self.process = process
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def requests(self) -> list[Recorded]:
        r = self.http.get("/__mock/requests")
        r.raise_for_status()
        return [Recorded(x) for x in r.json()]

    def only_request(self) -> Recorded:
        reqs = self.requests()
        assert len(reqs) == 1, f"expected exactly one upstream request, got {reqs}"
        return reqs[0]

    def script(self, *items: dict) -> None:
        """Queue answers in the JSON form of `Scripted`, e.g. {"respond": {...}}."""
        r = self.http.post("/__mock/script", json=list(items))
        assert r.status_code == 200, r.text

    def respond(self, status: int, body: Any, headers: Iterable[tuple[str, str]] = (), times: int = 1) -> None:
        body = body if isinstance(body, str) else json.dumps(body)
        self.script(*[{"respond": {"status": status, "headers": [list(h) for h in headers], "body": body}}] * times)

    def reset(self) -> None:
        self.http.post("/__mock/reset").raise_for_status()

    def in_flight(self) -> int:
        return self.http.get("/__mock/in_flight").json()["in_flight"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("switchyard-sdk")


@pytest.fixture(scope="session")
def mock_upstream(workdir) -> Iterable[MockUpstream]:
    proc, addr = _start("mock_upstream", _binary("MOCK_UPSTREAM_BIN", "target/debug/examples/mock_upstream"), [], workdir)
    mock = MockUpstream(addr, proc)
    yield mock
    mock.http.close()
    proc.stop()


@pytest.fixture(autouse=True)
def _per_test(request):
    """Mark where each log is at the start of the test; reset the mock if this test uses it."""
    for entry in _LOGS.values():
        try:
            entry[1] = entry[0].stat().st_size
        except OSError:
            entry[1] = 0
    if "mock_upstream" in request.fixturenames:
        request.getfixturevalue("mock_upstream").reset()
    if "gateway" in request.fixturenames:
        _wait_deployments_up(request.getfixturevalue("gateway"))
    yield


def _wait_deployments_up(gateway, timeout: float = 5.0) -> None:
    """A scripted upstream failure can leave a deployment cooling down (a failed probe, a
    429's retry-after): let that pass before the next test, so tests stay independent."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(
            f"{gateway.url}/admin/routes", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        )
        r.raise_for_status()
        down = [d["deployment"] for route in r.json()["routes"] for d in route["deployments"] if not d["up"]]
        if not down or time.monotonic() > deadline:
            return
        time.sleep(0.05)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for name, (path, offset) in _LOGS.items():
            try:
                data = _ANSI.sub("", path.read_bytes()[offset:].decode("utf-8", "replace"))
            except OSError:
                continue
            lines = data.splitlines()[-150:]
            rep.sections.append((f"{name} log during this test", "\n".join(lines) or "(empty)"))


# ------------------------------------------------------------------------------------------
# The gateway


def gateway_config(upstream_addr: str) -> str:
    u = f"http://{upstream_addr}"
    all_routes = "[gpt-4o, gpt-4o-cached, gpt-4o-azure, text-embedding-3-small, whisper, tts, dall-e-3, gpt-image-1, omni-moderation-latest, demo]"
    # retries: 0 and a large allowed_fails keep the error tests independent: one scripted
    # upstream error is one client error, and no deployment is put in cooldown by them.
    return f"""\
server:
  listen: 127.0.0.1:0
  admin_key: {ADMIN_KEY}
routing:
  retries: 0
  allowed_fails: 1000
  cooldown: 1s
providers:
  up-openai: {{ kind: openai, base_url: "{u}/v1", api_key: {UPSTREAM_KEY_OPENAI} }}
  up-azure: {{ kind: azure_openai, endpoint: "{u}", api_key: {UPSTREAM_KEY_AZURE}, api_version: "{API_VERSION}" }}
  demo: {{ kind: mock }}
models:
  gpt-4o: {{ deployments: [ {{ provider: up-openai, deployment: gpt-4o-upstream }} ] }}
  gpt-4o-cached: {{ deployments: [ {{ provider: up-openai, deployment: gpt-4o-upstream }} ], cache: {{ ttl: 5m }} }}
  gpt-4o-azure: {{ deployments: [ {{ provider: up-azure, deployment: my-azure-deployment }} ] }}
  text-embedding-3-small: {{ deployments: [ {{ provider: up-openai, deployment: emb-upstream }} ] }}
  whisper: {{ deployments: [ {{ provider: up-azure, deployment: whisper-dep }} ] }}
  tts: {{ deployments: [ {{ provider: up-openai, deployment: tts-1 }} ] }}
  dall-e-3: {{ deployments: [ {{ provider: up-azure, deployment: dalle-dep }} ] }}
  gpt-image-1: {{ deployments: [ {{ provider: up-openai, deployment: gpt-image-1 }} ] }}
  omni-moderation-latest: {{ deployments: [ {{ provider: up-openai, deployment: omni-moderation-latest }} ] }}
  demo: {{ deployments: [ {{ provider: demo, deployment: demo-model }} ] }}
keys:
  - {{ name: team-a-app, key: "{sha256_key(KEY_A)}", models: {all_routes} }}
  - {{ name: limited, key: "{sha256_key(KEY_LIMITED)}", models: [demo] }}
"""


ROUTES = ["gpt-4o", "gpt-4o-cached", "gpt-4o-azure", "text-embedding-3-small", "whisper", "tts", "dall-e-3", "gpt-image-1", "omni-moderation-latest", "demo"]


class Gateway:
    def __init__(self, addr: str, process: Process, config_path: pathlib.Path):
        self.addr = addr
        self.url = f"http://{addr}"
        self.process = process
        self.config_path = config_path


@pytest.fixture(scope="session")
def gateway(workdir, mock_upstream) -> Iterable[Gateway]:
    config = workdir / "routes.yaml"
    config.write_text(gateway_config(mock_upstream.addr))
    # cwd is the temp dir, so a default sqlite ledger lands there and not in the repo.
    proc, addr = _start("switchyard", _binary("SWITCHYARD_BIN", "target/debug/switchyard"), ["serve", "--config", str(config)], workdir)
    gw = Gateway(addr, proc, config)
    yield gw
    proc.stop()


@pytest.fixture
def client(gateway):
    from openai import OpenAI

    with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_A, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def azure_client(gateway):
    from openai import AzureOpenAI

    with AzureOpenAI(azure_endpoint=gateway.url, api_key=KEY_A, api_version=API_VERSION, max_retries=0, timeout=30) as c:
        yield c


class SentBodies:
    """Captures the request bodies the SDK sends (an httpx event hook)."""

    def __init__(self):
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def last_json(self) -> Any:
        return json.loads(self.requests[-1].content)


@pytest.fixture
def capturing_client(gateway):
    """An OpenAI client plus the list of requests it sent."""
    from openai import OpenAI

    sent = SentBodies()
    http = httpx.Client(event_hooks={"request": [sent]}, timeout=30)
    with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_A, max_retries=0, http_client=http) as c:
        yield c, sent


# ------------------------------------------------------------------------------------------
# Values the mock upstream answers with (mirrors tests/support/upstream.rs)

MOCK_TEXT = "Hello from mock"
TOOL_ARGUMENTS = {"mock": True}


def prompt_tokens_for(chars: int) -> int:
    return max(1, -(-chars // 4))


def speech_bytes() -> bytes:
    out = bytearray(b"ID3\x04\x00\x00\x00\x00\x00\x00")
    i = 0
    while len(out) < 4096:
        out.append((i * 31) % 251)
        i += 1
    return bytes(out)
