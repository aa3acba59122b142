"""The relay on its own, on virtual time: a fake upstream, a fake ticket. What users rely on:
a stalled backend ends the stream with an error frame, a backend that ignores the output cap is
cut at the reservation, and a long stream keeps its concurrency lease alive."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from nzgw.core import paths
from nzgw.core.framing import StreamKind, StreamWatcher
from nzgw.core.record import RequestInfo
from nzgw.ports import UpstreamError
from nzgw.services.forwarding import Relay


def frame(i: int, *, done: bool = False) -> bytes:
    doc: dict[str, object] = {
        "model": "m",
        "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": f"t{i} "},
        "done": done,
    }
    if done:
        doc |= {"done_reason": "stop", "prompt_eval_count": 3, "eval_count": i}
    return json.dumps(doc).encode() + b"\n"


class FakeUpstream:
    status = 200

    def __init__(self, chunks: Sequence[bytes | float | Exception], *, stall: bool = False):
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks = list(chunks)
        self.stall = stall

    def header(self, name: bytes) -> bytes | None:
        return None

    async def receive_some(self) -> bytes:
        while self.chunks:
            item = self.chunks.pop(0)
            if isinstance(item, float):
                await trio.sleep(item)
                continue
            if isinstance(item, Exception):
                raise item
            return item
        if self.stall:
            await trio.sleep_forever()
        return b""

    async def read_all(self, limit: int) -> bytes:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class FakeTicket:
    def __init__(self, every: float) -> None:
        self.headers: dict[str, str] = {}
        self.refresh_every = every
        self.refreshed_at: list[float] = []

    async def refresh(self) -> None:
        self.refreshed_at.append(trio.current_time())

    async def settle(self, info: RequestInfo) -> None:
        pass


def info() -> RequestInfo:
    route = paths.classify("POST", "/api/chat")
    assert isinstance(route, paths.Route)
    return RequestInfo("rid", "POST", route, "127.0.0.1", 0.0, time.time())


async def relay_all(relay: Relay) -> bytes:
    return b"".join([chunk async for chunk in relay])


def relay(upstream: FakeUpstream, record: RequestInfo, **kwargs: object) -> Relay:
    watcher = StreamWatcher(StreamKind.NDJSON)
    first = upstream.chunks.pop(0)
    assert isinstance(first, bytes)
    return Relay(upstream, first, watcher, record, StreamKind.NDJSON, **kwargs)  # type: ignore[arg-type]


async def test_a_whole_stream_passes_through_unchanged() -> None:
    chunks = [frame(0), frame(1) + frame(2), frame(3, done=True)]
    record = info()
    out = await relay_all(relay(FakeUpstream(list(chunks)), record))
    assert out == b"".join(chunks)
    assert record.outcome == "ok" and record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (3, 3)


@pytest.mark.parametrize("ending", [UpstreamError("reset"), None], ids=["error", "eof"])
async def test_an_unterminated_stream_ends_with_an_error_frame(ending: Exception | None) -> None:
    chunks: list[bytes | float | Exception] = [frame(0), frame(1)]
    if ending is not None:
        chunks.append(ending)
    record = info()
    out = await relay_all(relay(FakeUpstream(chunks), record))
    last = json.loads(out.splitlines()[-1])
    assert set(last) == {"error"} and record.outcome == "upstream_truncated"
    assert record.usage is not None and record.usage.completion_tokens == 2
    assert not record.usage.reported


async def test_a_stalled_backend_is_cut_after_the_stall_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    record = info()
    started = trio.current_time()
    out = await relay_all(relay(FakeUpstream([frame(0)], stall=True), record, stall_timeout=30.0))
    assert trio.current_time() - started == pytest.approx(30.0)
    assert json.loads(out.splitlines()[-1]) == {"error": "the model server stopped sending"}
    assert record.outcome == "upstream_truncated"


async def test_a_backend_ignoring_the_cap_is_cut_at_the_reservation() -> None:
    chunks: list[bytes | float | Exception] = [frame(i) for i in range(50)]
    record = info()
    out = await relay_all(relay(FakeUpstream(chunks), record, max_frames=10))
    lines = out.splitlines()
    assert len(lines) == 12  # 11 frames (the 11th crosses the line) and the error frame
    assert json.loads(lines[-1]) == {"error": "this request used up its token reservation"}
    assert record.outcome == "reservation_exhausted"
    assert record.usage is not None and record.usage.completion_tokens == 11


async def test_a_long_stream_keeps_extending_its_lease(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    chunks: list[bytes | float | Exception] = [frame(0)]
    for i in range(1, 10):
        chunks += [15.0, frame(i)]
    chunks.append(frame(10, done=True))
    ticket = FakeTicket(every=40.0)
    started = trio.current_time()
    record = info()
    await relay_all(relay(FakeUpstream(chunks), record, ticket=ticket, stall_timeout=60.0))
    assert record.outcome == "ok"
    # 135 s of stream, refreshed at the first chunk after each 40 s mark
    assert [round(t - started) for t in ticket.refreshed_at] == [45, 90, 135]
