"""The Grafana dashboards and the deployment files, checked by the tools that read them.

A real Prometheus (Debian's `prometheus` binary) scrapes a gateway of this test's own every
second while the gateway serves mixed traffic: plain and streamed answers on two routes, an
upstream 500 that is retried, every attempt failing into a fallback, an upstream 429 that
cools a deployment down, cache hits and skips, rpm and budget refusals, an unknown model, and
config reloads that succeed and fail. Then every PromQL expression of every panel of
grafana/dashboards/*.json is evaluated the way Grafana would send it (variables set to "All"),
and each must return at least one number that is not NaN. The same Prometheus loads
deploy/alerts.yml, whose rules must evaluate without error; promtool checks
deploy/prometheus.yml and runs deploy/alerts.test.yml.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time
from typing import Iterable

import openai
import pytest
import yaml
from openai import OpenAI

from conftest import REPO, MockUpstream, Process, _binary, _start, httpx, sha256_key

DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "alerts.yml"
ADMIN = "dashboards-admin"
KEY_APP = "sk-dash-app"
KEY_ML = "sk-dash-ml"
KEY_LIMITED = "sk-dash-limited"
KEY_BROKE = "sk-dash-broke"
VARIABLES = ("route", "deployment", "team")
# What Grafana puts in place of its built-in variables, for a 1 s scrape interval.
BUILTINS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
SCRAPE_INTERVAL = 1.0


# ------------------------------------------------------------------------------------------
# Prometheus


def prometheus_binary() -> str | None:
    """Debian's `prometheus` (which brings `promtool`), installed when missing and possible."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
    for cmd in (install, ["apt-get", "update", "-qq"], install):
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        if shutil.which("prometheus"):
            break
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, workdir: pathlib.Path, target: str):
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL:g}s",
                        "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
                        "evaluation_interval": f"{SCRAPE_INTERVAL:g}s",
                    },
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": "switchyard", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        # A port picked free can be taken before Prometheus binds it: try a few.
        for _ in range(5):
            self.addr = f"127.0.0.1:{free_port()}"
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.addr}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
            self.http = httpx.Client(base_url=f"http://{self.addr}", timeout=10)
            if self._wait_ready():
                return
            self.stop()
            self._log = open(self.log_path, "ab")
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False

    def query(self, expr: str) -> dict:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise PromQLError(body.get("error") or r.text)
        return body["data"]

    def last_scrape(self) -> float:
        """Unix time of the newest sample scraped from the gateway (0 before the first)."""
        # timestamp() of a bare selector is the sample's time; of any other expression, it is
        # the evaluation time.
        result = self.query('timestamp(up{job="switchyard"}) and up{job="switchyard"} == 1')["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def wait_scrapes_after(self, t: float, scrapes: int, timeout: float = 15.0) -> None:
        """Until `scrapes` scrapes have started after the Unix time `t`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_scrape() > t + (scrapes - 1) * SCRAPE_INTERVAL:
                return
            time.sleep(0.1)
        targets = self.http.get("/api/v1/targets").json()
        raise AssertionError(f"prometheus scraped nothing after {t}; targets: {json.dumps(targets)[:2000]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()


class PromQLError(Exception):
    pass


# ------------------------------------------------------------------------------------------
# The gateway and its traffic


def gateway_config(upstream: str) -> str:
    u = f"http://{upstream}/v1"
    return f"""\
server:
  listen: 127.0.0.1:0
  admin_key: {ADMIN}
  watch_config: false
routing:
  retries: 2
  allowed_fails: 5
  cooldown: 1s
providers:
  up-a: {{ kind: openai, base_url: "{u}", api_key: upstream-secret-a }}
  up-b: {{ kind: openai, base_url: "{u}", api_key: upstream-secret-b }}
  builtin: {{ kind: mock, latency: 5ms, stream_chunks: 4, chunk_delay: 2ms }}
models:
  chat:
    strategy: round_robin
    deployments:
      - {{ provider: up-a, deployment: chat-a, model: gpt-4o }}
      - {{ provider: up-b, deployment: chat-b, model: gpt-4o }}
    fallbacks: [demo]
    pricing: {{ input_per_1m: 2.50, cached_input_per_1m: 1.25, output_per_1m: 10.00 }}
    cache: {{ ttl: 10m }}
  demo:
    deployments:
      - {{ provider: builtin, deployment: demo-model }}
    pricing: {{ input_per_1m: 0.50, output_per_1m: 1.50 }}
    cache: {{ ttl: 10m }}
teams:
  research: {{ budget: {{ usd: 10, soft_usd: 0.000001, period: monthly }}, limits: {{ rpm: 1000 }} }}
  ml: {{ limits: {{ rpm: 1000 }} }}
keys:
  - {{ name: app, key: "{sha256_key(KEY_APP)}", team: research }}
  - {{ name: ml-batch, key: "{sha256_key(KEY_ML)}", team: ml }}
  - {{ name: limited, key: "{sha256_key(KEY_LIMITED)}", team: research, limits: {{ rpm: 2 }} }}
  - {{ name: broke, key: "{sha256_key(KEY_BROKE)}", budget: {{ usd: 0.0000001, period: daily }} }}
"""


def server_error() -> dict:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    return {"respond": {"status": 500, "body": json.dumps(body)}}


def rate_limited(ms: int) -> dict:
    body = {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    headers = [["retry-after-ms", str(ms)], ["retry-after", "1"]]
    return {"respond": {"status": 429, "headers": headers, "body": json.dumps(body)}}


class Traffic:
    def __init__(self, gateway_url: str, mock: MockUpstream, config_path: pathlib.Path):
        self.url = gateway_url
        self.mock = mock
        self.config_path = config_path
        self.admin = httpx.Client(base_url=gateway_url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"})
        self.prompts = itertools.count()

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def wait_deployments_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            routes = self.admin.get("/admin/routes").json()["routes"]
            if all(d["up"] for r in routes for d in r["deployments"]) or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def scripted(self, *items: dict) -> None:
        """The next upstream answers; the mock is reset after the request that used them."""
        self.wait_deployments_up()
        self.mock.reset()
        self.mock.script(*items)

    def round(self, reloads: bool) -> None:
        # Every prompt is new (a cache miss that reaches the upstream) unless it is `CACHED`.
        def ask(what: str = "How far is the next station?") -> list[dict]:
            return [{"role": "user", "content": f"{what} #{next(self.prompts)}"}]

        cached = [{"role": "user", "content": "Which platform for the 8:15?"}]
        with self.client(KEY_APP) as app, self.client(KEY_ML) as ml:
            for _ in range(3):
                r = app.chat.completions.create(model="chat", messages=ask())
                assert r.choices[0].message.content
            ml.chat.completions.create(model="chat", messages=ask())
            for _ in range(2):
                app.chat.completions.create(model="chat", messages=cached)  # a hit, after the first
            app.chat.completions.create(model="chat", messages=ask(), extra_headers={"cache-control": "no-cache"})
            for model, messages in (("chat", ask()), ("demo", ask()), ("demo", ask()), ("chat", cached)):
                chunks = list(app.chat.completions.create(model=model, messages=messages, stream=True))
                assert chunks, model
            app.chat.completions.create(model="demo", messages=ask())
            app.embeddings.create(model="demo", input="switchyard")

            # An upstream 500, retried on the other deployment.
            self.scripted(server_error())
            r = app.chat.completions.with_raw_response.create(model="chat", messages=ask())
            assert r.http_response.status_code == 200
            # Every attempt fails: the route falls back to `demo`.
            self.scripted(server_error(), server_error(), server_error())
            r = app.chat.completions.with_raw_response.create(model="chat", messages=ask())
            assert r.headers.get("x-switchyard-route") == "demo", r.headers
            # An upstream 429 cools its deployment down; the other one answers.
            self.scripted(rate_limited(400))
            app.chat.completions.create(model="chat", messages=ask())
            self.mock.reset()

            with pytest.raises(openai.NotFoundError):
                app.chat.completions.create(model="no-such-model", messages=ask())

        with self.client(KEY_LIMITED) as limited:
            with pytest.raises(openai.RateLimitError) as refused:
                for _ in range(3):
                    limited.chat.completions.create(model="demo", messages=ask())
            assert refused.value.code == "rate_limit_exceeded"
        with self.client(KEY_BROKE) as broke:
            with pytest.raises(openai.RateLimitError) as refused:
                broke.chat.completions.create(model="demo", messages=ask())
            assert refused.value.code == "budget_exceeded"

        if reloads:
            assert self.admin.post("/admin/reload").status_code == 200
            good = self.config_path.read_text()
            self.config_path.write_text(good + "\nnot_a_field: true\n")
            try:
                assert self.admin.post("/admin/reload").status_code == 400
            finally:
                self.config_path.write_text(good)


class Stack:
    def __init__(self, prometheus: Prometheus, gateway_url: str):
        self.prometheus = prometheus
        self.gateway_url = gateway_url


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterable[Stack]:
    binary = prometheus_binary()
    if not binary:
        pytest.skip("the `prometheus` binary is missing and could not be installed (apt-get install prometheus)")
    workdir = tmp_path_factory.mktemp("switchyard-dashboards")
    procs: list[Process] = []
    prometheus = None
    try:
        up_proc, up_addr = _start("dash_upstream", _binary("MOCK_UPSTREAM_BIN", "target/debug/examples/mock_upstream"), [], workdir)
        procs.append(up_proc)
        mock = MockUpstream(up_addr, up_proc)
        config = workdir / "routes.yaml"
        config.write_text(gateway_config(up_addr))
        gw_proc, gw_addr = _start(
            "dash_gateway", _binary("SWITCHYARD_BIN", "target/debug/switchyard"), ["serve", "--config", str(config)], workdir
        )
        procs.append(gw_proc)

        prometheus = Prometheus(binary, workdir, gw_addr)
        prometheus.wait_scrapes_after(0, 1)  # a sample before the traffic, so rates see all of it
        traffic = Traffic(f"http://{gw_addr}", mock, config)
        traffic.round(reloads=True)
        # Series created by the first round are in Prometheus before the second adds to them.
        prometheus.wait_scrapes_after(time.time(), 1)
        traffic.round(reloads=False)
        prometheus.wait_scrapes_after(time.time(), 2)
        traffic.admin.close()
        mock.http.close()
        yield Stack(prometheus, f"http://{gw_addr}")
    finally:
        if prometheus:
            prometheus.stop()
        for p in reversed(procs):
            p.stop()


# ------------------------------------------------------------------------------------------
# The dashboards' queries


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> Iterable[dict]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    out = []
    for path in DASHBOARDS:
        for p in all_panels(load(path)):
            for t in p.get("targets", []):
                out.append((path.name, f'{p["title"]} [{t["refId"]}]', t["expr"]))
    return out


def substitute(expr: str) -> str:
    """The query as Grafana sends it with every variable on "All" (allValue `.*`)."""
    for name, value in sorted(BUILTINS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    for v in VARIABLES:
        expr = re.sub(rf"\$\{{{v}\}}|\${v}\b", ".*", expr)
    return expr


def numbers(data: dict) -> list[float]:
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "vector":
        return [float(s["value"][1]) for s in data["result"]]
    if data["resultType"] == "matrix":
        return [float(v[1]) for s in data["result"] for v in s["values"]]
    return []


@pytest.mark.timeout(300)  # only installing Prometheus takes long; a run takes about 15 s
def test_every_panel_query_returns_data(stack):
    queries = panel_queries()
    assert len(queries) > 40, "the dashboards lost their panels?"
    failures = []
    for dashboard, panel, expr in queries:
        promql = substitute(expr)
        if "$" in promql:
            failures.append(f"{dashboard} / {panel}: unknown variable left in {promql}")
            continue
        try:
            data = stack.prometheus.query(promql)
        except PromQLError as e:
            failures.append(f"{dashboard} / {panel}: error {e}\n    {promql}")
            continue
        values = numbers(data)
        if not values:
            failures.append(f"{dashboard} / {panel}: empty result\n    {promql}")
        elif all(math.isnan(v) for v in values):
            failures.append(f"{dashboard} / {panel}: only NaN\n    {promql}")
    assert not failures, f"{len(failures)} of {len(queries)} panel queries failed:\n" + "\n".join(failures)


def test_merged_tables_join_their_queries_row_by_row(stack):
    """A table that merges several queries (Grafana's `merge` transformation) joins rows whose
    labels are all equal: each query must return the same label sets, `__name__` included,
    or the table shows each query's rows apart (spent on one row, limit on another)."""
    failures = []
    for path in DASHBOARDS:
        for p in all_panels(load(path)):
            if not any(t.get("id") == "merge" for t in p.get("transformations", [])):
                continue
            label_sets = {}
            for t in p["targets"]:
                data = stack.prometheus.query(substitute(t["expr"]))
                label_sets[t["refId"]] = sorted(
                    tuple(sorted(s["metric"].items())) for s in data.get("result", [])
                )
            first = next(iter(label_sets.values()))
            if not first or any(v != first for v in label_sets.values()):
                failures.append(f"{path.name} / {p['title']}: {label_sets}")
    assert not failures, "\n".join(failures)


def test_template_variables_have_values(stack):
    """`label_values(metric{...}, label)`, as Grafana's Prometheus datasource asks for it."""
    failures = []
    for path in DASHBOARDS:
        for var in load(path)["templating"]["list"]:
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"{path.name}: variable {var['name']}: not a label_values() query: {q}"
            r = stack.prometheus.http.get(f"/api/v1/label/{m[2]}/values", params={"match[]": substitute(m[1])})
            values = r.json().get("data") or []
            if r.status_code != 200 or not values:
                failures.append(f"{path.name}: ${var['name']} = {q}: {r.status_code} {values}")
    assert not failures, "\n".join(failures)


def test_alert_rules_evaluate_without_error(stack):
    deadline = time.monotonic() + 10
    while True:
        groups = stack.prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(rules) >= 10, f"deploy/alerts.yml not loaded: {groups}"
    bad = [f'{r["name"]}: {r["health"]} {r.get("lastError", "")}' for r in rules if r["health"] != "ok"]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------
# The files themselves


def test_dashboards_are_well_formed():
    uids = set()
    for path in DASHBOARDS:
        d = load(path)
        where = path.name
        assert d["uid"] not in uids, f"{where}: uid {d['uid']} used twice"
        uids.add(d["uid"])
        assert d["schemaVersion"] >= 36, where
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert set(VARIABLES) <= set(variables), f"{where}: variables {sorted(variables)}"
        for v in variables.values():
            assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*", (where, v["name"])
            assert v["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (where, v["name"])
        ids = [p["id"] for p in all_panels(d)]
        assert len(ids) == len(set(ids)), f"{where}: panel ids repeat"
        for p in all_panels(d):
            title = f'{where} / {p["title"]}'
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, title
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
            assert p["targets"], title
            for t in p["targets"]:
                assert t["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
                expr = t["expr"]
                used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
                assert used <= set(variables), f"{title}: unknown variables {used}"
                # Windows of rate()/increase() follow the scrape interval, not a fixed length
                # (instant "in range" stats use $__range).
                for window in re.findall(r"\[([^\]]+)\]", expr):
                    assert window in ("$__rate_interval", "$__range"), f"{title}: window [{window}]"
                for label in ("route", "deployment", "team"):
                    if re.search(rf'{label}=~"(?!\${label}")', expr):
                        pytest.fail(f"{title}: {label} filtered by something else than ${label}")


def test_yaml_and_json_files_parse():
    files = [
        *sorted((REPO / "deploy").rglob("*.yml")),
        *sorted((REPO / "deploy").rglob("*.yaml")),
        *sorted((REPO / "grafana").rglob("*.yaml")),
    ]
    assert len(files) >= 12, files
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f
    for f in DASHBOARDS:
        load(f)
    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == ["prometheus"]
    # The routes.yaml inside the Kubernetes ConfigMap is YAML too, and so is every config
    # the gateway would load: `switchyard check` says whether it would.
    cm = yaml.safe_load((REPO / "deploy/kubernetes/configmap.yaml").read_text())
    assert "models" in yaml.safe_load(cm["data"]["routes.yaml"])


def test_gateway_configs_of_the_deployment_files_check(tmp_path):
    binary = _binary("SWITCHYARD_BIN", "target/debug/switchyard")
    cm = yaml.safe_load((REPO / "deploy/kubernetes/configmap.yaml").read_text())
    k8s = tmp_path / "routes.yaml"
    k8s.write_text(cm["data"]["routes.yaml"])
    env = {
        **os.environ,
        "SWITCHYARD_ADMIN_KEY": "x",
        "SWITCHYARD_LEDGER_URL": "postgres://u:p@db.invalid/switchyard",
        "SWITCHYARD_REDIS_URL": "redis://db.invalid:6379",
        "AZURE_EAST_KEY": "x",
        "LLAMA_KEY": "x",
    }
    for config in (REPO / "deploy/routes.compose.yaml", k8s):
        r = subprocess.run([str(binary), "check", "--config", str(config)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{config}:\n{r.stdout}{r.stderr}"


def test_promtool_checks_config_and_rules_and_runs_the_rule_tests():
    if not prometheus_binary():
        pytest.skip("promtool (Debian's prometheus package) is missing and could not be installed")
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    deploy = REPO / "deploy"
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        r = subprocess.run([promtool, *args], cwd=deploy, capture_output=True, text=True)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
