"""The engine thread never dies silently: faults outside a batch fail what is in flight, the loop
goes on, and when it truly cannot, every open stream ends with an error and `running` is False."""

from __future__ import annotations

import asyncio
import threading

import pytest

from layerserve.engine.async_engine import MAX_CONSECUTIVE_FAULTS, AsyncEngine
from layerserve.engine.core import INTERNAL_ERROR
from layerserve.engine.request import SamplingParams

from fakes import make_core

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


async def launch(core) -> AsyncEngine:
    engine, _ = await AsyncEngine.launch(lambda: (core, None))
    return engine


async def drain(stream) -> list:
    return [out async for out in stream]


async def test_a_raising_abort_does_not_kill_the_engine(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=256)
    real_abort = core.abort
    calls = []

    def abort_once(request_id, reason=None):
        calls.append(request_id)
        if len(calls) == 1:
            raise RuntimeError("injected abort fault")
        return real_abort(request_id)

    core.abort = abort_once
    engine = await launch(core)
    try:
        bystander = engine.add_request("bystander", [7, 8, 9], SamplingParams(max_tokens=900, temperature=0,
                                                                              ignore_eos=True))
        victim = engine.add_request("victim", [1, 2, 3], LONG)
        first = await victim.__anext__()
        assert not first.finished
        await victim.aclose()  # leaving the iterator early aborts: the abort raises on the engine thread
        for _ in range(1000):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == ["victim"]
        outs = await asyncio.wait_for(drain(bystander), 30)
        assert outs[-1].finished and outs[-1].error is None  # a request in flight beside it goes on
        assert sum(len(d.token_ids) for o in outs for d in o.deltas) == 900
        assert engine.running
        outs = await asyncio.wait_for(drain(engine.add_request("after", [4, 5, 6], SHORT)), 30)
        assert outs[-1].finished and outs[-1].error is None  # later requests are served
        assert "victim" not in core.groups and core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        await engine.stop()


async def test_a_fault_outside_a_batch_fails_only_what_is_in_flight(smollm_tokenizer):
    core = make_core(smollm_tokenizer, num_blocks=256)
    real_schedule = core.scheduler.schedule
    faults = []

    def schedule_once():
        if not faults:
            faults.append(1)
            raise RuntimeError("injected schedule fault")
        return real_schedule()

    core.scheduler.schedule = schedule_once
    engine = await launch(core)
    try:
        outs = await asyncio.wait_for(drain(engine.add_request("first", [1, 2, 3], SHORT)), 30)
        assert outs[-1].finished and outs[-1].error == INTERNAL_ERROR  # no exception text for clients
        outs = await asyncio.wait_for(drain(engine.add_request("second", [1, 2, 3], SHORT)), 30)
        assert outs[-1].error is None and engine.running
        assert core.kv.num_free_blocks == core.kv.num_blocks  # the failed request's blocks came back
    finally:
        await engine.stop()


async def test_when_recovery_keeps_failing_every_stream_ends_and_the_engine_reports_dead(smollm_tokenizer):
    gate = threading.Event()
    steps = []

    def hold_after_first_step(out):
        steps.append(out)
        if len(steps) > 1:
            gate.wait(30)  # the engine thread waits in its second forward until the faults are in

    core = make_core(smollm_tokenizer, num_blocks=256, hook=hold_after_first_step)

    def broken(*args, **kwargs):
        raise RuntimeError("injected persistent fault")

    engine = await launch(core)
    try:
        streams = [engine.add_request(f"r{i}", [1, 2, 3], LONG) for i in range(3)]
        for stream in streams:
            assert not (await stream.__anext__()).finished
        core.scheduler.schedule = broken
        core.fail_all = broken  # recovery fails too
        gate.set()
        for stream in streams:  # nobody waits forever
            outs = await asyncio.wait_for(drain(stream), 30)
            assert outs[-1].finished and outs[-1].error == INTERNAL_ERROR
        assert not engine.running and engine.dead_reason is not None
        assert str(MAX_CONSECUTIVE_FAULTS) in engine.dead_reason
        with pytest.raises(RuntimeError):
            engine.add_request("late", [1], SHORT)
    finally:
        await engine.stop()
