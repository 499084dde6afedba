"""Hands lobby events to the channel layer, in order, without blocking the caller.

Services run in worker threads (database_sync_to_async). Sending from there
with async_to_sync would make the thread wait on the server's event loop, and
a thread caught waiting when the server stops keeps the process from exiting.
So, where a server loop is running, events are queued to one task on that loop,
which hands them to the channel layer in order: the order in which a process
publishes is the order in which everyone receives. Elsewhere (management commands, plain
sync code) they are sent directly. Once the server's loop has stopped, events
are dropped: no connection of this process is left to hear them.
"""

import asyncio
import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from lobbies import metrics

logger = logging.getLogger(__name__)

# ("group" | "channel", name, message)
Event = tuple[str, str, dict[str, Any]]


class Publisher:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        # Events, and futures that flush() waits on.
        self.queue: asyncio.Queue[Event | asyncio.Future] | None = None

    def attach(self) -> None:
        """Deliver through the running loop from now on. Call from async code."""
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        self.loop = loop
        self.queue = asyncio.Queue()
        loop.create_task(self.run(self.queue))

    def publish(self, event: Event) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            async_to_sync(deliver)(event)
        elif loop.is_running():
            loop.call_soon_threadsafe(self.queue.put_nowait, event)
        else:
            # The server is stopping; waiting for its loop would hang the exit.
            logger.warning("Server stopping; not published: %s", event[2]["type"])

    async def flush(self) -> None:
        """Wait until every event published so far in this process has been
        handed to the channel layer. Call from async code."""
        if self.queue is None or self.loop is not asyncio.get_running_loop():
            return
        # Events published from threads reach the queue through callbacks
        # already scheduled on this loop: let them run first.
        await asyncio.sleep(0)
        handed_over = self.loop.create_future()
        self.queue.put_nowait(handed_over)
        await handed_over

    async def run(self, queue: asyncio.Queue[Event | asyncio.Future]) -> None:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            # Started in order, and each reaches the channel layer before
            # anything in it waits (the Redis layer queues its PUBLISH at
            # once): they go out in order, all in one round trip, where
            # awaiting each in turn cost a round trip per event.
            deliveries = [asyncio.ensure_future(deliver(item)) for item in items if not isinstance(item, asyncio.Future)]
            await asyncio.gather(*deliveries)
            for item in items:
                if isinstance(item, asyncio.Future):
                    item.set_result(None)


async def deliver(event: Event) -> None:
    kind, name, message = event
    layer = get_channel_layer()
    operation = "group_send" if kind == "group" else "send"
    started = time.perf_counter()
    try:
        if kind == "group":
            await layer.group_send(name, message)
        else:
            await layer.send(name, message)
    except ChannelFull:
        metrics.layer_failed(operation, "full")
        logger.warning("Channel layer full; dropped %s to %s %s", message["type"], kind, name)
    except Exception:
        metrics.layer_failed(operation, "error")
        logger.exception("Could not publish %s to %s %s", message["type"], kind, name)
    else:
        metrics.layer_sent(operation, time.perf_counter() - started)


publisher = Publisher()
