"""The one-reader queue behind every connection's incoming messages (voicebot/queues.py)."""

import asyncio

import pytest

from voicebot.queues import OneReaderQueue


async def test_items_come_out_in_order_and_an_emptied_queue_holds_nothing() -> None:
    queue: OneReaderQueue[str] = OneReaderQueue()
    for item in ("offer", "answer", "ice"):
        queue.put_nowait(item)

    assert queue.qsize() == 3
    assert [await queue.get() for _ in range(3)] == ["offer", "answer", "ice"]
    assert queue.empty() and queue.items is None


async def test_a_waiting_reader_gets_the_next_item() -> None:
    queue: OneReaderQueue[str] = OneReaderQueue()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)

    queue.put_nowait("hello")

    assert await asyncio.wait_for(reader, 1) == "hello"


async def test_a_reader_cancelled_while_an_item_arrives_leaves_it_for_the_next() -> None:
    queue: OneReaderQueue[str] = OneReaderQueue()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("kept")
    reader.cancel()

    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await asyncio.wait_for(queue.get(), 1) == "kept"


async def test_a_second_reader_at_once_is_refused() -> None:
    queue: OneReaderQueue[str] = OneReaderQueue()
    first = asyncio.create_task(queue.get())
    await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="another reader"):
        await queue.get()
    queue.put_nowait("for the first")
    assert await asyncio.wait_for(first, 1) == "for the first"
