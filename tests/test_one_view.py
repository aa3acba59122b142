"""Issue #12 over real sockets: the backend runs exactly what the gateway checked and charged.

Each finding of the issue is a test here (they failed on the main of the time): folded and
duplicate keys on all ten model routes, caps normalised as Ollama reads them, image discounts
only in image fields, non-streamed answers held to the reservation, spend bounded by budget +
one reservation, shared-model controls stripped, no filesystem paths or other tenants' timing.
Plus from #11: every malformed body is a 400 in the caller's shape, logged and audited as 400;
and from #18: `/v1/completions` with a list of prompts is a clear OpenAI-shaped 400.

The emulator binds bodies like Go (case-insensitive keys, last wins), so a forwarded body that
smuggled a second spelling would run; the assertions check what the emulator received.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing

from nzgw.core.models import Budgets, Limits
from nzgw.http.bodies import THREAD_THRESHOLD
from nzgw.testing import EmulatorSettings
from tests.harness import Harness, open_harness
from tests.test_audit import flushed_rows

USER = [{"role": "user", "content": "hi"}]

# path, body without model, error shape
ROUTES: list[tuple[str, dict[str, Any], str]] = [
    ("/api/generate", {"prompt": "hi", "stream": False}, "native"),
    ("/api/chat", {"messages": USER, "stream": False}, "native"),
    ("/api/show", {}, "native"),
    ("/api/embed", {"input": "x"}, "native"),
    ("/api/embeddings", {"prompt": "x"}, "native"),
    ("/v1/chat/completions", {"messages": USER}, "openai"),
    ("/v1/completions", {"prompt": "x"}, "openai"),
    ("/v1/embeddings", {"input": "x"}, "openai"),
    ("/v1/responses", {"input": "x"}, "openai"),
    ("/v1/messages", {"max_tokens": 5, "messages": USER}, "anthropic"),
]


def assert_shape(response: httpx.Response, shape: str, status: int = 400) -> str:
    assert response.status_code == status, response.text
    doc = response.json()
    if shape == "native":
        assert set(doc) == {"error"} and isinstance(doc["error"], str)
        return str(doc["error"])
    if shape == "openai":
        assert doc["error"]["type"] == "invalid_request_error"
        return str(doc["error"]["message"])
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    return str(doc["error"]["message"])


def forwarded(h: Harness, path: str) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in h.emulator.requests if r.path == path and r.body]


def _raw(doc_text: str) -> bytes:
    return doc_text.encode()


async def test_a_second_spelling_of_model_is_refused_on_all_ten_routes(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        key = await h.new_key(name="llama-only", allowed_models=("llama3*", "all-minilm*"))
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with trio.fail_after(60):
            for path, extra, shape in ROUTES:
                fields = json.dumps(extra)[1:-1]
                sep = "," if fields else ""
                for spelling in ("MODEL", "Model", "mOdel"):
                    body = f'{{"model":"llama3"{sep}{fields},"{spelling}":"qwen3"}}'
                    response = await h.client.post(path, content=_raw(body), headers=auth)
                    message = assert_shape(response, shape)
                    assert "letter case" in message and "qwen3" not in message
                # the legacy field of /api/show folds too
                if path == "/api/show":
                    body = '{"name":"llama3","Name":"qwen3"}'
                    response = await h.client.post(path, content=_raw(body), headers=auth)
                    assert_shape(response, shape)
            assert not [r for r in h.emulator.requests if r.method == "POST"]
            # and the plain request still works, forwarding the checked model only
            ok = await h.client.post(
                "/api/generate",
                json={"model": "llama3", "prompt": "hi", "stream": False, "extra": 1},
                headers=auth,
            )
            assert ok.status_code == 200
            (seen,) = forwarded(h, "/api/generate")
            assert seen["model"] == "llama3" and "extra" not in seen and seen["stream"] is False
            finished = await h.wait_finished(32)
        refused = [i for i in finished if i.refusal == "bad_request"]
        assert len(refused) == 31 and all(i.status == 400 for i in refused)


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        (
            "/api/generate",
            '{"model":"llama3","prompt":"hi","stream":false,"Stream":true}',
            "native",
        ),
        (
            "/api/generate",
            '{"model":"llama3","prompt":"hi","options":{"num_predict":5},'
            '"Options":{"num_predict":-1}}',
            "native",
        ),
        (
            "/v1/chat/completions",
            '{"model":"llama3","messages":[],"max_tokens":5,"MAX_TOKENS":null}',
            "openai",
        ),
        ("/api/generate", '{"model":"llama3","prompt":"hi","\u017ftream":true}', "native"),
        (
            "/v1/chat/completions",
            '{"model":"llama3","messages":[],"max_to\u212aens":null}',
            "openai",
        ),
        ("/api/generate", '{"model":"llama3","stream":false,"stream":true}', "native"),
        (
            "/v1/messages",
            '{"model":"llama3","max_tokens":5,"messages":[{"role":"user","content":"a",'
            '"Content":"b"}]}',
            "anthropic",
        ),
    ],
)
async def test_unbilled_tokens_smuggled_by_a_second_spelling_are_refused(
    tmp_path: Path, path: str, body: str, shape: str
) -> None:
    async with open_harness(tmp_path) as h:
        with trio.fail_after(30):
            response = await h.client.post(path, content=body.encode(), headers=h.auth)
            assert_shape(response, shape)
            assert not forwarded(h, path)
            (info,) = await h.wait_finished(1)
        assert info.status == 400 and info.refusal == "bad_request"


async def test_a_fractional_cap_gets_the_default_cap_not_no_limit(tmp_path: Path) -> None:
    async with open_harness(
        tmp_path, default_max_tokens=20, settings=lambda _: EmulatorSettings(tokens_per_reply=300)
    ) as h:
        with trio.fail_after(30):
            for cap in (0.5, 0, -1, None, 1e30, 7.9):
                body = {"model": "llama3", "prompt": "x", "stream": False}
                body["options"] = {"num_predict": cap}
                response = await h.client.post("/api/generate", json=body, headers=h.auth)
                assert response.status_code == 200
                assert response.json()["eval_count"] == 20, cap
                assert forwarded(h, "/api/generate")[-1]["options"]["num_predict"] == 20
            chat = await h.client.post(
                "/v1/chat/completions",
                json={"model": "llama3", "messages": USER, "max_tokens": 0.5},
                headers=h.auth,
            )
            assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 20


CAPS: list[Any] = [0.5, 0, -1, None, 1e30, 2**40, 3, 50, 7.9, "absent"]
SURFACES: list[tuple[str, dict[str, Any], str]] = [
    ("/api/generate", {"prompt": "tell me"}, "options.num_predict"),
    ("/api/chat", {"messages": USER}, "options.num_predict"),
    ("/v1/chat/completions", {"messages": USER}, "max_tokens"),
    ("/v1/completions", {"prompt": "tell me"}, "max_tokens"),
    ("/v1/responses", {"input": "tell me"}, "max_output_tokens"),
    ("/v1/messages", {"messages": USER}, "max_tokens"),
]


async def test_no_sequence_of_requests_spends_more_than_budget_plus_one_reservation(
    tmp_path: Path,
) -> None:
    budget = 1_000
    default_cap = 60
    rng = random.Random(12)
    async with open_harness(
        tmp_path,
        default_max_tokens=default_cap,
        settings=lambda _: EmulatorSettings(tokens_per_reply=400),
    ) as h:
        key = await h.new_key(name="budgeted", budgets=Budgets(daily_tokens=budget))
        auth = {"Authorization": f"Bearer {key}"}
        refused = 0
        with trio.fail_after(120):
            for _ in range(60):
                path, extra, field = rng.choice(SURFACES)
                body: dict[str, Any] = {"model": "llama3", **extra}
                body["stream"] = rng.random() < 0.5
                cap = rng.choice(CAPS)
                if cap != "absent":
                    if field.startswith("options."):
                        body["options"] = {"num_predict": cap}
                    else:
                        body[field] = cap
                response = await h.client.post(path, json=body, headers=auth)
                assert response.status_code in (200, 429), response.text
                refused += response.status_code == 429
            finished = await h.wait_finished(60)
        served = [i for i in finished if i.status == 200]
        # every served request stayed within its own cap, and the cap was never "no limit"
        for info in served:
            assert info.usage is not None
            assert info.usage.completion_tokens <= max(default_cap, 50), info
        spent = sum(
            (i.usage.prompt_tokens if i.usage and i.usage.prompt_tokens else i.prompt_estimate)
            + (i.usage.completion_tokens if i.usage else 0)
            for i in served
        )
        one_reservation = max(i.prompt_estimate for i in served) + max(default_cap, 50)
        assert refused > 0  # the budget was reached
        assert spent <= budget + one_reservation


CAP_10: dict[str, Any] = {"options": {"num_predict": 10}}


async def test_a_data_prefix_is_not_an_image(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        key = await h.new_key(name="tpm", limits=Limits(tokens_per_minute=1000))
        auth = {"Authorization": f"Bearer {key}"}
        with trio.fail_after(30):
            for prompt in ("data:" + "a" * 40_000, "a" * 40_000):
                body = {"model": "llama3", "prompt": prompt, "stream": False, **CAP_10}
                response = await h.client.post("/api/generate", json=body, headers=auth)
                assert response.status_code == 429, prompt[:5]
            image = base64.b64encode(bytes(30_000)).decode()
            body = {"model": "llama3", "prompt": "x", "images": [image], "stream": False, **CAP_10}
            response = await h.client.post("/api/generate", json=body, headers=auth)
            assert response.status_code == 200  # a real image is still discounted


async def test_a_non_streamed_answer_is_held_to_the_reservation(tmp_path: Path) -> None:
    async with open_harness(
        tmp_path, settings=lambda _: EmulatorSettings(tokens_per_reply=200, ignore_caps=True)
    ) as h:
        with trio.fail_after(30):
            body = {"model": "llama3", "prompt": "x", "stream": False}
            body["options"] = {"num_predict": 5}
            response = await h.client.post("/api/generate", json=body, headers=h.auth)
            assert response.status_code == 502
            assert "reservation" in response.json()["error"]
            assert "tok199" not in response.text
            (info,) = await h.wait_finished(1)
        assert info.usage is not None and info.usage.completion_tokens == 5
        assert info.refusal == "reservation_exhausted"


async def test_show_and_ps_disclose_no_paths_or_other_tenants_timing(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        restricted = await h.new_key(name="restricted", allowed_models=("llama3*",))
        with trio.fail_after(30):
            show = await h.client.post("/api/show", json={"model": "llama3"}, headers=h.auth)
            assert show.status_code == 200
            modelfile = show.json()["modelfile"]
            assert "/usr/share" not in modelfile and "blobs" not in modelfile
            assert "\nFROM llama3\n" in modelfile
            assert show.json()["template"]  # the rest is untouched
            ps = await h.client.get("/api/ps", headers={"Authorization": f"Bearer {restricted}"})
            (entry,) = ps.json()["models"]
            assert entry["name"] == "llama3:latest"
            assert "expires_at" not in entry and "size_vram" not in entry
            operator = await h.client.get("/api/ps", headers=h.auth)
            assert all("expires_at" in m for m in operator.json()["models"])


MALFORMED = [
    ('{"model":"llama3","prompt":"\\ud800"}', "surrogate"),
    ('{"model":"llama3","prompt":"x","options":{"num_predict":1e400}}', "out of range"),
    ('{"model":"llama3","prompt":"x","format":' + "[" * 200 + "]" * 200 + "}", "deeper"),
    ('{"model":"llama3","prompt":' + "[" * 50_000 + "]" * 50_000 + "}", "deeper"),
    ('{"model":"llama3","prompt":"x","options":{"temperature":NaN}}', "NaN"),
    ('{"model":"llama3","prompt":"x","options":{"temperature":Infinity}}', "Infinity"),
    ('{"model":"llama3","prompt":"x","options":{"temperature":-Infinity}}', "Infinity"),
    ('{"model":"llama3","prompt":"a","prompt":"b"}', "duplicate"),
]


@pytest.mark.parametrize(("body", "marker"), MALFORMED)
async def test_malformed_bodies_are_the_clients_error(
    tmp_path: Path, body: str, marker: str
) -> None:
    async with open_harness(tmp_path) as h:
        with trio.fail_after(60):
            for path, shape in (
                ("/api/generate", "native"),
                ("/v1/completions", "openai"),
                ("/v1/messages", "anthropic"),
            ):
                response = await h.client.post(path, content=body.encode(), headers=h.auth)
                assert marker in assert_shape(response, shape)
            rows = await flushed_rows(h, 3)
        assert [i.status for i in h.finished] == [400, 400, 400]  # the access log's status
        assert sorted((r.event.status, r.event.refusal) for r in rows) == [(400, "bad_request")] * 3
        assert not [r for r in h.emulator.requests if r.method == "POST"]


async def test_openai_sdk_completions_with_a_prompt_list_is_a_clear_400(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        client = openai.OpenAI(base_url=f"{h.url}/v1", api_key=h.key, max_retries=0)
        h.cleanups.append(client.close)
        with trio.fail_after(30):
            with pytest.raises(openai.BadRequestError) as caught:
                await trio.to_thread.run_sync(
                    lambda: client.completions.create(model="llama3", prompt=["a", "b"])
                )
            assert "only one prompt" in str(caught.value)
            done = await trio.to_thread.run_sync(
                lambda: client.completions.create(model="llama3", prompt="a")
            )
            assert done.choices[0].text


async def test_the_emulator_binds_bodies_like_go(tmp_path: Path) -> None:
    """So that the tests above see what Ollama would: folded keys bind, the last one wins,
    `num_predict` is truncated to an int64 and `<= 0` means no limit."""
    async with open_harness(tmp_path) as h, httpx.AsyncClient(base_url=h.emulator.url) as direct:
        with trio.fail_after(30):
            body = (
                '{"model":"qwen3","MODEL":"llama3","stream":true,"\u017ftream":false,'
                '"options":{"num_predict":0.5},"prompt":"x"}'
            )
            response = await direct.post("/api/generate", content=body.encode())
            assert response.status_code == 200
            answer = response.json()  # one object: the folded `ſtream` (false) won
            assert answer["model"] == "llama3"
            assert answer["eval_count"] == 8  # int64(0.5) == 0: no limit
            doc = {"model": "llama3", "prompt": "x", "stream": False}
            doc["options"] = {"num_predict": 3.9}
            capped = await direct.post("/api/generate", json=doc)
            assert capped.json()["eval_count"] == 3


async def test_big_bodies_are_prepared_in_a_bounded_worker_thread(tmp_path: Path) -> None:
    """Causality, not timing: with the body workers' only token held, a big body waits for it
    while a small one (prepared inline) is answered; releasing the token lets the big one on."""
    async with open_harness(tmp_path) as h:
        limiter = trio.CapacityLimiter(1)
        h.running.gateway.body_workers = limiter
        holder = object()
        await limiter.acquire_on_behalf_of(holder)
        big = {"model": "llama3", "prompt": "a" * (THREAD_THRESHOLD + 1), "stream": False}
        big["options"] = {"num_predict": 2}
        small = {"model": "llama3", "prompt": "hi", "stream": False}
        answers: dict[str, httpx.Response] = {}

        async def send_big() -> None:
            answers["big"] = await h.client.post("/api/generate", json=big, headers=h.auth)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_big)
                while limiter.statistics().tasks_waiting == 0:
                    await trio.testing.wait_all_tasks_blocked()
                answers["small"] = await h.client.post("/api/generate", json=small, headers=h.auth)
                assert answers["small"].status_code == 200
                assert "big" not in answers
                limiter.release_on_behalf_of(holder)
        assert answers["big"].status_code == 200 and answers["big"].json()["eval_count"] == 2
