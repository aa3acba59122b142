"""`nzgw audit`, `audit verify`, `usage`, `prompts show|purge` with click's CliRunner, on SQLite
and the real PostgreSQL. The database is filled by a real gateway (`tests/harness.py`) first;
raw SQL plays the attacker who edits or deletes audit rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from click.testing import CliRunner, Result

from nzgw.cli import main
from nzgw.services.audit import AuditLog
from tests.harness import open_harness
from tests.store.test_audit_contract import raw_sql

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


async def _populate(url: str, tmp_path: Path) -> dict[str, str]:
    """One gateway run: an ordinary request, an opted-in one, a forbidden model, a blocked
    endpoint. Returns their request ids and the two key prefixes."""
    async with open_harness(tmp_path, database_url=url) as h:
        logged = await h.new_key(
            name=f"logged-{tmp_path.name}", log_prompts=True, prompt_ttl_seconds=3600
        )
        logged_auth = {"Authorization": f"Bearer {logged}"}
        marked = {**CHAT, "messages": [{"role": "user", "content": "CLI-MARKER"}]}
        answers = {
            "ok": await h.client.post("/api/chat", json=CHAT, headers=h.auth),
            "logged": await h.client.post("/api/chat", json=marked, headers=logged_auth),
            "forbidden": await h.client.post(
                "/api/chat", json={**CHAT, "model": "nosuch"}, headers=h.auth
            ),
            "blocked": await h.client.post("/api/pull", json={}),
        }
        with trio.fail_after(30):
            await h.wait_finished(len(answers))
            audit = h.running.gateway.audit
            assert isinstance(audit, AuditLog)
            await audit.flush(h.running.store)
        ids = {name: r.headers["x-request-id"] for name, r in answers.items()}
        ids["prefix"], ids["logged_prefix"] = h.key[:11], logged[:11]
        return ids


def populate(url: str, tmp_path: Path) -> dict[str, str]:
    return trio.run(_populate, url, tmp_path)


def sql(url: str, statement: str, *params: Any) -> None:
    trio.run(raw_sql, url, statement, *params)


class Cli:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.env: dict[str, str | None] = {
            "DATABASE_URL": url,
            "NZGW_ENV_FILE": str(tmp_path / "no.env"),
            "NZGW_CONFIG": None,
        }

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(main, list(args), env=self.env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)


def test_audit_lists_newest_first_with_filters(database_url: str, tmp_path: Path) -> None:
    ids = populate(database_url, tmp_path)
    cli = Cli(database_url, tmp_path)

    rows = cli.json("audit")
    assert [r["request_id"] for r in rows] == [
        ids["blocked"],
        ids["forbidden"],
        ids["logged"],
        ids["ok"],
    ]
    ok = rows[3]
    assert (ok["tenant"], ok["key_prefix"], ok["status"], ok["outcome"]) == (
        "acme",
        ids["prefix"],
        200,
        "ok",
    )
    assert ok["backend"] == "backend-0" and ok["model"] == "llama3:latest"
    assert ok["prompt_tokens"] > 0 and ok["latency_ms"] > 0 and len(ok["hash"]) == 64

    refused = cli.json("audit", "--tenant", "acme", "--status", "4xx")
    assert [r["request_id"] for r in refused] == [ids["forbidden"]]  # blocked: no tenant
    assert cli.json("audit", "--status", "403") == [rows[0], rows[1]]
    assert [r["request_id"] for r in cli.json("audit", "--key", ids["logged_prefix"])] == [
        ids["logged"]
    ]
    assert len(cli.json("audit", "--limit", "1")) == 1
    assert len(cli.json("audit", "--since", "1h")) == 4
    assert cli.json("audit", "--until", "2000-01-01") == []

    table = cli("audit").stdout
    assert table.splitlines()[0].startswith("TIME (UTC)")
    assert ids["forbidden"] in table and "forbidden_model" in table and "backend-0" in table

    assert "unknown tenant" in cli("audit", "--tenant", "nobody", code=1).stderr
    assert "--status" in cli("audit", "--status", "4x", code=2).stderr
    assert "--since" in cli("audit", "--since", "yesterday", code=2).stderr


def test_audit_verify_detects_an_edited_and_a_deleted_row(
    database_url: str, tmp_path: Path
) -> None:
    populate(database_url, tmp_path / "one")
    populate(database_url, tmp_path / "two")
    cli = Cli(database_url, tmp_path)
    report = cli.json("audit", "verify")
    assert report["ok"] and len(report["chains"]) == 2
    assert [c["rows_verified"] for c in report["chains"]] == [4, 4]
    assert "ok      chain" in cli("audit", "verify").stdout

    first, second = (c["chain_id"] for c in report["chains"])
    sql(
        database_url,
        "UPDATE audit_log SET prompt_tokens = prompt_tokens + 1 WHERE chain_id = ? AND seq = 1",
        first,
    )
    sql(database_url, "DELETE FROM audit_log WHERE chain_id = ? AND seq = 3", second)

    result = cli("audit", "verify", code=1)
    assert f"BROKEN  chain {first} at seq 1: edited" in result.stdout
    assert f"BROKEN  chain {second} at seq 3: missing" in result.stdout
    assert "2 of 2 audit chains are broken" in result.stderr
    broken = cli.json("audit", "verify", code=1)
    assert [c["break"]["problem"] for c in broken["chains"]] == ["edited", "missing"]


def test_usage_reports_tokens_and_refusals(database_url: str, tmp_path: Path) -> None:
    ids = populate(database_url, tmp_path)
    cli = Cli(database_url, tmp_path)
    by_model = cli.json("usage", "--by", "model")
    assert [(r["model"], r["requests"], r["refusals"]) for r in by_model] == [
        ("llama3:latest", 2, 0),
        ("nosuch:latest", 0, 1),
    ]
    assert by_model[0]["prompt_tokens"] > 0 and by_model[0]["completion_tokens"] > 0
    (today,) = cli.json("usage", "--tenant", "acme", "--since", "1d")
    assert (today["requests"], today["refusals"]) == (2, 1)
    (month,) = cli.json("usage", "--by", "month")
    assert len(month["month"]) == 7
    (mine,) = cli.json("usage", "--key", ids["logged_prefix"], "--by", "model")
    assert (mine["model"], mine["requests"], mine["refusals"]) == ("llama3:latest", 1, 0)
    assert cli.json("usage", "--until", "2000-01-01") == []
    table = cli("usage", "--by", "model").stdout
    assert "llama3:latest" in table and table.splitlines()[-1].startswith("total")


def test_prompts_show_and_purge(database_url: str, tmp_path: Path) -> None:
    ids = populate(database_url, tmp_path)
    cli = Cli(database_url, tmp_path)

    shown = cli.json("prompts", "show", ids["logged"])
    assert isinstance(shown, dict) and "also" not in shown  # one request: one object
    assert "CLI-MARKER" in shown["request_body"] and "tok" in shown["response"]
    assert shown["key_prefix"] == ids["logged_prefix"] and shown["expires_at"] is not None
    sql(
        database_url,
        "UPDATE prompt_logs SET response_text = ? WHERE request_id = ?",
        "evil \x1b[2J\x9b31m end",
        ids["logged"],
    )
    text = cli("prompts", "show", ids["logged"]).stdout
    assert "CLI-MARKER" in text and "evil \\u001b[2J\\u009b31m end" in text
    assert "\x1b" not in text and "\x9b" not in text  # no terminal escapes reach the screen

    missing = cli("prompts", "show", ids["ok"], code=1)
    assert "no prompt log" in missing.stderr and missing.stdout == ""

    assert cli.json("prompts", "purge") == {"purged": 0}  # not expired yet
    sql(
        database_url,
        "UPDATE prompt_logs SET expires_at = created_at WHERE request_id = ?",
        ids["logged"],
    )
    assert "purged 1 expired prompt logs" in cli("prompts", "purge").stdout
    cli("prompts", "show", ids["logged"], code=1)
    assert len(cli.json("audit")) == 4  # the audit rows stay
