"""A queue for one reader, small enough to keep one per connection.

An asyncio.Queue holds four deques and an Event, about 3.2 KiB even when
empty, and every WebSocket connection has two: uvicorn's for what the client
sends, and the channel layer's for what the other connections send it.
Replacing both took an idle connection from about 31 to 26 KiB of server
memory (docs/performance.md#idle-connections).
"""

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class OneReaderQueue(Generic[T]):
    """The part of asyncio.Queue that uvicorn and the channel layer use
    (put_nowait, get, empty), for a single reader at a time, unbounded."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        # Only while it holds something: an empty deque is about 600 bytes,
        # and an idle connection's queues are empty.
        self.items: deque[T] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        if self.items is None:
            self.items = deque()
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> T:
        while not self.items:
            if self.waiter is not None:
                raise RuntimeError("OneReaderQueue: another reader is already waiting")
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.items.popleft()
        if not self.items:
            self.items = None
        return item

    def empty(self) -> bool:
        return not self.items

    def qsize(self) -> int:
        return len(self.items) if self.items else 0
