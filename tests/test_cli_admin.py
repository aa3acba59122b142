"""The operator CLI for schema, tenants and keys, driven with click's CliRunner (and once as a
real `python -m nzgw` process). The workflow runs on SQLite and on the real PostgreSQL
(a scratch database per test); the error cases on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result

from nzgw.adapters.stores import open_store
from nzgw.cli import main
from nzgw.config import Argon2Params, test_config
from nzgw.core.models import Principal
from nzgw.services.identity import AuthenticationError, Authenticator

ARGON2_ENV = {"NZGW_ARGON2_TIME_COST": "1", "NZGW_ARGON2_MEMORY_KIB": "64"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


def _env(url: str, tmp_path: Path) -> dict[str, str | None]:
    return {
        "DATABASE_URL": url,
        "NZGW_ENV_FILE": str(tmp_path / "no.env"),
        "NZGW_CONFIG": None,
        **ARGON2_ENV,
    }


class Cli:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.env = _env(url, tmp_path)

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(main, list(args), env=self.env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def error(self, *args: str, code: int = 1) -> str:
        """The one-line error of a failing command."""
        result = self(*args, code=code)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ")
        return lines[0]


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    return Cli(database_url, tmp_path)


@pytest.fixture
def lite(sqlite_url: str, tmp_path: Path) -> Cli:
    cli = Cli(sqlite_url, tmp_path)
    cli("migrate")
    return cli


def _authenticate(url: str, key: str) -> Principal:
    config = test_config(argon2=Argon2Params(time_cost=1, memory_cost_kib=64, parallelism=1))

    async def run() -> Principal:
        async with open_store(url) as store:
            auth = Authenticator.from_config(store, config)
            return await auth.authenticate(key, "192.0.2.1")

    return trio.run(run)


def test_the_whole_workflow(cli: Cli) -> None:
    every = sorted(p.stem for p in (Path(__file__).parents[1] / "schema").glob("*.sql"))
    assert every[:2] == ["0001_init", "0002_audit"]
    assert cli.json("migrate") == {"applied": every}
    assert "up to date" in cli("migrate").stdout

    tenant = cli.json(
        "create-tenant",
        "--name",
        "acme",
        "--rpm",
        "600",
        "--daily-tokens",
        "2_000_000",
        "--models",
        "llama3*,qwen3",
    )[0]
    assert tenant["name"] == "acme"
    assert tenant["limits"]["requests_per_minute"] == 600
    assert tenant["budgets"]["daily_tokens"] == 2_000_000
    assert tenant["allowed_models"] == ["llama3*", "qwen3"]
    assert [t["name"] for t in cli.json("list-tenants")] == ["acme"]

    created = cli.json(
        "create-key",
        "--tenant",
        "acme",
        "--name",
        "ci",
        "--tpm",
        "5000",
        "--expires",
        "30d",
        "--log-prompts",
        "--prompt-ttl",
        "7d",
    )
    assert set(created) == {"key", "prefix"}
    key, prefix = created["key"], created["prefix"]
    assert key.startswith(prefix)

    principal = _authenticate(cli.url, key)
    assert principal.tenant.name == "acme"
    assert principal.key.prefix == prefix
    assert principal.key.log_prompts and principal.key.prompt_ttl_seconds == 7 * 86400
    assert principal.key_limits.tokens_per_minute == 5000
    assert principal.key_limits.requests_per_minute == 600  # inherited from the tenant

    listing = cli("list-keys").stdout + cli("list-keys", "--json").stdout
    listing += cli("list-keys", "--tenant", "acme", "--json").stdout
    assert prefix in listing
    assert key not in listing and key[len(prefix) :] not in listing
    assert "argon2" not in listing and "key_hash" not in listing
    [listed] = cli.json("list-keys", "--tenant", "acme")
    assert listed["tenant"] == "acme" and listed["expires_at"] is not None

    updated = cli.json(
        "update-key", "--prefix", prefix, "--tpm", "none", "--expires", "never", "--rpm", "10"
    )[0]
    assert updated["limits"]["tokens_per_minute"] is None
    assert updated["limits"]["requests_per_minute"] == 10
    assert updated["expires_at"] is None

    tenant = cli.json("update-tenant", "acme", "--daily-tokens", "none", "--models", "all")[0]
    assert tenant["budgets"]["daily_tokens"] is None
    assert tenant["allowed_models"] == []
    assert tenant["limits"]["requests_per_minute"] == 600  # untouched

    assert cli.json("disable-tenant", "acme")["status"] == "disabled"
    with pytest.raises(AuthenticationError):
        _authenticate(cli.url, key)
    assert cli.json("enable-tenant", "acme")["status"] == "active"
    _authenticate(cli.url, key)

    assert "is revoked" in cli("revoke-key", "--prefix", prefix).stdout
    with pytest.raises(AuthenticationError):
        _authenticate(cli.url, key)
    assert cli.json("list-keys")[0]["status"] == "revoked"


def test_list_keys_shows_what_applies_with_the_tenant_and_where_it_comes_from(cli: Cli) -> None:
    cli("migrate")
    cli("create-tenant", "--name", "acme", "--rpm", "600", "--tpm", "1000", "--models", "llama3*")
    cli("create-tenant", "--name", "open")
    ci = cli.json("create-key", "--tenant", "acme", "--name", "ci", "--rpm", "60", "--tpm", "5000")
    cli("create-key", "--tenant", "acme", "--name", "bot", "--models", "llama3:8b")
    cli("create-key", "--tenant", "open", "--name", "free")
    cli("disable-tenant", "acme")

    table = {line.split()[2]: line for line in cli("list-keys").stdout.splitlines()[1:]}
    ci_row = table["ci"].split()
    assert ci_row[3:9] == ["disabled", "(tenant)", "60", "(key)", "1000", "(tenant)"]
    assert "llama3* (tenant)" in table["ci"]
    assert "llama3:8b (key) & llama3* (tenant)" in table["bot"]
    assert table["free"].split()[3:5] == ["active", "-"]

    listed = {k["name"]: k for k in cli.json("list-keys")}
    ci_json = listed["ci"]
    assert ci_json["prefix"] == ci["prefix"]
    assert ci_json["status"] == "active"  # the key's own state, as stored
    assert ci_json["limits"]["tokens_per_minute"] == 5000
    effective = ci_json["effective"]
    assert effective["status"] == {"value": "disabled", "source": "tenant"}
    assert effective["requests_per_minute"] == {"value": 60, "source": "key"}
    assert effective["tokens_per_minute"] == {"value": 1000, "source": "tenant"}
    assert effective["concurrent_requests"] == {"value": None, "source": None}
    assert effective["models"] == {"key": [], "tenant": ["llama3*"]}
    assert listed["bot"]["effective"]["requests_per_minute"] == {"value": 600, "source": "tenant"}
    assert listed["bot"]["effective"]["models"] == {"key": ["llama3:8b"], "tenant": ["llama3*"]}
    assert listed["free"]["effective"]["status"] == {"value": "active", "source": None}

    cli("enable-tenant", "acme")
    cli("update-key", "--prefix", ci["prefix"], "--disable")
    [after] = cli.json("list-keys", "--tenant", "acme")[:1]
    assert after["effective"]["status"] == {"value": "disabled", "source": "key"}


def test_duplicate_key_names_in_a_tenant_are_refused(cli: Cli) -> None:
    cli("migrate")
    cli("create-tenant", "--name", "acme")
    cli("create-tenant", "--name", "other")
    first = cli.json("create-key", "--tenant", "acme", "--name", "ci")["prefix"]
    assert "a key named 'ci' exists already in tenant 'acme'" in cli.error(
        "create-key", "--tenant", "acme", "--name", "ci"
    )
    cli("create-key", "--tenant", "other", "--name", "ci")  # another tenant: fine
    second = cli.json("create-key", "--tenant", "acme", "--name", "ci-2")["prefix"]
    assert "named 'ci' already" in cli.error("update-key", "--prefix", second, "--name", "ci")
    assert [k["name"] for k in cli.json("list-keys", "--tenant", "acme")] == ["ci", "ci-2"]
    # Rotation: a revoked key's name can be given to its replacement.
    cli("revoke-key", "--prefix", first)
    cli("create-key", "--tenant", "acme", "--name", "ci")


def test_create_key_prints_the_key_exactly_once(lite: Cli) -> None:
    lite("create-tenant", "--name", "acme")
    result = lite("create-key", "--tenant", "acme", "--name", "laptop")
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("key:")
    key = first_line.split()[1]
    assert result.stdout.count(key) == 1
    assert "only this once" in result.stderr
    _authenticate(lite.url, key)


def test_readable_tables(lite: Cli) -> None:
    lite("create-tenant", "--name", "acme", "--rpm", "5")
    lite("create-key", "--tenant", "acme", "--name", "ci")
    tenants = lite("list-tenants").stdout.splitlines()
    assert tenants[0].split()[:4] == ["ID", "NAME", "STATUS", "RPM"]
    assert tenants[1].split()[:4] == ["1", "acme", "active", "5"]
    keys = lite("list-keys").stdout.splitlines()
    assert keys[0].split()[:4] == ["PREFIX", "TENANT", "NAME", "STATUS"]
    assert keys[1].split()[1:4] == ["acme", "ci", "active"]


def test_errors_are_one_line_with_a_non_zero_status(lite: Cli) -> None:
    lite("create-tenant", "--name", "acme")
    assert "unknown tenant 'nope'" in lite.error("create-key", "--tenant", "nope", "--name", "x")
    assert "unknown tenant 'nope'" in lite.error("update-tenant", "nope", "--rpm", "1")
    assert "unknown tenant 'nope'" in lite.error("disable-tenant", "nope")
    assert "unknown tenant 'nope'" in lite.error("list-keys", "--tenant", "nope")
    assert "exists already" in lite.error("create-tenant", "--name", "acme")
    lite("create-tenant", "--name", "other")
    assert "exists already" in lite.error("update-tenant", "other", "--rename", "acme")

    assert "--rpm" in lite.error("create-tenant", "--name", "b", "--rpm", "ten", code=2)
    assert "--tpm" in lite.error("create-tenant", "--name", "b", "--tpm", "-5", code=2)
    assert "--rpm" in lite.error("create-tenant", "--name", "b", "--rpm", "none", code=2)
    assert "invalid tenant name" in lite.error("create-tenant", "--name", "a b", code=2)
    assert "--models" in lite.error("create-tenant", "--name", "b", "--models", "a b", code=2)
    args = ("create-key", "--tenant", "acme", "--name", "k")
    assert "--prompt-ttl" in lite.error(*args, "--prompt-ttl", "7 days", code=2)
    assert "--expires" in lite.error(*args, "--expires", "2001-01-01", code=2)
    assert "--expires" in lite.error(*args, "--expires", "soon", code=2)

    assert "unknown key nz_zzzzzzzz" in lite.error("revoke-key", "--prefix", "nz_zzzzzzzz")
    assert "unknown key" in lite.error("update-key", "--prefix", "nz_zzzzzzzz", "--rpm", "1")
    assert "--prefix" in lite.error("revoke-key", "--prefix", "abc", code=2)

    prefix = lite.json(*args)["prefix"]
    lite("revoke-key", "--prefix", prefix)
    lite("revoke-key", "--prefix", prefix)  # again: fine
    assert "is revoked" in lite.error("update-key", "--prefix", prefix, "--enable")


def test_a_whole_key_is_accepted_where_a_prefix_is_expected(lite: Cli) -> None:
    lite("create-tenant", "--name", "acme")
    created = lite.json("create-key", "--tenant", "acme", "--name", "k")
    lite("revoke-key", "--prefix", created["key"])
    assert lite.json("list-keys")[0]["status"] == "revoked"


def test_an_unmigrated_database_is_refused(cli: Cli) -> None:
    assert "nzgw migrate" in cli.error("list-tenants")


def test_unreachable_database(tmp_path: Path) -> None:
    cli = Cli("postgresql://postgres@127.0.0.1:1/nzgw", tmp_path)
    assert "unreachable" in cli.error("list-tenants")
    assert "unreachable" in cli.error("migrate")
    unwritable = Cli("sqlite:////proc/nzgw/no.db", tmp_path)
    assert "unavailable" in unwritable.error("list-tenants")


def test_invalid_configuration_exits_2(tmp_path: Path) -> None:
    cli = Cli("mysql://x", tmp_path)
    assert "DATABASE_URL" in cli.error("list-tenants", code=2)


def test_as_a_real_process(lite: Cli, sqlite_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in {**os.environ, **_env(sqlite_url, tmp_path)}.items() if v is not None}
    lite("create-tenant", "--name", "acme")

    def nzgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nzgw", *args], env=env, capture_output=True, text=True
        )

    created = nzgw("create-key", "--tenant", "acme", "--name", "k", "--json")
    assert created.returncode == 0, created.stderr
    assert set(json.loads(created.stdout)) == {"key", "prefix"}
    failed = nzgw("create-key", "--tenant", "nope", "--name", "k")
    assert failed.returncode == 1
    assert failed.stderr.strip() == "Error: unknown tenant 'nope'"


def test_tenant_weight(lite: Cli) -> None:
    assert lite.json("create-tenant", "--name", "acme")[0]["weight"] == 1
    assert lite.json("create-tenant", "--name", "big", "--weight", "3")[0]["weight"] == 3
    assert lite.json("update-tenant", "acme", "--weight", "5")[0]["weight"] == 5
    assert lite.json("update-tenant", "acme", "--rpm", "7")[0]["weight"] == 5  # untouched
    header, *rows = lite("list-tenants").stdout.splitlines()
    column = header.split().index("WEIGHT")
    assert [row.split()[column] for row in rows] == ["5", "3"]
    assert "--weight" in lite.error("create-tenant", "--name", "b", "--weight", "0", code=2)
    assert "--weight" in lite.error("update-tenant", "acme", "--weight", "1001", code=2)
