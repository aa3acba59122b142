"""The real `anthropic` Python SDK through the gateway's `/v1/messages` (issue #18, item 8).

What an Anthropic SDK user relies on: `request_id` is filled (from the `request-id` header),
every refusal raises the SDK's typed exception with Anthropic's own `error.type`
(`rate_limit_error` for limits and budgets alike), and `messages.count_tokens` answers (an
estimate). The SDK runs in a worker thread while the gateway runs in this test's Trio loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import pytest
import trio

from nzgw.core.models import Budgets, Limits
from tests.harness import Harness, open_harness

T = TypeVar("T")
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
REPLY = "".join(f"tok{i} " for i in range(8))


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(fn)


def error_body(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    return body


def client_for(h: Harness, key: str) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=h.url, api_key=key, max_retries=0)
    h.cleanups.append(client.close)
    return client


async def test_messages_carry_the_request_id_the_sdk_reads(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        client = client_for(h, h.key)
        settled = len(h.finished)
        message = await in_thread(
            lambda: client.messages.create(model="llama3", max_tokens=64, messages=MESSAGES)
        )
        assert "".join(b.text for b in message.content if b.type == "text") == REPLY
        assert message.usage.output_tokens == 8
        with trio.fail_after(10):  # settled after the answer was sent
            finished = await h.wait_finished(settled + 1)
        assert message._request_id is not None
        assert message._request_id == finished[settled].request_id

        def stream() -> tuple[str, str | None]:
            with client.messages.stream(model="llama3", max_tokens=64, messages=MESSAGES) as events:
                return "".join(events.text_stream), events.response.headers.get("request-id")

        text, streamed_id = await in_thread(stream)
        assert text == REPLY and streamed_id is not None and len(streamed_id) == 16


async def test_refusals_raise_typed_errors_with_anthropic_error_types(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        rpm = client_for(h, await h.new_key(name="rpm", limits=Limits(requests_per_minute=1)))
        await in_thread(
            lambda: rpm.messages.create(model="llama3", max_tokens=8, messages=MESSAGES)
        )
        with pytest.raises(anthropic.RateLimitError) as limited:
            await in_thread(
                lambda: rpm.messages.create(model="llama3", max_tokens=8, messages=MESSAGES)
            )
        body = error_body(limited.value)
        assert body == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": body["error"]["message"]},
            "request_id": limited.value.request_id,
        }
        assert limited.value.request_id is not None

        tpm = client_for(h, await h.new_key(name="tpm", limits=Limits(tokens_per_minute=10)))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await in_thread(
                lambda: tpm.messages.create(model="llama3", max_tokens=64, messages=MESSAGES)
            )
        assert error_body(limited.value)["error"]["type"] == "rate_limit_error"

        budget = client_for(h, await h.new_key(name="budget", budgets=Budgets(daily_tokens=1)))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await in_thread(
                lambda: budget.messages.create(model="llama3", max_tokens=8, messages=MESSAGES)
            )
        assert error_body(limited.value)["error"]["type"] == "rate_limit_error"

        with pytest.raises(anthropic.AuthenticationError) as denied:
            await in_thread(
                lambda: client_for(h, "nz_wrong").messages.create(
                    model="llama3", max_tokens=8, messages=MESSAGES
                )
            )
        assert error_body(denied.value)["error"]["type"] == "authentication_error"

        client = client_for(h, h.key)
        with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
            await in_thread(
                lambda: client.messages.create(model="nope", max_tokens=8, messages=MESSAGES)
            )
        assert error_body(forbidden.value)["error"]["type"] == "permission_error"


async def test_count_tokens_answers_an_estimate_without_touching_a_backend(
    tmp_path: Path,
) -> None:
    async with open_harness(tmp_path) as h:
        client = client_for(h, h.key)
        forwarded, settled = len(h.emulator.requests), len(h.finished)
        short = await in_thread(
            lambda: client.messages.count_tokens(model="llama3", messages=MESSAGES)
        )
        long: list[Any] = [{"role": "user", "content": "word " * 400}]
        longer = await in_thread(
            lambda: client.messages.count_tokens(model="llama3", messages=long, system="Be terse")
        )
        assert 0 < short.input_tokens < longer.input_tokens
        assert 500 <= longer.input_tokens <= 600  # 2,000 characters of text: about a quarter
        later = h.emulator.requests[forwarded:]  # discovery polls go on meanwhile
        assert [
            r.path for r in later if not r.path.startswith(("/api/tags", "/api/ps", "/api/version"))
        ] == []
        with pytest.raises(anthropic.PermissionDeniedError):
            await in_thread(lambda: client.messages.count_tokens(model="nope", messages=MESSAGES))
        with pytest.raises(anthropic.AuthenticationError):
            await in_thread(
                lambda: client_for(h, "nz_wrong").messages.count_tokens(
                    model="llama3", messages=MESSAGES
                )
            )
        with trio.fail_after(10):
            await h.wait_finished(settled + 4)
        counted = [i for i in h.finished if i.log_path == "/v1/messages/count_tokens"]
        assert [i.status for i in counted] == [200, 200, 403, 401]
        assert counted[0].model == "llama3:latest" and counted[0].backend is None
