"""Real clients through the gateway: the `ollama` and `openai` Python packages, sync and async,
streaming and not, against the emulator. They run in worker threads (their async flavours on
asyncio, in a thread of their own) while the gateway runs in this test's Trio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ollama
import openai
import pytest
import trio

from tests.harness import Harness, open_harness

T = TypeVar("T")
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
REPLY = "".join(f"tok{i} " for i in range(8))


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def ollama_client(h: Harness) -> ollama.Client:
    return ollama.Client(host=h.url, headers=h.auth)


def openai_client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key=h.key, max_retries=0)


async def test_ollama_client_chat_generate_embed_list_show(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        client = ollama_client(h)
        h.cleanups.append(client.close)
        chat = await in_thread(lambda: client.chat(model="llama3", messages=MESSAGES))
        assert chat.message.content == REPLY and chat.done
        assert chat.prompt_eval_count and chat.eval_count == 8

        def stream_chat() -> list[Any]:
            return list(client.chat(model="llama3", messages=MESSAGES, stream=True))

        parts = await in_thread(stream_chat)
        assert "".join(p.message.content or "" for p in parts) == REPLY and parts[-1].done

        gen = await in_thread(lambda: client.generate(model="llama3", prompt="Hi"))
        assert gen.response == REPLY

        def stream_generate() -> str:
            return "".join(
                p.response or "" for p in client.generate(model="llama3", prompt="Hi", stream=True)
            )

        assert await in_thread(stream_generate) == REPLY
        embed = await in_thread(lambda: client.embed(model="all-minilm", input=["a", "b"]))
        assert len(embed.embeddings) == 2
        listed = await in_thread(client.list)
        assert {m.model for m in listed.models} == {
            "llama3:latest",
            "qwen3:latest",
            "all-minilm:latest",
        }
        shown = await in_thread(lambda: client.show("llama3"))
        assert shown.details is not None and shown.details.family == "llama"

        with pytest.raises(ollama.ResponseError) as info:
            await in_thread(lambda: client.chat(model="nope", messages=MESSAGES))
        assert info.value.status_code == 403
        with pytest.raises(ollama.ResponseError) as info:
            await in_thread(lambda: client.pull("llama3"))
        assert info.value.status_code == 403
        assert not [r for r in h.emulator.requests if r.path.startswith("/api/pull")]


async def test_ollama_async_client(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:

        async def session() -> tuple[str, str]:
            async with ollama.AsyncClient(host=h.url, headers=h.auth) as client:
                whole = await client.chat(model="llama3", messages=MESSAGES)
                streamed = ""
                stream = await client.chat(model="llama3", messages=MESSAGES, stream=True)
                async for part in stream:
                    streamed += part.message.content or ""
            return whole.message.content or "", streamed

        whole, streamed = await in_thread(lambda: asyncio.run(session()))
        assert whole == streamed == REPLY


async def test_openai_client_chat_completions_embeddings_models(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        client = openai_client(h)
        h.cleanups.append(client.close)
        chat = await in_thread(
            lambda: client.chat.completions.create(model="llama3", messages=MESSAGES)
        )
        assert chat.choices[0].message.content == REPLY
        assert chat.usage is not None and chat.usage.completion_tokens == 8

        def stream_chat(include_usage: bool) -> list[Any]:
            options: Any = {"include_usage": True} if include_usage else openai.omit
            return list(
                client.chat.completions.create(
                    model="llama3", messages=MESSAGES, stream=True, stream_options=options
                )
            )

        chunks = await in_thread(lambda: stream_chat(False))
        # nzgw asked the backend for usage on the client's behalf and removed it again:
        assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
        chunks = await in_thread(lambda: stream_chat(True))
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 8

        completion = await in_thread(
            lambda: client.completions.create(model="llama3", prompt="Once")
        )
        assert completion.choices[0].text == REPLY

        def stream_completion() -> str:
            return "".join(
                c.choices[0].text
                for c in client.completions.create(model="llama3", prompt="Once", stream=True)
                if c.choices
            )

        assert await in_thread(stream_completion) == REPLY
        embeddings = await in_thread(
            lambda: client.embeddings.create(model="all-minilm", input=["x", "y"])
        )
        assert len(embeddings.data) == 2 and embeddings.usage.prompt_tokens > 0
        models = await in_thread(lambda: [m.id for m in client.models.list()])
        assert sorted(models) == ["all-minilm:latest", "llama3:latest", "qwen3:latest"]
        model = await in_thread(lambda: client.models.retrieve("llama3"))
        assert model.id == "llama3:latest"  # the canonical id, as the list shows it

        with pytest.raises(openai.PermissionDeniedError):
            await in_thread(lambda: client.chat.completions.create(model="nope", messages=MESSAGES))
        bad = openai.OpenAI(base_url=f"{h.url}/v1", api_key="nz_wrong", max_retries=0)
        h.cleanups.append(bad.close)
        with pytest.raises(openai.AuthenticationError):
            await in_thread(lambda: bad.models.list())

        # every request was settled with the backend's real counts
        infos = [i for i in h.finished if i.log_path == "/v1/chat/completions" and i.status == 200]
        assert len(infos) == 3
        assert all(i.usage and i.usage.reported and i.usage.completion_tokens == 8 for i in infos)


async def test_openai_async_client(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:

        async def session() -> tuple[str, str]:
            client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=h.key, max_retries=0)
            whole = await client.chat.completions.create(model="llama3", messages=MESSAGES)
            streamed = ""
            stream = await client.chat.completions.create(
                model="llama3", messages=MESSAGES, stream=True
            )
            async for chunk in stream:
                streamed += chunk.choices[0].delta.content or ""
            await client.close()
            return whole.choices[0].message.content or "", streamed

        whole, streamed = await in_thread(lambda: asyncio.run(session()))
        assert whole == streamed == REPLY
