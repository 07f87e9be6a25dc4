"""The request channel between the worker thread and `Engine.generate`: events in order, the
error where the consumer reads, one release whoever ends the request, and a cancel when the
consumer's event loop is gone. (The text side, `OutputStream`, is tested through the engine:
test_engine*.py.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import CancelledError
from services.llm.domain import GenerationEvent
from services.llm.stream import RequestChannel


async def test_events_then_the_error_reach_the_consumer_and_the_end_releases_once() -> None:
    released: list[str] = []
    channel = RequestChannel(threading.Event(), on_end=lambda: released.append("version"))

    def worker() -> None:
        channel.send(GenerationEvent(text="a", token_ids=(1,)))
        channel.send(GenerationEvent(text="b", token_ids=(2,)))
        channel.finish(CancelledError("request cancelled after 2 tokens"))

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert released == ["version"]  # released before the consumer reads the end
    assert [(await channel.get()).text, (await channel.get()).text] == ["a", "b"]  # type: ignore[union-attr]
    with pytest.raises(CancelledError, match="after 2 tokens"):
        await channel.get()
    assert await channel.get() is None  # then the end


async def test_a_request_that_ends_well_ends_with_none() -> None:
    channel = RequestChannel(threading.Event(), on_end=lambda: None)
    await asyncio.to_thread(channel.finish)
    assert await channel.get() is None


def test_a_channel_whose_event_loop_is_gone_cancels_its_request() -> None:
    cancel = threading.Event()

    async def make() -> RequestChannel:
        return RequestChannel(cancel, on_end=lambda: None)

    channel = asyncio.run(make())  # the loop closes when asyncio.run returns
    channel.send(GenerationEvent(text="nobody reads this"))
    assert cancel.is_set()
