"""Shared-model controls (`keep_alive`, load-time options) per tenant: stored on SQLite and
PostgreSQL (migration 0003), set and shown by the operator CLI, applied by the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from nzgw.ports import TenantChanges
from tests.harness import open_harness
from tests.test_cli_admin import Cli

STEERING = {
    "model": "llama3",
    "prompt": "",
    "stream": False,
    "keep_alive": 0,
    "options": {"num_ctx": 131072, "num_gpu": 0, "num_batch": 8, "temperature": 0.5},
}


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:  # sqlite and postgres
    return Cli(database_url, tmp_path)


def test_the_cli_sets_and_lists_the_policy(cli: Cli) -> None:
    cli("migrate")
    created = cli.json("create-tenant", "--name", "ops", "--model-controls")[0]
    assert created["allow_model_controls"] is True
    plain = cli.json("create-tenant", "--name", "acme")[0]
    assert plain["allow_model_controls"] is False
    table = cli("list-tenants").stdout
    assert "MODEL CONTROLS" in table
    lines = {line.split()[1]: line for line in table.splitlines()[1:]}
    assert "allowed" in lines["ops"] and "stripped" in lines["acme"]
    updated = cli.json("update-tenant", "ops", "--no-model-controls")[0]
    assert updated["allow_model_controls"] is False
    updated = cli.json("update-tenant", "acme", "--model-controls")[0]
    assert updated["allow_model_controls"] is True
    assert {t["name"]: t["allow_model_controls"] for t in cli.json("list-tenants")} == {
        "ops": False,
        "acme": True,
    }


async def test_controls_reach_the_backend_only_for_allowed_tenants(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        with trio.fail_after(30):
            stripped = await h.client.post("/api/generate", json=STEERING, headers=h.auth)
            assert stripped.status_code == 200
            # keep_alive:0 with an empty prompt would unload the model for everyone
            assert stripped.json()["done_reason"] == "load"
            seen = json.loads(h.emulator.requests[-1].body)
            assert "keep_alive" not in seen
            assert seen["options"] == {"temperature": 0.5, "num_predict": 4096}

            store = h.running.store
            ops = await store.create_tenant("ops")
            await store.update_tenant(ops.id, TenantChanges(allow_model_controls=True))
            key = await h.new_key(tenant="ops", name="ops-key")
            allowed = await h.client.post(
                "/api/generate", json=STEERING, headers={"Authorization": f"Bearer {key}"}
            )
            assert allowed.status_code == 200
            assert allowed.json()["done_reason"] == "unload"
            seen = json.loads(h.emulator.requests[-1].body)
            assert seen["keep_alive"] == 0
            assert seen["options"]["num_ctx"] == 131072 and seen["options"]["num_gpu"] == 0
