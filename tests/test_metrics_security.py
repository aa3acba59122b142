"""Issue #14, finding 5: `/metrics` can require a bearer token, and tenant names can be kept out
of it. (That compose binds it to the monitoring network only: tests/test_deploy_static.py.)"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import trio

from tests.harness import Harness, open_harness
from tests.metrics_samples import parse_exposition
from tests.test_audit import CHAT

TOKEN = "m3tricsTokenValue"


async def _get(h: Harness, headers: dict[str, str] | None = None) -> httpx.Response:
    bound = h.running.metrics
    assert bound is not None
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://{bound.host}:{bound.port}/metrics", headers=headers)


async def test_a_metrics_token_is_required_when_set(tmp_path: Path) -> None:
    async with open_harness(tmp_path, metrics_bind="127.0.0.1:0", metrics_token=TOKEN) as h:
        with trio.fail_after(30):
            missing = await _get(h)
            wrong = await _get(h, {"Authorization": "Bearer nope"})
            basic = await _get(h, {"Authorization": f"Basic {TOKEN}"})
            ok = await _get(h, {"Authorization": f"Bearer {TOKEN}"})
    for refused in (missing, wrong, basic):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "nzgw_" not in refused.text and TOKEN not in refused.text
    assert ok.status_code == 200 and "nzgw_requests_total" in ok.text


async def test_tenant_labels_can_be_turned_off(tmp_path: Path) -> None:
    tenant = f"hidden-{secrets.token_hex(4)}"
    async with open_harness(tmp_path, metrics_bind="127.0.0.1:0", metrics_tenant_labels=False) as h:
        with trio.fail_after(30):
            key = await h.new_key(tenant=tenant)
            answer = await h.client.post("/api/chat", json=CHAT, headers=_bearer(key))
            assert answer.is_success
            await h.wait_finished(1)
            text = (await _get(h)).text
    assert tenant not in text
    samples = parse_exposition(text)
    assert any(
        name.startswith("nzgw_tokens") and ("tenant", "_all") in labels
        for (name, labels) in samples
    )


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
