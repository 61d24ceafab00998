"""A client that goes away aborts its engine request at once, streaming or not."""

from __future__ import annotations

import asyncio
import time

import httpx

from api_helpers import CHAT, chat_body, metrics

LONG = {"max_tokens": 900, "ignore_eos": True}  # minutes of work if nobody aborted it


def wait_idle(http: httpx.Client, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(http)
        if values["layerserve:num_requests_running"] == 0 and values["layerserve:num_requests_waiting"] == 0:
            return values
        assert time.monotonic() < deadline, f"requests still in the engine: {values}"
        time.sleep(0.1)


async def abandon_streams(base_url: str, count: int, concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> None:
        async with limit:
            async with client.stream("POST", CHAT, json=chat_body(stream=True, **LONG)) as response:
                assert response.status_code == 200
                async for first in response.aiter_raw():
                    assert first.startswith(b"data: ")
                    break  # leaving the block closes the connection mid-stream

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))


def test_fifty_abandoned_streams(server, http):
    steps = wait_idle(http)["layerserve:engine_steps_total"]
    asyncio.run(abandon_streams(server.base_url, count=50, concurrency=10))
    values = wait_idle(http)
    assert values["layerserve:kv_cache_usage_perc"] == 0.0
    # had any stream run on, the engine would have stepped at least 900 times
    assert values["layerserve:engine_steps_total"] - steps < LONG["max_tokens"]
    after = http.post(CHAT, json=chat_body(max_tokens=4))
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


def test_non_stream_disconnect_aborts(server, http):
    steps = wait_idle(http)["layerserve:engine_steps_total"]
    try:
        httpx.post(f"{server.base_url}{CHAT}", json=chat_body(**LONG), timeout=1.0)
        raise AssertionError("a 900-token completion returned within a second")
    except httpx.ReadTimeout:
        pass  # httpx closes the connection
    values = wait_idle(http)
    assert values["layerserve:engine_steps_total"] - steps < LONG["max_tokens"]
